#pragma once
// Auto-wrap: choose the units of a model by a policy instead of listing them.
//
//   fsdp::apply_fully_shard(engine, model.ptr(), options,
//                           fsdp::wrap_module_types({"torch::nn::TransformerEncoderLayerImpl"}));
//
// apply_fully_shard walks the module tree depth first, children before their
// parent (post-order, in registration order), calls engine.fully_shard on
// every module the policy picks, then on the root. It mirrors FSDP1's
// `_recursive_wrap` (torch/distributed/fsdp/wrap.py): before a module's
// children are visited the policy decides whether to look inside it
// (should_recurse), after them whether to make it a unit (should_wrap); each
// call sees the module's params that no unit has taken yet. Every unit must
// still run its forward through fsdp::call (a module whose parent calls it
// directly cannot be a unit: the engine refuses it at the first forward).
//
// Thread-safety: policies are immutable once built and may be shared by the
// ranks' threads; apply_fully_shard runs on the rank that owns `engine`.

#include <torch/nn/module.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "fsdp/fully_shard.h"

namespace fsdpsim::fsdp {

/// A module apply_fully_shard is deciding about.
struct WrapCandidate {
  const torch::nn::Module& module;
  /// Its path from the root ("" for the root).
  const std::string& fqn;
  /// Elements of the params in its subtree that no unit holds yet (each
  /// TensorImpl once): before its children are visited in should_recurse,
  /// what they left in should_wrap.
  int64_t unwrapped_numel;
};

class WrapPolicy {
 public:
  virtual ~WrapPolicy() = default;
  /// Whether to visit the module's children (the default: always).
  virtual bool should_recurse(const WrapCandidate& candidate) const;
  /// Whether to make the module a unit, once its children are done.
  virtual bool should_wrap(const WrapCandidate& candidate) const = 0;
};
using WrapPolicyPtr = std::shared_ptr<const WrapPolicy>;

/// Wraps the modules for which `pick(module, fqn)` is true (a custom callable).
WrapPolicyPtr wrap_modules_where(std::function<bool(const torch::nn::Module& module, const std::string& fqn)> pick);

/// Wraps the modules whose name() (the demangled class name unless the
/// module set its own, e.g. "torch::nn::LinearImpl") is in `type_names`.
WrapPolicyPtr wrap_module_types(std::set<std::string> type_names);

/// Wraps the modules of any of the given Impl classes (dynamic_cast; derived
/// classes count), e.g. wrap_module_types<torch::nn::TransformerEncoderLayerImpl>().
template <typename... ModuleImpls>
WrapPolicyPtr wrap_module_types() {
  static_assert(sizeof...(ModuleImpls) > 0, "name at least one module type");
  return wrap_modules_where([](const torch::nn::Module& module, const std::string&) {
    return ((dynamic_cast<const ModuleImpls*>(&module) != nullptr) || ...);
  });
}

/// FSDP1's size_based_auto_wrap_policy: a module is looked into when its
/// unwrapped params reach min_num_params (unless its type is a forced leaf),
/// and wrapped when what its children left still does (unless its type is
/// excluded). Types are module name()s, as wrap_module_types (some LibTorch
/// modules name themselves: MultiheadAttention is "torch::nn::MultiheadAttention").
struct SizeWrapOptions {
  int64_t min_num_params = 100000000;  ///< FSDP1's default, 1e8
  std::set<std::string> force_leaf_types = {"torch::nn::MultiheadAttention"};
  /// Containers without a forward of their own.
  std::set<std::string> exclude_types = {"torch::nn::ModuleListImpl", "torch::nn::ModuleDictImpl"};
};
WrapPolicyPtr wrap_by_size(SizeWrapOptions options);

/// Shards `root`'s tree: engine.fully_shard(module, options) on every
/// module `policy` picks, children before parents, then on `root` itself.
/// Modules that are already units of any engine are neither looked into nor
/// wrapped again (a root already a unit is left as it is). Returns the
/// modules made units, in fully_shard order (the root last when wrapped
/// here). Throws std::invalid_argument for a null root or policy, and what
/// fully_shard throws.
std::vector<std::shared_ptr<torch::nn::Module>> apply_fully_shard(Engine& engine,
                                                                  const std::shared_ptr<torch::nn::Module>& root,
                                                                  const FullyShardOptions& options,
                                                                  const WrapPolicyPtr& policy);

}  // namespace fsdpsim::fsdp
