#include "sim/op_costs.h"

#include <ATen/record_function.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "sim/sim_clock.h"
#include "sim/world.h"

namespace fsdpsim::sim {

void OpCostTable::add(const std::string& key, const std::string& name, int64_t ns) {
  Named& entry = by_key_[key];
  if (entry.count == 0) entry.name = name;
  ++entry.count;
  entry.total_ns += ns;
  Entry& named = by_name_[name];
  ++named.count;
  named.total_ns += ns;
}

OpCostTable::Cost OpCostTable::cost(const std::string& key, const std::string& name) const {
  if (auto it = by_key_.find(key); it != by_key_.end()) return {it->second.mean_ns(), Source::Exact};
  if (auto it = by_name_.find(name); it != by_name_.end()) return {it->second.mean_ns(), Source::ByName};
  return {0, Source::Unknown};
}

std::map<std::string, OpCostTable::Entry> OpCostTable::entries() const {
  std::map<std::string, Entry> sorted;
  for (const auto& [key, entry] : by_key_) sorted.emplace(key, entry);
  return sorted;
}

nlohmann::json OpCostTable::to_json() const {
  std::map<std::string, const Named*> sorted;
  for (const auto& [key, entry] : by_key_) sorted.emplace(key, &entry);
  nlohmann::json ops = nlohmann::json::array();
  for (const auto& [key, entry] : sorted) {
    ops.push_back({{"key", key}, {"name", entry->name}, {"count", entry->count}, {"total_ns", entry->total_ns}});
  }
  return {{"version", 1}, {"ops", ops}};
}

OpCostTable OpCostTable::from_json(const nlohmann::json& json) {
  if (!json.is_object() || json.value("version", 0) != 1 || !json.contains("ops") || !json.at("ops").is_array()) {
    throw std::invalid_argument("op cost table: expected {\"version\": 1, \"ops\": [...]}");
  }
  OpCostTable table;
  for (const auto& op : json.at("ops")) {
    try {
      const auto key = op.at("key").get<std::string>();
      const auto name = op.at("name").get<std::string>();
      const auto count = op.at("count").get<int64_t>();
      const auto total = op.at("total_ns").get<int64_t>();
      if (count < 1 || total < 0) throw std::invalid_argument("count must be >= 1 and total_ns >= 0");
      Named& entry = table.by_key_[key];
      entry.name = name;
      entry.count += count;
      entry.total_ns += total;
      Entry& named = table.by_name_[name];
      named.count += count;
      named.total_ns += total;
    } catch (const std::exception& e) {
      throw std::invalid_argument("op cost table: bad entry " + op.dump() + ": " + e.what());
    }
  }
  return table;
}

void OpCostTable::save(const std::string& path) const {
  std::ofstream out(path);
  out << to_json().dump(1) << "\n";
  if (!out.flush()) throw std::runtime_error("cannot write the op cost table to '" + path + "'");
}

OpCostTable OpCostTable::load(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read the op cost table '" + path + "'");
  nlohmann::json json;
  try {
    in >> json;
  } catch (const std::exception& e) {
    throw std::runtime_error("op cost table '" + path + "' is not JSON: " + e.what());
  }
  try {
    return from_json(json);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error("'" + path + "': " + e.what());
  }
}

namespace detail {

struct OpCostHook::State {
  SimClock& clock;
  OpCostTable* record;
  const OpCostTable* charge;
  std::vector<char> in_op;  // per rank: an outermost op is running (fibers may switch inside it)
};

namespace {

thread_local OpCostHook::State* t_state = nullptr;

// "name f32[8,64] i64[8] -": the op and its input tensors (undefined: "-").
std::string op_key(const at::RecordFunction& fn) {
  std::string key = fn.name();
  for (const c10::IValue& input : fn.inputs()) {
    if (input.isTensor()) {
      const at::Tensor& t = input.toTensor();
      key += ' ';
      if (!t.defined()) {
        key += '-';
        continue;
      }
      key += c10::toString(t.scalar_type());
      key += '[';
      const auto sizes = t.sizes();
      for (size_t d = 0; d < sizes.size(); ++d) {
        if (d > 0) key += ',';
        key += std::to_string(sizes[d]);
      }
      key += ']';
    } else if (input.isTensorList()) {
      key += " list" + std::to_string(input.toTensorList().size());
    } else if (input.isIntList()) {  // a factory's or a view's shape
      key += " [";
      const auto values = input.toIntList();
      for (size_t i = 0; i < values.size(); ++i) {
        if (i > 0) key += ',';
        key += std::to_string(values.get(i));
      }
      key += ']';
    }
  }
  return key;
}

struct OpContext : at::ObserverContext {
  int rank = 0;
  std::string key;
  int64_t compute_at_start = 0;
};

std::unique_ptr<at::ObserverContext> on_op_start(const at::RecordFunction& fn) {
  OpCostHook::State* state = t_state;
  const RankContext* rank = current_rank();
  if (state == nullptr || rank == nullptr) return nullptr;
  const int r = rank->rank();
  // Nested ops are inside their caller's cost; the comm backend's own ops are not compute.
  if (state->in_op[r] || state->clock.in_backend(r)) return nullptr;
  state->in_op[r] = 1;
  auto context = std::make_unique<OpContext>();
  context->rank = r;
  context->key = op_key(fn);
  if (state->record) context->compute_at_start = state->clock.compute_so_far_ns(r);
  return context;
}

void on_op_end(const at::RecordFunction& fn, at::ObserverContext* raw) {
  OpCostHook::State* state = t_state;
  auto* context = static_cast<OpContext*>(raw);
  if (state == nullptr || context == nullptr) return;
  const int r = context->rank;
  state->in_op[r] = 0;
  if (state->record) {
    state->record->add(context->key, fn.name(), state->clock.compute_so_far_ns(r) - context->compute_at_start);
  }
  if (state->charge) {
    const OpCostTable::Cost cost = state->charge->cost(context->key, fn.name());
    OpCostUsage& usage = state->clock.op_cost_usage(r);
    switch (cost.source) {
      case OpCostTable::Source::Exact: ++usage.exact; break;
      case OpCostTable::Source::ByName: ++usage.by_name; break;
      case OpCostTable::Source::Unknown: ++usage.unknown; break;
    }
    state->clock.charge_compute(r, cost.ns);
  }
}

}  // namespace

OpCostHook::OpCostHook(SimClock& clock, int world_size, OpCostTable* record, const OpCostTable* charge)
    : state_(std::make_unique<State>(State{clock, record, charge, std::vector<char>(world_size, 0)})) {
  if (t_state != nullptr) throw std::logic_error("OpCostHook: one per thread");
  t_state = state_.get();
  handle_ = at::addThreadLocalCallback(at::RecordFunctionCallback(&on_op_start, &on_op_end)
                                           .needsInputs(true)
                                           .scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION}));
}

OpCostHook::~OpCostHook() {
  at::removeCallback(handle_);
  t_state = nullptr;
}

}  // namespace detail

}  // namespace fsdpsim::sim
