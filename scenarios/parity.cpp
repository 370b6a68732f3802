#include "scenarios/parity.h"

#include <torch/optim/adam.h>
#include <torch/optim/sgd.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <unordered_map>

#include "backends/comm_hooks.h"
#include "backends/observe/trace_recorder.h"
#include "fsdp/dcp.h"
#include "fsdp/distributed_checkpoint.h"
#include "fsdp/state_dict.h"
#include "sim/fiber_autograd.h"

namespace fsdpsim::scenarios {

int64_t CollectiveCounts::total() const {
  int64_t sum = 0;
  for (int64_t count : by_op) sum += count;
  return sum;
}

const char* to_string(RoundTripVia via) {
  switch (via) {
    case RoundTripVia::StateDict: return "state-dict";
    case RoundTripVia::Checkpoint: return "checkpoint";
  }
  return "?";
}

std::string ParityConfig::describe() const {
  std::ostringstream out;
  out << scenario.name;
  if (scenario.name == "double_linear" && !scenario.use_second_linear) out << "(lin1 only)";
  if (scenario.name == "transformer" && !scenario.batch_norm) out << "(no bn)";
  out << " " << fsdp::to_string(strategy);
  if (strategy == fsdp::ShardingStrategy::HybridShard) {
    out << " " << replicate_size << "x" << (replicate_size > 0 ? world.world_size / replicate_size : 0);
  }
  out << " world " << world.world_size << " " << sim::to_string(world.rank_kind) << " "
      << sim::to_string(world.backend);
  if (world.rank_kind == sim::RankKind::Fibers && world.schedule == sim::SchedulePolicy::SeededRandom) {
    out << " schedule-seed " << world.seed;
  }
  if (world.simulated_time) out << " simulated-time";
  out << " " << to_string(optimizer) << " steps " << steps;
  if (zero_grad_set_to_none_alternate) {
    out << " alternate-set-to-none";
  } else if (!zero_grad_set_to_none) {
    out << " zero-grad-in-place";
  }
  if (zero_grad_at != ZeroGradAt::BeforeForward) out << " zero-grad-" << to_string(zero_grad_at);
  if (auto_wrap) out << " auto-wrap";
  if (cpu_offload) out << " cpu-offload";
  if (round_trip.after_step >= 0) {
    out << " round-trip-after-step " << round_trip.after_step << " via " << to_string(round_trip.via);
    if (!round_trip.load_back) out << " (no load)";
  }
  if (!tolerance.exact()) out << " atol " << tolerance.atol << " rtol " << tolerance.rtol;
  return out.str();
}

std::string Mismatch::to_string() const {
  std::ostringstream out;
  out << "step " << step << " rank " << rank << " " << what;
  if (!fqn.empty()) out << " " << fqn;
  out << ": max |diff| " << max_abs_diff;
  if (!detail.empty()) out << " (" << detail << ")";
  return out.str();
}

std::string ParityReport::summary() const {
  std::ostringstream out;
  out << config.describe() << ": ";
  if (!error.empty()) {
    out << "FAILED to run: " << error;
    return out.str();
  }
  out << (ok() ? "parity holds" : "PARITY BROKEN") << " (" << mismatch_count << " mismatches; reference " << std::fixed
      << std::setprecision(2) << seconds_reference << " s, sharded " << seconds_sharded << " s)\n";
  out << std::defaultfloat << std::setprecision(6);
  for (size_t s = 0; s < steps.size(); ++s) {
    out << "  step " << s << " max |diff|: loss " << steps[s].loss << ", param after backward "
        << steps[s].param_after_backward << ", grad " << steps[s].grad << ", param after step "
        << steps[s].param_after_step << ", optimizer state " << steps[s].optimizer_state << "\n";
  }
  for (const auto& mismatch : mismatches) out << "  " << mismatch.to_string() << "\n";
  return out.str();
}

namespace {

enum Phase { kLoss = 0, kParamAfterBackward = 1, kGrad = 2, kParamAfterStep = 3, kOptimizerState = 4, kRoundTrip = 5 };
const char* phase_name(int phase) {
  switch (phase) {
    case kLoss: return "loss";
    case kParamAfterBackward: return "param after backward";
    case kGrad: return "grad";
    case kParamAfterStep: return "param after step";
    case kOptimizerState: return "optimizer state";
    case kRoundTrip: return "round trip";
  }
  return "?";
}

/// Values of one phase of one step, by param index: one tensor shared by
/// every replica, or one per replica (rank-local params).
struct Snapshot {
  std::vector<std::vector<at::Tensor>> values;
  const at::Tensor& get(size_t param, int replica) const {
    const auto& per_replica = values[param];
    return per_replica.size() == 1 ? per_replica[0] : per_replica[static_cast<size_t>(replica)];
  }
};

at::Tensor copy_of(const at::Tensor& t) { return t.defined() ? t.detach().clone() : at::Tensor(); }

/// One param's optimiser state (copies) by PyTorch's names: SGD's
/// momentum_buffer; Adam's step (a 0-dim int64), exp_avg, exp_avg_sq and
/// max_exp_avg_sq. Empty: the optimiser holds no state for the param.
using ParamOptimState = std::vector<std::pair<std::string, at::Tensor>>;

ParamOptimState optimizer_state_of(const torch::optim::Optimizer& optimizer, const at::Tensor& param) {
  ParamOptimState out;
  auto found = optimizer.state().find(param.unsafeGetTensorImpl());
  if (found == optimizer.state().end()) return out;
  auto add = [&out](const char* name, const at::Tensor& t) {
    if (t.defined()) out.emplace_back(name, copy_of(t));
  };
  const torch::optim::OptimizerParamState* state = found->second.get();
  if (const auto* sgd = dynamic_cast<const torch::optim::SGDParamState*>(state)) {
    add("momentum_buffer", sgd->momentum_buffer());
  } else if (const auto* adam = dynamic_cast<const torch::optim::AdamParamState*>(state)) {
    out.emplace_back("step", at::scalar_tensor(adam->step(), at::kLong));
    add("exp_avg", adam->exp_avg());
    add("exp_avg_sq", adam->exp_avg_sq());
    add("max_exp_avg_sq", adam->max_exp_avg_sq());
  } else {
    throw std::logic_error("parity: unknown optimiser state (the trainer builds SGD or Adam)");
  }
  return out;
}

/// Optimiser state by param index: one shared by every replica, or one per
/// replica (rank-local params).
struct OptimSnapshot {
  std::vector<std::vector<ParamOptimState>> values;
  const ParamOptimState& get(size_t param, int replica) const {
    const auto& per_replica = values[param];
    return per_replica.size() == 1 ? per_replica[0] : per_replica[static_cast<size_t>(replica)];
  }
};

struct ReferenceStep {
  std::vector<at::Tensor> loss;  // per replica
  Snapshot param_after_backward;
  Snapshot grad;
  Snapshot param_after_step;
  OptimSnapshot optimizer_state;  // after the step
};

struct Reference {
  std::vector<std::string> fqns;
  std::unordered_map<std::string, size_t> index;
  std::vector<ReferenceStep> steps;
};

using Replicas = std::vector<std::unique_ptr<Trainer>>;

// DDP: the mean over replicas, summed in rank order then divided (the fake
// backend's reduce-scatter / all-reduce with ReduceOp::Avg), for every param
// that is not rank-local.
void average_grads(const Replicas& replicas, const std::vector<bool>& is_local) {
  const int world = static_cast<int>(replicas.size());
  for (size_t i = 0; i < is_local.size(); ++i) {
    if (is_local[i]) continue;
    bool any = false;
    for (const auto& replica : replicas) any = any || replica->params()[i].grad().defined();
    if (!any) continue;
    at::Tensor sum;
    for (int r = 0; r < world; ++r) {
      const at::Tensor& param = replicas[static_cast<size_t>(r)]->params()[i];
      at::Tensor grad = param.grad();
      if (!grad.defined()) grad = at::zeros_like(param);
      if (r == 0) {
        sum = grad.detach().clone();
      } else {
        sum.add_(grad);
      }
    }
    sum.div_(static_cast<int64_t>(world));
    for (const auto& replica : replicas) replica->params()[i].mutable_grad() = sum.clone();
  }
}

Reference run_reference(const ParityConfig& config) {
  // The rank threads run one intra-op thread each; so must the reference.
  at::set_num_threads(1);
  const int world = config.world.world_size;
  Replicas replicas;
  Reference reference;
  for (int r = 0; r < world; ++r) {
    replicas.push_back(std::make_unique<Trainer>(config, r));
    const auto& named = replicas.back()->named_params();
    if (r == 0) {
      for (const auto& item : named) {
        reference.index[item.first] = reference.fqns.size();
        reference.fqns.push_back(item.first);
      }
    }
    if (named.size() != reference.fqns.size()) throw std::logic_error("replicas of different shapes");
  }
  const auto local = replicas[0]->scenario().rank_local_params();
  std::vector<bool> is_local(reference.fqns.size());
  for (size_t i = 0; i < reference.fqns.size(); ++i) is_local[i] = local.count(reference.fqns[i]) > 0;

  auto snapshot = [&](const std::function<at::Tensor(const at::Tensor&)>& value) {
    Snapshot snap;
    snap.values.resize(reference.fqns.size());
    for (size_t i = 0; i < reference.fqns.size(); ++i) {
      for (const auto& replica : replicas) {
        snap.values[i].push_back(copy_of(value(replica->params()[i])));
        if (!is_local[i]) break;  // one value shared by every replica
      }
    }
    return snap;
  };

  for (int step = 0; step < config.steps; ++step) {
    ReferenceStep record;
    for (int r = 0; r < world; ++r) {
      Trainer& replica = *replicas[static_cast<size_t>(r)];
      replica.zero_grad(step);  // before the forward, whatever the sharded run's zero_grad_at
      auto loss = replica.forward_loss(replica.scenario().input(r, step));
      loss.backward();
      record.loss.push_back(loss.detach().clone());
    }
    average_grads(replicas, is_local);
    record.param_after_backward = snapshot([](const at::Tensor& p) { return p; });
    record.grad = snapshot([](const at::Tensor& p) { return p.grad(); });
    for (auto& replica : replicas) replica->optimizer_step();
    record.param_after_step = snapshot([](const at::Tensor& p) { return p; });
    record.optimizer_state.values.resize(reference.fqns.size());
    for (size_t i = 0; i < reference.fqns.size(); ++i) {
      for (const auto& replica : replicas) {
        record.optimizer_state.values[i].push_back(optimizer_state_of(replica->optimizer(), replica->params()[i]));
        if (!is_local[i]) break;
      }
    }
    reference.steps.push_back(std::move(record));
  }
  return reference;
}

/// Counts each collective by (step, phase) on one rank.
class CountingCommHooks : public DefaultCommHooks {
 public:
  explicit CountingCommHooks(int steps) : counts_(static_cast<size_t>(steps)) {}
  void set(int step, int phase) {
    step_ = step;
    phase_ = phase;
  }
  void stop() { step_ = -1; }
  void before(const CollectiveDesc& desc) override {
    if (step_ < 0) return;
    auto& step = counts_[static_cast<size_t>(step_)];
    CollectiveCounts& counts = phase_ == 0 ? step.forward : phase_ == 1 ? step.backward : step.optimizer;
    ++counts.by_op[static_cast<size_t>(desc.op)];
  }
  const std::vector<StepCommCounts>& counts() const { return counts_; }

 private:
  std::vector<StepCommCounts> counts_;
  int step_ = -1;
  int phase_ = 0;
};

/// Where a rank's shard of a param sits: shard `index` of `count` on dim 0.
struct Placement {
  int index = 0;
  int count = 1;
};

struct Outcome {
  bool ok = true;
  double max_abs_diff = 0.0;
  std::string detail;
};

std::string shape_string(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

Outcome compare_values(const at::Tensor& actual, const at::Tensor& expected, const Tolerance& tolerance) {
  Outcome outcome;
  if (actual.scalar_type() != expected.scalar_type()) {
    outcome.ok = false;
    outcome.detail = std::string("dtype ") + c10::toString(actual.scalar_type()) + ", reference " +
                     c10::toString(expected.scalar_type());
    return outcome;
  }
  if (actual.numel() == 0) return outcome;
  outcome.max_abs_diff = (actual.to(at::kDouble) - expected.to(at::kDouble)).abs().max().item<double>();
  outcome.ok =
      tolerance.exact() ? at::equal(actual, expected) : at::allclose(actual, expected, tolerance.rtol, tolerance.atol);
  if (!outcome.ok) {
    auto differ = tolerance.exact() ? actual.ne(expected)
                                    : (actual.to(at::kDouble) - expected.to(at::kDouble))
                                          .abs()
                                          .gt(tolerance.atol + tolerance.rtol * expected.to(at::kDouble).abs());
    auto where = differ.flatten().nonzero();
    std::ostringstream out;
    out << std::setprecision(9) << where.size(0) << " of " << actual.numel() << " elements differ";
    if (where.size(0) > 0) {
      const int64_t k = where[0][0].item<int64_t>();
      out << "; first at flat index " << k << " of the shard: " << actual.flatten()[k].item<double>() << ", reference "
          << expected.flatten()[k].item<double>();
    } else if (std::isnan(outcome.max_abs_diff)) {
      out << "; NaN";
    }
    outcome.detail = out.str();
  }
  return outcome;
}

/// `shard` against rows [i c, i c + n) of `full`, c = ceil(dim0 / count).
Outcome compare_shard(const at::Tensor& shard, const at::Tensor& full, const Placement& placement,
                      const Tolerance& tolerance) {
  Outcome outcome;
  if (!shard.defined() || !full.defined()) {
    outcome.ok = shard.defined() == full.defined();
    if (!outcome.ok) outcome.detail = shard.defined() ? "defined, reference undefined" : "undefined, reference defined";
    return outcome;
  }
  if (full.dim() == 0) {
    if (shard.dim() != 0) {
      outcome.ok = false;
      outcome.detail = "shape " + shape_string(shard) + ", reference " + shape_string(full);
      return outcome;
    }
    return compare_values(shard, full, tolerance);
  }
  const int64_t dim0 = full.size(0);
  const int64_t chunk = (dim0 + placement.count - 1) / placement.count;
  const int64_t begin = std::min<int64_t>(placement.index * chunk, dim0);
  const int64_t valid = std::min<int64_t>(chunk, dim0 - begin);
  bool shape_ok = shard.dim() == full.dim() && (shard.size(0) == valid || shard.size(0) == chunk);
  for (int64_t d = 1; shape_ok && d < full.dim(); ++d) shape_ok = shard.size(d) == full.size(d);
  if (!shape_ok) {
    outcome.ok = false;
    std::ostringstream out;
    out << "shape " << shard.sizes() << ", expected " << valid << " (or padded " << chunk << ") rows of "
        << full.sizes() << " as shard " << placement.index << " of " << placement.count;
    outcome.detail = out.str();
    return outcome;
  }
  outcome = compare_values(shard.narrow(0, 0, valid), full.narrow(0, begin, valid), tolerance);
  if (!outcome.ok) {
    outcome.detail += "; shard " + std::to_string(placement.index) + " of " + std::to_string(placement.count) +
                      ", rows [" + std::to_string(begin) + ", " + std::to_string(begin + valid) + ") of " +
                      shape_string(full);
  }
  return outcome;
}

struct RankMismatch {
  int phase = 0;
  size_t order = 0;  // param index within the phase
  Mismatch mismatch;
};

/// What one rank found; merged after the world ends.
struct RankResult {
  std::vector<StepDiff> diffs;
  std::vector<RankMismatch> mismatches;  // the first kMaxMismatches
  int64_t mismatch_count = 0;
  std::vector<double> losses;
  std::vector<StepCommCounts> comm_counts;
  std::map<std::string, at::Tensor> final_shards;

  void record(int step, int rank, int phase, size_t order, const std::string& fqn, const Outcome& outcome) {
    auto& diff = diffs[static_cast<size_t>(step)];
    double ignored = 0.0;  // round-trip checks have no column
    double* slot = phase == kLoss                 ? &diff.loss
                   : phase == kParamAfterBackward ? &diff.param_after_backward
                   : phase == kGrad               ? &diff.grad
                   : phase == kParamAfterStep     ? &diff.param_after_step
                   : phase == kOptimizerState     ? &diff.optimizer_state
                                                  : &ignored;
    if (std::isnan(outcome.max_abs_diff) || outcome.max_abs_diff > *slot) *slot = outcome.max_abs_diff;
    if (outcome.ok) return;
    ++mismatch_count;
    if (mismatches.size() >= ParityReport::kMaxMismatches) return;
    Mismatch m;
    m.step = step;
    m.rank = rank;
    m.what = phase_name(phase);
    m.fqn = fqn;
    m.max_abs_diff = outcome.max_abs_diff;
    m.detail = outcome.detail;
    mismatches.push_back({phase, order, std::move(m)});
  }
};

/// Each param's shard placement, from the unit that manages it. Unit FQNs
/// are relative to the root once the root is known (its first forward), so
/// the map is built at the first lookup.
class Placements {
 public:
  Placements(torch::nn::Module& module, const fsdp::Engine& engine) : module_(module), engine_(engine) {}

  Placement of(const at::Tensor& param) {
    if (!known_) resolve();
    auto found = placements_.find(param.unsafeGetTensorImpl());
    return found == placements_.end() ? Placement{} : found->second;
  }

 private:
  void resolve() {
    std::unordered_map<std::string, at::Tensor> by_fqn;
    for (const auto& item : module_.named_parameters()) by_fqn.emplace(item.key(), item.value());
    for (const fsdp::Unit* unit : engine_.units()) {
      const auto& group = unit->options().shard_group;
      Placement placement;
      if (group) placement = Placement{group->rank(), group->size()};
      for (const auto& fqn : unit->param_fqns()) {
        auto found = by_fqn.find(fqn);
        if (found == by_fqn.end()) {
          throw std::runtime_error("unit '" + unit->fqn() + "' manages param '" + fqn +
                                   "', which the root's named_parameters() does not have");
        }
        placements_[found->second.unsafeGetTensorImpl()] = placement;
      }
    }
    known_ = true;
  }

  torch::nn::Module& module_;
  const fsdp::Engine& engine_;
  std::unordered_map<const c10::TensorImpl*, Placement> placements_;
  bool known_ = false;
};

/// One rank's checks against the reference, after backward and after the step.
class RankChecker {
 public:
  RankChecker(const ParityConfig& config, const Reference& reference, Trainer& trainer, RankResult& result)
      : tolerance_(config.tolerance),
        reference_(reference),
        trainer_(trainer),
        placements_(*trainer.scenario().module(), *trainer.engine()),
        result_(result) {}

  void after_backward(int step, const at::Tensor& loss) {
    const auto& ref = reference_.steps[static_cast<size_t>(step)];
    const int rank = trainer_.rank();
    result_.record(step, rank, kLoss, 0, "",
                   compare_values(loss.detach(), ref.loss[static_cast<size_t>(rank)], tolerance_));
    compare_params(step, kParamAfterBackward, ref.param_after_backward);
    compare_params(step, kGrad, ref.grad);
  }
  void after_step(int step) {
    compare_params(step, kParamAfterStep, reference_.steps[static_cast<size_t>(step)].param_after_step);
    compare_optimizer_state(step);
  }

 private:
  // Each state tensor against the same rows of the replica's (the step
  // counter exactly: an integer).
  void compare_optimizer_state(int step) {
    const OptimSnapshot& snapshot = reference_.steps[static_cast<size_t>(step)].optimizer_state;
    const auto& named = trainer_.named_params();
    const int rank = trainer_.rank();
    for (size_t i = 0; i < named.size(); ++i) {
      const auto& [fqn, param] = named[i];
      auto index = reference_.index.find(fqn);
      if (index == reference_.index.end()) continue;  // reported by compare_params
      const ParamOptimState& expected = snapshot.get(index->second, rank);
      const ParamOptimState actual = optimizer_state_of(trainer_.optimizer(), param);
      auto find = [](const ParamOptimState& state, const std::string& name) -> const at::Tensor* {
        for (const auto& item : state) {
          if (item.first == name) return &item.second;
        }
        return nullptr;
      };
      for (const auto& [name, want] : expected) {
        const at::Tensor* got = find(actual, name);
        const Outcome outcome = got == nullptr ? Outcome{false, 0.0, "missing, the reference has it"}
                                               : compare_shard(*got, want, placements_.of(param),
                                                               name == "step" ? Tolerance{} : tolerance_);
        result_.record(step, rank, kOptimizerState, i, fqn + "." + name, outcome);
      }
      for (const auto& [name, value] : actual) {
        if (find(expected, name) == nullptr) {
          result_.record(step, rank, kOptimizerState, i, fqn + "." + name,
                         Outcome{false, 0.0, "present, the reference has none"});
        }
      }
    }
  }

  void compare_params(int step, int phase, const Snapshot& snapshot) {
    const auto& named = trainer_.named_params();
    const int rank = trainer_.rank();
    for (size_t i = 0; i < named.size(); ++i) {
      const auto& [fqn, param] = named[i];
      auto index = reference_.index.find(fqn);
      if (index == reference_.index.end()) {
        result_.record(step, rank, phase, i, fqn, Outcome{false, 0.0, "not in the reference"});
        continue;
      }
      const at::Tensor& expected = snapshot.get(index->second, rank);
      const at::Tensor actual = phase == kGrad ? param.grad() : param;
      result_.record(step, rank, phase, i, fqn, compare_shard(actual, expected, placements_.of(param), tolerance_));
    }
  }

  const Tolerance& tolerance_;
  const Reference& reference_;
  Trainer& trainer_;
  Placements placements_;
  RankResult& result_;
};

// ---- the state round trip ---------------------------------------------------

/// Model and optimiser state as (key, tensor): "model.<fqn>", "optim.<fqn>.<name>".
using FlatState = std::vector<std::pair<std::string, at::Tensor>>;

FlatState flatten(const fsdp::StateDict& model, const fsdp::OptimizerStateDict& optimizer) {
  FlatState out;
  for (const auto& item : model) out.emplace_back("model." + item.key(), item.value().local);
  for (const auto& param : optimizer.state) {
    for (const auto& value : param.value()) {
      out.emplace_back("optim." + param.key() + "." + value.key(), value.value().local);
    }
  }
  return out;
}

// Copies: a sharded dict shares storage with the params and the state.
fsdp::StateDict cloned(fsdp::StateDict dict) {
  for (auto& item : dict) item.value().local = copy_of(item.value().local);
  return dict;
}
fsdp::OptimizerStateDict cloned(fsdp::OptimizerStateDict dict) {
  for (auto& param : dict.state) {
    for (auto& value : param.value()) value.value().local = copy_of(value.value().local);
  }
  return dict;
}

void zero_if_defined(const at::Tensor& t) {
  if (t.defined()) t.zero_();
}

// Overwrites what a load must restore, so that a load restoring nothing
// breaks parity: every param and buffer zeroed; the optimiser's state zeroed
// in place (Adam's step too) and its learning rate 0 -- or, `drop_optimizer_state`,
// its per-param state dropped (the load must create it).
void scramble(Trainer& trainer, bool drop_optimizer_state) {
  torch::NoGradGuard no_grad;
  torch::nn::Module& root = *trainer.scenario().module();
  for (const auto& param : root.parameters()) param.zero_();
  for (const auto& buffer : root.buffers()) buffer.zero_();
  torch::optim::Optimizer& optimizer = trainer.optimizer();
  if (drop_optimizer_state) {
    optimizer.state().clear();
    return;
  }
  for (auto& group : optimizer.param_groups()) group.options().set_lr(0.0);
  for (auto& item : optimizer.state()) {
    if (auto* sgd = dynamic_cast<torch::optim::SGDParamState*>(item.second.get())) {
      zero_if_defined(sgd->momentum_buffer());
    } else if (auto* adam = dynamic_cast<torch::optim::AdamParamState*>(item.second.get())) {
      adam->step(0);
      zero_if_defined(adam->exp_avg());
      zero_if_defined(adam->exp_avg_sq());
      zero_if_defined(adam->max_exp_avg_sq());
    }
  }
}

// Every saved key restored bitwise, and no other key.
void check_restored(int step, int rank, const FlatState& saved, const FlatState& restored, RankResult& result) {
  std::map<std::string, at::Tensor> by_key(restored.begin(), restored.end());
  size_t order = 0;
  for (const auto& [key, want] : saved) {
    auto found = by_key.find(key);
    Outcome outcome;
    if (found == by_key.end()) {
      outcome = Outcome{false, 0.0, "missing after the load"};
    } else if (found->second.sizes() != want.sizes()) {
      outcome = Outcome{false, 0.0, "shape " + shape_string(found->second) + ", saved " + shape_string(want)};
    } else {
      outcome = compare_values(found->second, want, Tolerance{});
    }
    result.record(step, rank, kRoundTrip, order++, key, outcome);
    if (found != by_key.end()) by_key.erase(found);
  }
  for (const auto& [key, value] : by_key) {
    result.record(step, rank, kRoundTrip, order++, key, Outcome{false, 0.0, "after the load, not saved"});
  }
}

// After `step`: the sharded state out (in memory or to `dir`), the live state
// scrambled, the state back in, checked against what went out.
void round_trip(const ParityConfig& config, const std::filesystem::path& dir, int step, Trainer& trainer,
                ProcessGroup& world, RankResult& result) {
  fsdp::Engine& engine = *trainer.engine();
  const torch::nn::Module& root = *trainer.scenario().module();
  torch::optim::Optimizer& optimizer = trainer.optimizer();
  const fsdp::StateDict model = cloned(fsdp::get_model_state_dict(engine, root));
  const fsdp::OptimizerStateDict optim = cloned(fsdp::get_optimizer_state_dict(engine, root, optimizer));
  if (config.round_trip.via == RoundTripVia::Checkpoint) {
    const int64_t saved_step = step + 1;
    fsdp::save_checkpoint(dir, engine, root, &optimizer, fsdp::dcp::process_group_coordinator(world), saved_step);
    scramble(trainer, /*drop_optimizer_state=*/true);
    const int64_t loaded_step =
        config.round_trip.load_back ? fsdp::load_checkpoint(dir, engine, root, &optimizer) : saved_step;
    if (loaded_step != saved_step) {
      result.record(
          step, trainer.rank(), kRoundTrip, 0, "fsdpsim.step",
          Outcome{false, 0.0, "loaded step " + std::to_string(loaded_step) + ", saved " + std::to_string(saved_step)});
    }
  } else {
    scramble(trainer, /*drop_optimizer_state=*/false);
    if (config.round_trip.load_back) {
      fsdp::set_model_state_dict(engine, root, model);
      fsdp::set_optimizer_state_dict(engine, root, optimizer, optim);
    }
  }
  check_restored(
      step, trainer.rank(), flatten(model, optim),
      flatten(fsdp::get_model_state_dict(engine, root), fsdp::get_optimizer_state_dict(engine, root, optimizer)),
      result);
}

void run_rank(const ParityConfig& config, const Reference* reference, const std::filesystem::path& checkpoint_dir,
              sim::RankContext& ctx, RankResult& result) {
  const int rank = ctx.rank();
  result.diffs.assign(static_cast<size_t>(config.steps), StepDiff{});
  auto counter = std::make_shared<CountingCommHooks>(config.steps);
  // Hook the world before splitting: sub-groups inherit the hooks.
  ProcessGroupPtr world = std::make_shared<HookedProcessGroup>(ctx.world_group(), counter);
  if (config.comm_hooks) {
    if (auto hooks = config.comm_hooks(rank)) world = std::make_shared<HookedProcessGroup>(world, std::move(hooks));
  }
  std::vector<std::shared_ptr<fsdp::EngineHooks>> engine_hooks;
  if (config.engine_hooks) {
    if (auto hooks = config.engine_hooks(rank)) engine_hooks.push_back(std::move(hooks));
  }
  Trainer trainer(config, rank, world, std::move(engine_hooks));
  std::optional<RankChecker> checker;
  if (reference != nullptr) checker.emplace(config, *reference, trainer, result);

  StepCallbacks callbacks;
  callbacks.before_forward = [&](int step) { counter->set(step, 0); };
  callbacks.after_loss = [&](int step, const at::Tensor&) {
    if (config.delay) config.delay(rank, "after_loss");
    counter->set(step, 1);
  };
  callbacks.after_backward = [&](int step, const at::Tensor& loss) {
    counter->set(step, 2);
    result.losses.push_back(loss.item<double>());
    if (checker) checker->after_backward(step, loss);
    if (config.delay) config.delay(rank, "before_step");
  };
  callbacks.after_step = [&](int step, const at::Tensor&) {
    if (checker) checker->after_step(step);
    counter->stop();
    if (step == config.round_trip.after_step) round_trip(config, checkpoint_dir, step, trainer, *world, result);
  };
  for (int step = 0; step < config.steps; ++step) trainer.step(step, callbacks);
  for (const auto& [fqn, param] : trainer.named_params()) result.final_shards[fqn] = param.detach().clone();
  result.comm_counts = counter->counts();
}

// Per-step maxima over ranks, every rank's counts and losses, and the
// earliest mismatches in (step, phase, rank, param) order.
void merge_results(ParityReport& report, std::vector<RankResult>& results) {
  const ParityConfig& config = report.config;
  report.steps.assign(static_cast<size_t>(config.steps), StepDiff{});
  std::vector<std::tuple<int, int, int, size_t, Mismatch>> all;
  for (size_t r = 0; r < results.size(); ++r) {
    auto& result = results[r];
    for (size_t s = 0; s < result.diffs.size() && s < report.steps.size(); ++s) {
      auto merge = [](double& into, double value) {
        if (std::isnan(value) || value > into) into = value;
      };
      merge(report.steps[s].loss, result.diffs[s].loss);
      merge(report.steps[s].param_after_backward, result.diffs[s].param_after_backward);
      merge(report.steps[s].grad, result.diffs[s].grad);
      merge(report.steps[s].param_after_step, result.diffs[s].param_after_step);
      merge(report.steps[s].optimizer_state, result.diffs[s].optimizer_state);
    }
    report.mismatch_count += result.mismatch_count;
    for (auto& m : result.mismatches) {
      all.emplace_back(m.mismatch.step, m.phase, m.mismatch.rank, m.order, std::move(m.mismatch));
    }
    report.comm_counts.push_back(std::move(result.comm_counts));
    report.losses.push_back(std::move(result.losses));
    report.final_shards.push_back(std::move(result.final_shards));
  }
  std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) {
    return std::tie(std::get<0>(a), std::get<1>(a), std::get<2>(a), std::get<3>(a)) <
           std::tie(std::get<0>(b), std::get<1>(b), std::get<2>(b), std::get<3>(b));
  });
  for (size_t i = 0; i < all.size() && i < ParityReport::kMaxMismatches; ++i) {
    report.mismatches.push_back(std::move(std::get<4>(all[i])));
  }
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void validate_round_trip(const ParityConfig& config, const char* what) {
  if (config.round_trip.after_step < -1 || config.round_trip.after_step >= config.steps) {
    throw std::invalid_argument(std::string(what) + ": round_trip.after_step " +
                                std::to_string(config.round_trip.after_step) + " is not a step of " +
                                std::to_string(config.steps) + ": use 0.." + std::to_string(config.steps - 1) +
                                ", or -1 for none");
  }
}

void validate(const ParityConfig& config, const char* what) {
  config.world.validate();
  if (config.steps < 0) throw std::invalid_argument(std::string(what) + ": steps must be >= 0");
  if (config.strategy == fsdp::ShardingStrategy::HybridShard &&
      (config.replicate_size < 1 || config.world.world_size % config.replicate_size != 0)) {
    throw std::invalid_argument(std::string(what) + ": replicate_size " + std::to_string(config.replicate_size) +
                                " does not divide world size " + std::to_string(config.world.world_size));
  }
  validate_round_trip(config, what);
}

/// A fresh directory for a Checkpoint round trip; removed when it goes.
class ScratchDir {
 public:
  explicit ScratchDir(bool wanted) {
    if (!wanted) return;
    static std::atomic<int64_t> counter{0};
    path_ = std::filesystem::temp_directory_path() /
            ("fsdpsim_parity_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(path_);
  }
  ~ScratchDir() {
    std::error_code ignored;
    if (!path_.empty()) std::filesystem::remove_all(path_, ignored);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

}  // namespace

ParityReport run_parity(const ParityConfig& config) {
  validate(config, "run_parity");
  make_scenario(config.scenario, 0);  // an unknown name throws here

  ParityReport report;
  report.config = config;
  Reference reference;
  if (config.run_reference) {
    const auto start = std::chrono::steady_clock::now();
    try {
      reference = run_reference(config);
    } catch (const std::exception& e) {
      report.error = std::string("reference: ") + e.what();
      return report;
    }
    report.seconds_reference = seconds_since(start);
  }

  std::vector<RankResult> results(static_cast<size_t>(config.world.world_size));
  const auto start = std::chrono::steady_clock::now();
  sim::World world(config.world);
  const Reference* ref = config.run_reference ? &reference : nullptr;
  const ScratchDir scratch(config.round_trip.after_step >= 0 && config.round_trip.via == RoundTripVia::Checkpoint);
  auto outcome =
      world.run([&](sim::RankContext& ctx) { run_rank(config, ref, scratch.path(), ctx, results[ctx.rank()]); });
  report.seconds_sharded = seconds_since(start);
  if (!outcome.ok()) report.error = outcome.error_report();

  merge_results(report, results);
  return report;
}

ParityReport run_parity_rank(const ParityConfig& config, int rank, const ProcessGroupPtr& world_group) {
  validate_round_trip(config, "run_parity_rank");
  if (config.round_trip.after_step >= 0 && config.round_trip.via == RoundTripVia::Checkpoint) {
    throw std::invalid_argument(
        "run_parity_rank: a Checkpoint round trip needs a directory every process shares; use "
        "RoundTripVia::StateDict");
  }
  ParityReport report;
  report.config = config;
  const int world_size = config.world.world_size;
  if (rank < 0 || rank >= world_size || !world_group || world_group->size() != world_size) {
    throw std::invalid_argument("run_parity_rank: rank " + std::to_string(rank) + " / group of size " +
                                std::to_string(world_group ? world_group->size() : 0) + " do not fit world size " +
                                std::to_string(world_size));
  }
  Reference reference;
  auto start = std::chrono::steady_clock::now();
  try {
    reference = run_reference(config);  // every process computes the same reference
  } catch (const std::exception& e) {
    report.error = std::string("reference: ") + e.what();
    return report;
  }
  report.seconds_reference = seconds_since(start);
  std::vector<RankResult> results(1);
  start = std::chrono::steady_clock::now();
  sim::RankContext ctx(rank, world_size, sim::RankKind::Threads, world_group, &SteadyClock::instance(), nullptr);
  try {
    run_rank(config, &reference, {}, ctx, results[0]);
  } catch (const std::exception& e) {
    report.error = "rank " + std::to_string(rank) + ": " + e.what();
  }
  report.seconds_sharded = seconds_since(start);
  merge_results(report, results);
  return report;
}

}  // namespace fsdpsim::scenarios
