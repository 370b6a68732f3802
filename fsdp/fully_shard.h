#pragma once
// fully_shard for LibTorch modules: per-parameter sharding on dim 0 (the
// design of PyTorch's newer FSDP), one engine per rank.
//
//   fsdp::Engine engine(engine_options);                 // one per rank
//   for (auto& layer : model->layers) engine.fully_shard(layer.ptr(), options);
//   engine.fully_shard(model.ptr(), options);             // the root last
//   torch::optim::SGD optimizer(model->parameters(), ...);  // sees the shards
//   auto out = fsdp::call(model, input);                  // forward through units
//   loss.backward();  // (sim::backward on fiber ranks) re-gathers, reduce-scatters
//   optimizer.step();
//
// Forward interception: the C++ frontend has no forward hooks, so a unit's
// forward runs through fsdp::call(module, args...) (or fsdp::forward_sequential
// for a torch::nn::Sequential), which gathers the unit's parameters before
// and frees them after. Inside a user module's forward, call sharded children
// the same way: `x = fsdp::call(block, x);`. Calling an unsharded module
// through fsdp::call is a plain forward.
//
// Parameters: each rank owns a dim-0 chunk of every parameter, padded to
// ceil(dim0 / world) rows (ranks past the end own an empty chunk). The
// module's parameter Tensors keep their identity and names; their data is
// swapped (Tensor::set_data) between the rank's shard (between steps) and the
// full tensor (inside forward/backward), so optimisers built on
// module->parameters() step on shards, and param.grad is the sharded grad.
//
// Thread-safety: an Engine and its modules belong to one rank (one thread or
// fiber). Different ranks' engines share nothing but the process groups.

#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>

#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "backends/process_group.h"
#include "fsdp/all_gather_extension.h"

namespace fsdpsim::fsdp {

enum class ShardingStrategy {
  FullShard,    ///< shard params, grads and optimiser state; reshard after forward
  ShardGradOp,  ///< like FullShard but keep params gathered from forward to backward
  NoShard,      ///< replicate params; all-reduce grads (DDP)
  HybridShard,  ///< shard within shard_group, all-reduce grads across replicate_group
};
const char* to_string(ShardingStrategy strategy);

enum class TrainingState { Idle, Forward, PreBackward, PostBackward };
const char* to_string(TrainingState state);

/// Engine events, for tests (GoogleMock) and traces. Every call names the
/// unit by its FQN ("" for the root) and the unit's training state.
class EngineHooks {
 public:
  virtual ~EngineHooks() = default;
  /// All-gather of the unit's params issued (not recorded when already gathered).
  virtual void on_unshard(const std::string& unit, TrainingState state) = 0;
  /// The unit's gathered params freed.
  virtual void on_reshard(const std::string& unit, TrainingState state) = 0;
  /// The first gradient for one of the unit's outputs arrived.
  virtual void on_pre_backward(const std::string& unit, TrainingState state) = 0;
  /// The unit's post-backward step ran: its gradients' reduction issued,
  /// or nothing to reduce yet (no gradient arrived, e.g. a param used by two
  /// forwards accumulates once both passes are done).
  virtual void on_post_backward(const std::string& unit, TrainingState state) = 0;
  /// The end-of-backward step ran (once per backward pass, root unit).
  virtual void on_final_callback(const std::string& unit, TrainingState state) = 0;
  /// `unit` chose `target` to gather ahead ("" = nothing to prefetch). A
  /// target already gathered or in flight gets no on_unshard.
  virtual void on_prefetch(const std::string& unit, const std::string& target, TrainingState state) = 0;
};

/// Does nothing; derive to observe a few events only.
class NoEngineHooks : public EngineHooks {
 public:
  void on_unshard(const std::string&, TrainingState) override {}
  void on_reshard(const std::string&, TrainingState) override {}
  void on_pre_backward(const std::string&, TrainingState) override {}
  void on_post_backward(const std::string&, TrainingState) override {}
  void on_final_callback(const std::string&, TrainingState) override {}
  void on_prefetch(const std::string&, const std::string&, TrainingState) override {}
};

/// Runs `callback` at the end of the backward pass in flight on this thread
/// or fiber. The default uses LibTorch's engine; fiber ranks, whose backward
/// runs through sim::backward, pass sim::queue_backward_callback.
using QueueBackwardCallback = std::function<void(std::function<void()>)>;

/// When backward gathers the next unit (the next in reverse post-forward
/// order: the root first, then the last block, ...).
enum class BackwardPrefetch {
  None,          ///< each unit gathers itself when its backward begins
  BackwardPre,   ///< issue the next unit's gather before this unit's gradient compute
  BackwardPost,  ///< issue it after this unit's gradient compute (its reduce-scatter issued)
};
const char* to_string(BackwardPrefetch policy);

struct EngineOptions {
  QueueBackwardCallback queue_backward_callback;  ///< empty: LibTorch's engine
  std::vector<std::shared_ptr<EngineHooks>> hooks;
  BackwardPrefetch backward_prefetch = BackwardPrefetch::BackwardPre;
  /// Implicit forward prefetch: when a unit's forward starts, gather the unit
  /// that followed it in the previous forward.
  bool forward_prefetch = false;
  /// Prefetched gathers issued but not yet used by their unit; further
  /// prefetches wait (are skipped) so memory cannot run away.
  int max_prefetches_in_flight = 2;
  /// Data-free mode (sim's prediction at scale): params stay on the meta
  /// device (shapes and dtypes, no storage) and forward, backward and every
  /// collective run on meta tensors without materialize(); nothing has values.
  bool data_free = false;
};

/// Mixed precision for one unit (FSDP2's MixedPrecisionPolicy). The sharded
/// params stay in their own dtype (the optimiser's master copy); the unit's
/// all-gather, forward and backward run in param_dtype.
///
///   param_dtype   each shard is cast before the all-gather, so the gathered
///                 params (and the bytes gathered) are in this dtype; also the
///                 dtype forward inputs are cast to. Unset, or the params' own
///                 dtype, or params that are not floating point: no cast.
///   reduce_dtype  the dtype grads are reduce-scattered (all-reduced) in.
///                 Unset: the params' own dtype (FSDP2 >= 2.15; FSDP1 and
///                 older FSDP2 reduced in param_dtype). The reduced shard is
///                 cast back to the params' dtype before it lands in .grad.
///                 A float16 reduction divides by ~sqrt(ranks) before the sum
///                 and the rest after it, to stay in range (FSDP2's rule).
///   output_dtype  floating-point outputs of the unit's forward are cast to it.
///   cast_forward_inputs  floating-point tensor inputs of the unit's forward
///                 are cast to param_dtype (every unit casts its own inputs).
/// Buffers are never cast. Each unit follows its own policy: a child whose
/// param_dtype differs from its parent's casts its inputs to its own, and its
/// output_dtype can hand the parent back the parent's dtype.
struct MixedPrecisionPolicy {
  std::optional<at::ScalarType> param_dtype;
  std::optional<at::ScalarType> reduce_dtype;
  std::optional<at::ScalarType> output_dtype;
  bool cast_forward_inputs = true;
};

/// FSDP2's offload_policy: OffloadPolicy() (no offload, the default) or
/// CPUOffloadPolicy(pin_memory).
struct OffloadPolicy {
  /// Sharded params and their grads (so the optimiser's state) live on the
  /// CPU; each all-gather first copies the shard to the compute device, each
  /// reduced grad is copied back to the CPU. Copies are real copies even when
  /// the compute device is the CPU too.
  bool cpu_offload = false;
  /// Pin the CPU shards (faster, overlappable host-device copies); applies
  /// only when the compute device is an accelerator (pinning needs one).
  bool pin_memory = true;
};

struct FullyShardOptions {
  /// Params are sharded over this group (HybridShard: the shard axis).
  ProcessGroupPtr shard_group;
  /// HybridShard: grads are all-reduced (averaged) across this group after the
  /// reduce-scatter. NoShard: the group grads are all-reduced over (the params
  /// are then "sharded" over a size-1 group).
  ProcessGroupPtr replicate_group;
  ShardingStrategy strategy = ShardingStrategy::FullShard;
  /// Gradients are summed over ranks and divided by the number of ranks they
  /// were reduced over (the DDP mean). With a predivide factor f, each rank's
  /// grad is divided by f before the sum and the sum by world / f after.
  double gradient_predivide_factor = 1.0;
  /// Broadcast params and buffers from rank 0 of the world before sharding.
  bool sync_module_states = false;
  /// Mixed precision; the default computes and reduces in the params' dtype.
  /// Throws std::invalid_argument (at fully_shard) for a dtype that is not
  /// floating point.
  MixedPrecisionPolicy mp_policy;
  /// FSDP2's set_reduce_scatter_unused_params. false (FSDP2's default): only
  /// params with a grad on this rank take part in the unit's reduce-scatter,
  /// so a param no rank used keeps grad None (optimisers skip it, as
  /// unsharded); ranks that use different params of the unit then issue
  /// different reduce-scatters, which fail with a collective mismatch naming
  /// the unit. true: every param that requires grad takes part, zeros where a
  /// rank did not use it (the DDP mean for rank-divergent control flow); a
  /// param no rank used then gets a zero grad, not None.
  bool reduce_scatter_unused_params = false;
  /// The compute device (FSDP2: the mesh's device): gathered params and
  /// collectives live here. Unset: the params' device. Set: every param not
  /// on the meta device must already be there (FSDP2 checks the same).
  std::optional<at::Device> device;
  OffloadPolicy offload_policy;
  /// Params whose all-gather an extension shapes (fsdp/all_gather_extension.h),
  /// by FQN relative to the module given to fully_shard. Every key must name
  /// a param this unit manages (not a nested unit's): fully_shard throws
  /// std::invalid_argument otherwise. A unit with any extension packs all its
  /// params' gather inputs into one all-gather (bytes, when dtypes differ).
  std::map<std::string, std::shared_ptr<AllGatherExtension>> all_gather_extensions;
};

/// Engine::summon_full_params: what it gathers and what it keeps on exit.
struct FullParamsOptions {
  /// On exit, write each rank's full params (edited or not) back into its
  /// shard, each rank from its own copy: edits must be the same on every
  /// rank (as FSDP1 documents). false: edits are dropped.
  bool writeback = true;
  /// Also gather the sharded grads: each param's grad is its full grad inside
  /// (None where no rank of its shard group has one), and on exit with
  /// writeback its rows go back into the sharded grad (None stays None).
  /// FSDP1 restores the saved grad shard instead (its edits are dropped).
  bool with_grads = false;
  /// Only the rank that is rank 0 of a unit's shard group (and of its
  /// replicate group) sees the full params; every rank still joins the
  /// gathers, the others reshard at once. Needs writeback = false (FSDP1
  /// refuses the pair too: the other ranks have nothing to write back).
  bool rank0_only = false;
};

/// One param's shard to fill when a meta-built model is materialised
/// (Engine::materialize).
struct ShardInit {
  std::string fqn;                  ///< from the root given to materialize
  std::vector<int64_t> full_shape;  ///< the whole param's shape
  int64_t row_begin = 0;            ///< the full param's row at the shard's row 0
  at::Tensor shard;                 ///< this rank's rows (none past the end), on the device: fill in place
};
using ShardInitFn = std::function<void(const ShardInit&)>;

struct MaterializeOptions {
  /// Where the shards (and buffers) are allocated.
  at::Device device = at::kCPU;
  /// Fills each meta param's shard; required when a param is on meta.
  ShardInitFn init_param;
  /// Fills each meta buffer (buffers are not sharded: each rank holds it
  /// whole); required when a buffer is on meta.
  std::function<void(const std::string& fqn, const at::Tensor& buffer)> init_buffer;
};

class Engine;

/// RAII: while alive, the params of the summoned units are their full
/// tensors (identity kept, shapes full); close() or the destructor reshards
/// them, writing back per FullParamsOptions. Thread-safety: as its Engine
/// (one rank's thread or fiber).
class FullParams {
 public:
  FullParams(FullParams&& other) noexcept;
  FullParams& operator=(FullParams&&) = delete;
  FullParams(const FullParams&) = delete;
  FullParams& operator=(const FullParams&) = delete;
  /// Calls close(); its error propagates unless an exception is already
  /// unwinding the stack (then the params are resharded and it is dropped).
  ~FullParams() noexcept(false);
  /// Reshards now (at most once). Throws std::runtime_error naming each param
  /// whose shape (or grad's shape) changed inside: those edits are dropped,
  /// the other params are written back and every unit is resharded.
  void close();

  struct State;
  explicit FullParams(std::unique_ptr<State> state);

 private:
  std::unique_ptr<State> state_;
};

class Unit;

/// Runs `module->forward(args...)` as a unit's forward when `module` is
/// sharded (gather before, free after, backward hooks on inputs and outputs),
/// as a plain forward otherwise. Tensor arguments and results (a Tensor, a
/// tuple or vector of them) are what the backward hooks attach to. `module`
/// is a std::shared_ptr to the module or its ModuleHolder (torch::nn::Linear).
template <typename ModuleType, typename... Args>
auto call(const std::shared_ptr<ModuleType>& module, Args&&... args);

/// forward through every element of `sequential`, each through fsdp::call.
/// fsdp::call on a Sequential comes here, so its children that are units
/// gather (Sequential::forward would call them directly, with their shards).
at::Tensor forward_sequential(const std::shared_ptr<torch::nn::SequentialImpl>& sequential, at::Tensor input);
at::Tensor forward_sequential(torch::nn::Sequential& sequential, at::Tensor input);

class Engine {
 public:
  explicit Engine(EngineOptions options = {});
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  /// Makes `module` a unit: shards every parameter of it and its descendants
  /// that no unit manages yet. Shard children first and the root last.
  /// Throws std::invalid_argument for a module sharded twice, params on
  /// different devices, a missing group, or a strategy/group mismatch.
  void fully_shard(const std::shared_ptr<torch::nn::Module>& module, const FullyShardOptions& options);

  /// The root unit (the outermost one run by fsdp::call), once a forward ran.
  const Unit* root() const;
  /// Every unit, in the order fully_shard made them.
  std::vector<const Unit*> units() const;
  /// Whether a unit of this engine holds `param` (the same TensorImpl).
  bool manages(const at::Tensor& param) const;
  /// Explicit prefetch lists (override the implicit choice for `module`):
  /// when its forward (backward) begins, gather `targets` in order.
  void set_forward_prefetch(const std::shared_ptr<torch::nn::Module>& module,
                            const std::vector<std::shared_ptr<torch::nn::Module>>& targets);
  void set_backward_prefetch(const std::shared_ptr<torch::nn::Module>& module,
                             const std::vector<std::shared_ptr<torch::nn::Module>>& targets);

  /// Gradient accumulation (FSDP2's FSDPModule setters). Each applies to
  /// every unit, or to the unit of `module` and, with `recurse`, every unit
  /// inside it; a setting holds until changed.
  ///
  /// requires_gradient_sync = false: backward issues no reduce-scatter and no
  /// all-reduce; each param's full-size grad is kept on this rank and summed
  /// over such backwards, and the next backward with sync reduces the sum
  /// (FSDP2's no_sync). Sharded grads already there (a synced backward
  /// without zero_grad) keep accumulating as usual.
  void set_requires_gradient_sync(bool sync);
  void set_requires_gradient_sync(const std::shared_ptr<torch::nn::Module>& module, bool sync, bool recurse = true);
  /// HybridShard / NoShard: false keeps the reduce-scatter but skips the
  /// all-reduce across replicas; its outputs are summed and join the next
  /// all-reduce.
  void set_requires_all_reduce(bool all_reduce);
  void set_requires_all_reduce(const std::shared_ptr<torch::nn::Module>& module, bool all_reduce, bool recurse = true);
  /// false: a unit's params stay gathered after its backward, so the next
  /// forward issues no all-gather (more memory, less communication). As in
  /// FSDP2, call reshard_all() before optimizer.step(): until then the
  /// params are full-size and their sharded grads are set aside.
  void set_reshard_after_backward(bool reshard);
  void set_reshard_after_backward(const std::shared_ptr<torch::nn::Module>& module, bool reshard, bool recurse = true);

  /// FSDP1's summon_full_params / FSDP2's unshard, as a scope: gathers the
  /// params of every unit (of the units in `module`'s subtree) until the
  /// returned FullParams closes. Every rank of the units' groups must call it
  /// alike (it issues their all-gathers; with_grads also one all-reduce and
  /// one all-gather per unit). Throws std::runtime_error inside a forward or
  /// backward or when already inside one; std::invalid_argument for
  /// rank0_only with writeback. Units gathered by a forward whose backward has
  /// not run are resharded first (their backward gathers them again);
  /// fsdp::call of a unit while it is open throws.
  [[nodiscard]] FullParams summon_full_params(const FullParamsOptions& options = {});
  [[nodiscard]] FullParams summon_full_params(const std::shared_ptr<torch::nn::Module>& module,
                                              const FullParamsOptions& options = {});

  /// Deferred init: allocates on options.device, for every param of `root`
  /// still on the meta device, only this rank's padded shard and fills its
  /// rows through options.init_param; meta buffers are allocated whole and
  /// filled through options.init_buffer. Params keep their Tensor identity.
  /// Call after fully_shard (on meta params it records shapes only) and
  /// before the first forward (which refuses meta params). Throws
  /// std::invalid_argument for a missing init function or a meta param no
  /// unit holds.
  void materialize(const std::shared_ptr<torch::nn::Module>& root, const MaterializeOptions& options);

  /// Gathers (or frees) every unit's params outside forward/backward; edits
  /// made in between are dropped (summon_full_params writes them back).
  void unshard_all();
  void reshard_all();

  /// Bytes of gathered (full) params alive right now, and the peak since
  /// construction or the last reset. A unit counts from the wait of its
  /// all-gather to its reshard; all-gather buffers in flight (prefetches) are
  /// not counted (fsdpsim_bench_engine reports them separately as "issued").
  int64_t unsharded_bytes() const;
  int64_t peak_unsharded_bytes() const;
  void reset_peak_unsharded_bytes();

  // Used by fsdp::call; not for users.
  struct ForwardScope;
  std::unique_ptr<ForwardScope> begin_forward(const torch::nn::Module* module);
  struct Impl;  // engine.cpp's

 private:
  std::unique_ptr<Impl> impl_;
};

/// What one unit manages: read-only view for tests and tools.
class Unit {
 public:
  /// The unit's module path from the root ("" for the root); "" until the
  /// first forward found the root.
  const std::string& fqn() const;
  /// FQNs of the params this unit manages: relative to the root once the
  /// first forward found the root, relative to the unit's module before.
  std::vector<std::string> param_fqns() const;
  bool is_root() const;
  bool is_unsharded() const;
  TrainingState state() const;
  bool reshard_after_forward() const;
  bool requires_gradient_sync() const;
  bool requires_all_reduce() const;
  bool reshard_after_backward() const;
  const FullyShardOptions& options() const;
  /// The params this unit manages (the module's Tensors), in param_fqns() order.
  std::vector<at::Tensor> params() const;
  /// Rows of each param's padded shard (ceil(dim0 / shard world)).
  std::vector<int64_t> shard_rows() const;
  /// Each param's whole (unsharded) shape, in param_fqns() order.
  std::vector<std::vector<int64_t>> full_shapes() const;

  struct Impl;
  explicit Unit(std::unique_ptr<Impl> impl);
  ~Unit();
  Impl& impl() { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

// ---------------------------------------------------------------------------
// Implementation of the call templates.

struct Engine::ForwardScope {
  virtual ~ForwardScope() = default;
  virtual std::vector<at::Tensor> wrap_inputs(std::vector<at::Tensor> inputs) = 0;
  /// Inputs cast to the unit's param_dtype (mp_policy), then those that
  /// require grad routed through the unit's post-backward hook.
  /// Registers pre-backward hooks on the outputs and frees params if due;
  /// returns the outputs to hand back (cast to the unit's output_dtype).
  /// Throws if the forward computed with a sub-unit's shards (a child unit
  /// called directly, not through fsdp::call).
  virtual std::vector<at::Tensor> finish(const std::vector<at::Tensor>& outputs) = 0;
  /// The forward threw `error`: the error to throw instead, with a note
  /// naming sub-units it never gathered (a likely cause: shards' shapes).
  virtual std::exception_ptr with_context(std::exception_ptr error) = 0;
};

namespace detail {

/// The engine of the rank that sharded `module`, or nullptr.
Engine* engine_of(const torch::nn::Module* module);

template <typename T>
void collect_tensors(const T& value, std::vector<at::Tensor>& out) {
  if constexpr (std::is_same_v<std::decay_t<T>, at::Tensor>) {
    out.push_back(value);
  } else if constexpr (std::is_same_v<std::decay_t<T>, std::vector<at::Tensor>>) {
    out.insert(out.end(), value.begin(), value.end());
  }
}

template <typename... Ts>
void collect_tensors(const std::tuple<Ts...>& value, std::vector<at::Tensor>& out) {
  std::apply([&](const auto&... items) { (collect_tensors(items, out), ...); }, value);
}

// Writes replacements[next...] back into `value`'s tensors, in
// collect_tensors' order.
template <typename T>
void assign_tensors(T& value, const std::vector<at::Tensor>& replacements, size_t& next) {
  if constexpr (std::is_same_v<T, at::Tensor>) {
    value = replacements[next++];
  } else if constexpr (std::is_same_v<T, std::vector<at::Tensor>>) {
    for (auto& item : value) item = replacements[next++];
  }
}

template <typename... Ts>
void assign_tensors(std::tuple<Ts...>& value, const std::vector<at::Tensor>& replacements, size_t& next) {
  std::apply([&](auto&... items) { (assign_tensors(items, replacements, next), ...); }, value);
}

template <typename T>
decltype(auto) replace_tensors(T&& value, const std::vector<at::Tensor>& replacements, size_t& next) {
  if constexpr (std::is_same_v<std::decay_t<T>, at::Tensor>) {
    return at::Tensor(replacements[next++]);
  } else if constexpr (std::is_same_v<std::decay_t<T>, std::vector<at::Tensor>>) {
    std::vector<at::Tensor> result;
    for (size_t i = 0; i < value.size(); ++i) result.push_back(replacements[next++]);
    return result;
  } else {
    return std::forward<T>(value);
  }
}

}  // namespace detail

namespace detail {

template <typename ModuleType, typename... Args>
auto call_unit(Engine& engine, const std::shared_ptr<ModuleType>& module, Args&&... args) {
  auto scope = engine.begin_forward(module.get());
  std::vector<at::Tensor> inputs;
  (collect_tensors(args, inputs), ...);
  std::vector<at::Tensor> wrapped = scope->wrap_inputs(std::move(inputs));
  size_t next = 0;
  // A braced initialiser evaluates left to right (function arguments do not),
  // so the i-th tensor argument gets the i-th wrapped tensor.
  std::tuple<decltype(replace_tensors(std::forward<Args>(args), wrapped, next))...> replaced{
      replace_tensors(std::forward<Args>(args), wrapped, next)...};
  auto run_forward = [&]() {
    try {
      return std::apply(
          [&](auto&&... forwarded) { return module->forward(std::forward<decltype(forwarded)>(forwarded)...); },
          std::move(replaced));
    } catch (...) {
      std::rethrow_exception(scope->with_context(std::current_exception()));
    }
  };
  auto output = run_forward();
  std::vector<at::Tensor> outputs;
  collect_tensors(output, outputs);
  const std::vector<at::Tensor> handed_back = scope->finish(outputs);
  size_t next_output = 0;
  assign_tensors(output, handed_back, next_output);
  return output;
}

}  // namespace detail

template <typename ModuleType, typename... Args>
auto call(const std::shared_ptr<ModuleType>& module, Args&&... args) {
  if constexpr (std::is_base_of_v<torch::nn::SequentialImpl, ModuleType> && sizeof...(Args) == 1 &&
                (std::is_convertible_v<Args, at::Tensor> && ...)) {
    return forward_sequential(std::static_pointer_cast<torch::nn::SequentialImpl>(module),
                              at::Tensor(std::forward<Args>(args))...);
  } else {
    Engine* engine = detail::engine_of(module.get());
    if (engine == nullptr) return module->forward(std::forward<Args>(args)...);
    return detail::call_unit(*engine, module, std::forward<Args>(args)...);
  }
}

template <typename ModuleType, typename... Args>
auto call(torch::nn::ModuleHolder<ModuleType>& module, Args&&... args) {
  return call(module.ptr(), std::forward<Args>(args)...);
}

}  // namespace fsdpsim::fsdp
