#pragma once
// Per-op compute costs for simulated time: what each outermost ATen op and
// autograd node of a rank costs, keyed by its name and its input tensors'
// dtypes and shapes and its int-list arguments ("aten::addmm Float[64]
// Float[8,64] Float[64,64]", "aten::zeros [16,64]").
//
// Why: in a data-free run (tensors on the meta device, shapes only) ops take
// no real time, so measured compute would predict nothing. A small data run
// records the table (WorldOptions::record_op_costs: each op's compute as the
// simulated clock measures it, switches and the comm backend excluded); the
// data-free run then charges each op its recorded mean
// (ComputeTime::OpCosts). An op whose shapes were never recorded (a shard at
// another world size) costs its name's mean over the shapes recorded; an op
// never seen costs nothing and is counted (OpCostUsage::unknown).
//
// Only outermost ops count: nested ops (a linear's addmm) are inside their
// caller's time. Code between ops (the engine's bookkeeping) is not charged.
//
// Thread-safety: an OpCostTable is a plain value (const methods may be
// called from several threads); recording happens on a fiber world's one OS
// thread only.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>

#include <nlohmann/json_fwd.hpp>

namespace fsdpsim::sim {

class SimClock;

class OpCostTable {
 public:
  struct Entry {
    int64_t count = 0;
    int64_t total_ns = 0;
    int64_t mean_ns() const { return count > 0 ? total_ns / count : 0; }
  };
  enum class Source { Exact, ByName, Unknown };
  struct Cost {
    int64_t ns = 0;
    Source source = Source::Unknown;
  };

  /// One run of the op `key` (whose name is `name`) that took `ns`.
  void add(const std::string& key, const std::string& name, int64_t ns);
  /// The mean of `key`; else the mean of `name` over its shapes; else 0.
  Cost cost(const std::string& key, const std::string& name) const;
  size_t size() const { return by_key_.size(); }
  bool empty() const { return by_key_.empty(); }
  /// Every key, sorted.
  std::map<std::string, Entry> entries() const;

  /// {"version": 1, "ops": [{"key", "name", "count", "total_ns"}, ...]}.
  nlohmann::json to_json() const;
  /// Throws std::invalid_argument naming what is wrong.
  static OpCostTable from_json(const nlohmann::json& json);
  /// Throws std::runtime_error when the file cannot be written or read.
  void save(const std::string& path) const;
  static OpCostTable load(const std::string& path);

 private:
  struct Named : Entry {
    std::string name;
  };
  std::unordered_map<std::string, Named> by_key_;
  std::unordered_map<std::string, Entry> by_name_;
};

/// How a run's op costs were found (ComputeTime::OpCosts).
struct OpCostUsage {
  int64_t exact = 0;
  int64_t by_name = 0;
  int64_t unknown = 0;
};

namespace detail {

/// Installs a thread-local RecordFunction callback on the calling thread
/// (the fiber host, before the fibers start) for its lifetime: it records
/// into `record` and/or charges from `charge` through `clock`.
class OpCostHook {
 public:
  OpCostHook(SimClock& clock, int world_size, OpCostTable* record, const OpCostTable* charge);
  ~OpCostHook();
  OpCostHook(const OpCostHook&) = delete;
  OpCostHook& operator=(const OpCostHook&) = delete;

  struct State;

 private:
  std::unique_ptr<State> state_;
  uint64_t handle_ = 0;
};

}  // namespace detail

}  // namespace fsdpsim::sim
