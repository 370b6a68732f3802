#pragma once
// One rank's training loop, shared by the parity harness (its sharded ranks
// and its unsharded reference replicas), the scenario runner and the engine
// benchmark: the scenario's model, sharded through an fsdp::Engine per the
// config (or left plain), its optimiser, and a step of zero_grad, forward,
// backward and optimiser step. Callers keep what is theirs (comparisons,
// traces, timing statistics) in the step's callbacks.
//
// Thread-safety: a Trainer belongs to one rank (one thread or fiber) or one
// reference replica, like the Scenario it owns; different instances share
// nothing. A TrainConfig is a plain value.

#include <ATen/Tensor.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backends/process_group.h"
#include "fsdp/fully_shard.h"
#include "scenarios/models.h"

namespace torch::optim {
class Optimizer;
}

namespace fsdpsim::scenarios {

enum class OptimizerKind {
  SGD,   ///< momentum 0.9 (the classic tests: Adam hides scale bugs)
  Adam,  ///< default betas
};
const char* to_string(OptimizerKind kind);

enum class ZeroGradAt {
  BeforeForward,
  BeforeBackward,  ///< after the loss: the root (and ShardGradOp units) are still gathered
};
const char* to_string(ZeroGradAt at);

/// What to train and how; where (the world) is the caller's.
struct TrainConfig {
  ScenarioConfig scenario;
  fsdp::ShardingStrategy strategy = fsdp::ShardingStrategy::FullShard;
  /// HybridShard: number of replicas (world / replicate_size ranks shard
  /// each replica). Ignored by the other strategies.
  int replicate_size = 1;
  fsdp::BackwardPrefetch backward_prefetch = fsdp::BackwardPrefetch::BackwardPre;
  bool forward_prefetch = false;
  /// Every unit's mixed precision (ShardingSetup::mp_policy).
  fsdp::MixedPrecisionPolicy mp_policy;
  int steps = 5;
  OptimizerKind optimizer = OptimizerKind::SGD;
  double learning_rate = 1e-2;
  /// zero_grad(set_to_none = step % 2 == 0) as PyTorch's newer tests do;
  /// otherwise zero_grad(set_to_none = zero_grad_set_to_none) every step.
  bool zero_grad_set_to_none_alternate = false;
  bool zero_grad_set_to_none = true;
  /// Where step() zeroes the grads.
  ZeroGradAt zero_grad_at = ZeroGradAt::BeforeForward;
  /// Shard through fsdp::apply_fully_shard with the scenario's
  /// wrap_policy() instead of its hand-listed units (Scenario::shard).
  bool auto_wrap = false;
  /// Shard with FSDP2's CPUOffloadPolicy (sharded params and grads on the CPU).
  bool cpu_offload = false;
  /// Data-free (prediction at scale): the model's params and buffers and
  /// every batch are moved to the meta device, the engine runs with
  /// EngineOptions::data_free, so forward, backward, collectives and the
  /// optimiser step run on shapes only. Losses have no value: step() returns
  /// a meta tensor and train() refuses to run (it returns values).
  bool data_free = false;

  bool set_to_none_at(int step) const {
    return zero_grad_set_to_none_alternate ? step % 2 == 0 : zero_grad_set_to_none;
  }
};

/// Points of a step where a caller observes or acts (delays, checks, timers).
/// Every callback is optional.
struct StepCallbacks {
  /// Before the step's zero_grad and forward.
  std::function<void(int step)> before_forward;
  /// The loss computed (and grads zeroed if ZeroGradAt::BeforeBackward), backward not begun.
  std::function<void(int step, const at::Tensor& loss)> after_loss;
  /// Backward done (its end-of-backward callbacks included), the optimiser not stepped.
  std::function<void(int step, const at::Tensor& loss)> after_backward;
  /// The optimiser stepped.
  std::function<void(int step, const at::Tensor& loss)> after_step;
};

class Trainer {
 public:
  /// Builds make_scenario(config.scenario, rank) and its optimiser. With a
  /// `world` group: shards the scenario's units through an engine (groups
  /// from make_sharding_setup(world, config.strategy, config.replicate_size),
  /// a collective over `world`) joined by `engine_hooks`; without one, the
  /// plain model (fsdp::call falls through to forward).
  Trainer(const TrainConfig& config, int rank, const ProcessGroupPtr& world = nullptr,
          std::vector<std::shared_ptr<fsdp::EngineHooks>> engine_hooks = {});
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  /// One step on the scenario's batch of (rank, step); returns the loss.
  at::Tensor step(int step, const StepCallbacks& callbacks = {});
  /// One step on `input` (a caller's own batch).
  at::Tensor step(int step, const std::vector<at::Tensor>& input, const StepCallbacks& callbacks = {});
  /// config.steps steps; returns each step's loss (not data-free: throws
  /// std::logic_error, a meta loss has no value).
  std::vector<double> train(const StepCallbacks& callbacks = {});

  /// The parts of a step, for callers that interleave several trainers
  /// (the parity reference averages its replicas' grads between backward
  /// and step).
  void zero_grad(int step);
  at::Tensor forward_loss(const std::vector<at::Tensor>& input);
  /// sim::backward: LibTorch's engine, or the graph walk on fiber ranks.
  void backward(const at::Tensor& loss);
  void optimizer_step();

  int rank() const { return rank_; }
  const TrainConfig& config() const { return config_; }
  Scenario& scenario() { return *scenario_; }
  /// nullptr for the plain model.
  fsdp::Engine* engine() { return engine_.get(); }
  /// unique_named_parameters of the root, in registration order.
  const std::vector<std::pair<std::string, at::Tensor>>& named_params() const { return named_; }
  const std::vector<at::Tensor>& params() const { return params_; }
  /// The optimiser over params() (state dicts, tests).
  torch::optim::Optimizer& optimizer() { return *optimizer_; }

 private:
  TrainConfig config_;
  int rank_;
  std::unique_ptr<Scenario> scenario_;
  std::unique_ptr<fsdp::Engine> engine_;  // after scenario_: destroyed before the modules it registered
  std::vector<std::pair<std::string, at::Tensor>> named_;
  std::vector<at::Tensor> params_;
  std::unique_ptr<torch::optim::Optimizer> optimizer_;
};

}  // namespace fsdpsim::scenarios
