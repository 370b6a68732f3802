#pragma once
// Simulated time of a fiber world: one virtual clock per rank.
//
// A rank's clock advances by (a) its compute: the real run time of its fiber
// slices (scaled), or nothing in ComputeTime::Zero, or a fixed cost per slice
// in ComputeTime::Fixed, (b) sleeps, which cost no
// real time, and (c) waiting: a collective starts when its last rank arrives
// (the latest issue time) and ends after the cost model's duration; a rank
// that waits on it jumps to that end if it is not past it already. The jump
// is the rank's exposed communication. Time spent inside the comm backend
// (bookkeeping, the in-memory copies) is not compute and is not charged.
//
// Thread-safety: none. Every fiber of a world runs on one OS thread; read the
// totals from elsewhere only after World::run returned.

#include <chrono>
#include <cstdint>
#include <vector>

#include "backends/clock.h"
#include "sim/op_costs.h"

namespace fsdpsim::sim {

enum class ComputeTime {
  Measured,  ///< compute costs its real run time x compute_scale
  Zero,      ///< compute is free: only sleeps and collectives take time (fully deterministic)
  Fixed,     ///< each slice of rank code (between comm calls and switches) costs a fixed time (deterministic)
  OpCosts,   ///< each outermost ATen op / autograd node costs its entry in an OpCostTable (sim/op_costs.h);
             ///< code between ops is free (deterministic; what a data-free run charges)
};

class SimClock final : public Clock {
 public:
  /// fixed_compute_ns: the cost of one slice under ComputeTime::Fixed.
  SimClock(int world_size, ComputeTime compute, double compute_scale, int64_t fixed_compute_ns = 0);

  /// The calling rank's time; outside a rank, the latest of all ranks.
  int64_t now_ns() const override;
  int64_t rank_now_ns(int rank) const { return time_[rank]; }
  /// Total time each rank spent waiting for communication beyond its compute.
  int64_t exposed_comm_ns(int rank) const { return exposed_[rank]; }
  int64_t compute_ns(int rank) const { return compute_[rank]; }
  int world_size() const { return static_cast<int>(time_.size()); }

  void advance(int rank, int64_t ns) { time_[rank] += ns; }
  /// Compute of `ns` charged to `rank` (ComputeTime::OpCosts: an op's cost).
  void charge_compute(int rank, int64_t ns) {
    time_[rank] += ns;
    compute_[rank] += ns;
  }
  /// The rank's compute so far, its running slice included (what an op
  /// recorder reads before and after the op).
  int64_t compute_so_far_ns(int rank) const;
  bool in_backend(int rank) const { return in_backend_[rank] > 0; }
  /// ComputeTime::OpCosts: how the ops' costs of `rank` were found, and of every rank.
  OpCostUsage& op_cost_usage(int rank) { return op_cost_usage_[rank]; }
  const OpCostUsage& op_cost_usage(int rank) const { return op_cost_usage_[rank]; }
  OpCostUsage op_cost_usage() const;
  /// The rank waited for communication that ends at end_ns.
  void wait_until(int rank, int64_t end_ns);

  // Compute accounting, driven by the fiber scheduler and the backend.
  void on_switch_in(int rank);
  void on_switch_out(int rank);
  void enter_backend(int rank);
  void leave_backend(int rank);

 private:
  void charge(int rank);
  /// Simulated cost of a slice of rank code that took `real`.
  int64_t slice_cost(std::chrono::steady_clock::duration real) const;

  ComputeTime compute_mode_;
  double compute_scale_;
  int64_t fixed_compute_ns_;
  std::vector<int64_t> time_;
  std::vector<int64_t> exposed_;
  std::vector<int64_t> compute_;
  std::vector<std::chrono::steady_clock::time_point> slice_start_;
  std::vector<int> in_backend_;  // nesting depth of BackendScope
  std::vector<OpCostUsage> op_cost_usage_;
};

/// Charges the compute so far and stops charging until the scope ends (a
/// no-op without a clock).
class BackendScope {
 public:
  BackendScope(SimClock* clock, int rank) : clock_(clock), rank_(rank) {
    if (clock_) clock_->enter_backend(rank_);
  }
  ~BackendScope() {
    if (clock_) clock_->leave_backend(rank_);
  }
  BackendScope(const BackendScope&) = delete;
  BackendScope& operator=(const BackendScope&) = delete;

 private:
  SimClock* clock_;
  int rank_;
};

}  // namespace fsdpsim::sim
