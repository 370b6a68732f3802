#include "sim/fiber_autograd.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/edge.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>
#include <boost/fiber/fss.hpp>

#include <algorithm>
#include <exception>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "backends/errors.h"
#include "sim/world.h"

namespace fsdpsim::sim {
namespace {

using torch::autograd::Edge;
using torch::autograd::edge_list;
using torch::autograd::Node;
using torch::autograd::variable_list;

// The state of one run_graph_backward pass, owned by the pass's stack frame
// and published per fiber (a plain thread is its own main fiber).
struct PassState {
  std::vector<std::function<void()>> callbacks;
  // Identity of the LibTorch engine's current graph task on this OS thread
  // when the pass began: a different one later means an engine pass nested
  // inside ours (a hook called Tensor::backward) is the innermost pass.
  const void* engine_task = nullptr;
};

const void* current_engine_task() { return torch::autograd::get_current_graph_task_nodes_in_graph(); }

// Leaked on purpose: destroying it at exit would touch Boost.Fiber's per-thread
// context after that is gone. The pointee lives on a pass's stack frame, so
// there is nothing to clean up.
boost::fibers::fiber_specific_ptr<PassState>& active_pass() {
  static auto* pass = new boost::fibers::fiber_specific_ptr<PassState>([](PassState*) {});
  return *pass;
}

// Publishes a pass for the calling fiber; restores the enclosing one (nested
// passes from hooks) on exit.
class PassScope {
 public:
  explicit PassScope(PassState& state) : outer_(active_pass().get()) {
    state.engine_task = current_engine_task();
    active_pass().reset(&state);
  }
  ~PassScope() { active_pass().reset(outer_); }
  PassScope(const PassScope&) = delete;
  PassScope& operator=(const PassScope&) = delete;

 private:
  PassState* outer_;
};

std::string node_context(const Node& fn) { return "(in backward node " + fn.name() + ")"; }

// Rethrows the exception in flight with the node named. c10::Error and the
// comm errors keep their type (callers and World tell an aborted rank from a
// failed one by type); anything else becomes a std::runtime_error that
// carries the original as its nested exception.
[[noreturn]] void rethrow_in_node(const Node& fn) {
  const std::string where = node_context(fn);
  try {
    throw;
  } catch (c10::Error& e) {
    e.add_context(where);
    throw;
  } catch (const WorldAbortedError& e) {
    throw WorldAbortedError(std::string(e.what()) + " " + where);
  } catch (const CollectiveTimeoutError& e) {
    throw CollectiveTimeoutError(std::string(e.what()) + " " + where);
  } catch (const CollectiveMismatchError& e) {
    throw CollectiveMismatchError(std::string(e.what()) + " " + where);
  } catch (const CommError& e) {
    throw CommError(std::string(e.what()) + " " + where);
  } catch (const std::exception& e) {
    std::throw_with_nested(std::runtime_error(std::string(e.what()) + " " + where));
  }
}

// What the engine's validate_outputs does for CPU tensors: undefined grads
// pass, a shape the input can be broadcast to is summed back, a gradient of
// another real dtype is cast to the input's grad_dtype (none: any dtype is
// kept, LibTorch 2.x); anything else is an error naming `who`.
void validate_grads(const edge_list& edges, variable_list& grads, const std::string& who) {
  TORCH_CHECK(grads.size() == edges.size(), who, " returned an invalid number of gradients - expected ", edges.size(),
              ", but got ", grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const Edge& edge = edges[i];
    at::Tensor& grad = grads[i];
    if (!edge.is_valid() || !grad.defined()) continue;
    const auto& meta = edge.function->input_metadata(edge.input_nr);
    grad = meta.maybe_reduce(i, std::move(grad),
                             [&](const std::string& message) { return who + " returned an " + message; });
    const std::optional<at::ScalarType> expected = meta.was_default_constructed() ? std::nullopt : meta.grad_dtype();
    if (expected) {
      TORCH_CHECK(at::isFloatingType(grad.scalar_type()) || at::isComplexType(*expected) == grad.is_complex(), who,
                  " returned an invalid gradient at index ", i, " - expected dtype ", *expected, " but got ",
                  grad.scalar_type());
      if (grad.scalar_type() != *expected) grad = grad.to(*expected);
    }
    TORCH_CHECK(grad.layout() == meta.layout() || grad.is_sparse(), who, " returned an invalid gradient at index ", i,
                " - expected layout ", meta.layout(), " but got ", grad.layout());
    if (grad.device() != meta.device()) {
      TORCH_CHECK(grad.dim() == 0, who, " returned an invalid gradient at index ", i, " - expected device ",
                  meta.device(), " but got ", grad.device());
      grad = grad.to(meta.device());
    }
  }
}

// Sums gradients for one node input (InputBuffer::add): undefined adds
// nothing; a sparse sum is taken dense + sparse, which ATen routes.
void add_grad(at::Tensor& slot, at::Tensor&& grad) {
  if (!grad.defined()) return;
  if (!slot.defined()) {
    slot = std::move(grad);
  } else if (slot.is_sparse() || slot.is_sparse_csr()) {
    slot = grad + slot;
  } else {
    slot = slot + grad;
  }
}

// A node whose every dependency has delivered, with its summed input grads.
struct ReadyNode {
  c10::intrusive_ptr<Node> fn;
  variable_list inputs;
};

// The engine's CPU ready queue: a std::priority_queue-shaped max-heap on
// sequence_nr (later forward ops first, AccumulateGrad's UINT64_MAX before
// all). Same comparator and same heap algorithm as the engine, so the same
// push sequence pops in the same order, ties between AccumulateGrads included.
class ReadyQueue {
 public:
  bool empty() const { return heap_.empty(); }
  void push(ReadyNode node) {
    heap_.push_back(std::move(node));
    std::push_heap(heap_.begin(), heap_.end(), RunsLater{});
  }
  ReadyNode pop() {
    std::pop_heap(heap_.begin(), heap_.end(), RunsLater{});
    ReadyNode node = std::move(heap_.back());
    heap_.pop_back();
    return node;
  }

 private:
  struct RunsLater {
    bool operator()(const ReadyNode& a, const ReadyNode& b) const { return a.fn->sequence_nr() < b.fn->sequence_nr(); }
  };
  std::vector<ReadyNode> heap_;
};

// Number of edges into each node reachable from root (the root itself has 0).
std::unordered_map<Node*, int> count_dependencies(Node* root) {
  std::unordered_map<Node*, int> dependencies;
  std::unordered_set<Node*> seen;
  std::vector<Node*> stack{root};
  while (!stack.empty()) {
    Node* fn = stack.back();
    stack.pop_back();
    for (const Edge& edge : fn->next_edges()) {
      Node* next = edge.function.get();
      if (next == nullptr) continue;
      ++dependencies[next];
      if (seen.insert(next).second) stack.push_back(next);
    }
  }
  return dependencies;
}

// The hooks that see a node's incoming gradients, in the engine's order
// (call_tensor_pre_hooks, then call_pre_hooks): tensor pre-hooks (a leaf's
// register_hook lands on its AccumulateGrad's), then retains_grad hooks, then
// the node's own pre-hooks.
variable_list run_pre_hooks(Node& fn, variable_list inputs) {
  for (const auto& hook : fn.tensor_pre_hooks()) inputs = (*hook)(inputs);
  for (const auto& entry : fn.retains_grad_hooks()) inputs = (*entry.second)(inputs);
  for (const auto& hook : fn.pre_hooks()) inputs = (*hook)(inputs);
  return inputs;
}

// Pre-hooks, the node, validation, post-hooks (the engine's call_function),
// then the saved variables are freed (retain_graph=false).
variable_list run_node(Node& fn, variable_list inputs) {
  variable_list outputs;
  const bool has_post_hooks = !fn.post_hooks().empty();
  try {
    inputs = run_pre_hooks(fn, std::move(inputs));
    fn.will_release_variables();
    // Without post hooks the inputs are moved in, so AccumulateGrad may steal
    // the incoming grad exactly as under the engine.
    outputs = has_post_hooks ? fn(variable_list(inputs)) : fn(std::move(inputs));
  } catch (...) {
    rethrow_in_node(fn);
  }
  validate_grads(fn.next_edges(), outputs, "Function " + fn.name());
  if (has_post_hooks) {
    try {
      // NOLINTNEXTLINE(bugprone-use-after-move): moved above only when there are no post hooks
      for (const auto& hook : fn.post_hooks()) outputs = (*hook)(outputs, inputs);
    } catch (...) {
      rethrow_in_node(fn);
    }
    TORCH_CHECK(outputs.size() == fn.num_outputs(), "a post hook of ", fn.name(), " returned ", outputs.size(),
                " gradients, expected ", fn.num_outputs());
  }
  fn.release_variables();
  return outputs;
}

}  // namespace

void run_graph_backward(const at::Tensor& root, const at::Tensor& grad) {
  TORCH_CHECK(root.defined(), "run_graph_backward: the root tensor is undefined");
  const Edge root_edge = torch::autograd::impl::gradient_edge(root);
  TORCH_CHECK(root_edge.function, "element 0 of tensors does not require grad and does not have a grad_fn");
  at::Tensor root_grad = grad;
  if (!root_grad.defined()) {
    TORCH_CHECK(root.numel() == 1, "grad can be implicitly created only for scalar outputs");
    root_grad = at::ones_like(root, LEGACY_CONTIGUOUS_MEMORY_FORMAT);
  } else {
    TORCH_CHECK(root_grad.is_complex() == root.is_complex(),
                "For complex Tensors, both grad_output and output are required to have the same dtype. "
                "Mismatch in dtype: grad_output[0] has a dtype of ",
                root_grad.scalar_type(), " and output[0] has a dtype of ", root.scalar_type(), ".");
  }

  // create_graph=false: nodes, hooks and callbacks run with grad mode off.
  at::AutoGradMode grad_mode(false);
  PassState state;
  PassScope scope(state);

  variable_list root_grads{std::move(root_grad)};
  validate_grads({root_edge}, root_grads, "the root gradient");

  std::unordered_map<Node*, int> dependencies = count_dependencies(root_edge.function.get());
  std::unordered_map<Node*, ReadyNode> waiting;  // some but not all dependencies delivered
  ReadyQueue ready;
  {
    variable_list inputs(root_edge.function->num_inputs());
    add_grad(inputs.at(root_edge.input_nr), std::move(root_grads[0]));
    ready.push({root_edge.function, std::move(inputs)});
  }

  while (!ready.empty()) {
    ReadyNode task = ready.pop();
    Node& fn = *task.fn;
    variable_list outputs = run_node(fn, std::move(task.inputs));
    for (size_t i = 0; i < outputs.size(); ++i) {
      const Edge& next = fn.next_edge(i);
      if (!next.is_valid()) continue;
      Node* next_fn = next.function.get();
      auto dep = dependencies.find(next_fn);
      TORCH_INTERNAL_ASSERT(dep != dependencies.end(), "dependency not found for ", next_fn->name());
      const bool is_ready = --dep->second == 0;
      if (is_ready) dependencies.erase(dep);

      auto pending = waiting.find(next_fn);
      if (pending == waiting.end()) {
        ReadyNode next_task{next.function, variable_list(next_fn->num_inputs())};
        add_grad(next_task.inputs.at(next.input_nr), std::move(outputs[i]));
        if (is_ready) {
          ready.push(std::move(next_task));
        } else {
          waiting.emplace(next_fn, std::move(next_task));
        }
      } else {
        add_grad(pending->second.inputs.at(next.input_nr), std::move(outputs[i]));
        if (is_ready) {
          ready.push(std::move(pending->second));
          waiting.erase(pending);
        }
      }
    }
  }
  TORCH_INTERNAL_ASSERT(waiting.empty(), "could not compute gradients for some functions");

  // Indexed loop: a callback may queue more (the vector may reallocate).
  for (size_t i = 0; i < state.callbacks.size(); ++i) {
    std::function<void()> callback = std::move(state.callbacks[i]);
    callback();
  }
}

void backward(const at::Tensor& root, const at::Tensor& grad) {
  const RankContext* rank = current_rank();
  if (rank != nullptr && rank->rank_kind() == RankKind::Fibers) {
    run_graph_backward(root, grad);
  } else {
    root.backward(grad);
  }
}

bool in_backward_pass() { return active_pass().get() != nullptr || current_engine_task() != nullptr; }

void queue_backward_callback(std::function<void()> fn) {
  if (!fn) throw std::invalid_argument("queue_backward_callback: empty callback");
  PassState* pass = active_pass().get();
  const void* engine_task = current_engine_task();
  if (pass != nullptr && pass->engine_task == engine_task) {
    pass->callbacks.push_back(std::move(fn));
  } else if (engine_task != nullptr) {
    torch::autograd::Engine::get_default_engine().queue_callback(std::move(fn));
  } else {
    throw std::logic_error("queue_backward_callback called outside a backward pass");
  }
}

}  // namespace fsdpsim::sim
