#include "fsdp/checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/variable.h>

#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace fsdpsim::fsdp {

namespace {

// Per OS thread: a checkpointed region never yields, so fibers sharing the
// thread cannot observe each other's regions.
thread_local int region_depth = 0;

struct RegionGuard {
  RegionGuard() { ++region_depth; }
  ~RegionGuard() { --region_depth; }
  RegionGuard(const RegionGuard&) = delete;
  RegionGuard& operator=(const RegionGuard&) = delete;
};

at::Tensor rng_state() {
  at::Generator generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(generator.mutex());
  return generator.get_state();
}

void set_rng_state(const at::Tensor& state) {
  at::Generator generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_state(state);
}

std::string shapes(const std::vector<at::Tensor>& tensors) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < tensors.size(); ++i) {
    out << (i ? ", " : "");
    if (tensors[i].defined()) {
      out << tensors[i].sizes();
    } else {
      out << "undefined";
    }
  }
  out << "]";
  return out.str();
}

// The grad_fn of a checkpointed function's outputs: recomputes the function
// and backpropagates through the recomputed graph.
class CheckpointNode final : public torch::autograd::Node {
 public:
  CheckpointNode(CheckpointFunction fn, std::vector<at::Tensor> inputs, at::Tensor rng, std::vector<at::Tensor> outputs)
      : fn_(std::move(fn)), rng_(std::move(rng)), output_shapes_(shapes(outputs)) {
    for (auto& input : inputs) {
      requires_grad_.push_back(input.defined() && input.requires_grad());
      inputs_.push_back(input.defined() ? input.detach() : input);
    }
  }
  std::string name() const override { return "fsdp::CheckpointBackward"; }
  /// For each output of the function, its gradient's index among the
  /// node's inputs (-1: not differentiable).
  void set_grad_slots(std::vector<int> slots) { grad_slots_ = std::move(slots); }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    if (released_) throw std::runtime_error("fsdp::checkpoint: backward through the same graph a second time");
    std::vector<at::Tensor> inputs;
    for (size_t i = 0; i < inputs_.size(); ++i) {
      at::Tensor input = inputs_[i].defined() ? inputs_[i].detach() : inputs_[i];
      if (requires_grad_[i]) input.requires_grad_(true);
      inputs.push_back(std::move(input));
    }
    std::vector<at::Tensor> outputs = recompute(inputs);
    torch::autograd::variable_list roots;
    torch::autograd::variable_list root_grads;
    for (size_t i = 0; i < outputs.size(); ++i) {
      const int slot = grad_slots_[i];
      if (slot < 0 || !grads[static_cast<size_t>(slot)].defined() || !outputs[i].requires_grad()) continue;
      roots.push_back(outputs[i]);
      root_grads.push_back(grads[static_cast<size_t>(slot)]);
    }
    // Params accumulate their grads here; the inputs' grads go on below.
    if (!roots.empty()) torch::autograd::backward(roots, root_grads, /*retain_graph=*/false, /*create_graph=*/false);
    torch::autograd::variable_list input_grads;
    for (auto& input : inputs) {
      input_grads.push_back(input.defined() && input.requires_grad() ? input.grad() : at::Tensor());
    }
    release_variables();
    return input_grads;
  }

  void release_variables() override {
    inputs_.clear();
    rng_ = at::Tensor();
    released_ = true;
  }

 private:
  std::vector<at::Tensor> recompute(const std::vector<at::Tensor>& inputs) {
    std::vector<at::Tensor> outputs;
    {
      RegionGuard region;
      at::AutoGradMode enable(true);
      if (rng_.defined()) {
        const at::Tensor current = rng_state();
        set_rng_state(rng_);
        try {
          outputs = fn_(inputs);
        } catch (...) {
          set_rng_state(current);
          throw;
        }
        set_rng_state(current);
      } else {
        outputs = fn_(inputs);
      }
    }
    if (shapes(outputs) != output_shapes_) {
      throw std::runtime_error("fsdp::checkpoint: the recompute in backward returned outputs " + shapes(outputs) +
                               ", the forward returned " + output_shapes_ +
                               " (the checkpointed function must compute the same thing both times)");
    }
    return outputs;
  }

  CheckpointFunction fn_;
  std::vector<at::Tensor> inputs_;  // detached: the function's inputs, the only thing kept
  std::vector<bool> requires_grad_;
  at::Tensor rng_;
  std::string output_shapes_;
  std::vector<int> grad_slots_;
  bool released_ = false;
};

}  // namespace

namespace detail {
bool in_checkpoint_region() { return region_depth > 0; }
}  // namespace detail

std::vector<at::Tensor> checkpoint(const CheckpointFunction& fn, const std::vector<at::Tensor>& inputs,
                                   const CheckpointOptions& options) {
  if (!fn) throw std::invalid_argument("fsdp::checkpoint: the function is empty");
  if (!at::GradMode::is_enabled()) {
    RegionGuard region;
    return fn(inputs);
  }
  const at::Tensor rng = options.preserve_rng_state ? rng_state() : at::Tensor();
  std::vector<at::Tensor> outputs;
  {
    RegionGuard region;
    at::NoGradGuard no_grad;  // no graph, no saved activations
    outputs = fn(inputs);
  }
  // Params used inside make the outputs differentiable even when no input
  // is, and only the recompute can tell: the node is always attached.
  auto node = c10::make_intrusive<CheckpointNode>(fn, inputs, rng, outputs);
  node->set_next_edges(torch::autograd::collect_next_edges(inputs));
  std::vector<int> slots;
  for (auto& output : outputs) {
    if (!output.defined() || !torch::autograd::isDifferentiableType(output.scalar_type())) {
      slots.push_back(-1);
      continue;
    }
    if (output.is_view() || output.requires_grad()) {
      // An input returned as is, or a view: give the node its own tensor.
      at::NoGradGuard no_grad;
      output = output.clone();
    }
    slots.push_back(static_cast<int>(node->num_inputs()));
    torch::autograd::create_gradient_edge(output, node);
  }
  node->set_grad_slots(std::move(slots));
  return outputs;
}

at::Tensor checkpoint(const std::function<at::Tensor(const at::Tensor&)>& fn, const at::Tensor& input,
                      const CheckpointOptions& options) {
  if (!fn) throw std::invalid_argument("fsdp::checkpoint: the function is empty");
  // By value: the node keeps the function until backward.
  return checkpoint([fn](const std::vector<at::Tensor>& in) { return std::vector<at::Tensor>{fn(in[0])}; },
                    std::vector<at::Tensor>{input}, options)[0];
}

}  // namespace fsdpsim::fsdp
