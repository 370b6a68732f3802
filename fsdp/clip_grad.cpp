#include "fsdp/clip_grad.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <unordered_set>

#include "backends/collective_label.h"
#include "fsdp/fully_shard.h"

namespace fsdpsim::fsdp {
namespace {

// The grads of one shard group's params, and the group.
struct GroupGrads {
  ProcessGroupPtr group;
  std::vector<at::Tensor> grads;
};

// Groups in the engine's unit order (the same on every rank, so the
// all-reduces line up); `wanted` empty means every param.
std::vector<GroupGrads> grads_by_group(const Engine& engine, const std::unordered_set<const c10::TensorImpl*>& wanted) {
  std::vector<GroupGrads> groups;
  for (const Unit* unit : engine.units()) {
    if (unit->state() != TrainingState::Idle) {
      throw std::runtime_error("clip_grad_norm_ inside a forward or backward (unit '" + unit->fqn() + "' is in " +
                               to_string(unit->state()) + "): call it after backward, before the optimiser step");
    }
    const ProcessGroupPtr& group = unit->options().shard_group;
    GroupGrads* entry = nullptr;
    for (const at::Tensor& param : unit->params()) {
      if (!wanted.empty() && !wanted.count(param.unsafeGetTensorImpl())) continue;
      if (entry == nullptr) {
        for (auto& g : groups) entry = g.group == group ? &g : entry;
        if (entry == nullptr) entry = &groups.emplace_back(GroupGrads{group, {}});
      }
      if (param.grad().defined()) entry->grads.push_back(param.grad());
    }
  }
  return groups;
}

// The inf norm's combine: a NaN wins, as in ATen's max.
double combine(double total, double value, bool inf) {
  if (!inf) return total + value;
  return std::isnan(value) || value > total ? value : total;
}

// sum |g|^p (max |g| for the inf norm) over the group's local grads: one
// vector norm per grad, accumulated in double, and one read of the result.
double local_power_sum(const std::vector<at::Tensor>& grads, double norm_type, bool inf) {
  std::vector<at::Tensor> norms;
  norms.reserve(grads.size());
  for (const at::Tensor& grad : grads) {
    if (grad.numel() == 0) continue;
    norms.push_back(at::linalg_vector_norm(grad.detach(), norm_type, std::nullopt, false, at::kDouble));
  }
  if (norms.empty()) return 0.0;
  const at::Tensor stacked = at::stack(norms);
  // at::max propagates NaN, as combine() does.
  return inf ? stacked.max().item<double>() : stacked.pow(norm_type).sum().item<double>();
}

double clip(Engine& engine, const std::unordered_set<const c10::TensorImpl*>& wanted, double max_norm, double norm_type,
            bool error_if_nonfinite) {
  const bool inf = std::isinf(norm_type) && norm_type > 0;
  if (!inf && !(norm_type > 0.0 && std::isfinite(norm_type))) {
    throw std::invalid_argument("clip_grad_norm_: norm_type " + std::to_string(norm_type) +
                                " is not supported: pass a p > 0 or infinity");
  }
  std::vector<GroupGrads> groups = grads_by_group(engine, wanted);
  double total = 0.0;
  for (const GroupGrads& entry : groups) {
    double sum = local_power_sum(entry.grads, norm_type, inf);
    if (entry.group->size() > 1) {
      at::Tensor value = at::full({1}, sum, at::kDouble);
      AllReduceOptions options;
      options.reduce_op = inf ? ReduceOp::Max : ReduceOp::Sum;
      ScopedCollectiveLabel label("fsdp clip_grad_norm_ all-reduce");
      entry.group->all_reduce(value, options)->wait();
      sum = value.item<double>();
    }
    total = combine(total, sum, inf);
  }
  if (!inf) total = std::pow(total, 1.0 / norm_type);
  if (error_if_nonfinite && !std::isfinite(total)) {
    throw std::runtime_error("clip_grad_norm_: the total norm of order " + std::to_string(norm_type) + " is " +
                             std::to_string(total) +
                             ", so it cannot be clipped (error_if_nonfinite = false scales "
                             "the grads anyway)");
  }
  // LibTorch's arithmetic, in the grads' dtype: max_norm / (total + 1e-6), at
  // most 1; one coefficient per dtype and device.
  std::vector<at::Tensor> coefs;
  for (const GroupGrads& entry : groups) {
    for (const at::Tensor& grad : entry.grads) {
      const at::Tensor* coef = nullptr;
      for (const at::Tensor& c : coefs) {
        if (c.scalar_type() == grad.scalar_type() && c.device() == grad.device()) coef = &c;
      }
      if (coef == nullptr) {
        const at::Tensor norm = at::scalar_tensor(total, grad.options().requires_grad(false));
        coef = &coefs.emplace_back(at::clamp(max_norm / (norm + 1e-6), std::nullopt, 1.0));
      }
      grad.detach().mul_(*coef);
    }
  }
  return total;
}

}  // namespace

double clip_grad_norm_(Engine& engine, double max_norm, double norm_type, bool error_if_nonfinite) {
  return clip(engine, {}, max_norm, norm_type, error_if_nonfinite);
}

double clip_grad_norm_(Engine& engine, const std::vector<at::Tensor>& params, double max_norm, double norm_type,
                       bool error_if_nonfinite) {
  std::unordered_set<const c10::TensorImpl*> managed;
  for (const Unit* unit : engine.units()) {
    for (const at::Tensor& param : unit->params()) managed.insert(param.unsafeGetTensorImpl());
  }
  std::unordered_set<const c10::TensorImpl*> wanted;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].defined() || !managed.count(params[i].unsafeGetTensorImpl())) {
      throw std::invalid_argument("clip_grad_norm_: params[" + std::to_string(i) +
                                  "] is not a param of a unit of this engine (pass the module's params after "
                                  "fully_shard)");
    }
    wanted.insert(params[i].unsafeGetTensorImpl());
  }
  if (wanted.empty()) return 0.0;
  return clip(engine, wanted, max_norm, norm_type, error_if_nonfinite);
}

}  // namespace fsdpsim::fsdp
