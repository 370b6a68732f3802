#pragma once
// Model and optimiser state dicts of a sharded model, and the full state dict
// file Python's torch.load reads (torch.distributed.checkpoint.state_dict's
// get/set_model_state_dict and get/set_optimizer_state_dict for the engine).
//
//   fsdp::StateDict sharded = fsdp::get_model_state_dict(engine, *model);   // shards, no copy
//   fsdp::StateDictOptions full;  full.full_state_dict = true;
//   fsdp::StateDict gathered = fsdp::get_model_state_dict(engine, *model, full);
//   fsdp::save_full_state_dict("model.pt", fsdp::to_tensors(gathered));   // torch.load reads it
//   fsdp::set_model_state_dict(engine, *model, fsdp::from_tensors(fsdp::load_full_state_dict("model.pt")), full);
//   // model.pt from Python: torch.save(dict(model.state_dict()), "model.pt")
//
// Keys are the FQNs of the unwrapped model, in the order Python's
// Module.state_dict() lists them (each module in pre-order: its params, then
// its buffers). Every value is a ShardedTensor: a sharded dict holds each
// rank's rows of a param (sharing storage with it) with the global shape and
// the chunk layout; a full dict holds whole tensors (one chunk). Buffers and
// params no unit manages are whole in both.
//
// Collectives: getting a full dict, and loading one with
// broadcast_from_rank0, issue collectives over the units' groups, in key
// order: every rank of the world must call alike. Sharded dicts issue none.
//
// Thread-safety: as the Engine (one rank's thread or fiber); the file
// functions are reentrant.

#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/ordered_dict.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "fsdp/fully_shard.h"

namespace fsdpsim::fsdp {

/// One chunk of a tensor: where its element [0, ..., 0] sits in the global
/// tensor, and its shape (dim 0 may be 0: a rank past the last row).
struct ChunkMeta {
  std::vector<int64_t> offsets;
  std::vector<int64_t> sizes;
};

/// A state dict value: this rank's chunk of a (possibly sharded) tensor.
/// `chunks` lists every chunk of the tensor, one per rank of the shard group
/// in rank order (HSDP replicas hold the same chunks again); `local` is
/// chunks[i] for this rank's i. A whole tensor has one chunk.
struct ShardedTensor {
  at::Tensor local;
  std::vector<int64_t> global_shape;
  std::vector<int64_t> offsets;
  std::vector<ChunkMeta> chunks;

  /// `local` is the whole tensor.
  bool is_full() const;
  /// A whole tensor as a one-chunk ShardedTensor.
  static ShardedTensor whole(at::Tensor tensor);
};

using StateDict = torch::OrderedDict<std::string, ShardedTensor>;
using TensorDict = torch::OrderedDict<std::string, at::Tensor>;

/// torch.distributed.checkpoint.state_dict.StateDictOptions.
struct StateDictOptions {
  /// Gather every param (and optimiser state) into whole tensors; else each
  /// rank's shards.
  bool full_state_dict = false;
  /// Full dicts: values on the CPU. As in PyTorch, full + cpu_offload also
  /// means rank 0 only unless rank0_only says otherwise.
  bool cpu_offload = false;
  /// Full dicts: only the rank that is rank 0 of every unit's shard (and
  /// replicate) group gets the values; the others join the gathers and get an
  /// empty dict. Unset: full_state_dict && cpu_offload (PyTorch's rule).
  std::optional<bool> rank0_only;
  /// Loading a full dict: rank 0 (as above) holds it, the other ranks pass
  /// an empty one; each tensor is broadcast and every rank keeps its rows.
  bool broadcast_from_rank0 = false;
  /// Loading: every key of the model must be in the dict and no other key.
  /// Shapes are always checked.
  bool strict = true;
};

/// The model's params and buffers. Needs every unit resharded (between
/// steps); throws std::runtime_error naming a unit still gathered.
StateDict get_model_state_dict(Engine& engine, const torch::nn::Module& root, const StateDictOptions& options = {});

/// Writes `state` into the model in place (params keep their Tensor
/// identity). A sharded dict must have this model's layout (same global
/// shapes and this rank's offsets: the same world and strategy); a full dict
/// (full_state_dict) any layout. Throws std::invalid_argument naming the key,
/// the shapes and the fix for a missing or unexpected key (strict) or a shape
/// that does not match; a full dict's errors are found on rank 0 when
/// broadcasting and raised on every rank.
void set_model_state_dict(Engine& engine, const torch::nn::Module& root, const StateDict& state,
                          const StateDictOptions& options = {});

/// One param group: its hyperparameters (PyTorch's names: lr, momentum,
/// dampening, weight_decay, nesterov, betas, eps, amsgrad) and its params'
/// FQNs.
struct ParamGroupState {
  std::map<std::string, c10::IValue> options;
  std::vector<std::string> params;
};

/// get_optimizer_state_dict's layout: state[fqn][name] (SGD: momentum_buffer;
/// Adam/AdamW: step, exp_avg, exp_avg_sq, max_exp_avg_sq with amsgrad), only
/// for params the optimiser has state for; `step` a 0-dim float tensor as
/// PyTorch keeps it.
struct OptimizerStateDict {
  torch::OrderedDict<std::string, torch::OrderedDict<std::string, ShardedTensor>> state;
  std::vector<ParamGroupState> param_groups;
};

/// Supports torch::optim::SGD, Adam and AdamW (std::invalid_argument for
/// others). Collectives as get_model_state_dict.
OptimizerStateDict get_optimizer_state_dict(Engine& engine, const torch::nn::Module& root,
                                            const torch::optim::Optimizer& optimizer,
                                            const StateDictOptions& options = {});

/// Writes the state into the optimiser (creating its per-param state where it
/// has none yet) and the groups' hyperparameters. strict: every param of the
/// optimiser's groups must appear in param_groups, grouped alike.
void set_optimizer_state_dict(Engine& engine, const torch::nn::Module& root, torch::optim::Optimizer& optimizer,
                              const OptimizerStateDict& state, const StateDictOptions& options = {});

/// A full dict's tensors (std::invalid_argument for a chunk that is not whole).
TensorDict to_tensors(const StateDict& state);
StateDict from_tensors(const TensorDict& tensors);

/// Writes a file Python reads with torch.load(path, weights_only=True) as a
/// plain {str: Tensor} dict (torch.save's zip layout; dicts untagged, so no
/// safe_globals allowance is needed). Tensors are saved contiguous on the CPU.
void save_full_state_dict(const std::string& path, const TensorDict& tensors);
/// Reads a file Python's torch.save(model.state_dict(), path) wrote (an
/// OrderedDict, or a plain dict; fsdp/torch_save.h reads it), or
/// save_full_state_dict. Throws std::runtime_error naming the path for a
/// missing, truncated or foreign file or a value that is not a tensor.
TensorDict load_full_state_dict(const std::string& path);

}  // namespace fsdpsim::fsdp
