#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>

#include <algorithm>
#include <any>
#include <cstdlib>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <unordered_set>

#include "backends/collective_label.h"
#include "backends/errors.h"
#include "fsdp/checkpoint.h"
#include "fsdp/fully_shard.h"

namespace fsdpsim::fsdp {

const char* to_string(ShardingStrategy strategy) {
  switch (strategy) {
    case ShardingStrategy::FullShard: return "full_shard";
    case ShardingStrategy::ShardGradOp: return "shard_grad_op";
    case ShardingStrategy::NoShard: return "no_shard";
    case ShardingStrategy::HybridShard: return "hybrid_shard";
  }
  return "unknown";
}

const char* to_string(BackwardPrefetch policy) {
  switch (policy) {
    case BackwardPrefetch::None: return "none";
    case BackwardPrefetch::BackwardPre: return "backward_pre";
    case BackwardPrefetch::BackwardPost: return "backward_post";
  }
  return "unknown";
}

const char* to_string(TrainingState state) {
  switch (state) {
    case TrainingState::Idle: return "idle";
    case TrainingState::Forward: return "forward";
    case TrainingState::PreBackward: return "pre_backward";
    case TrainingState::PostBackward: return "post_backward";
  }
  return "unknown";
}

namespace detail {
namespace {
// Which engine sharded a module. Modules are per rank, so entries of
// different ranks never collide; the mutex only guards the map itself.
struct Registry {
  std::mutex mutex;
  std::unordered_map<const torch::nn::Module*, Engine*> engines;
};
Registry& registry() {
  static Registry instance;
  return instance;
}
}  // namespace

Engine* engine_of(const torch::nn::Module* module) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = r.engines.find(module);
  return it == r.engines.end() ? nullptr : it->second;
}
}  // namespace detail

namespace {

std::string shape_of(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << sizes;
  return out.str();
}

// One parameter: its dim-0 shard (padded to rows_per_rank rows) and, while
// gathered, its full tensor.
struct ShardedParam {
  std::string fqn;
  at::Tensor param;  // the module's Tensor: identity kept, data swapped
  std::vector<int64_t> full_shape;
  int64_t dim0 = 0;
  int64_t rows_per_rank = 0;   // c = ceil(dim0 / world)
  int64_t row_numel = 1;       // elements per dim-0 row
  int64_t my_rows = 0;         // rows this rank owns (0..c)
  int64_t offset = 0;          // in the unit's per-rank flat chunk
  at::Tensor padded_shard;     // (c, rest...)
  at::Tensor shard_view;       // padded_shard rows [0, my_rows): the param's data between steps
  at::Tensor full;             // the gathered param, while unsharded
  at::Tensor stashed_grad;     // the sharded grad, set aside while the param is full-size
  at::Tensor unsynced_grad;    // full-size grads of backwards run without gradient sync, summed in reduce_dtype
  at::Tensor partial_reduced;  // HSDP without all-reduce: reduce-scatter outputs summed (padded chunk, flat)

  // All-gather extension (units with any): what this param put on the wire
  // in the gather in flight, and post_all_gather's first result, kept for
  // in-place reuse (its storage freed between gathers).
  struct GatherInput {
    std::vector<int64_t> shape;
    at::ScalarType dtype = at::kFloat;
    int64_t wire_offset = 0;  // in the unit's per-rank chunk, in wire elements
    int64_t wire_numel = 0;
  };
  std::shared_ptr<AllGatherExtension> extension;
  std::vector<GatherInput> gather_inputs;
  std::any gather_metadata;
  at::Tensor extension_out;
  size_t extension_out_nbytes = 0;

  int64_t chunk_numel() const { return rows_per_rank * row_numel; }
  std::vector<int64_t> rows_shape(int64_t rows) const {
    std::vector<int64_t> shape = full_shape;
    shape[0] = rows;
    return shape;
  }
};

// Which way copy_real_rows moves data.
enum class RowCopy { FromBlocks, ToBlocks };

// Copies between a param's real rows `rows` (dim0, row_numel) and its padded
// blocks (world, rows_per_rank, row_numel): the ranks whose rows are all real
// in one copy, the partly real rank in another, whatever the world size; the
// padding rows are not touched. narrow + view, not select: the same op names
// at every world size (the data-free mode's op-cost table is keyed by name).
void copy_real_rows(const at::Tensor& blocks, const at::Tensor& rows, const ShardedParam& p, RowCopy direction) {
  const int64_t whole = p.dim0 / p.rows_per_rank;  // ranks whose rows are all real
  const int64_t rest = p.dim0 - whole * p.rows_per_rank;
  const auto copy = [direction](const at::Tensor& block_part, const at::Tensor& row_part) {
    if (direction == RowCopy::ToBlocks) {
      block_part.copy_(row_part);
    } else {
      row_part.copy_(block_part);
    }
  };
  if (whole > 0) {
    copy(blocks.narrow(0, 0, whole),
         rows.narrow(0, 0, whole * p.rows_per_rank).view({whole, p.rows_per_rank, p.row_numel}));
  }
  if (rest > 0) {
    copy(blocks.narrow(0, whole, 1).narrow(1, 0, rest),
         rows.narrow(0, whole * p.rows_per_rank, rest).view({1, rest, p.row_numel}));
  }
}

// `p`'s blocks of a buffer viewed as (world, chunk_total), its chunk at `offset`.
at::Tensor param_blocks(const at::Tensor& by_rank, int64_t offset, const ShardedParam& p) {
  return by_rank.narrow(1, offset, p.chunk_numel()).view({by_rank.size(0), p.rows_per_rank, p.row_numel});
}

// The first dim0 rows of `p` out of a gathered buffer viewed as (world,
// chunk_total), copied once into a contiguous tensor of their own. Only the
// real rows are copied and kept: at world > dim0 most rows are padding, and a
// tensor narrowed out of the padded block would keep all of them alive.
at::Tensor gathered_rows(const at::Tensor& by_rank, const ShardedParam& p) {
  at::Tensor full = at::empty(p.full_shape, by_rank.options());
  if (p.dim0 == 0 || p.row_numel == 0) return full;
  copy_real_rows(param_blocks(by_rank, p.offset, p), full.view({p.dim0, p.row_numel}), p, RowCopy::FromBlocks);
  return full;
}

// The inverse for a reduce-scatter input viewed as (world, total): rank r's
// rows of `flat_rows` (dim0, row_numel) to its chunk at `offset`, cast to
// the buffer's dtype; the padding rows stay as they are.
void scatter_rows(const at::Tensor& by_rank, int64_t offset, const ShardedParam& p, const at::Tensor& flat_rows) {
  if (p.dim0 == 0 || p.row_numel == 0) return;
  copy_real_rows(param_blocks(by_rank, offset, p), flat_rows, p, RowCopy::ToBlocks);
}

// A copy on the CPU (FSDP2's offload device), a real one even when `t` is
// there already; pinned when it will be copied to an accelerator.
at::Tensor offload_copy(const at::Tensor& t, const OffloadPolicy& policy, const at::Device& compute) {
  at::Tensor out = t.to(t.options().device(at::kCPU), /*non_blocking=*/false, /*copy=*/true);
  if (policy.pin_memory && !compute.is_cpu()) out = out.pin_memory();
  return out;
}

void stash_grad(ShardedParam& p) {
  const at::Tensor& grad = p.param.grad();
  if (!grad.defined()) return;
  p.stashed_grad = grad;
  p.param.mutable_grad() = at::Tensor();
}

struct PendingReduction {
  WorkPtr reduce_scatter;      // null when the shard group has one rank
  at::Tensor input;            // kept alive until the collective is done
  at::Tensor output;           // this rank's reduced chunk, flat
  std::vector<size_t> params;  // indices of the params reduced, with their offsets in `output`
  std::vector<int64_t> offsets;
};

}  // namespace

// A unit without params of its own (a param-less root) is FSDP2's state
// without a param group: it gathers, prefetches and reports nothing, and
// still runs the bookkeeping (pre-backward queues the final callback).
struct Unit::Impl {
  Engine::Impl* engine = nullptr;
  std::shared_ptr<torch::nn::Module> module;
  FullyShardOptions options;
  std::string fqn;
  bool is_root = false;
  bool reshard_after_forward = true;
  std::vector<ShardedParam> params;
  int64_t chunk_total = 0;  // per-rank flat elements
  int shard_world = 1;
  int shard_rank = 0;
  // The params' own (sharded) dtype, on the compute device: gather buffers,
  // gathered params.
  at::TensorOptions tensor_options;
  bool offload = false;  // shards and sharded grads live on the CPU
  // Mixed precision, resolved against the params' dtype: the dtype params are
  // gathered and computed in (unset: no cast) and the dtype grads reduce in.
  std::optional<at::ScalarType> compute_dtype;
  at::ScalarType reduce_dtype = at::kFloat;

  // Whether the params computed with are copies of the shards (gathered, cast
  // or copied from the offloaded shard), not the shards themselves.
  bool copies_full() const { return shard_world > 1 || offload || compute_dtype.has_value() || has_extensions; }
  // Some param has an all-gather extension: the unit gathers per-param input
  // lists (unshard_extended), in gather_dtype (kByte when dtypes differ).
  bool has_extensions = false;
  at::ScalarType gather_dtype = at::kFloat;
  int64_t gather_total = 0;  // per-rank wire elements of the gather in flight

  bool unsharded = false;
  TrainingState state = TrainingState::Idle;
  WorkPtr gather_work;
  at::Tensor gather_buffer;
  bool needs_post_backward = false;
  bool backward_done = false;       // its post-backward ran in this backward pass
  bool prefetch_in_flight = false;  // gathered ahead, not yet used by the unit
  bool grads_stashed = false;       // pre-backward set the sharded grads aside; reshard restores them
  bool reduce_grads = true;         // set_requires_gradient_sync
  bool all_reduce_grads = true;     // set_requires_all_reduce (HSDP, NoShard)
  bool reshard_after_backward = true;
  std::vector<PendingReduction> pending;
  std::vector<Unit::Impl*> sub_units;         // units inside this unit's module (known once the root is)
  uint64_t last_forward_call = 0;             // Engine::Impl::forward_calls at its latest pre-forward
  std::vector<Unit::Impl*> forward_prefetch;  // explicit lists (empty: implicit)
  std::vector<Unit::Impl*> backward_prefetch;
  bool explicit_forward_prefetch = false;
  bool explicit_backward_prefetch = false;
};

namespace {
// Labels a unit's collectives, so ranks that issue them for different units
// under one sequence number fail with a report instead of mixing data.
std::string collective_label(const char* what, const Unit::Impl& unit) {
  return std::string("fsdp ") + what + " of unit '" + unit.fqn + "'";
}

// Whether the unit computes with tensors other than its shards while
// unsharded: gathered ones, or a world of one's shards cast to param_dtype.
at::TensorOptions compute_options(const Unit::Impl& unit) {
  return unit.tensor_options.dtype(unit.compute_dtype.value_or(unit.tensor_options.dtype().toScalarType()));
}

at::TensorOptions reduce_options(const Unit::Impl& unit) { return unit.tensor_options.dtype(unit.reduce_dtype); }

// A zero-filled flat buffer (the reduce-scatter input). On the CPU it comes
// from calloc, which takes a large buffer from fresh pages the OS already
// zeroed: at world > dim0 FSDP2 pads every param to one row per rank, the
// buffer is mostly padding, and the padding is then never written, only read
// back as zeros by the reduction. No dispatched op on either device (meta:
// empty_meta, values unread), so a data run and a data-free run charge the
// same op costs.
at::Tensor zeroed_flat(int64_t numel, const at::TensorOptions& options) {
  if (options.device().is_meta()) return at::detail::empty_meta({numel}, options);
  if (!options.device().is_cpu()) return at::zeros({numel}, options);
  const size_t element = options.dtype().itemsize();
  void* data = std::calloc(static_cast<size_t>(std::max<int64_t>(numel, 1)), element);
  TORCH_CHECK_WITH(OutOfMemoryError, data != nullptr, "can't allocate memory: a reduce-scatter input of ", numel,
                   " elements (", static_cast<size_t>(numel) * element, " bytes)");
  return at::from_blob(
      data, {numel}, [](void* ptr) { std::free(ptr); }, options);
}

// A grad as reduced (reduce_dtype) in the dtype of the sharded param.
at::Tensor to_param_dtype(const Unit::Impl& unit, const at::Tensor& reduced) {
  return reduced.to(unit.tensor_options.dtype().toScalarType());
}

// FSDP2's division of a gradient mean: fp32 and bf16 reduce with an average;
// fp16 (little range) divides by the largest power of two p with p * p < n
// that divides n before the sum, and by n / p after it. An explicit
// gradient_predivide_factor f keeps ours: f before, world / f after.
struct GradDivision {
  bool average = true;  // ReduceOp::Avg on the reduce-scatter and the all-reduce
  double before = 1.0;  // divides every rank's grad before the reduction
  double after = 1.0;   // divides the result (after the all-reduce, if any)
};

GradDivision grad_division(const Unit::Impl& unit) {
  const double factor = unit.options.gradient_predivide_factor;
  GradDivision division;
  if (factor != 1.0) {
    division.average = false;
    division.before = factor;
    division.after = static_cast<double>(unit.shard_world) / factor;
    return division;
  }
  if (unit.reduce_dtype != at::kHalf) return division;
  const int replicas = unit.options.replicate_group ? unit.options.replicate_group->size() : 1;
  const int64_t ranks = static_cast<int64_t>(unit.shard_world) * replicas;
  int64_t before = 1;
  while (ranks % before == 0 && ranks / before > before) before *= 2;
  division.average = false;
  division.before = static_cast<double>(before);
  division.after = static_cast<double>(ranks) / static_cast<double>(before);
  return division;
}

// ---------------------------------------------------------------------------
// All-gather extensions: per-param gather inputs, byte-packed when dtypes
// differ (one collective per unit, as FSDP2's foreach_all_gather).

std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> strides(sizes.size(), 1);
  for (size_t d = sizes.size(); d-- > 1;) strides[d - 1] = strides[d] * std::max<int64_t>(sizes[d], 1);
  return strides;
}

std::string shapes_of(const std::vector<at::Tensor>& tensors) {
  std::string out;
  for (const auto& t : tensors) out += (out.empty() ? "" : ", ") + (t.defined() ? shape_of(t.sizes()) : "undefined");
  return "[" + out + "]";
}

// pre_all_gather's tensors: at least one, each defined and on the unit's
// device; a param whose rows the shard world does not divide gathers padded
// rows (a rank whose own shard is short throws; one whose shard is whole
// cannot tell, as in FSDP2, and its all-gather then fails or is aborted).
void check_gather_inputs(const Unit::Impl& unit, const ShardedParam& p, const std::vector<at::Tensor>& tensors) {
  auto fail = [&](const std::string& what) {
    throw std::runtime_error("all-gather extension of param '" + p.fqn + "' of unit '" + unit.fqn +
                             "': pre_all_gather returned " + shapes_of(tensors) + ": " + what);
  };
  if (tensors.empty()) fail("no tensors (return at least one)");
  const bool uneven = p.dim0 % unit.shard_world != 0;
  for (const auto& t : tensors) {
    if (!t.defined()) fail("an undefined tensor");
    if (t.device() != unit.tensor_options.device()) {
      fail("a tensor on " + t.device().str() + ", the unit gathers on " + unit.tensor_options.device().str());
    }
    if (uneven && (t.dim() == 0 || t.size(0) != p.rows_per_rank)) {
      fail("dim 0 " + shape_of(p.full_shape) + " is sharded unevenly over " + std::to_string(unit.shard_world) +
           " ranks, so each tensor needs the padded shard's " + std::to_string(p.rows_per_rank) +
           " rows (start from context.padded_shard)");
    }
  }
}

// This param's all-gather inputs: its extension's, else its padded shard in
// the compute dtype (what the unit without extensions gathers).
std::vector<at::Tensor> gather_inputs_of(const Unit::Impl& unit, ShardedParam& p) {
  at::Tensor padded = p.padded_shard.to(unit.tensor_options.device());  // offload: the copy to the device
  if (!p.extension) return {padded.to(compute_options(unit).dtype().toScalarType())};
  AllGatherContext context;
  context.fqn = p.fqn;
  context.module = unit.module.get();
  context.outer_size = p.full_shape;
  context.outer_stride = contiguous_strides(p.full_shape);
  context.padded_shard_size = p.rows_shape(p.rows_per_rank);
  context.padded_shard = padded;
  context.shard_rank = unit.shard_rank;
  context.shard_world = unit.shard_world;
  context.mp_policy = &unit.options.mp_policy;
  AllGatherInputs inputs = p.extension->pre_all_gather(padded.narrow(0, 0, p.my_rows), context);
  check_gather_inputs(unit, p, inputs.tensors);
  p.gather_metadata = std::move(inputs.metadata);
  return std::move(inputs.tensors);
}

// FSDP2 frees the unsharded param's storage at reshard and re-allocates it
// before the next post_all_gather writes into it: the tensor (and views of
// it that autograd saved) stays, the memory does not.
void free_extension_out(ShardedParam& p) {
  c10::StorageImpl* storage = p.extension_out.storage().unsafeGetStorageImpl();
  if (storage->allocator() == nullptr || storage->nbytes() == 0) return;  // from_blob: not ours to free
  p.extension_out_nbytes = storage->nbytes();
  storage->reset();
}

void restore_extension_out(ShardedParam& p) {
  c10::StorageImpl* storage = p.extension_out.storage().unsafeGetStorageImpl();
  if (storage->nbytes() != 0 || p.extension_out_nbytes == 0) return;
  storage->set_data_ptr_noswap(storage->allocator()->allocate(p.extension_out_nbytes));
  storage->set_nbytes(p.extension_out_nbytes);
}

// post_all_gather's result as the param: its outer size, padding rows dropped.
at::Tensor outer_view(const Unit::Impl& unit, const ShardedParam& p, const at::Tensor& result) {
  const at::IntArrayRef want(p.full_shape);
  if (result.sizes() == want) return result;
  if (result.dim() == static_cast<int64_t>(want.size()) && result.size(0) >= p.dim0 &&
      result.sizes().slice(1) == want.slice(1)) {
    return result.narrow(0, 0, p.dim0);
  }
  throw std::runtime_error("all-gather extension of param '" + p.fqn + "' of unit '" + unit.fqn +
                           "': post_all_gather returned shape " + shape_of(result.sizes()) +
                           ", expected the outer size " + shape_of(want) + " (or more dim-0 rows: padding)");
}

// The unsharded param from its gathered tensors: post_all_gather, in place
// into its first result from the second gather on.
at::Tensor rebuild_param(const Unit::Impl& unit, ShardedParam& p, const std::vector<at::Tensor>& gathered) {
  const at::ScalarType dtype = compute_options(unit).dtype().toScalarType();
  const std::string where = "all-gather extension of param '" + p.fqn + "' of unit '" + unit.fqn + "': ";
  at::Tensor result;
  if (p.extension_out.defined()) {
    restore_extension_out(p);
    // Writing into it bumps its version; autograd's saved views of it would
    // then refuse the backward (FSDP2 preserves the counter too).
    c10::VariableVersion version = torch::autograd::impl::version_counter(p.extension_out);
    const uint32_t before = version.current_version();
    result = p.extension->post_all_gather(gathered, p.gather_metadata, dtype, p.extension_out);
    version.set_version(before);
    if (!result.defined() || !result.storage().is_alias_of(p.extension_out.storage())) {
      throw std::runtime_error(where + "post_all_gather was given `out` and returned a tensor not in its storage " +
                               "(fill `out` in place and return it)");
    }
  } else {
    result = p.extension->post_all_gather(gathered, p.gather_metadata, dtype, std::nullopt);
    if (!result.defined()) throw std::runtime_error(where + "post_all_gather returned an undefined tensor");
    p.extension_out = result;
  }
  p.gather_metadata.reset();
  return outer_view(unit, p, result);
}
}  // namespace

struct Engine::Impl {
  EngineOptions options;
  std::vector<std::unique_ptr<Unit>> units;
  std::unordered_map<const torch::nn::Module*, Unit::Impl*> by_module;
  std::unordered_set<const c10::TensorImpl*> managed;
  Unit::Impl* root = nullptr;
  int forward_depth = 0;
  uint64_t forward_calls = 0;  // pre-forwards so far: tells which units ran inside another's forward
  bool final_callback_queued = false;
  std::vector<Unit::Impl*> preorder_units;      // units under the root, in module pre-order
  std::vector<Unit::Impl*> forward_order;       // units in the order their forward started
  std::vector<Unit::Impl*> post_forward_order;  // ... and finished; reversed, the backward order
  std::vector<Unit::Impl*> last_forward_order;  // forward_order of the previous forward
  int prefetches_in_flight = 0;
  int64_t unsharded_bytes = 0;
  int64_t peak_unsharded_bytes = 0;
  bool summoned = false;  // a FullParams scope is open

  template <typename Method>
  void emit(Method method, const Unit::Impl& unit) {
    for (auto& hooks : options.hooks) ((*hooks).*method)(unit.fqn, unit.state);
  }

  void lazy_init_root(Unit::Impl& unit);
  void check_shards(Unit::Impl& unit);
  void check_materialized(const Unit::Impl& unit) const;
  void check_gathered(Unit::Impl& unit, const char* when);
  void unshard(Unit::Impl& unit);
  void set_full(ShardedParam& p, at::Tensor full);
  void wait_unshard(Unit::Impl& unit);
  void unshard_extended(Unit::Impl& unit);
  void finish_extended(Unit::Impl& unit);
  void reshard(Unit::Impl& unit);
  void pre_forward(Unit::Impl& unit);
  void post_forward(Unit::Impl& unit, const std::vector<at::Tensor>& outputs, bool grad_enabled);
  void pre_backward(Unit::Impl& unit);
  void post_backward(Unit::Impl& unit);
  std::vector<std::pair<size_t, at::Tensor>> take_full_grads(Unit::Impl& unit);
  void accumulate_local_grads(Unit::Impl& unit, std::vector<std::pair<size_t, at::Tensor>>& grads);
  PendingReduction issue_reduction(Unit::Impl& unit, const std::vector<std::pair<size_t, at::Tensor>>& grads);
  void finish_reductions(Unit::Impl& unit);
  void final_callback();
  void abandon_backward();
  void queue_final_callback();
  void finish_post_backward(Unit::Impl& unit);
  void keep_unsynced_grads(Unit::Impl& unit);
  void land_reduction(Unit::Impl& unit, PendingReduction& reduction);
  void prefetch(Unit::Impl& unit, Unit::Impl* target);
  void prefetch_forward(Unit::Impl& unit);
  void prefetch_backward(Unit::Impl& unit);
  Unit::Impl* unit_of(const std::shared_ptr<torch::nn::Module>& module, const char* what);
  std::vector<Unit::Impl*> units_under(const std::shared_ptr<torch::nn::Module>& module, bool recurse,
                                       const char* what);
  void check_can_summon() const;
};

// ---------------------------------------------------------------------------
// Post-backward: an identity on the unit's forward inputs whose backward runs
// once the gradient w.r.t. those inputs exists, i.e. after the unit's own
// gradient computation (AccumulateGrad nodes run before it: the ready queue
// puts them first).

class PostBackwardNode final : public torch::autograd::Node {
 public:
  explicit PostBackwardNode(Unit::Impl* unit) : unit_(unit) {}
  std::string name() const override { return "fsdp::PostBackward"; }
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    unit_->engine->post_backward(*unit_);
    return std::move(grads);
  }

 private:
  Unit::Impl* unit_;
};

// Routes `inputs` through one PostBackwardNode (one node for all of them, so
// it runs only after every input's gradient is complete).
torch::autograd::variable_list attach_post_backward(const torch::autograd::variable_list& inputs, Unit::Impl* unit) {
  auto node = c10::make_intrusive<PostBackwardNode>(unit);
  node->set_next_edges(torch::autograd::collect_next_edges(inputs));
  torch::autograd::variable_list outputs;
  for (const auto& input : inputs) {
    at::Tensor output;
    {
      at::NoGradGuard no_grad;
      output = input.view_as(input);
    }
    torch::autograd::create_gradient_edge(output, node);
    outputs.push_back(std::move(output));
  }
  return outputs;
}

// ---------------------------------------------------------------------------

void Engine::Impl::lazy_init_root(Unit::Impl& unit) {
  if (root != nullptr) return;
  root = &unit;
  unit.is_root = true;
  unit.reshard_after_forward = false;  // backward needs the root's params first: keep them
  std::unordered_map<const torch::nn::Module*, std::string> module_names;
  for (const auto& item : unit.module->named_modules()) module_names[item.value().get()] = item.key();
  std::unordered_map<const c10::TensorImpl*, std::string> param_names;
  for (const auto& item : unit.module->named_parameters()) {
    param_names.emplace(item.value().unsafeGetTensorImpl(), item.key());
  }
  for (const auto& module : unit.module->modules(/*include_self=*/true)) {
    auto found = by_module.find(module.get());
    if (found != by_module.end() &&
        std::find(preorder_units.begin(), preorder_units.end(), found->second) == preorder_units.end()) {
      preorder_units.push_back(found->second);
    }
  }
  for (auto& u : units) {
    auto& impl = u->impl();
    for (const auto& child : impl.module->modules(/*include_self=*/false)) {
      auto sub = by_module.find(child.get());
      if (sub != by_module.end()) impl.sub_units.push_back(sub->second);
    }
    auto it = module_names.find(impl.module.get());
    impl.fqn = it == module_names.end() ? "<outside root>" : it->second;
    for (auto& p : impl.params) {
      auto name = param_names.find(p.param.unsafeGetTensorImpl());
      if (name != param_names.end()) p.fqn = name->second;
    }
  }
}

namespace {
const char* const kMaterializeFix =
    ": materialise the model first (engine.materialize(root, {device, init_param, init_buffer}) after fully_shard; "
    "FSDP2: model.to_empty(device=...) then reset_parameters())";
}  // namespace

// A meta-built model computes nothing until materialised: refuse it before
// the unit's state changes. Buffers are checked at the root's first forward.
void Engine::Impl::check_materialized(const Unit::Impl& unit) const {
  if (options.data_free) return;  // meta params are the point
  // Before the first forward FQNs are relative to the unit: name its module.
  const std::string where = unit.fqn.empty() ? unit.module->name() : "'" + unit.fqn + "'";
  for (const auto& p : unit.params) {
    if (p.param.is_meta()) {
      throw std::runtime_error("fsdp: param '" + p.fqn + "' of unit " + where + " (shape " + shape_of(p.full_shape) +
                               ") is still on the meta device" + kMaterializeFix);
    }
  }
  if (forward_depth > 0) return;  // buffers: checked by the outermost unit
  for (const auto& item : unit.module->named_buffers()) {
    if (item.value().is_meta()) {
      throw std::runtime_error("fsdp: buffer '" + item.key() + "' of unit " + where + " is still on the meta device" +
                               kMaterializeFix);
    }
  }
}

void Engine::Impl::check_shards(Unit::Impl& unit) {
  // Writes between steps must land in the shard: in-place ones do; a
  // set_data/assignment replaced the data, so copy it back (or refuse).
  for (auto& p : unit.params) {
    const at::Tensor data = p.param.data();
    const bool same = data.data_ptr() == p.shard_view.data_ptr() && data.sizes() == p.shard_view.sizes();
    if (!same) {
      if (data.sizes() != p.shard_view.sizes()) {
        throw std::runtime_error("Cannot writeback: param '" + p.fqn + "' of unit '" + unit.fqn + "' now has shape " +
                                 shape_of(data.sizes()) + ", its shard has shape " + shape_of(p.shard_view.sizes()));
      }
      p.shard_view.copy_(data);
      p.param.set_data(p.shard_view);
    }
    const at::Tensor& grad = p.param.grad();
    if (grad.defined() && grad.sizes() != p.shard_view.sizes()) {
      throw std::runtime_error("Cannot writeback: grad of param '" + p.fqn + "' of unit '" + unit.fqn + "' has shape " +
                               shape_of(grad.sizes()) + ", its shard has shape " + shape_of(p.shard_view.sizes()));
    }
  }
}

void Engine::Impl::check_gathered(Unit::Impl& unit, const char* when) {
  if (!unit.unsharded || !unit.copies_full()) return;
  for (auto& p : unit.params) {
    if (p.param.data_ptr() != p.full.data_ptr() || p.param.sizes() != p.full.sizes()) {
      throw std::runtime_error("param '" + p.fqn + "' of unit '" + unit.fqn + "' was replaced " + when +
                               " without resharding (write to params between steps, after backward)");
    }
  }
}

void Engine::Impl::unshard(Unit::Impl& unit) {
  if (unit.unsharded || unit.gather_work) return;    // a no-op unshard is not an event
  if (!unit.copies_full() || unit.params.empty()) {  // nothing to gather, cast or copy
    unit.unsharded = true;
    return;
  }
  check_shards(unit);
  if (unit.has_extensions) {
    unshard_extended(unit);
    return;
  }
  if (unit.shard_world == 1) {  // nothing to gather: copy (cast) the shards to the compute device and dtype
    for (auto& p : unit.params) {
      set_full(p, p.shard_view.to(compute_options(unit), /*non_blocking=*/false, /*copy=*/true));
    }
    peak_unsharded_bytes = std::max(peak_unsharded_bytes, unsharded_bytes);
    unit.unsharded = true;
    return;
  }
  const int64_t total = unit.chunk_total;
  // In param_dtype: the copy-in below casts each shard.
  unit.gather_buffer = at::empty({unit.shard_world * total}, compute_options(unit));
  at::Tensor mine = unit.gather_buffer.narrow(0, unit.shard_rank * total, total);
  for (auto& p : unit.params) mine.narrow(0, p.offset, p.chunk_numel()).copy_(p.padded_shard.view(-1));
  ScopedCollectiveLabel label(collective_label("all-gather", unit));
  unit.gather_work = unit.options.shard_group->all_gather_into_tensor(unit.gather_buffer, mine);
  emit(&EngineHooks::on_unshard, unit);
}

void Engine::Impl::set_full(ShardedParam& p, at::Tensor full) {
  unsharded_bytes += full.nbytes();
  p.param.set_data(full);
  p.full = std::move(full);
}

void Engine::Impl::wait_unshard(Unit::Impl& unit) {
  if (unit.prefetch_in_flight) {
    unit.prefetch_in_flight = false;
    --prefetches_in_flight;
  }
  if (unit.unsharded) return;
  if (!unit.gather_work) unshard(unit);
  if (unit.unsharded) return;
  unit.gather_work->wait();
  unit.gather_work.reset();
  if (unit.has_extensions) {
    finish_extended(unit);
    return;
  }
  const int world = unit.shard_world;
  at::Tensor by_rank = unit.gather_buffer.view({world, unit.chunk_total});
  for (auto& p : unit.params) set_full(p, gathered_rows(by_rank, p));
  peak_unsharded_bytes = std::max(peak_unsharded_bytes, unsharded_bytes);
  unit.gather_buffer = at::Tensor();
  unit.unsharded = true;
}

// A unit with all-gather extensions: every param's inputs (its extension's,
// else its padded shard) in one buffer; one dtype when all share it, else
// bytes (a uint8 buffer, as FSDP2), so the unit still issues one collective.
void Engine::Impl::unshard_extended(Unit::Impl& unit) {
  torch::NoGradGuard no_grad;
  std::vector<std::vector<at::Tensor>> inputs;
  std::optional<at::ScalarType> common;
  bool mixed = false;
  for (auto& p : unit.params) {
    inputs.push_back(gather_inputs_of(unit, p));
    for (const auto& t : inputs.back()) {
      mixed = mixed || (common && *common != t.scalar_type());
      common = t.scalar_type();
    }
  }
  unit.gather_dtype = mixed ? at::kByte : *common;
  const int64_t wire_size = static_cast<int64_t>(c10::elementSize(unit.gather_dtype));
  int64_t total = 0;
  for (size_t i = 0; i < unit.params.size(); ++i) {
    auto& p = unit.params[i];
    p.gather_inputs.clear();
    for (const auto& t : inputs[i]) {
      const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
      p.gather_inputs.push_back({t.sizes().vec(), t.scalar_type(), total, bytes / wire_size});
      total += bytes / wire_size;
    }
  }
  unit.gather_total = total;
  unit.gather_buffer = at::empty({unit.shard_world * total}, unit.tensor_options.dtype(unit.gather_dtype));
  at::Tensor mine = unit.gather_buffer.narrow(0, unit.shard_rank * total, total);
  for (size_t i = 0; i < unit.params.size(); ++i) {
    for (size_t k = 0; k < inputs[i].size(); ++k) {
      const auto& in = unit.params[i].gather_inputs[k];
      at::Tensor flat = inputs[i][k].contiguous().view(-1);
      mine.narrow(0, in.wire_offset, in.wire_numel).copy_(mixed ? flat.view(at::kByte) : flat);
    }
  }
  if (unit.shard_world == 1) {  // nothing to gather: the buffer is every rank's
    finish_extended(unit);
    return;
  }
  ScopedCollectiveLabel label(collective_label("all-gather", unit));
  unit.gather_work = unit.options.shard_group->all_gather_into_tensor(unit.gather_buffer, mine);
  emit(&EngineHooks::on_unshard, unit);
}

// Copy-out: each input's column block into a tensor of its own dtype (every
// rank's rows in rank order), then each param rebuilt from its tensors.
void Engine::Impl::finish_extended(Unit::Impl& unit) {
  torch::NoGradGuard no_grad;
  const int world = unit.shard_world;
  const bool bytes = unit.gather_dtype == at::kByte;
  at::Tensor by_rank = unit.gather_buffer.view({world, unit.gather_total});
  for (auto& p : unit.params) {
    std::vector<at::Tensor> gathered;
    for (const auto& in : p.gather_inputs) {
      std::vector<int64_t> shape = in.shape;
      if (shape.empty()) shape.push_back(1);
      shape[0] *= world;
      at::Tensor out = at::empty(shape, unit.tensor_options.dtype(in.dtype));
      at::Tensor flat = out.view(-1);
      (bytes ? flat.view(at::kByte) : flat)
          .view({world, in.wire_numel})
          .copy_(by_rank.narrow(1, in.wire_offset, in.wire_numel));
      gathered.push_back(std::move(out));
    }
    p.gather_inputs.clear();
    set_full(p, p.extension ? rebuild_param(unit, p, gathered) : gathered[0].narrow(0, 0, p.dim0));
  }
  peak_unsharded_bytes = std::max(peak_unsharded_bytes, unsharded_bytes);
  unit.gather_buffer = at::Tensor();
  unit.unsharded = true;
}

void Engine::Impl::reshard(Unit::Impl& unit) {
  if (unit.gather_work) wait_unshard(unit);  // never free a buffer a collective still writes
  if (!unit.unsharded) return;
  // The event comes before the free: a hook that delays here delays the free.
  if (unit.shard_world > 1 && !unit.params.empty()) emit(&EngineHooks::on_reshard, unit);
  unit.unsharded = false;
  for (auto& p : unit.params) {
    if (unit.copies_full()) {
      unsharded_bytes -= p.full.nbytes();
      p.param.set_data(p.shard_view);
      p.full = at::Tensor();
      if (p.extension_out.defined()) free_extension_out(p);
    }
    if (p.stashed_grad.defined()) {
      p.param.mutable_grad() = p.stashed_grad;
      p.stashed_grad = at::Tensor();
    }
  }
  unit.grads_stashed = false;
}

void Engine::Impl::pre_forward(Unit::Impl& unit) {
  if (summoned) {
    throw std::runtime_error("forward of unit '" + unit.fqn +
                             "' inside summon_full_params: close the FullParams (leave its scope) first");
  }
  check_materialized(unit);
  if (forward_depth == 0) {
    if (final_callback_queued) abandon_backward();
    lazy_init_root(unit);
    if (&unit == root) {
      if (!forward_order.empty()) last_forward_order = forward_order;
      forward_order.clear();
    }
  }
  ++forward_depth;
  unit.last_forward_call = ++forward_calls;
  unit.state = TrainingState::Forward;
  if (std::find(forward_order.begin(), forward_order.end(), &unit) == forward_order.end()) {
    forward_order.push_back(&unit);
  }
  if (unit.unsharded) {
    check_gathered(unit, "while gathered");
  } else {
    check_shards(unit);
  }
  unshard(unit);
  wait_unshard(unit);
  if (!unit.params.empty()) prefetch_forward(unit);
}

void Engine::Impl::post_forward(Unit::Impl& unit, const std::vector<at::Tensor>& outputs, bool grad_enabled) {
  --forward_depth;
  // Every post-forward since the last backward: each backward step pops its
  // unit's latest entry and prefetches the one before (two forwards before
  // one backward replay the pattern twice).
  if (grad_enabled) post_forward_order.push_back(&unit);
  if (grad_enabled) {
    Engine::Impl* engine = this;
    Unit::Impl* target = &unit;
    for (const auto& output : outputs) {
      if (!output.defined() || !output.requires_grad()) continue;
      output.register_hook([engine, target](const at::Tensor&) { engine->pre_backward(*target); });
    }
  }
  // Without grad there is no backward to keep params for: free them all.
  if ((unit.reshard_after_forward && !unit.is_root) || !grad_enabled) reshard(unit);
  unit.state = TrainingState::Idle;
}

void Engine::Impl::queue_final_callback() {
  if (final_callback_queued) return;
  final_callback_queued = true;
  auto callback = [this] { final_callback(); };
  if (options.queue_backward_callback) {
    options.queue_backward_callback(callback);
  } else {
    torch::autograd::Engine::get_default_engine().queue_callback(callback);
  }
}

void Engine::Impl::pre_backward(Unit::Impl& unit) {
  queue_final_callback();
  if (unit.needs_post_backward) return;  // this unit's backward already began
  if (unit.prefetch_in_flight) {         // its own gather, prefetched, is now in use
    unit.prefetch_in_flight = false;
    --prefetches_in_flight;
  }
  unit.state = TrainingState::PreBackward;
  unit.needs_post_backward = true;
  // The sharded grads step aside only now, so that a zero_grad between
  // forward and backward still reaches them; this backward's full-size
  // grads then accumulate alone and are reduced into them.
  for (auto& p : unit.params) stash_grad(p);
  unit.grads_stashed = true;
  if (!unit.params.empty()) emit(&EngineHooks::on_pre_backward, unit);
  check_gathered(unit, "between forward and backward");
  unshard(unit);
  if (options.backward_prefetch == BackwardPrefetch::BackwardPre && !unit.params.empty()) prefetch_backward(unit);
  wait_unshard(unit);
  for (auto& p : unit.params) {
    if (p.param.sizes() != at::IntArrayRef(p.full_shape)) {
      throw std::runtime_error("param '" + p.fqn + "' of unit '" + unit.fqn + "' has shape " +
                               shape_of(p.param.sizes()) + " in backward, " + shape_of(p.full_shape) + " in forward");
    }
  }
}

namespace {
// This backward's full-size grad of `p`, taken off the param (undefined if
// it has none), checked to be full-size.
at::Tensor take_full_grad(const Unit::Impl& unit, ShardedParam& p) {
  at::Tensor grad = std::move(p.param.mutable_grad());
  p.param.mutable_grad() = at::Tensor();
  if (grad.defined() && grad.sizes() != at::IntArrayRef(p.full_shape)) {
    throw std::runtime_error("grad of param '" + p.fqn + "' of unit '" + unit.fqn + "' has shape " +
                             shape_of(grad.sizes()) + ", expected the full shape " + shape_of(p.full_shape));
  }
  return grad;
}

// Adds this backward's full-size grad of `p` to the sum of earlier backwards
// run without sync, in reduce_dtype: FSDP2 (2.15) gives the unsharded param
// grad_dtype = reduce_dtype (unset: the param's own dtype), so autograd casts
// each backward's grad to it and accumulates in it. With bf16 compute and an
// fp32 reduction the sum is fp32; with fp32 compute and a bf16 reduction each
// grad is rounded to bf16 before the bf16 addition.
void add_to_unsynced(const Unit::Impl& unit, ShardedParam& p, const at::Tensor& grad) {
  if (!grad.defined()) return;
  if (p.unsynced_grad.defined()) {
    p.unsynced_grad.add_(grad.to(unit.reduce_dtype));
  } else {
    p.unsynced_grad = grad.to(unit.reduce_dtype);
  }
}

}  // namespace

// This backward's full-size grads of `unit`, taken off the params and added
// to those kept from backwards without sync: those of the params with a grad
// (FSDP2), or, with reduce_scatter_unused_params, of every param that
// requires grad once any has one (an undefined grad: unused on this rank,
// reduced as zeros), so that ranks whose forward used different params still
// issue the same reduce-scatter.
std::vector<std::pair<size_t, at::Tensor>> Engine::Impl::take_full_grads(Unit::Impl& unit) {
  std::vector<std::pair<size_t, at::Tensor>> grads;
  bool any = false;
  const bool with_unused = unit.options.reduce_scatter_unused_params;
  for (size_t i = 0; i < unit.params.size(); ++i) {
    auto& p = unit.params[i];
    if (!p.param.requires_grad()) continue;
    at::Tensor grad = take_full_grad(unit, p);
    if (p.unsynced_grad.defined()) {
      add_to_unsynced(unit, p, grad);
      grad = std::move(p.unsynced_grad);
      p.unsynced_grad = at::Tensor();
    }
    if (!with_unused && !grad.defined()) continue;
    any = any || grad.defined();
    grads.emplace_back(i, std::move(grad));
  }
  if (!any) grads.clear();
  return grads;
}

void Engine::Impl::post_backward(Unit::Impl& unit) {
  if (!unit.unsharded) return;  // nothing was computed with gathered params
  unit.state = TrainingState::PostBackward;
  unit.needs_post_backward = false;
  unit.backward_done = true;
  if (!unit.reduce_grads) {
    keep_unsynced_grads(unit);
    return;
  }
  // Take the full-size grads aside, free the gathered params (reshard first,
  // as PyTorch's FSDP does), then reduce-scatter the grads.
  std::vector<std::pair<size_t, at::Tensor>> grads = take_full_grads(unit);
  if (unit.reshard_after_backward) reshard(unit);
  if (grads.empty()) {
    // No grad yet (a param used by two forwards accumulates once, after
    // both) or none at all (frozen): still the unit's post-backward step.
    if (!unit.params.empty()) emit(&EngineHooks::on_post_backward, unit);
    finish_post_backward(unit);
    return;
  }
  const bool replicated = unit.options.replicate_group && unit.options.replicate_group->size() > 1;
  if (unit.shard_world == 1 && !replicated) {
    accumulate_local_grads(unit, grads);
  } else {
    unit.pending.push_back(issue_reduction(unit, grads));
  }
  emit(&EngineHooks::on_post_backward, unit);
  finish_post_backward(unit);
}

namespace {
// Lands this rank's reduced grad of `p` (reduce_dtype, its rows) in the
// sharded grad: cast to the param's dtype, copied beside an offloaded shard,
// then added to the sharded grad of earlier backwards or assigned. `shared`:
// `reduced` views a buffer that must not become the grad (copied if nothing
// above copied it).
void land_sharded_grad(Unit::Impl& unit, ShardedParam& p, const at::Tensor& reduced, bool shared) {
  at::Tensor grad = to_param_dtype(unit, reduced);
  if (unit.offload) grad = offload_copy(grad, unit.options.offload_policy, unit.tensor_options.device());
  // The sharded grad: aside while the unit stays gathered after backward.
  at::Tensor& current = unit.grads_stashed ? p.stashed_grad : p.param.mutable_grad();
  if (current.defined()) {
    current.add_(grad);
  } else {
    current = shared && grad.is_same(reduced) ? grad.clone() : grad;
  }
}

}  // namespace

// A world of one: the grad is already the reduced, sharded grad (in
// reduce_dtype on its way, as a reduction would round it).
void Engine::Impl::accumulate_local_grads(Unit::Impl& unit, std::vector<std::pair<size_t, at::Tensor>>& grads) {
  for (auto& [index, grad] : grads) {
    if (!grad.defined()) continue;  // unused here, and no other rank to hear from
    land_sharded_grad(unit, unit.params[index], grad.to(unit.reduce_dtype), /*shared=*/false);
  }
}

// Without gradient sync the full-size grads stay on this rank, summed in
// reduce_dtype over the backwards until one with sync reduces them (FSDP2
// keeps them on the unsharded param; ours is one Tensor whose data is
// swapped, so they wait aside).
void Engine::Impl::keep_unsynced_grads(Unit::Impl& unit) {
  for (auto& p : unit.params) {
    if (p.param.requires_grad()) add_to_unsynced(unit, p, take_full_grad(unit, p));
  }
  if (unit.reshard_after_backward) reshard(unit);
  if (!unit.params.empty()) emit(&EngineHooks::on_post_backward, unit);
  finish_post_backward(unit);
}

// Copies the full grads, rank by rank, into one flat buffer in reduce_dtype
// and issues its reduce-scatter (none for a shard group of one: the replicas'
// all-reduce in finish_reductions is then the whole reduction).
PendingReduction Engine::Impl::issue_reduction(Unit::Impl& unit,
                                               const std::vector<std::pair<size_t, at::Tensor>>& grads) {
  const int world = unit.shard_world;
  int64_t total = 0;
  PendingReduction reduction;
  for (const auto& [index, grad] : grads) {
    reduction.params.push_back(index);
    reduction.offsets.push_back(total);
    total += unit.params[index].chunk_numel();
  }
  reduction.input = zeroed_flat(world * total, reduce_options(unit));
  at::Tensor by_rank = reduction.input.view({world, total});
  for (size_t k = 0; k < grads.size(); ++k) {
    const auto& p = unit.params[grads[k].first];
    if (!grads[k].second.defined()) continue;  // unused on this rank: contributes zeros
    scatter_rows(by_rank, reduction.offsets[k], p, grads[k].second.reshape({p.dim0, p.row_numel}));
  }
  const GradDivision division = grad_division(unit);
  const bool replicated = unit.options.replicate_group && unit.options.replicate_group->size() > 1;
  if (world == 1) {
    reduction.output = reduction.input;
    // FSDP2's fp16 pre-divide (an explicit factor never divided here).
    if (unit.options.gradient_predivide_factor == 1.0 && division.before != 1.0) reduction.output.div_(division.before);
    return reduction;
  }
  reduction.output = at::empty({total}, reduce_options(unit));
  ReduceScatterOptions scatter;
  if (division.average) {
    scatter.reduce_op = ReduceOp::Avg;
  } else {
    scatter.predivide_factor = division.before;
    // The explicit factor's postdivide is over the shard group alone; FSDP2's
    // fp16 one waits for the replicas' sum (finish_reductions).
    const bool after_all_reduce = replicated && unit.options.gradient_predivide_factor == 1.0;
    if (!after_all_reduce) scatter.postdivide_factor = division.after;
  }
  ScopedCollectiveLabel label(collective_label("reduce-scatter", unit));
  reduction.reduce_scatter =
      unit.options.shard_group->reduce_scatter_tensor(reduction.output, reduction.input, scatter);
  // Each backend's Work holds the input while it still reads it (the fake's
  // arrival, Gloo's c10d work); the input is never modified after this.
  // Not keeping it here lets a backend that has read it (the fake on fiber
  // ranks folds it in as the rank arrives) free it at once, rather than
  // every rank of a world holding world x shard bytes until the last rank
  // issues.
  reduction.input = at::Tensor();
  return reduction;
}

void Engine::Impl::finish_post_backward(Unit::Impl& unit) {
  if (options.backward_prefetch == BackwardPrefetch::BackwardPost && !unit.params.empty()) prefetch_backward(unit);
  unit.state = TrainingState::Idle;
}

void Engine::Impl::prefetch(Unit::Impl& unit, Unit::Impl* target) {
  for (auto& hooks : options.hooks) hooks->on_prefetch(unit.fqn, target ? target->fqn : "", unit.state);
  if (target == nullptr || target->unsharded || target->gather_work) return;
  if (prefetches_in_flight >= options.max_prefetches_in_flight) return;
  unshard(*target);
  if (target->gather_work) {
    target->prefetch_in_flight = true;
    ++prefetches_in_flight;
  }
}

void Engine::Impl::prefetch_forward(Unit::Impl& unit) {
  if (unit.explicit_forward_prefetch) {
    for (Unit::Impl* target : unit.forward_prefetch) prefetch(unit, target);
    return;
  }
  if (!options.forward_prefetch) return;
  auto it = std::find(last_forward_order.begin(), last_forward_order.end(), &unit);
  if (it == last_forward_order.end()) return;  // first forward: no order known yet
  ++it;
  prefetch(unit, it == last_forward_order.end() ? nullptr : *it);
}

void Engine::Impl::prefetch_backward(Unit::Impl& unit) {
  if (unit.explicit_backward_prefetch) {
    for (Unit::Impl* target : unit.backward_prefetch) {
      if (!target->backward_done) prefetch(unit, target);
    }
    return;
  }
  // Backward runs in reverse post-forward order: the root (its outputs get
  // their gradient first), then the last block, ... The unit's latest entry
  // goes; the entry before it is the next unit to run backward.
  auto it = std::find(post_forward_order.rbegin(), post_forward_order.rend(), &unit);
  Unit::Impl* next = nullptr;
  if (it != post_forward_order.rend()) {
    auto position = post_forward_order.erase(std::next(it).base());
    if (position != post_forward_order.begin()) next = *std::prev(position);
  }
  prefetch(unit, next);
}

void Engine::Impl::finish_reductions(Unit::Impl& unit) {
  for (auto& reduction : unit.pending) land_reduction(unit, reduction);
  unit.pending.clear();
}

void Engine::Impl::land_reduction(Unit::Impl& unit, PendingReduction& reduction) {
  if (reduction.reduce_scatter) reduction.reduce_scatter->wait();
  auto reduced_chunk = [&](const at::Tensor& output, size_t k) {
    return output.narrow(0, reduction.offsets[k], unit.params[reduction.params[k]].chunk_numel());
  };
  if (unit.options.replicate_group && unit.options.replicate_group->size() > 1) {
    if (!unit.all_reduce_grads) {
      // set_requires_all_reduce(false): the shard group's sums wait, summed,
      // for the next all-reduce (FSDP2's partial reduce output).
      for (size_t k = 0; k < reduction.params.size(); ++k) {
        auto& p = unit.params[reduction.params[k]];
        if (p.partial_reduced.defined()) {
          p.partial_reduced.add_(reduced_chunk(reduction.output, k));
        } else {
          p.partial_reduced = reduced_chunk(reduction.output, k).clone();
        }
      }
      return;
    }
    for (size_t k = 0; k < reduction.params.size(); ++k) {
      auto& p = unit.params[reduction.params[k]];
      if (!p.partial_reduced.defined()) continue;
      reduced_chunk(reduction.output, k).add_(p.partial_reduced);
      p.partial_reduced = at::Tensor();
    }
    // The mean over replicas; FSDP2's fp16 division sums and divides after.
    const GradDivision division = grad_division(unit);
    const bool sum_then_divide = !division.average && unit.options.gradient_predivide_factor == 1.0;
    AllReduceOptions all_reduce;
    all_reduce.reduce_op = sum_then_divide ? ReduceOp::Sum : ReduceOp::Avg;
    ScopedCollectiveLabel label(collective_label("all-reduce", unit));
    unit.options.replicate_group->all_reduce(reduction.output, all_reduce)->wait();
    if (sum_then_divide && division.after != 1.0) reduction.output.div_(division.after);
  }
  for (size_t k = 0; k < reduction.params.size(); ++k) {
    auto& p = unit.params[reduction.params[k]];
    const at::Tensor rows =
        reduced_chunk(reduction.output, k).view(p.rows_shape(p.rows_per_rank)).narrow(0, 0, p.my_rows);
    land_sharded_grad(unit, p, rows, /*shared=*/true);
  }
}

// A backward began (a pre-backward queued the final callback) but its
// end-of-backward step never ran: it threw, and LibTorch drops the callbacks
// of a failed pass. Land what is in flight (every rank issued it), drop this
// pass's partial grads and reductions, and free everything, so the next step
// runs as if the failed backward never had.
void Engine::Impl::abandon_backward() {
  final_callback_queued = false;
  for (auto& u : units) {
    auto& unit = u->impl();
    for (auto& reduction : unit.pending) {
      if (reduction.reduce_scatter) reduction.reduce_scatter->wait();
    }
    unit.pending.clear();
    if (unit.needs_post_backward) {
      for (auto& p : unit.params) p.param.mutable_grad() = at::Tensor();  // partial: this pass's
    }
    reshard(unit);  // restores the grads stashed at pre-backward
    unit.needs_post_backward = false;
    unit.backward_done = false;
    unit.prefetch_in_flight = false;
    unit.state = TrainingState::Idle;
  }
  prefetches_in_flight = 0;
  post_forward_order.clear();
}

void Engine::Impl::final_callback() {
  final_callback_queued = false;
  // Units whose inputs needed no grad have no post-backward hook: reduce
  // them here in module pre-order, the root first (FSDP2's order).
  for (Unit::Impl* unit : preorder_units) {
    if (unit->needs_post_backward) post_backward(*unit);
  }
  for (auto& unit : units) {
    auto& impl = unit->impl();
    if (impl.needs_post_backward) post_backward(impl);
  }
  for (auto it = forward_order.rbegin(); it != forward_order.rend(); ++it) finish_reductions(**it);
  for (auto& unit : units) {
    auto& impl = unit->impl();
    finish_reductions(impl);
    if (impl.reshard_after_backward) {
      reshard(impl);  // also lands prefetches that turned out unused
    } else if (impl.gather_work) {
      wait_unshard(impl);  // stays gathered, as its reshard_after_backward asks
    }
    impl.state = TrainingState::Idle;
    impl.backward_done = false;
  }
  post_forward_order.clear();
  if (root != nullptr) emit(&EngineHooks::on_final_callback, *root);
}

// ---------------------------------------------------------------------------

namespace {

class UnitForwardScope final : public Engine::ForwardScope {
 public:
  UnitForwardScope(Engine::Impl& engine, Unit::Impl& unit)
      : engine_(engine), unit_(unit), grad_enabled_(at::GradMode::is_enabled()) {
    engine_.pre_forward(unit_);
    my_call_ = unit_.last_forward_call;
  }
  ~UnitForwardScope() override {
    if (!finished_) {  // the forward threw: leave the engine consistent
      --engine_.forward_depth;
      unit_.state = TrainingState::Idle;
    }
  }
  std::vector<at::Tensor> wrap_inputs(std::vector<at::Tensor> inputs) override {
    const MixedPrecisionPolicy& mp = unit_.options.mp_policy;
    if (mp.cast_forward_inputs && mp.param_dtype) {
      for (auto& input : inputs) input = cast_floating(input, *mp.param_dtype);
    }
    if (!grad_enabled_) return inputs;
    std::vector<size_t> positions;
    torch::autograd::variable_list needing_grad;
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (inputs[i].defined() && inputs[i].requires_grad()) {
        positions.push_back(i);
        needing_grad.push_back(inputs[i]);
      }
    }
    if (needing_grad.empty()) return inputs;  // the final callback reduces this unit
    auto wrapped = attach_post_backward(needing_grad, &unit_);
    for (size_t k = 0; k < positions.size(); ++k) inputs[positions[k]] = wrapped[k];
    return inputs;
  }
  std::vector<at::Tensor> finish(const std::vector<at::Tensor>& outputs) override {
    if (grad_enabled_) check_no_shards_used(outputs);
    finished_ = true;
    engine_.post_forward(unit_, outputs, grad_enabled_);
    // After the pre-backward hooks (FSDP2's order): the cast's backward feeds them.
    const std::optional<at::ScalarType> output_dtype = unit_.options.mp_policy.output_dtype;
    if (!output_dtype) return outputs;
    std::vector<at::Tensor> cast;
    cast.reserve(outputs.size());
    for (const auto& output : outputs) cast.push_back(cast_floating(output, *output_dtype));
    return cast;
  }
  std::exception_ptr with_context(std::exception_ptr error) override {
    // A failed collective keeps its type (callers tell a timeout by it) and
    // its text: it has nothing to do with how sub-units were called.
    if (is_comm_error(error)) return error;
    const std::vector<Unit::Impl*> skipped = sub_units_not_run();
    if (skipped.empty()) return error;
    return std::make_exception_ptr(std::runtime_error(
        "forward of unit '" + unit_.fqn + "' failed: " + error_text(error) + "\n  note: its sub-unit(s) " +
        names(skipped) +
        " were not called through fsdp::call before the failure; a forward that calls them directly computes "
        "with their shards. " +
        kFix));
  }

 private:
  static constexpr const char* kFix =
      "Call sharded children as fsdp::call(child, args...) inside the forward (a torch::nn::Sequential: "
      "fsdp::call(sequential, x) or fsdp::forward_sequential).";

  // Sub-units whose pre-forward did not run inside this unit's forward.
  std::vector<Unit::Impl*> sub_units_not_run() const {
    std::vector<Unit::Impl*> skipped;
    for (Unit::Impl* sub : unit_.sub_units) {
      if (sub->last_forward_call < my_call_) skipped.push_back(sub);
    }
    return skipped;
  }

  // FSDP2's cast of inputs and outputs: floating-point tensors only.
  static at::Tensor cast_floating(const at::Tensor& tensor, at::ScalarType dtype) {
    if (!tensor.defined() || !tensor.is_floating_point() || tensor.scalar_type() == dtype) return tensor;
    return tensor.to(dtype);
  }

  static bool is_comm_error(const std::exception_ptr& error) {
    try {
      std::rethrow_exception(error);
    } catch (const CommError&) {
      return true;
    } catch (...) {
      return false;
    }
  }

  static std::string names(const std::vector<Unit::Impl*>& units) {
    std::string out;
    for (const Unit::Impl* unit : units) out += (out.empty() ? "'" : ", '") + unit->fqn + "'";
    return out;
  }

  // A sub-unit that did not run through fsdp::call may still have been
  // computed with (called directly): its params' grad accumulators are then
  // in the outputs' graph. Those shards give wrong numbers or shape errors.
  void check_no_shards_used(const std::vector<at::Tensor>& outputs) const {
    const std::vector<Unit::Impl*> skipped = sub_units_not_run();
    if (skipped.empty()) return;
    std::unordered_map<const torch::autograd::Node*, std::pair<Unit::Impl*, const ShardedParam*>> accumulators;
    for (Unit::Impl* sub : skipped) {
      for (const auto& p : sub->params) {
        if (auto node = torch::autograd::impl::try_get_grad_accumulator(p.param)) {
          accumulators.emplace(node.get(), std::make_pair(sub, &p));
        }
      }
    }
    if (accumulators.empty()) return;
    std::vector<const torch::autograd::Node*> stack;
    std::unordered_set<const torch::autograd::Node*> seen;
    for (const auto& output : outputs) {
      if (output.defined() && output.grad_fn()) stack.push_back(output.grad_fn().get());
    }
    while (!stack.empty()) {
      const torch::autograd::Node* node = stack.back();
      stack.pop_back();
      if (!seen.insert(node).second) continue;
      auto found = accumulators.find(node);
      if (found != accumulators.end()) {
        const auto& [sub, param] = found->second;
        throw std::runtime_error("forward of unit '" + unit_.fqn + "' computed with the shard of param '" + param->fqn +
                                 "' of sub-unit '" + sub->fqn + "' (shape " + shape_of(param->param.sizes()) +
                                 ", full " + shape_of(param->full_shape) + "): the forward called '" + sub->fqn +
                                 "' directly. " + kFix);
      }
      for (const auto& edge : node->next_edges()) {
        if (edge.function) stack.push_back(edge.function.get());
      }
    }
  }

 public:
 private:
  Engine::Impl& engine_;
  Unit::Impl& unit_;
  bool grad_enabled_;
  bool finished_ = false;
  uint64_t my_call_ = 0;
};

}  // namespace

Engine::Engine(EngineOptions options) : impl_(std::make_unique<Impl>()) {
  impl_->options = std::move(options);
  for (const auto& hooks : impl_->options.hooks) {
    if (!hooks) throw std::invalid_argument("EngineOptions::hooks holds a null entry");
  }
  if (impl_->options.max_prefetches_in_flight < 0) {
    throw std::invalid_argument("EngineOptions::max_prefetches_in_flight must be >= 0");
  }
}

Engine::~Engine() {
  auto& r = detail::registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  for (const auto& [module, unit] : impl_->by_module) r.engines.erase(module);
}

namespace {

void check_shard_options(const std::string& name, const FullyShardOptions& options) {
  if (!options.shard_group) throw std::invalid_argument("fully_shard(" + name + "): shard_group is null");
  const bool replicated =
      options.strategy == ShardingStrategy::NoShard || options.strategy == ShardingStrategy::HybridShard;
  if (replicated && !options.replicate_group) {
    throw std::invalid_argument(std::string("fully_shard(") + name + "): strategy " + to_string(options.strategy) +
                                " needs a replicate_group");
  }
  if (!replicated && options.replicate_group) {
    throw std::invalid_argument(std::string("fully_shard(") + name + "): strategy " + to_string(options.strategy) +
                                " takes no replicate_group");
  }
  if (options.strategy == ShardingStrategy::NoShard && options.shard_group->size() != 1) {
    throw std::invalid_argument("fully_shard(" + name + "): no_shard needs a shard_group of size 1 (make_self_group)");
  }
  if (!(options.gradient_predivide_factor > 0.0)) {
    throw std::invalid_argument("fully_shard(" + name + "): gradient_predivide_factor must be positive");
  }
  const MixedPrecisionPolicy& mp = options.mp_policy;
  for (const auto& [field, dtype] :
       {std::pair{"param_dtype", mp.param_dtype}, std::pair{"reduce_dtype", mp.reduce_dtype},
        std::pair{"output_dtype", mp.output_dtype}}) {
    if (dtype && !c10::isFloatingType(*dtype)) {
      throw std::invalid_argument("fully_shard(" + name + "): mp_policy." + field + " is " + c10::toString(*dtype) +
                                  ", not a floating-point dtype; use at::kBFloat16, at::kHalf or at::kFloat, or leave "
                                  "it unset (no cast)");
    }
  }
}

// Resolves the unit's policy against its params' dtype (FSDP2's rules): no
// cast when param_dtype is the params' own or they are not floating point;
// grads reduce in reduce_dtype, else in the params' own dtype.
void resolve_mixed_precision(Unit::Impl& unit) {
  const MixedPrecisionPolicy& mp = unit.options.mp_policy;
  const at::ScalarType own = unit.tensor_options.dtype().toScalarType();
  unit.compute_dtype.reset();
  if (mp.param_dtype && *mp.param_dtype != own && c10::isFloatingType(own)) unit.compute_dtype = mp.param_dtype;
  unit.reduce_dtype = mp.reduce_dtype.value_or(own);
}

// Broadcasts rank 0's values of the module's params (those no nested unit
// owns yet) and buffers over both groups, so every rank starts alike.
void sync_module_states(torch::nn::Module& module, const FullyShardOptions& options,
                        const std::unordered_set<const c10::TensorImpl*>& managed) {
  torch::NoGradGuard no_grad;
  auto broadcast_into = [](ProcessGroup& group, const at::Tensor& target) {
    at::Tensor contiguous = target.contiguous();
    group.broadcast(contiguous, BroadcastOptions{})->wait();
    if (!contiguous.is_same(target)) target.copy_(contiguous);
  };
  for (const auto& group : {options.shard_group, options.replicate_group}) {
    if (!group || group->size() == 1) continue;
    for (auto& tensor : module.parameters()) {
      if (!managed.count(tensor.unsafeGetTensorImpl())) broadcast_into(*group, tensor.data());
    }
    for (auto& buffer : module.buffers()) broadcast_into(*group, buffer);
  }
}

// One unit's params agree on device and dtype (they share one flat
// all-gather buffer) and have a dim 0 to shard.
class UnitParamChecker {
 public:
  explicit UnitParamChecker(std::string unit_name) : unit_name_(std::move(unit_name)) {}

  void check(const std::string& fqn, const at::Tensor& param) {
    if (device_ && param.device() != *device_) {
      throw std::invalid_argument("fully_shard(" + unit_name_ + "): param '" + fqn + "' is on " + param.device().str() +
                                  ", other params of the unit on " + device_->str());
    }
    if (dtype_ && param.scalar_type() != *dtype_) {
      throw std::invalid_argument("fully_shard(" + unit_name_ + "): param '" + fqn + "' is " +
                                  c10::toString(param.scalar_type()) + ", other params of the unit " +
                                  c10::toString(*dtype_));
    }
    if (param.dim() == 0) {
      throw std::invalid_argument("fully_shard(" + unit_name_ + "): param '" + fqn + "' is 0-dim; shard it as [1]");
    }
    device_ = param.device();
    dtype_ = param.scalar_type();
  }

  at::TensorOptions tensor_options() const {
    return at::TensorOptions().dtype(dtype_.value_or(at::kFloat)).device(device_.value_or(at::kCPU));
  }

 private:
  std::string unit_name_;
  std::optional<at::Device> device_;
  std::optional<at::ScalarType> dtype_;
};

// FSDP2 shards params where they are: fully_shard with a device expects them
// there already (meta excepted: materialize allocates them).
void check_on_compute_device(const std::string& unit_name, const std::string& fqn, const at::Tensor& param,
                             const FullyShardOptions& options) {
  if (!options.device || param.is_meta() || param.device() == *options.device) return;
  throw std::invalid_argument("fully_shard(" + unit_name + "): Expects the parameter to already be moved to device " +
                              options.device->str() + " but got " + param.device().str() + " (param '" + fqn +
                              "'): move the module there first (module->to(device)), or build it on the meta device");
}

// Swaps `param` to this rank's rows of dim 0 (padded to an equal chunk per
// rank) with its identity kept; a grad it already has is sharded alike.
ShardedParam shard_param(std::string fqn, const at::Tensor& param, Unit::Impl& unit) {
  ShardedParam p;
  p.fqn = std::move(fqn);
  p.param = param;
  p.full_shape = param.sizes().vec();
  p.dim0 = p.full_shape[0];
  p.row_numel = 1;
  for (size_t d = 1; d < p.full_shape.size(); ++d) p.row_numel *= p.full_shape[d];
  p.rows_per_rank = (p.dim0 + unit.shard_world - 1) / unit.shard_world;
  const int64_t begin = unit.shard_rank * p.rows_per_rank;
  p.my_rows = std::max<int64_t>(0, std::min(p.rows_per_rank, p.dim0 - begin));
  p.offset = unit.chunk_total;
  unit.chunk_total += p.chunk_numel();

  torch::NoGradGuard no_grad;
  p.padded_shard = at::zeros(p.rows_shape(p.rows_per_rank), param.options().requires_grad(false));
  // A meta param (deferred init) has no values: Engine::materialize fills the shard.
  if (p.my_rows > 0 && !param.is_meta()) {
    p.padded_shard.narrow(0, 0, p.my_rows).copy_(param.detach().narrow(0, begin, p.my_rows));
  }
  const OffloadPolicy& offload = unit.options.offload_policy;
  const bool to_cpu = offload.cpu_offload && !param.is_meta();
  if (to_cpu) p.padded_shard = offload_copy(p.padded_shard, offload, param.device());
  p.shard_view = p.padded_shard.narrow(0, 0, p.my_rows);
  const at::Tensor& grad = param.grad();
  at::Tensor sharded_grad;
  if (grad.defined()) {
    sharded_grad = grad.narrow(0, begin, p.my_rows);
    sharded_grad = to_cpu ? offload_copy(sharded_grad, offload, param.device()) : sharded_grad.clone();
  }
  p.param.mutable_grad() = at::Tensor();
  p.param.set_data(p.shard_view);
  if (sharded_grad.defined()) p.param.mutable_grad() = sharded_grad;
  return p;
}

// Hands each param named in options.all_gather_extensions its extension;
// a key that names no param of this unit is refused (a typo, or a nested
// unit's param, which that unit's options must name).
void assign_extensions(Unit::Impl& unit, const std::string& name) {
  for (const auto& entry : unit.options.all_gather_extensions) {
    const std::string& fqn = entry.first;  // a plain reference: lambdas cannot capture bindings (clang)
    const std::shared_ptr<AllGatherExtension>& extension = entry.second;
    if (!extension) {
      throw std::invalid_argument("fully_shard(" + name + "): all_gather_extensions['" + fqn + "'] is null");
    }
    auto it = std::find_if(unit.params.begin(), unit.params.end(), [&](const ShardedParam& p) { return p.fqn == fqn; });
    if (it == unit.params.end()) {
      std::string names;
      for (const auto& p : unit.params) names += (names.empty() ? "'" : ", '") + p.fqn + "'";
      throw std::invalid_argument("fully_shard(" + name + "): all_gather_extensions names '" + fqn +
                                  "', which is not a param this unit manages (its params: " + names +
                                  "); key by the FQN relative to the module given to fully_shard, and name a "
                                  "nested unit's params in that unit's options");
    }
    it->extension = extension;
    unit.has_extensions = true;
  }
}

}  // namespace

void Engine::fully_shard(const std::shared_ptr<torch::nn::Module>& module, const FullyShardOptions& options) {
  if (!module) throw std::invalid_argument("fully_shard: module is null");
  const std::string name = module->name();
  if (detail::engine_of(module.get()) != nullptr) {
    throw std::invalid_argument("fully_shard: module " + name + " is already sharded");
  }
  check_shard_options(name, options);

  auto unit_impl = std::make_unique<Unit::Impl>();
  Unit::Impl& unit = *unit_impl;
  unit.engine = impl_.get();
  unit.module = module;
  unit.options = options;
  unit.shard_world = options.shard_group->size();
  unit.shard_rank = options.shard_group->rank();
  unit.offload = options.offload_policy.cpu_offload;
  unit.reshard_after_forward =
      options.strategy == ShardingStrategy::FullShard || options.strategy == ShardingStrategy::HybridShard;
  if (options.sync_module_states) {
    for (const auto& tensor : module->parameters()) {
      if (tensor.is_meta()) {
        throw std::invalid_argument("fully_shard(" + name +
                                    "): sync_module_states with params on the meta device (nothing to broadcast); "
                                    "materialize initialises every rank alike instead");
      }
    }
    sync_module_states(*module, options, impl_->managed);
  }

  std::unordered_set<const c10::TensorImpl*> seen;
  UnitParamChecker checker(name);
  for (const auto& item : module->named_parameters()) {
    const c10::TensorImpl* key = item.value().unsafeGetTensorImpl();
    if (impl_->managed.count(key) || !seen.insert(key).second) continue;  // a nested unit's, or tied
    check_on_compute_device(name, item.key(), item.value(), options);
    checker.check(item.key(), item.value());
    unit.params.push_back(shard_param(item.key(), item.value(), unit));
  }
  unit.tensor_options = checker.tensor_options();
  if (options.device) unit.tensor_options = unit.tensor_options.device(*options.device);
  resolve_mixed_precision(unit);
  assign_extensions(unit, name);

  for (const auto& p : unit.params) impl_->managed.insert(p.param.unsafeGetTensorImpl());
  impl_->by_module[module.get()] = &unit;
  {
    auto& r = detail::registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    r.engines[module.get()] = this;
  }
  impl_->units.push_back(std::make_unique<Unit>(std::move(unit_impl)));
}

std::unique_ptr<Engine::ForwardScope> Engine::begin_forward(const torch::nn::Module* module) {
  auto it = impl_->by_module.find(module);
  if (it == impl_->by_module.end()) throw std::logic_error("fsdp: module is not a unit of this engine");
  if (detail::in_checkpoint_region()) {
    throw std::runtime_error("fsdp::call of unit '" + it->second->fqn + "' (" + module->name() +
                             ") inside an fsdp::checkpoint function: its gathers would run again in backward. "
                             "Checkpoint inside the unit instead (in its forward, around the computation).");
  }
  return std::make_unique<UnitForwardScope>(*impl_, *it->second);
}

const Unit* Engine::root() const {
  if (impl_->root == nullptr) return nullptr;
  for (const auto& unit : impl_->units) {
    if (&unit->impl() == impl_->root) return unit.get();
  }
  return nullptr;
}

std::vector<const Unit*> Engine::units() const {
  std::vector<const Unit*> result;
  for (const auto& unit : impl_->units) result.push_back(unit.get());
  return result;
}

namespace {

// Re-points `param`'s TensorImpl at `data` (identity kept). For a meta param
// LibTorch's set_data refuses (meta and CPU are different dispatch key sets:
// Module::to(kMeta) fails the same way), so this does what set_data does
// after that check: TensorImpl::shallow_copy_from. Safe for a meta param: it
// has no storage, no grad and no autograd history to keep consistent.
void repoint(const at::Tensor& param, const at::Tensor& data) {
  if (!param.is_meta()) {
    param.set_data(data);
    return;
  }
  param.unsafeGetTensorImpl()->shallow_copy_from(data.getIntrusivePtr());
}

// The first FQN under `root` of every param (tied params: the first name).
std::unordered_map<const c10::TensorImpl*, std::string> param_names(const torch::nn::Module& root) {
  std::unordered_map<const c10::TensorImpl*, std::string> names;
  for (const auto& item : root.named_parameters()) names.emplace(item.value().unsafeGetTensorImpl(), item.key());
  return names;
}

void materialize_param(ShardedParam& p, const Unit::Impl& unit, const std::string& fqn,
                       const MaterializeOptions& options) {
  if (!options.init_param) {
    throw std::invalid_argument("materialize: param '" + fqn + "' (shape " + shape_of(p.full_shape) +
                                ") is on the meta device and MaterializeOptions::init_param is empty");
  }
  p.padded_shard =
      at::zeros(p.rows_shape(p.rows_per_rank), at::TensorOptions().dtype(p.param.scalar_type()).device(options.device));
  p.shard_view = p.padded_shard.narrow(0, 0, p.my_rows);
  const int64_t row_begin = std::min(unit.shard_rank * p.rows_per_rank, p.dim0);
  options.init_param(ShardInit{fqn, p.full_shape, row_begin, p.shard_view});
  repoint(p.param, p.shard_view);
}

}  // namespace

void Engine::materialize(const std::shared_ptr<torch::nn::Module>& root, const MaterializeOptions& options) {
  if (!root) throw std::invalid_argument("materialize: root module is null");
  if (options.device.is_meta()) throw std::invalid_argument("materialize: device is meta; give the device to fill");
  for (const auto& item : root->named_parameters()) {
    if (item.value().is_meta() && !manages(item.value())) {
      throw std::invalid_argument("materialize: param '" + item.key() +
                                  "' is on the meta device and no unit of this engine holds it: fully_shard its "
                                  "module (or the root) first");
    }
  }
  torch::NoGradGuard no_grad;
  const auto names = param_names(*root);
  for (auto& unit : impl_->units) {
    Unit::Impl& u = unit->impl();
    for (auto& p : u.params) {
      auto name = names.find(p.param.unsafeGetTensorImpl());
      if (!p.param.is_meta() || name == names.end()) continue;  // materialised, or outside `root`
      if (u.offload && !options.device.is_cpu()) {
        // FSDP2's message (its lazy init checks the same).
        throw std::invalid_argument(
            "materialize: FSDP parameters should be materialized on CPU when enabling CPU offloading. For example, "
            "load a CPU state dict or call module.to_empty(device=\"cpu\"). Found param '" +
            name->second + "' to materialize on " + options.device.str());
      }
      materialize_param(p, u, name->second, options);
      if (u.tensor_options.device().is_meta()) u.tensor_options = u.tensor_options.device(options.device);
    }
  }
  for (const auto& item : root->named_buffers()) {
    const at::Tensor& buffer = item.value();
    if (!buffer.is_meta()) continue;
    if (!options.init_buffer) {
      throw std::invalid_argument("materialize: buffer '" + item.key() +
                                  "' is on the meta device and MaterializeOptions::init_buffer is empty");
    }
    at::Tensor data = at::zeros(buffer.sizes(), buffer.options().device(options.device));
    options.init_buffer(item.key(), data);
    repoint(buffer, data);
  }
}

bool Engine::manages(const at::Tensor& param) const {
  return param.defined() && impl_->managed.count(param.unsafeGetTensorImpl()) > 0;
}

Unit::Impl* Engine::Impl::unit_of(const std::shared_ptr<torch::nn::Module>& module, const char* what) {
  auto it = by_module.find(module.get());
  if (it == by_module.end()) {
    throw std::invalid_argument(std::string(what) + ": module " + (module ? module->name() : "null") +
                                " is not a unit of this engine (call fully_shard on it first)");
  }
  return it->second;
}

void Engine::set_forward_prefetch(const std::shared_ptr<torch::nn::Module>& module,
                                  const std::vector<std::shared_ptr<torch::nn::Module>>& targets) {
  Unit::Impl* unit = impl_->unit_of(module, "set_forward_prefetch");
  unit->forward_prefetch.clear();
  for (const auto& target : targets) unit->forward_prefetch.push_back(impl_->unit_of(target, "set_forward_prefetch"));
  unit->explicit_forward_prefetch = true;
}

void Engine::set_backward_prefetch(const std::shared_ptr<torch::nn::Module>& module,
                                   const std::vector<std::shared_ptr<torch::nn::Module>>& targets) {
  Unit::Impl* unit = impl_->unit_of(module, "set_backward_prefetch");
  unit->backward_prefetch.clear();
  for (const auto& target : targets) {
    unit->backward_prefetch.push_back(impl_->unit_of(target, "set_backward_prefetch"));
  }
  unit->explicit_backward_prefetch = true;
}

std::vector<Unit::Impl*> Engine::Impl::units_under(const std::shared_ptr<torch::nn::Module>& module, bool recurse,
                                                   const char* what) {
  std::vector<Unit::Impl*> found{unit_of(module, what)};
  if (!recurse) return found;
  for (const auto& child : module->modules(/*include_self=*/false)) {
    auto it = by_module.find(child.get());
    if (it != by_module.end()) found.push_back(it->second);
  }
  return found;
}

void Engine::set_requires_gradient_sync(bool sync) {
  for (auto& unit : impl_->units) unit->impl().reduce_grads = unit->impl().all_reduce_grads = sync;
}

void Engine::set_requires_gradient_sync(const std::shared_ptr<torch::nn::Module>& module, bool sync, bool recurse) {
  for (Unit::Impl* unit : impl_->units_under(module, recurse, "set_requires_gradient_sync")) {
    unit->reduce_grads = unit->all_reduce_grads = sync;
  }
}

void Engine::set_requires_all_reduce(bool all_reduce) {
  for (auto& unit : impl_->units) unit->impl().all_reduce_grads = all_reduce;
}

void Engine::set_requires_all_reduce(const std::shared_ptr<torch::nn::Module>& module, bool all_reduce, bool recurse) {
  for (Unit::Impl* unit : impl_->units_under(module, recurse, "set_requires_all_reduce")) {
    unit->all_reduce_grads = all_reduce;
  }
}

void Engine::set_reshard_after_backward(bool reshard) {
  for (auto& unit : impl_->units) unit->impl().reshard_after_backward = reshard;
}

void Engine::set_reshard_after_backward(const std::shared_ptr<torch::nn::Module>& module, bool reshard, bool recurse) {
  for (Unit::Impl* unit : impl_->units_under(module, recurse, "set_reshard_after_backward")) {
    unit->reshard_after_backward = reshard;
  }
}

// ---------------------------------------------------------------------------
// summon_full_params: a scope in which the summoned units' params are full.

void Engine::Impl::check_can_summon() const {
  if (forward_depth > 0) {
    throw std::runtime_error(
        "summon_full_params inside a forward: call it between steps (before forward or after "
        "backward)");
  }
  if (final_callback_queued) {
    throw std::runtime_error(
        "summon_full_params inside a backward (or after a backward that threw, until the next "
        "forward): call it between steps");
  }
  if (summoned) throw std::runtime_error("summon_full_params while another FullParams of this engine is open");
}

struct FullParams::State {
  // What a param had before the scope, to restore (or write back into).
  struct Saved {
    at::Tensor data;  // units over one rank without writeback: a copy of the params
    at::Tensor grad;  // with_grads: the sharded grad (a copy for units over one rank)
  };
  Engine::Impl* engine = nullptr;
  FullParamsOptions options;
  std::vector<Unit::Impl*> units;
  std::vector<std::vector<Saved>> saved;  // per unit, per param
  int uncaught = 0;                       // std::uncaught_exceptions() at entry
  bool open = false;
};

namespace {

using Saved = FullParams::State::Saved;

// First row of this rank's shard in the full param (dim0 for an empty shard).
int64_t first_row(const Unit::Impl& unit, const ShardedParam& p) {
  return std::min(unit.shard_rank * p.rows_per_rank, p.dim0);
}

bool is_rank0(const Unit::Impl& unit) {
  return unit.shard_rank == 0 && (!unit.options.replicate_group || unit.options.replicate_group->rank() == 0);
}

// Each param's full grad over the unit's shard group; undefined where no rank
// has one (a has-grad mask all-reduced with max), zeros from ranks without one.
std::vector<at::Tensor> gather_grads(Unit::Impl& unit) {
  const auto count = static_cast<int64_t>(unit.params.size());
  at::Tensor has_grad = at::zeros({count}, at::kLong);
  for (int64_t i = 0; i < count; ++i) {
    if (unit.params[i].param.grad().defined()) has_grad[i] = 1;
  }
  {
    AllReduceOptions max;
    max.reduce_op = ReduceOp::Max;
    ScopedCollectiveLabel label(collective_label("summon_full_params grad mask", unit));
    unit.options.shard_group->all_reduce(has_grad, max)->wait();
  }
  std::vector<at::Tensor> full(unit.params.size());
  if (has_grad.sum().item<int64_t>() == 0) return full;
  const int world = unit.shard_world;
  at::Tensor buffer = at::empty({world * unit.chunk_total}, unit.tensor_options);
  at::Tensor mine = buffer.narrow(0, unit.shard_rank * unit.chunk_total, unit.chunk_total).zero_();
  for (const auto& p : unit.params) {
    const at::Tensor& grad = p.param.grad();
    if (grad.defined() && p.my_rows > 0) mine.narrow(0, p.offset, p.my_rows * p.row_numel).copy_(grad.reshape(-1));
  }
  {
    ScopedCollectiveLabel label(collective_label("summon_full_params grad all-gather", unit));
    unit.options.shard_group->all_gather_into_tensor(buffer, mine)->wait();
  }
  at::Tensor by_rank = buffer.view({world, unit.chunk_total});
  for (int64_t i = 0; i < count; ++i) {
    if (has_grad[i].item<int64_t>() == 0) continue;
    full[i] = gathered_rows(by_rank, unit.params[i]);
  }
  return full;
}

// After the unit's gather: sets its params' full grads (with_grads) and keeps
// what closing restores.
std::vector<Saved> save_unit(Unit::Impl& unit, const FullParamsOptions& options) {
  std::vector<Saved> saved(unit.params.size());
  const bool local = unit.shard_world == 1;  // the params are full already
  std::vector<at::Tensor> full_grads;
  if (options.with_grads && !local) full_grads = gather_grads(unit);
  for (size_t i = 0; i < unit.params.size(); ++i) {
    auto& p = unit.params[i];
    const at::Tensor& grad = p.param.grad();
    if (local) {
      if (options.writeback) continue;
      saved[i].data = p.param.data().clone();
      if (options.with_grads && grad.defined()) saved[i].grad = grad.clone();
    } else if (options.with_grads) {
      saved[i].grad = grad;
      p.param.mutable_grad() = full_grads[i];
    }
  }
  return saved;
}

// The sharded grad to leave on `p` when the scope closes.
at::Tensor grad_to_restore(const Unit::Impl& unit, const ShardedParam& p, Saved& saved, bool with_grads, bool writeback,
                           std::string& errors) {
  at::Tensor grad = p.param.grad();
  if (!with_grads) return grad;
  if (!writeback) return saved.grad;
  if (!grad.defined()) return grad;  // set to None inside: None
  if (grad.sizes() != at::IntArrayRef(p.full_shape)) {
    errors += "\n  grad of param '" + p.fqn + "' of unit '" + unit.fqn + "' now has shape " + shape_of(grad.sizes()) +
              ", the param's full shape is " + shape_of(p.full_shape) + " (grad edits dropped)";
    return saved.grad;
  }
  if (unit.shard_world == 1) return grad;
  at::Tensor rows = grad.narrow(0, first_row(unit, p), p.my_rows);
  if (saved.grad.defined() && saved.grad.sizes() == rows.sizes()) return saved.grad.copy_(rows);
  return rows.clone();
}

// Writes the unit's full params (and grads) back into its shards, or drops
// them, and reshards it. Returns the errors (changed shapes), "" if none.
std::string restore_unit(Engine::Impl& engine, Unit::Impl& unit, std::vector<Saved>& saved,
                         const FullParamsOptions& options, bool writeback) {
  if (!unit.unsharded) return "";
  torch::NoGradGuard no_grad;
  std::string errors;
  std::vector<at::Tensor> grads(unit.params.size());
  for (size_t i = 0; i < unit.params.size(); ++i) {
    auto& p = unit.params[i];
    const at::Tensor data = p.param.data();
    const bool same_shape = data.sizes() == at::IntArrayRef(p.full_shape);
    if (!same_shape) {
      errors += "\n  param '" + p.fqn + "' of unit '" + unit.fqn + "' now has shape " + shape_of(data.sizes()) +
                ", its full shape is " + shape_of(p.full_shape) + " (set_data with another shape; its edits dropped)";
    }
    const bool is_shard = data.data_ptr() == p.shard_view.data_ptr() && data.sizes() == p.shard_view.sizes();
    if (writeback && same_shape && !is_shard) {
      p.shard_view.copy_(unit.shard_world == 1 ? data : data.narrow(0, first_row(unit, p), p.my_rows));
    }
    if (!writeback && saved[i].data.defined()) p.shard_view.copy_(saved[i].data);
    grads[i] = grad_to_restore(unit, p, saved[i], options.with_grads, writeback, errors);
    p.param.mutable_grad() = at::Tensor();
  }
  engine.reshard(unit);
  for (size_t i = 0; i < unit.params.size(); ++i) {
    auto& p = unit.params[i];
    p.param.set_data(p.shard_view);  // units over one rank: reshard leaves the data alone
    p.param.mutable_grad() = grads[i];
  }
  return errors;
}

FullParams summon_units(Engine::Impl& engine, std::vector<Unit::Impl*> units, const FullParamsOptions& options) {
  if (options.rank0_only && options.writeback) {
    throw std::invalid_argument(
        "summon_full_params: rank0_only with writeback: ranks other than 0 keep their shards and have nothing to "
        "write back (FSDP1 refuses the pair too); pass writeback = false");
  }
  engine.check_can_summon();
  for (const Unit::Impl* unit : units) {
    // Its gather runs in param_dtype: writing that back would round the
    // fp32 shards (FSDP1 gathers full precision here). Not supported yet.
    if (unit->compute_dtype) {
      throw std::invalid_argument("summon_full_params: unit '" + unit->fqn + "' has mixed precision (param_dtype " +
                                  c10::toString(*unit->compute_dtype) + "), which summon_full_params does not support");
    }
    // The extension's gather may be lossy (bf16, quantised): the same.
    if (unit->has_extensions) {
      throw std::invalid_argument("summon_full_params: unit '" + unit->fqn +
                                  "' has all-gather extensions, which summon_full_params does not support");
    }
  }
  // Gathered by a forward whose backward has not run: that backward gathers
  // them again, so summon from the shards like every other unit.
  for (Unit::Impl* unit : units) {
    if (unit->unsharded) engine.check_gathered(*unit, "after forward");
    engine.reshard(*unit);
  }
  auto state = std::make_unique<FullParams::State>();
  state->engine = &engine;
  state->options = options;
  state->units = std::move(units);
  state->uncaught = std::uncaught_exceptions();
  for (Unit::Impl* unit : state->units) engine.unshard(*unit);
  for (Unit::Impl* unit : state->units) engine.wait_unshard(*unit);
  for (Unit::Impl* unit : state->units) state->saved.push_back(save_unit(*unit, options));
  state->open = true;
  engine.summoned = true;
  if (options.rank0_only) {
    for (size_t k = 0; k < state->units.size(); ++k) {
      if (!is_rank0(*state->units[k])) restore_unit(engine, *state->units[k], state->saved[k], options, false);
    }
  }
  return FullParams(std::move(state));
}

}  // namespace

FullParams::FullParams(std::unique_ptr<State> state) : state_(std::move(state)) {}
FullParams::FullParams(FullParams&& other) noexcept = default;

FullParams::~FullParams() noexcept(false) {
  if (!state_ || !state_->open) return;
  if (std::uncaught_exceptions() > state_->uncaught) {
    try {
      close();
    } catch (...) {  // already unwinding: the params are resharded, the error goes
    }
    return;
  }
  close();
}

void FullParams::close() {
  if (!state_ || !state_->open) return;
  state_->open = false;
  state_->engine->summoned = false;
  std::string errors;
  for (size_t k = 0; k < state_->units.size(); ++k) {
    errors +=
        restore_unit(*state_->engine, *state_->units[k], state_->saved[k], state_->options, state_->options.writeback);
  }
  if (!errors.empty()) {
    throw std::runtime_error(
        "summon_full_params: cannot write back (keep each param's and grad's full shape inside; "
        "edit values in place or set_data with the same shape):" +
        errors);
  }
}

FullParams Engine::summon_full_params(const FullParamsOptions& options) {
  std::vector<Unit::Impl*> units;
  for (auto& unit : impl_->units) units.push_back(&unit->impl());
  return summon_units(*impl_, std::move(units), options);
}

FullParams Engine::summon_full_params(const std::shared_ptr<torch::nn::Module>& module,
                                      const FullParamsOptions& options) {
  if (!module) throw std::invalid_argument("summon_full_params: module is null");
  std::unordered_set<const torch::nn::Module*> subtree;
  for (const auto& m : module->modules(/*include_self=*/true)) subtree.insert(m.get());
  std::vector<Unit::Impl*> units;
  for (auto& unit : impl_->units) {
    if (subtree.count(unit->impl().module.get())) units.push_back(&unit->impl());
  }
  if (units.empty()) {
    throw std::invalid_argument("summon_full_params: module " + module->name() +
                                " holds no unit of this engine (call fully_shard on it or a child first)");
  }
  return summon_units(*impl_, std::move(units), options);
}

void Engine::unshard_all() {
  for (auto& unit : impl_->units) impl_->unshard(unit->impl());
  for (auto& unit : impl_->units) impl_->wait_unshard(unit->impl());
}

void Engine::reshard_all() {
  for (auto& unit : impl_->units) impl_->reshard(unit->impl());
}

int64_t Engine::unsharded_bytes() const { return impl_->unsharded_bytes; }
int64_t Engine::peak_unsharded_bytes() const { return impl_->peak_unsharded_bytes; }
void Engine::reset_peak_unsharded_bytes() { impl_->peak_unsharded_bytes = impl_->unsharded_bytes; }

// ---------------------------------------------------------------------------

Unit::Unit(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Unit::~Unit() = default;
const std::string& Unit::fqn() const { return impl_->fqn; }
std::vector<std::string> Unit::param_fqns() const {
  std::vector<std::string> names;
  for (const auto& p : impl_->params) names.push_back(p.fqn);
  return names;
}
bool Unit::is_root() const { return impl_->is_root; }
bool Unit::is_unsharded() const { return impl_->unsharded; }
TrainingState Unit::state() const { return impl_->state; }
bool Unit::reshard_after_forward() const { return impl_->reshard_after_forward; }
bool Unit::requires_gradient_sync() const { return impl_->reduce_grads; }
bool Unit::requires_all_reduce() const { return impl_->all_reduce_grads; }
bool Unit::reshard_after_backward() const { return impl_->reshard_after_backward; }
const FullyShardOptions& Unit::options() const { return impl_->options; }
std::vector<at::Tensor> Unit::params() const {
  std::vector<at::Tensor> params;
  for (const auto& p : impl_->params) params.push_back(p.param);
  return params;
}
std::vector<int64_t> Unit::shard_rows() const {
  std::vector<int64_t> rows;
  for (const auto& p : impl_->params) rows.push_back(p.rows_per_rank);
  return rows;
}
std::vector<std::vector<int64_t>> Unit::full_shapes() const {
  std::vector<std::vector<int64_t>> shapes;
  for (const auto& p : impl_->params) shapes.push_back(p.full_shape);
  return shapes;
}

namespace {
// `forward(x)` as `module`'s forward: through its unit when it is one (the
// tensor-only path of fsdp::call).
at::Tensor forward_as_unit(const torch::nn::Module* module, const std::function<at::Tensor(at::Tensor)>& forward,
                           at::Tensor x) {
  Engine* engine = detail::engine_of(module);
  if (engine == nullptr) return forward(std::move(x));
  auto scope = engine->begin_forward(module);
  at::Tensor output;
  try {
    output = forward(scope->wrap_inputs({std::move(x)})[0]);
  } catch (...) {
    std::rethrow_exception(scope->with_context(std::current_exception()));
  }
  return scope->finish({output})[0];
}
}  // namespace

at::Tensor forward_sequential(const std::shared_ptr<torch::nn::SequentialImpl>& sequential, at::Tensor input) {
  auto run_children = [&sequential](at::Tensor x) {
    for (auto& child : *sequential) {
      if (auto nested = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(child.ptr())) {
        x = forward_sequential(nested, std::move(x));
      } else {
        x = forward_as_unit(
            child.ptr().get(), [&child](at::Tensor in) { return child.forward(std::move(in)); }, std::move(x));
      }
    }
    return x;
  };
  return forward_as_unit(sequential.get(), run_children, std::move(input));
}

at::Tensor forward_sequential(torch::nn::Sequential& sequential, at::Tensor input) {
  return forward_sequential(sequential.ptr(), std::move(input));
}

}  // namespace fsdpsim::fsdp
