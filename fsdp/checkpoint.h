#pragma once
// Activation checkpointing for LibTorch's C++ API (which has no
// torch.utils.checkpoint): fsdp::checkpoint runs a function without keeping
// its activations and runs it again in backward to get them back.
//
//   struct Block : torch::nn::Module {
//     at::Tensor forward(const at::Tensor& x) {
//       return fsdp::checkpoint([this](const at::Tensor& in) { return mlp(in); }, x);
//     }
//   };
//   engine.fully_shard(block, options);   // checkpoint inside the unit
//
// Inside a unit (FSDP2's fully_shard(checkpoint_wrapper(block))), the first
// run happens in the unit's forward and the recompute in the unit's backward,
// after its pre-backward gathered the params: both see the full params, and
// the recompute costs no collective (the unit gathers in backward anyway).
// A unit called inside the checkpointed function is refused (its gathers
// would run again in backward, outside the engine's order).
//
// Backward: the function is recomputed with grad enabled on detached copies
// of the inputs and backpropagated at once (a nested pass on LibTorch's
// engine, also from fiber ranks' sim::backward: the region must not block on
// a collective); parameters' grads accumulate through their AccumulateGrad
// nodes as without checkpointing, the inputs' grads flow on. Same ops, same
// order: the grads are bitwise those of the run without checkpointing.
//
// Thread-safety: call from the rank (thread or fiber) that owns the module;
// a checkpointed region must not yield to another fiber.

#include <ATen/Tensor.h>

#include <functional>
#include <vector>

namespace fsdpsim::fsdp {

struct CheckpointOptions {
  /// Restore the CPU generator's state for the recompute, so dropout draws
  /// the same masks as the first run (torch.utils.checkpoint's default).
  bool preserve_rng_state = true;
};

using CheckpointFunction = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;

/// fn(inputs), keeping only `inputs` for backward. Without grad mode a plain
/// call. Throws std::runtime_error if the recompute returns other outputs
/// (count, shapes) than the first run.
std::vector<at::Tensor> checkpoint(const CheckpointFunction& fn, const std::vector<at::Tensor>& inputs,
                                   const CheckpointOptions& options = {});
at::Tensor checkpoint(const std::function<at::Tensor(const at::Tensor&)>& fn, const at::Tensor& input,
                      const CheckpointOptions& options = {});

namespace detail {
/// True while a checkpointed function runs on this thread (first run or
/// recompute): the engine refuses to start a unit's forward there.
bool in_checkpoint_region();
}  // namespace detail

}  // namespace fsdpsim::fsdp
