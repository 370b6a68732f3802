#pragma once
// Backward passes that fiber ranks can block in.
//
// LibTorch's autograd engine keeps its ready queue and current graph task per
// OS thread, and waits on them with OS primitives. Fiber ranks share one OS
// thread, so several fibers each inside loss.backward(), each blocked in a
// backward hook on a collective, hang the thread. run_graph_backward() walks
// the autograd graph itself on the calling fiber instead: no engine threads,
// no engine state, so a hook that blocks in a fiber-aware wait lets the other
// fibers of the thread run (and finish their own backward passes).
//
// Order: nodes run one at a time in the order the engine's CPU ready queue
// gives them (among ready nodes the highest sequence_nr first, AccumulateGrad
// before everything), so the same graph gives the same node order, the same
// gradient sums and bitwise the same gradients as Tensor::backward().
//
// Hooks, as LibTorch 2.x's engine runs them around each node: tensor
// pre-hooks (Tensor::register_hook; a leaf's live on its AccumulateGrad),
// then retains_grad hooks, then the node's pre-hooks; the node; its
// post-hooks. Post-accumulate-grad hooks run inside AccumulateGrad itself.
//
// Thread-safety: each pass belongs to the thread or fiber that runs it; its
// state (the callback list of queue_backward_callback) is per fiber. Passes of
// different fibers may interleave on one OS thread as long as they do not
// share graph nodes; in particular a leaf with a blocking post-accumulate-grad
// hook must not be shared between fibers (it runs under AccumulateGrad's
// std::mutex).
//
// Not supported by run_graph_backward (LibTorch's engine is used elsewhere):
// retain_graph, create_graph, autograd::grad(inputs=...), anomaly mode, CUDA
// streams, reentrant checkpointing.

#include <ATen/Tensor.h>

#include <functional>

namespace fsdpsim::sim {

/// Runs backward from `root` on the calling thread or fiber by walking the
/// autograd graph (no LibTorch engine, no engine threads). Same semantics as
/// root.backward(grad) with retain_graph=false, create_graph=false: leaves
/// accumulate into .grad through their AccumulateGrad nodes, tensor hooks and
/// retain_grad() work, undefined gradients flow as undefined, the graph's
/// saved variables are released (a second pass through it fails like
/// LibTorch's). An undefined `grad` means ones, for a one-element root only.
/// An exception from a node or hook propagates with the node's name added
/// (c10::Error and the fsdpsim::CommError types keep their type); callbacks
/// queued by the failed pass do not run.
void run_graph_backward(const at::Tensor& root, const at::Tensor& grad = {});

/// What engine code calls for a backward pass: run_graph_backward() on a fiber
/// rank, root.backward(grad) on LibTorch's engine everywhere else.
void backward(const at::Tensor& root, const at::Tensor& grad = {});

/// Queues `fn` to run once at the end of the backward pass running on this
/// thread or fiber, after every node of it has run: in run_graph_backward()
/// from the pass's own list, on LibTorch's engine through
/// Engine::queue_callback. Callbacks run in queue order with grad mode off and
/// may queue further callbacks (they run in the same pass). Throws
/// std::logic_error outside a backward pass.
void queue_backward_callback(std::function<void()> fn);

/// True while a run_graph_backward() pass or a LibTorch engine pass runs on
/// this thread or fiber (what queue_backward_callback needs).
bool in_backward_pass();

}  // namespace fsdpsim::sim
