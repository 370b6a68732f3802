#pragma once
// All-gather extensions (FSDP2's fsdp_pre_all_gather / fsdp_post_all_gather):
// a param decides what crosses the wire when its unit gathers, e.g. a
// quantised or low-precision copy, several tensors (data and scales), and how
// the unsharded param is rebuilt from what was gathered. Gradients are not
// affected: the unsharded param's grad is reduce-scattered as usual (in
// reduce_dtype, else the param's own dtype) into the sharded grad.
//
//   struct Bf16Gather : fsdp::AllGatherExtension {
//     fsdp::AllGatherInputs pre_all_gather(const at::Tensor&, const fsdp::AllGatherContext& c) override {
//       return {{c.padded_shard.to(at::kBFloat16)}, {}};
//     }
//     at::Tensor post_all_gather(const std::vector<at::Tensor>& g, const std::any&, at::ScalarType dtype,
//                                const std::optional<at::Tensor>& out) override {
//       if (out) return out->copy_(g[0]);   // later gathers: in place
//       return g[0].to(dtype);              // the first: allocate
//     }
//   };
//   options.all_gather_extensions["lin.weight"] = std::make_shared<Bf16Gather>();
//   engine.fully_shard(block, options);
//
// Thread-safety: the engine calls an extension from its rank's thread or
// fiber only; an extension object shared by several ranks' params must be
// thread-safe (or give each rank its own).

#include <torch/nn/module.h>

#include <any>
#include <optional>
#include <string>
#include <vector>

namespace fsdpsim::fsdp {

struct MixedPrecisionPolicy;

/// What pre_all_gather knows of the param and its unit.
struct AllGatherContext {
  std::string fqn;  ///< as Unit::param_fqns() names it (from the root once the first forward found it)
  const torch::nn::Module* module = nullptr;  ///< the unit's module
  std::vector<int64_t> outer_size;            ///< the whole (unsharded) param's shape
  std::vector<int64_t> outer_stride;          ///< its contiguous strides
  /// {ceil(dim0 / shard_world), rest...}: the shape every rank's shard has
  /// once padded. A param whose dim 0 the shard world does not divide must
  /// gather tensors with exactly padded_shard_size[0] rows (every rank alike).
  std::vector<int64_t> padded_shard_size;
  /// This rank's rows zero-padded to padded_shard_size (the engine's storage:
  /// read, never write).
  at::Tensor padded_shard;
  int shard_rank = 0;                               ///< the shard axis only: HybridShard's replicas are not seen
  int shard_world = 1;                              ///< the shard group's size
  const MixedPrecisionPolicy* mp_policy = nullptr;  ///< the unit's policy
};

/// What pre_all_gather hands the engine to gather.
struct AllGatherInputs {
  /// Any number (at least one), any dtype; every rank returns the same
  /// number, shapes and dtypes (else the all-gather fails as a collective
  /// mismatch naming the unit).
  std::vector<at::Tensor> tensors;
  /// Handed back, untouched, to this rank's post_all_gather of the same gather.
  std::any metadata;
};

/// Per-param hooks around the unit's all-gather (FSDP2's tensor-subclass
/// methods fsdp_pre_all_gather / fsdp_post_all_gather). Registered with
/// FullyShardOptions::all_gather_extensions.
class AllGatherExtension {
 public:
  virtual ~AllGatherExtension() = default;
  /// Called at each all-gather of the unit. `shard` is this rank's rows of the
  /// param (unpadded; empty past the end), in the param's own dtype.
  virtual AllGatherInputs pre_all_gather(const at::Tensor& shard, const AllGatherContext& context) = 0;
  /// Rebuilds the unsharded param. gathered[i] holds every rank's tensors[i],
  /// concatenated on dim 0 in rank order: shape {shard_world * size(0),
  /// rest...} ({shard_world} for a 0-dim input), padded rows included.
  /// `param_dtype` is the unit's mp_policy.param_dtype where it applies, else
  /// the param's own dtype. The result has the param's outer size, or more
  /// dim-0 rows (the padding, dropped by the engine).
  ///
  /// `out`: unset at the param's first gather; afterwards the tensor that
  /// first call returned, storage re-allocated (the engine frees it at each
  /// reshard, as FSDP2 does): fill it in place and return it (the engine
  /// checks that the storage is out's). Its autograd version counter is
  /// restored after the write (FSDP2's; the param Variable has its own).
  virtual at::Tensor post_all_gather(const std::vector<at::Tensor>& gathered, const std::any& metadata,
                                     at::ScalarType param_dtype, const std::optional<at::Tensor>& out) = 0;
};

}  // namespace fsdpsim::fsdp
