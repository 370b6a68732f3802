#include "fsdp/state_dict.h"

#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <utility>

#include "backends/collective_label.h"
#include "fsdp/torch_save.h"

namespace fsdpsim::fsdp {

bool ShardedTensor::is_full() const { return local.defined() && local.sizes() == at::IntArrayRef(global_shape); }

ShardedTensor ShardedTensor::whole(at::Tensor tensor) {
  ShardedTensor value;
  value.global_shape = tensor.sizes().vec();
  value.offsets.assign(value.global_shape.size(), 0);
  value.chunks.push_back(ChunkMeta{value.offsets, value.global_shape});
  value.local = std::move(tensor);
  return value;
}

namespace {

std::string shape_of(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << sizes;
  return out.str();
}

// How one tensor of the model (or its optimiser state) lies across ranks:
// dim-0 rows [first_row, first_row + my_rows) of global_shape on this rank.
struct Layout {
  std::vector<int64_t> global_shape;
  int64_t rows_per_rank = 0;
  int shard_rank = 0;
  int shard_world = 1;
  ProcessGroupPtr shard_group;      // null: whole on every rank, nothing to gather
  ProcessGroupPtr replicate_group;  // HSDP / NoShard replicas (null: none)

  bool sharded() const { return shard_world > 1; }
  int64_t dim0() const { return global_shape.empty() ? 1 : global_shape[0]; }
  int64_t first_row(int rank) const { return std::min<int64_t>(rank * rows_per_rank, dim0()); }
  int64_t rows_of(int rank) const { return std::min<int64_t>(rows_per_rank, dim0() - first_row(rank)); }
  std::vector<int64_t> shape_with_rows(int64_t rows) const {
    std::vector<int64_t> shape = global_shape;
    shape[0] = rows;
    return shape;
  }
  ShardedTensor describe(const at::Tensor& local) const {
    if (!sharded()) return ShardedTensor::whole(local);
    ShardedTensor value;
    value.local = local;
    value.global_shape = global_shape;
    for (int r = 0; r < shard_world; ++r) {
      std::vector<int64_t> offsets(global_shape.size(), 0);
      offsets[0] = first_row(r);
      value.chunks.push_back(ChunkMeta{offsets, shape_with_rows(rows_of(r))});
    }
    value.offsets = value.chunks[shard_rank].offsets;
    return value;
  }
  // This rank's rows of a whole tensor.
  at::Tensor rows_of_whole(const at::Tensor& whole) const {
    return sharded() ? whole.narrow(0, first_row(shard_rank), rows_of(shard_rank)) : whole;
  }
};

struct Entry {
  std::string fqn;
  at::Tensor tensor;  // the module's param or buffer
  Layout layout;
};

// The model's params and buffers in Python's state_dict() order, with their layouts.
struct ModelIndex {
  std::vector<Entry> entries;
  std::unordered_map<const c10::TensorImpl*, size_t> param_entry;  // a param's first entry
  ProcessGroupPtr world_shard, world_replicate;                    // the root unit's groups
  bool is_rank0 = true;                                            // rank 0 of every unit's shard and replicate group
};

Layout layout_of_unit_param(const Unit& unit, const std::vector<int64_t>& shape, int64_t rows) {
  Layout layout;
  layout.global_shape = shape;
  layout.rows_per_rank = rows;
  layout.shard_group = unit.options().shard_group;
  layout.replicate_group = unit.options().replicate_group;
  layout.shard_world = layout.shard_group ? layout.shard_group->size() : 1;
  layout.shard_rank = layout.shard_group ? layout.shard_group->rank() : 0;
  return layout;
}

void collect_entries(const torch::nn::Module& module, const std::string& prefix, ModelIndex& index,
                     const std::unordered_map<const c10::TensorImpl*, Layout>& layouts) {
  auto add = [&](const std::string& name, const at::Tensor& tensor, bool is_param) {
    Entry entry{prefix + name, tensor, {}};
    auto it = layouts.find(tensor.unsafeGetTensorImpl());
    if (it != layouts.end()) {
      entry.layout = it->second;
    } else {
      entry.layout.global_shape = tensor.sizes().vec();
      entry.layout.shard_group = index.world_shard;  // broadcasts of whole tensors go over the root's groups
      entry.layout.replicate_group = index.world_replicate;
    }
    if (is_param) index.param_entry.emplace(tensor.unsafeGetTensorImpl(), index.entries.size());
    index.entries.push_back(std::move(entry));
  };
  for (const auto& item : module.named_parameters(/*recurse=*/false)) add(item.key(), item.value(), true);
  for (const auto& item : module.named_buffers(/*recurse=*/false)) add(item.key(), item.value(), false);
  for (const auto& child : module.named_children())
    collect_entries(*child.value(), prefix + child.key() + ".", index, layouts);
}

ModelIndex index_model(Engine& engine, const torch::nn::Module& root, const char* what) {
  ModelIndex index;
  std::unordered_map<const c10::TensorImpl*, Layout> layouts;
  int world_span = 0;
  for (const Unit* unit : engine.units()) {
    if (unit->is_unsharded()) {
      throw std::runtime_error(std::string(what) + ": unit '" + unit->fqn() +
                               "' is gathered (inside a forward/backward, or kept gathered by "
                               "set_reshard_after_backward(false)): call engine.reshard_all() first");
    }
    const auto params = unit->params();
    const auto shapes = unit->full_shapes();
    const auto rows = unit->shard_rows();
    for (size_t i = 0; i < params.size(); ++i) {
      layouts[params[i].unsafeGetTensorImpl()] = layout_of_unit_param(*unit, shapes[i], rows[i]);
    }
    const auto& options = unit->options();
    const bool rank0 = (!options.shard_group || options.shard_group->rank() == 0) &&
                       (!options.replicate_group || options.replicate_group->rank() == 0);
    index.is_rank0 = index.is_rank0 && rank0;
    // The groups that span the most ranks carry whole tensors and flags
    // (a rank-local expert's size-1 group never does).
    const int span = (options.shard_group ? options.shard_group->size() : 1) *
                     (options.replicate_group ? options.replicate_group->size() : 1);
    if (span > world_span) {
      world_span = span;
      index.world_shard = options.shard_group;
      index.world_replicate = options.replicate_group;
    }
  }
  collect_entries(root, "", index, layouts);
  return index;
}

bool rank0_only(const StateDictOptions& options) {
  return options.full_state_dict && options.rank0_only.value_or(options.cpu_offload);
}

// The whole tensor from every rank's rows (an all-gather over the shard group).
at::Tensor gather_whole(const at::Tensor& local, const Layout& layout, const std::string& fqn) {
  if (!layout.sharded()) return local;
  torch::NoGradGuard no_grad;
  const int64_t rows = layout.rows_per_rank;
  at::Tensor padded = at::zeros(layout.shape_with_rows(rows), local.options());
  padded.narrow(0, 0, local.size(0)).copy_(local);
  at::Tensor gathered = at::empty(layout.shape_with_rows(rows * layout.shard_world), local.options());
  {
    ScopedCollectiveLabel label("fsdp state_dict all-gather of '" + fqn + "'");
    layout.shard_group->all_gather_into_tensor(gathered, padded)->wait();
  }
  return gathered.narrow(0, 0, layout.dim0());
}

// A state dict value of `local` (a param's rows, or state shaped like them).
std::optional<ShardedTensor> value_of(const at::Tensor& local, const Layout& layout, const std::string& fqn,
                                      const StateDictOptions& options, bool keep) {
  const at::Tensor detached = local.detach();
  if (!options.full_state_dict) return layout.describe(detached);
  at::Tensor whole = gather_whole(detached, layout, fqn);
  if (!keep) return std::nullopt;
  if (options.cpu_offload) whole = whole.to(at::kCPU);
  return ShardedTensor::whole(whole);
}

}  // namespace

StateDict get_model_state_dict(Engine& engine, const torch::nn::Module& root, const StateDictOptions& options) {
  const ModelIndex index = index_model(engine, root, "get_model_state_dict");
  const bool keep = !rank0_only(options) || index.is_rank0;
  StateDict state;
  for (const Entry& entry : index.entries) {
    auto value = value_of(entry.tensor, entry.layout, entry.fqn, options, keep);
    if (value) state.insert(entry.fqn, std::move(*value));
  }
  return state;
}

namespace {

std::string missing_key_error(const char* what, const std::string& key) {
  return std::string(what) + ": missing key '" + key +
         "' in the state dict (the model has it): load a dict of this model, or pass strict = false";
}

std::string unexpected_key_error(const char* what, const std::string& key) {
  return std::string(what) + ": unexpected key '" + key +
         "' in the state dict (the model has no such param or buffer): rename it to the model's FQN, or pass "
         "strict = false";
}

// Why `value` cannot load into `entry` (empty: it can).
std::string check_value(const Entry& entry, const Layout& layout, const ShardedTensor& value, bool full,
                        const char* what) {
  const std::string key = "'" + entry.fqn + "'";
  if (value.global_shape != layout.global_shape || (full && !value.is_full())) {
    return std::string(what) + ": shape mismatch for " + key + ": the state dict has " + shape_of(value.global_shape) +
           (value.is_full() ? "" : " (sharded)") + ", the model " + shape_of(layout.global_shape) +
           ": load a dict saved from this model's architecture";
  }
  if (full) return {};
  const ShardedTensor mine = layout.describe(entry.tensor);
  if (value.offsets != mine.offsets || value.local.sizes() != mine.chunks[layout.shard_rank].sizes) {
    return std::string(what) + ": " + key + " is sharded differently: the state dict's chunk at offsets " +
           shape_of(value.offsets) + " of shape " + shape_of(value.local.sizes()) + ", this rank holds " +
           shape_of(mine.offsets) + " of shape " + shape_of(mine.chunks[layout.shard_rank].sizes) +
           ": a sharded dict loads only at the same world size and strategy; reshard through a full dict "
           "(full_state_dict) or the distributed checkpoint";
  }
  return {};
}

// The first problem with loading `state` into the model, or "".
std::string check_model_dict(const ModelIndex& index, const StateDict& state, const StateDictOptions& options,
                             const char* what) {
  std::unordered_map<std::string, const Entry*> by_fqn;
  for (const Entry& entry : index.entries) by_fqn.emplace(entry.fqn, &entry);
  for (const auto& item : state) {
    auto it = by_fqn.find(item.key());
    if (it == by_fqn.end()) {
      if (options.strict) return unexpected_key_error(what, item.key());
      continue;
    }
    std::string problem = check_value(*it->second, it->second->layout, item.value(), options.full_state_dict, what);
    if (!problem.empty()) return problem;
  }
  if (!options.strict) return {};
  for (const Entry& entry : index.entries) {
    if (!state.contains(entry.fqn)) return missing_key_error(what, entry.fqn);
  }
  return {};
}

void broadcast_from_rank0(const at::Tensor& tensor, const ProcessGroupPtr& shard, const ProcessGroupPtr& replicate,
                          const std::string& what) {
  // Over the replicas first (the shard-rank-0 ranks get rank 0's values),
  // then within each shard group from its rank 0.
  ScopedCollectiveLabel label("fsdp state_dict broadcast of " + what);
  if (replicate && replicate->size() > 1) replicate->broadcast(tensor, {})->wait();
  if (shard && shard->size() > 1) shard->broadcast(tensor, {})->wait();
}

// Rank 0's verdict on the dict it holds, on every rank; throws where it failed.
void agree_on_check(const ModelIndex& index, const std::string& problem, const char* what) {
  at::Tensor failed = at::full({1}, problem.empty() ? 0 : 1, at::kInt);
  broadcast_from_rank0(failed, index.world_shard, index.world_replicate, "the check result");
  if (failed.item<int>() == 0) return;
  if (!problem.empty()) throw std::invalid_argument(problem);
  throw std::invalid_argument(std::string(what) + ": rank 0's state dict failed the checks (rank 0 names the key)");
}

void copy_into(const at::Tensor& target, const at::Tensor& source) {
  torch::NoGradGuard no_grad;
  target.detach().copy_(source);
}

void load_broadcast(const ModelIndex& index, const StateDict& state, const StateDictOptions& options) {
  const char* what = "set_model_state_dict";
  agree_on_check(index, index.is_rank0 ? check_model_dict(index, state, options, what) : std::string(), what);
  for (const Entry& entry : index.entries) {
    // Every rank must agree on which keys travel: rank 0 says whether it has this one.
    at::Tensor present = at::full({1}, index.is_rank0 && state.contains(entry.fqn) ? 1 : 0, at::kInt);
    if (!options.strict) broadcast_from_rank0(present, index.world_shard, index.world_replicate, "a key's presence");
    if (present.item<int>() == 0 && !options.strict) continue;
    const at::TensorOptions tensor_options = entry.tensor.options().requires_grad(false);
    at::Tensor whole = index.is_rank0 ? state[entry.fqn].local.to(tensor_options, false, /*copy=*/true).contiguous()
                                      : at::empty(entry.layout.global_shape, tensor_options);
    broadcast_from_rank0(whole, entry.layout.shard_group, entry.layout.replicate_group, "'" + entry.fqn + "'");
    copy_into(entry.tensor, entry.layout.rows_of_whole(whole));
  }
}

}  // namespace

void set_model_state_dict(Engine& engine, const torch::nn::Module& root, const StateDict& state,
                          const StateDictOptions& options) {
  const char* what = "set_model_state_dict";
  const ModelIndex index = index_model(engine, root, what);
  if (options.broadcast_from_rank0) {
    if (!options.full_state_dict) {
      throw std::invalid_argument(std::string(what) + ": broadcast_from_rank0 needs full_state_dict = true");
    }
    load_broadcast(index, state, options);
    return;
  }
  const std::string problem = check_model_dict(index, state, options, what);
  if (!problem.empty()) throw std::invalid_argument(problem);
  for (const Entry& entry : index.entries) {
    if (!state.contains(entry.fqn)) continue;
    const at::Tensor& source = state[entry.fqn].local;
    copy_into(entry.tensor, options.full_state_dict ? entry.layout.rows_of_whole(source) : source);
  }
}

// ---------------------------------------------------------------------------
// Optimiser state.

namespace {

struct ParamStateTensors {
  std::vector<std::pair<std::string, at::Tensor>> shaped;  // like the param
  std::optional<int64_t> step;
};

ParamStateTensors tensors_of(const torch::optim::OptimizerParamState& state) {
  ParamStateTensors out;
  auto add = [&out](const char* name, const at::Tensor& t) {
    if (t.defined()) out.shaped.emplace_back(name, t);
  };
  if (const auto* sgd = dynamic_cast<const torch::optim::SGDParamState*>(&state)) {
    add("momentum_buffer", sgd->momentum_buffer());
  } else if (const auto* adam = dynamic_cast<const torch::optim::AdamParamState*>(&state)) {
    out.step = adam->step();
    add("exp_avg", adam->exp_avg());
    add("exp_avg_sq", adam->exp_avg_sq());
    add("max_exp_avg_sq", adam->max_exp_avg_sq());
  } else if (const auto* adamw = dynamic_cast<const torch::optim::AdamWParamState*>(&state)) {
    out.step = adamw->step();
    add("exp_avg", adamw->exp_avg());
    add("exp_avg_sq", adamw->exp_avg_sq());
    add("max_exp_avg_sq", adamw->max_exp_avg_sq());
  } else {
    throw std::invalid_argument(
        "get_optimizer_state_dict: unsupported optimiser state (supported: torch::optim::SGD, Adam, AdamW)");
  }
  return out;
}

std::map<std::string, c10::IValue> group_options(const torch::optim::OptimizerOptions& options) {
  std::map<std::string, c10::IValue> out;
  if (const auto* sgd = dynamic_cast<const torch::optim::SGDOptions*>(&options)) {
    out = {{"lr", sgd->lr()},
           {"momentum", sgd->momentum()},
           {"dampening", sgd->dampening()},
           {"weight_decay", sgd->weight_decay()},
           {"nesterov", sgd->nesterov()}};
  } else if (const auto* adam = dynamic_cast<const torch::optim::AdamOptions*>(&options)) {
    out = {{"lr", adam->lr()},
           {"betas", c10::ivalue::Tuple::create(std::get<0>(adam->betas()), std::get<1>(adam->betas()))},
           {"eps", adam->eps()},
           {"weight_decay", adam->weight_decay()},
           {"amsgrad", adam->amsgrad()}};
  } else if (const auto* adamw = dynamic_cast<const torch::optim::AdamWOptions*>(&options)) {
    out = {{"lr", adamw->lr()},
           {"betas", c10::ivalue::Tuple::create(std::get<0>(adamw->betas()), std::get<1>(adamw->betas()))},
           {"eps", adamw->eps()},
           {"weight_decay", adamw->weight_decay()},
           {"amsgrad", adamw->amsgrad()}};
  } else {
    throw std::invalid_argument(
        "get_optimizer_state_dict: unsupported optimiser (supported: torch::optim::SGD, Adam, AdamW)");
  }
  return out;
}

const Entry& param_entry(const ModelIndex& index, const at::Tensor& param, const char* what) {
  auto it = index.param_entry.find(param.unsafeGetTensorImpl());
  if (it == index.param_entry.end()) {
    throw std::invalid_argument(std::string(what) + ": the optimiser holds a param (shape " + shape_of(param.sizes()) +
                                ") that is not in the model given: pass the model the "
                                "optimiser was built on");
  }
  return index.entries[it->second];
}

}  // namespace

OptimizerStateDict get_optimizer_state_dict(Engine& engine, const torch::nn::Module& root,
                                            const torch::optim::Optimizer& optimizer, const StateDictOptions& options) {
  const char* what = "get_optimizer_state_dict";
  const ModelIndex index = index_model(engine, root, what);
  const bool keep = !rank0_only(options) || index.is_rank0;
  OptimizerStateDict out;
  for (const auto& group : optimizer.param_groups()) {
    ParamGroupState group_state{group_options(group.options()), {}};
    for (const auto& param : group.params()) {
      const Entry& entry = param_entry(index, param, what);
      group_state.params.push_back(entry.fqn);
      auto found = optimizer.state().find(param.unsafeGetTensorImpl());
      if (found == optimizer.state().end()) continue;
      const ParamStateTensors tensors = tensors_of(*found->second);
      torch::OrderedDict<std::string, ShardedTensor> param_state;
      if (tensors.step) {
        // PyTorch keeps step as a 0-dim float tensor; exact up to 2^24 steps.
        param_state.insert("step", ShardedTensor::whole(at::scalar_tensor(static_cast<double>(*tensors.step))));
      }
      for (const auto& [name, tensor] : tensors.shaped) {
        auto value = value_of(tensor, entry.layout, entry.fqn + "." + name, options, keep);
        if (value) param_state.insert(name, std::move(*value));
      }
      if (keep) out.state.insert(entry.fqn, std::move(param_state));
    }
    if (keep) out.param_groups.push_back(std::move(group_state));
  }
  return out;
}

namespace {

double as_double(const std::map<std::string, c10::IValue>& options, const std::string& name, double fallback) {
  auto it = options.find(name);
  return it == options.end() ? fallback : it->second.toDouble();
}
bool as_bool(const std::map<std::string, c10::IValue>& options, const std::string& name, bool fallback) {
  auto it = options.find(name);
  return it == options.end() ? fallback : it->second.toBool();
}
std::tuple<double, double> as_betas(const std::map<std::string, c10::IValue>& options,
                                    std::tuple<double, double> fallback) {
  auto it = options.find("betas");
  if (it == options.end()) return fallback;
  const auto& items = it->second.toTupleRef().elements();
  return {items.at(0).toDouble(), items.at(1).toDouble()};
}

void apply_group_options(torch::optim::OptimizerOptions& target, const std::map<std::string, c10::IValue>& from) {
  if (auto* sgd = dynamic_cast<torch::optim::SGDOptions*>(&target)) {
    sgd->lr(as_double(from, "lr", sgd->lr())).momentum(as_double(from, "momentum", sgd->momentum()));
    sgd->dampening(as_double(from, "dampening", sgd->dampening()));
    sgd->weight_decay(as_double(from, "weight_decay", sgd->weight_decay()));
    sgd->nesterov(as_bool(from, "nesterov", sgd->nesterov()));
  } else if (auto* adam = dynamic_cast<torch::optim::AdamOptions*>(&target)) {
    adam->lr(as_double(from, "lr", adam->lr()))
        .betas(as_betas(from, adam->betas()))
        .eps(as_double(from, "eps", adam->eps()));
    adam->weight_decay(as_double(from, "weight_decay", adam->weight_decay()));
    adam->amsgrad(as_bool(from, "amsgrad", adam->amsgrad()));
  } else if (auto* adamw = dynamic_cast<torch::optim::AdamWOptions*>(&target)) {
    adamw->lr(as_double(from, "lr", adamw->lr())).betas(as_betas(from, adamw->betas()));
    adamw->eps(as_double(from, "eps", adamw->eps()));
    adamw->weight_decay(as_double(from, "weight_decay", adamw->weight_decay()));
    adamw->amsgrad(as_bool(from, "amsgrad", adamw->amsgrad()));
  } else {
    throw std::invalid_argument(
        "set_optimizer_state_dict: unsupported optimiser (supported: torch::optim::SGD, Adam, AdamW)");
  }
}

// A fresh per-param state of the optimiser's kind.
std::unique_ptr<torch::optim::OptimizerParamState> new_param_state(const torch::optim::OptimizerOptions& options) {
  if (dynamic_cast<const torch::optim::SGDOptions*>(&options)) return std::make_unique<torch::optim::SGDParamState>();
  if (dynamic_cast<const torch::optim::AdamOptions*>(&options)) {
    return std::make_unique<torch::optim::AdamParamState>();
  }
  return std::make_unique<torch::optim::AdamWParamState>();
}

// This rank's rows of one state tensor from the dict, checked against the param's layout.
at::Tensor local_state(const Entry& entry, const std::string& name, const ShardedTensor& value,
                       const StateDictOptions& options) {
  Entry named = entry;
  named.fqn = entry.fqn + "." + name;
  const std::string problem =
      check_value(named, entry.layout, value, options.full_state_dict, "set_optimizer_state_dict");
  if (!problem.empty()) throw std::invalid_argument(problem);
  const at::Tensor rows = options.full_state_dict ? entry.layout.rows_of_whole(value.local) : value.local;
  // Its own storage, on the param's device and dtype (the dict may be shared or offloaded).
  return rows.to(entry.tensor.options().requires_grad(false), false, /*copy=*/true).contiguous();
}

void set_param_state(torch::optim::OptimizerParamState& target, const Entry& entry,
                     const torch::OrderedDict<std::string, ShardedTensor>& values, const StateDictOptions& options) {
  auto tensor = [&](const char* name) {
    const ShardedTensor* value = values.find(name);
    return value ? local_state(entry, name, *value, options) : at::Tensor();
  };
  auto step = [&]() {
    const ShardedTensor* value = values.find("step");
    return value ? static_cast<int64_t>(value->local.item<double>()) : int64_t{0};
  };
  if (auto* sgd = dynamic_cast<torch::optim::SGDParamState*>(&target)) {
    sgd->momentum_buffer(tensor("momentum_buffer"));
  } else if (auto* adam = dynamic_cast<torch::optim::AdamParamState*>(&target)) {
    adam->step(step()).exp_avg(tensor("exp_avg")).exp_avg_sq(tensor("exp_avg_sq"));
    adam->max_exp_avg_sq(tensor("max_exp_avg_sq"));
  } else if (auto* adamw = dynamic_cast<torch::optim::AdamWParamState*>(&target)) {
    adamw->step(step()).exp_avg(tensor("exp_avg")).exp_avg_sq(tensor("exp_avg_sq"));
    adamw->max_exp_avg_sq(tensor("max_exp_avg_sq"));
  }
}

void check_groups(const torch::optim::Optimizer& optimizer, const ModelIndex& index, const OptimizerStateDict& state) {
  const char* what = "set_optimizer_state_dict";
  const auto& groups = optimizer.param_groups();
  if (groups.size() != state.param_groups.size()) {
    throw std::invalid_argument(std::string(what) + ": the state dict has " +
                                std::to_string(state.param_groups.size()) + " param groups, the optimiser " +
                                std::to_string(groups.size()) + ": build the optimiser with the same groups");
  }
  for (size_t g = 0; g < groups.size(); ++g) {
    std::vector<std::string> fqns;
    for (const auto& param : groups[g].params()) fqns.push_back(param_entry(index, param, what).fqn);
    if (fqns != state.param_groups[g].params) {
      throw std::invalid_argument(
          std::string(what) + ": param group " + std::to_string(g) +
          " holds other params than the state dict's (first: '" + (fqns.empty() ? std::string() : fqns[0]) + "' vs '" +
          (state.param_groups[g].params.empty() ? std::string() : state.param_groups[g].params[0]) +
          "'): build the optimiser over the same params in the same order");
    }
  }
  for (const auto& item : state.state) {
    bool known = false;
    for (const auto& group : state.param_groups) {
      known = known || std::find(group.params.begin(), group.params.end(), item.key()) != group.params.end();
    }
    if (!known) throw std::invalid_argument(unexpected_key_error(what, item.key()));
  }
}

// Rank 0's problem with its dict (groups, keys, shapes), or "".
std::string check_optimizer_dict(const ModelIndex& index, const torch::optim::Optimizer& optimizer,
                                 const OptimizerStateDict& state, const StateDictOptions& options) {
  try {
    if (options.strict) check_groups(optimizer, index, state);
    for (const auto& group : optimizer.param_groups()) {
      for (const auto& param : group.params()) {
        const Entry& entry = param_entry(index, param, "set_optimizer_state_dict");
        const auto* values = state.state.find(entry.fqn);
        if (values == nullptr) continue;
        for (const auto& value : *values) {
          if (value.key() != "step") local_state(entry, value.key(), value.value(), options);
        }
      }
    }
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return {};
}

// Hyperparameters as numbers (map order; bools 0/1, betas two numbers) and back.
at::Tensor flatten_options(const std::map<std::string, c10::IValue>& options) {
  std::vector<double> values;
  for (const auto& [name, value] : options) {
    if (value.isTuple()) {
      for (const auto& item : value.toTupleRef().elements()) values.push_back(item.toDouble());
    } else {
      values.push_back(value.isBool() ? static_cast<double>(value.toBool()) : value.toDouble());
    }
  }
  return at::tensor(values, at::kDouble);
}

std::map<std::string, c10::IValue> unflatten_options(const std::map<std::string, c10::IValue>& like,
                                                     const at::Tensor& values) {
  std::map<std::string, c10::IValue> out;
  int64_t next = 0;
  auto take = [&]() { return values[next++].item<double>(); };
  for (const auto& [name, value] : like) {
    if (value.isTuple()) {
      const double first = take();
      out[name] = c10::ivalue::Tuple::create(first, take());
    } else if (value.isBool()) {
      out[name] = take() != 0.0;
    } else {
      out[name] = take();
    }
  }
  return out;
}

const std::vector<std::string>& state_names(const torch::optim::OptimizerOptions& options) {
  static const std::vector<std::string> sgd{"momentum_buffer"};
  static const std::vector<std::string> adam{"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
  return dynamic_cast<const torch::optim::SGDOptions*>(&options) ? sgd : adam;
}

// One param's state from rank 0: a header [has state, step, present...],
// then each present tensor whole.
void broadcast_param_state(const ModelIndex& index, const Entry& entry, torch::optim::Optimizer& optimizer,
                           torch::optim::OptimizerParamGroup& group, const at::Tensor& param,
                           const OptimizerStateDict& state, const StateDictOptions& options) {
  const auto& names = state_names(group.options());
  const auto* mine = index.is_rank0 ? state.state.find(entry.fqn) : nullptr;
  at::Tensor header = at::zeros({static_cast<int64_t>(2 + names.size())}, at::kDouble);
  if (mine != nullptr) {
    header[0] = 1.0;
    if (const ShardedTensor* step = mine->find("step")) header[1] = step->local.item<double>();
    for (size_t i = 0; i < names.size(); ++i) header[2 + i] = mine->contains(names[i]) ? 1.0 : 0.0;
  }
  broadcast_from_rank0(header, index.world_shard, index.world_replicate, "'" + entry.fqn + "' optimiser header");
  if (header[0].item<double>() == 0.0) return;
  torch::OrderedDict<std::string, ShardedTensor> values;
  if (!dynamic_cast<const torch::optim::SGDOptions*>(&group.options())) {
    values.insert("step", ShardedTensor::whole(at::scalar_tensor(header[1].item<double>())));
  }
  const at::TensorOptions tensor_options = entry.tensor.options().requires_grad(false);
  for (size_t i = 0; i < names.size(); ++i) {
    if (header[2 + i].item<double>() == 0.0) continue;
    at::Tensor whole = mine != nullptr ? (*mine)[names[i]].local.to(tensor_options, false, true).contiguous()
                                       : at::empty(entry.layout.global_shape, tensor_options);
    broadcast_from_rank0(whole, entry.layout.shard_group, entry.layout.replicate_group,
                         "'" + entry.fqn + "." + names[i] + "'");
    values.insert(names[i], ShardedTensor::whole(whole));
  }
  auto& slot = optimizer.state()[param.unsafeGetTensorImpl()];
  if (!slot) slot = new_param_state(group.options());
  set_param_state(*slot, entry, values, options);
}

void load_optimizer_broadcast(const ModelIndex& index, torch::optim::Optimizer& optimizer,
                              const OptimizerStateDict& state, const StateDictOptions& options) {
  const char* what = "set_optimizer_state_dict";
  agree_on_check(index, index.is_rank0 ? check_optimizer_dict(index, optimizer, state, options) : std::string(), what);
  auto& groups = optimizer.param_groups();
  for (size_t g = 0; g < groups.size(); ++g) {
    if (index.is_rank0 && g < state.param_groups.size()) {
      apply_group_options(groups[g].options(), state.param_groups[g].options);
    }
    const auto like = group_options(groups[g].options());
    at::Tensor hyper = flatten_options(like);
    broadcast_from_rank0(hyper, index.world_shard, index.world_replicate, "param group hyperparameters");
    apply_group_options(groups[g].options(), unflatten_options(like, hyper));
    for (const auto& param : groups[g].params()) {
      broadcast_param_state(index, param_entry(index, param, what), optimizer, groups[g], param, state, options);
    }
  }
}

}  // namespace

void set_optimizer_state_dict(Engine& engine, const torch::nn::Module& root, torch::optim::Optimizer& optimizer,
                              const OptimizerStateDict& state, const StateDictOptions& options) {
  const char* what = "set_optimizer_state_dict";
  const ModelIndex index = index_model(engine, root, what);
  if (options.broadcast_from_rank0) {
    if (!options.full_state_dict) {
      throw std::invalid_argument(std::string(what) + ": broadcast_from_rank0 needs full_state_dict = true");
    }
    load_optimizer_broadcast(index, optimizer, state, options);
    return;
  }
  if (options.strict) check_groups(optimizer, index, state);
  auto& groups = optimizer.param_groups();
  for (size_t g = 0; g < groups.size() && g < state.param_groups.size(); ++g) {
    apply_group_options(groups[g].options(), state.param_groups[g].options);
    for (const auto& param : groups[g].params()) {
      const Entry& entry = param_entry(index, param, what);
      const auto* values = state.state.find(entry.fqn);
      if (values == nullptr) continue;
      auto& slot = optimizer.state()[param.unsafeGetTensorImpl()];
      if (!slot) slot = new_param_state(groups[g].options());
      set_param_state(*slot, entry, *values, options);
    }
  }
}

// ---------------------------------------------------------------------------

TensorDict to_tensors(const StateDict& state) {
  TensorDict tensors;
  for (const auto& item : state) {
    if (!item.value().is_full()) {
      throw std::invalid_argument("to_tensors: '" + item.key() + "' is a shard (" +
                                  shape_of(item.value().local.sizes()) + " of " + shape_of(item.value().global_shape) +
                                  "): get the state dict with full_state_dict = true");
    }
    tensors.insert(item.key(), item.value().local);
  }
  return tensors;
}

StateDict from_tensors(const TensorDict& tensors) {
  StateDict state;
  for (const auto& item : tensors) state.insert(item.key(), ShardedTensor::whole(item.value()));
  return state;
}

void save_full_state_dict(const std::string& path, const TensorDict& tensors) {
  c10::Dict<std::string, at::Tensor> dict;
  for (const auto& item : tensors) dict.insert(item.key(), item.value().detach().to(at::kCPU).contiguous());
  std::vector<char> pickled;
  // tag_aggregates = false: a plain dict, no torch.jit._pickle.restore_type_tag
  // (which torch.load(weights_only=True) refuses).
  torch::jit::Pickler pickler(
      [&pickled](const char* data, size_t size) { pickled.insert(pickled.end(), data, data + size); }, nullptr, nullptr,
      nullptr, nullptr, /*tag_aggregates=*/false);
  pickler.protocol();
  pickler.pushIValue(c10::IValue(dict));
  pickler.stop();
  const std::string temp = path + ".tmp";
  {
    caffe2::serialize::PyTorchStreamWriter writer(temp);
    torch::jit::writeArchiveAndTensors("data", pickled.data(), pickled.size(), pickler.tensorData(), writer);
    writer.writeRecord("byteorder", "little", 6);
    writer.writeEndOfFile();
  }
  if (std::rename(temp.c_str(), path.c_str()) != 0) {
    throw std::runtime_error("save_full_state_dict: cannot rename " + temp + " to " + path);
  }
}

TensorDict load_full_state_dict(const std::string& path) {
  // Our reader, not LibTorch's: that one reads the OrderedDict of
  // torch.save(model.state_dict()) as None.
  const c10::IValue value = torch_save::load_file(path);
  if (!value.isGenericDict()) {
    throw std::runtime_error("load_full_state_dict: " + path + " holds a " + value.tagKind() +
                             ", not a dict of tensors (save it with torch.save(model.state_dict(), path))");
  }
  TensorDict tensors;
  for (const auto& item : value.toGenericDict()) {
    if (!item.key().isString() || !item.value().isTensor()) {
      throw std::runtime_error("load_full_state_dict: " + path + " has an entry that is not str -> Tensor (" +
                               item.key().tagKind() + " -> " + item.value().tagKind() + ")");
    }
    tensors.insert(item.key().toStringRef(), item.value().toTensor());
  }
  return tensors;
}

}  // namespace fsdpsim::fsdp
