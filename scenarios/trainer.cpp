#include "scenarios/trainer.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <torch/optim/adam.h>
#include <torch/optim/sgd.h>

#include <stdexcept>

#include "fsdp/deferred_init.h"
#include "sim/fiber_autograd.h"
#include "sim/meta_kernels.h"

namespace fsdpsim::scenarios {

const char* to_string(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::SGD: return "sgd";
    case OptimizerKind::Adam: return "adam";
  }
  return "?";
}

const char* to_string(ZeroGradAt at) {
  switch (at) {
    case ZeroGradAt::BeforeForward: return "before-forward";
    case ZeroGradAt::BeforeBackward: return "before-backward";
  }
  return "?";
}

namespace {

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const TrainConfig& config,
                                                        const std::vector<at::Tensor>& params) {
  switch (config.optimizer) {
    case OptimizerKind::SGD:
      return std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(config.learning_rate).momentum(0.9));
    case OptimizerKind::Adam:
      return std::make_unique<torch::optim::Adam>(params, torch::optim::AdamOptions(config.learning_rate));
  }
  throw std::invalid_argument("unknown optimizer");
}

}  // namespace

Trainer::Trainer(const TrainConfig& config, int rank, const ProcessGroupPtr& world,
                 std::vector<std::shared_ptr<fsdp::EngineHooks>> engine_hooks)
    : config_(config), rank_(rank), scenario_(make_scenario(config.scenario, rank)) {
  if (config.data_free) {
    if (config.cpu_offload) throw std::invalid_argument("TrainConfig: data_free with cpu_offload (nothing to offload)");
    sim::register_meta_kernels();  // relu and others LibTorch registers only from Python
    fsdp::move_to_meta(*scenario_->module());
  }
  if (world) {
    ShardingSetup setup = make_sharding_setup(world, config.strategy, config.replicate_size);
    setup.mp_policy = config.mp_policy;
    setup.offload_policy.cpu_offload = config.cpu_offload;
    fsdp::EngineOptions options;
    options.queue_backward_callback = sim::queue_backward_callback;  // fiber ranks too
    options.backward_prefetch = config.backward_prefetch;
    options.forward_prefetch = config.forward_prefetch;
    options.hooks = std::move(engine_hooks);
    options.data_free = config.data_free;
    engine_ = std::make_unique<fsdp::Engine>(options);
    if (config.auto_wrap) {
      fsdp::WrapPolicyPtr policy = scenario_->wrap_policy();
      if (!policy) {
        throw std::invalid_argument("TrainConfig::auto_wrap: scenario " + scenario_->name() +
                                    " has no wrap policy (its units take different options); set auto_wrap = false");
      }
      fsdp::apply_fully_shard(*engine_, scenario_->module(), setup.options(), policy);
    } else {
      scenario_->shard(*engine_, setup);
    }
  }
  named_ = unique_named_parameters(*scenario_->module());
  for (const auto& item : named_) params_.push_back(item.second);
  optimizer_ = make_optimizer(config_, params_);
}

Trainer::~Trainer() = default;

// By hand rather than Optimizer::zero_grad: in place, a grad is detached
// first, as PyTorch's zero_grad(set_to_none=False) does.
void Trainer::zero_grad(int step) {
  const bool set_to_none = config_.set_to_none_at(step);
  for (const auto& param : params_) {
    auto& grad = param.mutable_grad();
    if (!grad.defined()) continue;
    if (set_to_none) {
      grad.reset();
    } else {
      grad.detach_();
      grad.zero_();
    }
  }
}

at::Tensor Trainer::forward_loss(const std::vector<at::Tensor>& input) { return scenario_->forward_loss(input); }

void Trainer::backward(const at::Tensor& loss) { sim::backward(loss); }

void Trainer::optimizer_step() { optimizer_->step(); }

at::Tensor Trainer::step(int step, const StepCallbacks& callbacks) {
  return this->step(step, scenario_->input(rank_, step), callbacks);
}

namespace {
std::vector<at::Tensor> to_meta(const std::vector<at::Tensor>& input) {
  std::vector<at::Tensor> meta;
  meta.reserve(input.size());
  // at::detail::empty_meta runs no dispatcher op: a data-free step charges exactly the data step's ops.
  for (const auto& t : input) {
    meta.push_back(t.defined() ? at::Tensor(at::detail::empty_meta(t.sizes(), t.options().device(at::kMeta))) : t);
  }
  return meta;
}
}  // namespace

at::Tensor Trainer::step(int step, const std::vector<at::Tensor>& data_input, const StepCallbacks& callbacks) {
  const std::vector<at::Tensor> input = config_.data_free ? to_meta(data_input) : data_input;
  if (callbacks.before_forward) callbacks.before_forward(step);
  if (config_.zero_grad_at == ZeroGradAt::BeforeForward) zero_grad(step);
  at::Tensor loss = forward_loss(input);
  if (config_.zero_grad_at == ZeroGradAt::BeforeBackward) zero_grad(step);
  if (callbacks.after_loss) callbacks.after_loss(step, loss);
  backward(loss);
  if (callbacks.after_backward) callbacks.after_backward(step, loss);
  optimizer_step();
  if (callbacks.after_step) callbacks.after_step(step, loss);
  return loss;
}

std::vector<double> Trainer::train(const StepCallbacks& callbacks) {
  if (config_.data_free) {
    throw std::logic_error(
        "Trainer::train: a data-free run (TrainConfig::data_free) has no loss values; call step() and read no values");
  }
  std::vector<double> losses;
  for (int s = 0; s < config_.steps; ++s) losses.push_back(step(s, callbacks).item<double>());
  return losses;
}

}  // namespace fsdpsim::scenarios
