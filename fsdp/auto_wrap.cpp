#include "fsdp/auto_wrap.h"

#include <stdexcept>
#include <unordered_set>
#include <utility>

namespace fsdpsim::fsdp {

bool WrapPolicy::should_recurse(const WrapCandidate&) const { return true; }

namespace {

class PredicatePolicy final : public WrapPolicy {
 public:
  explicit PredicatePolicy(std::function<bool(const torch::nn::Module&, const std::string&)> pick)
      : pick_(std::move(pick)) {}
  bool should_wrap(const WrapCandidate& candidate) const override { return pick_(candidate.module, candidate.fqn); }

 private:
  std::function<bool(const torch::nn::Module&, const std::string&)> pick_;
};

class SizePolicy final : public WrapPolicy {
 public:
  explicit SizePolicy(SizeWrapOptions options) : options_(std::move(options)) {}
  bool should_recurse(const WrapCandidate& candidate) const override {
    return candidate.unwrapped_numel >= options_.min_num_params &&
           !options_.force_leaf_types.count(candidate.module.name());
  }
  bool should_wrap(const WrapCandidate& candidate) const override {
    return candidate.unwrapped_numel >= options_.min_num_params &&
           !options_.exclude_types.count(candidate.module.name());
  }

 private:
  SizeWrapOptions options_;
};

// The post-order walk; `wrapped` collects the units it made.
class Walker {
 public:
  Walker(Engine& engine, const FullyShardOptions& options, const WrapPolicy& policy)
      : engine_(engine), options_(options), policy_(policy) {}

  void visit(const std::shared_ptr<torch::nn::Module>& module, const std::string& fqn) {
    if (detail::engine_of(module.get()) != nullptr) return;  // already a unit
    if (!policy_.should_recurse({*module, fqn, unwrapped_numel(*module)})) return;
    for (const auto& child : module->named_children()) {
      visit(child.value(), fqn.empty() ? child.key() : fqn + "." + child.key());
    }
    if (!fqn.empty() && policy_.should_wrap({*module, fqn, unwrapped_numel(*module)})) wrap(module);
  }

  void wrap(const std::shared_ptr<torch::nn::Module>& module) {
    engine_.fully_shard(module, options_);
    wrapped_.push_back(module);
  }

  std::vector<std::shared_ptr<torch::nn::Module>> take_wrapped() { return std::move(wrapped_); }

 private:
  int64_t unwrapped_numel(const torch::nn::Module& module) const {
    std::unordered_set<const c10::TensorImpl*> seen;
    int64_t total = 0;
    for (const auto& param : module.parameters(/*recurse=*/true)) {
      if (engine_.manages(param) || !seen.insert(param.unsafeGetTensorImpl()).second) continue;
      total += param.numel();
    }
    return total;
  }

  Engine& engine_;
  const FullyShardOptions& options_;
  const WrapPolicy& policy_;
  std::vector<std::shared_ptr<torch::nn::Module>> wrapped_;
};

}  // namespace

WrapPolicyPtr wrap_modules_where(std::function<bool(const torch::nn::Module&, const std::string&)> pick) {
  if (!pick) throw std::invalid_argument("wrap_modules_where: the predicate is empty");
  return std::make_shared<PredicatePolicy>(std::move(pick));
}

WrapPolicyPtr wrap_module_types(std::set<std::string> type_names) {
  if (type_names.empty()) throw std::invalid_argument("wrap_module_types: no type names given");
  return wrap_modules_where([names = std::move(type_names)](const torch::nn::Module& module, const std::string&) {
    return names.count(module.name()) > 0;
  });
}

WrapPolicyPtr wrap_by_size(SizeWrapOptions options) {
  if (options.min_num_params < 0) {
    throw std::invalid_argument("wrap_by_size: min_num_params is " + std::to_string(options.min_num_params) +
                                ", must be >= 0");
  }
  return std::make_shared<SizePolicy>(std::move(options));
}

std::vector<std::shared_ptr<torch::nn::Module>> apply_fully_shard(Engine& engine,
                                                                  const std::shared_ptr<torch::nn::Module>& root,
                                                                  const FullyShardOptions& options,
                                                                  const WrapPolicyPtr& policy) {
  if (!root) throw std::invalid_argument("apply_fully_shard: root module is null");
  if (!policy) throw std::invalid_argument("apply_fully_shard: policy is null");
  Walker walker(engine, options, *policy);
  walker.visit(root, "");
  if (detail::engine_of(root.get()) == nullptr) walker.wrap(root);
  return walker.take_wrapped();
}

}  // namespace fsdpsim::fsdp
