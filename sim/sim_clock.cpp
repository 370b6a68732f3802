#include "sim/sim_clock.h"

#include <algorithm>
#include <stdexcept>

#include "sim/world.h"

namespace fsdpsim::sim {

SimClock::SimClock(int world_size, ComputeTime compute, double compute_scale, int64_t fixed_compute_ns)
    : compute_mode_(compute),
      compute_scale_(compute_scale),
      fixed_compute_ns_(fixed_compute_ns),
      time_(world_size, 0),
      exposed_(world_size, 0),
      compute_(world_size, 0),
      slice_start_(world_size, std::chrono::steady_clock::now()),
      in_backend_(world_size, 0),
      op_cost_usage_(world_size) {
  if (world_size < 1) throw std::invalid_argument("SimClock: world_size must be >= 1");
  if (!(compute_scale >= 0.0)) throw std::invalid_argument("SimClock: compute_scale must be >= 0");
  if (fixed_compute_ns < 0) throw std::invalid_argument("SimClock: fixed_compute_ns must be >= 0");
}

int64_t SimClock::now_ns() const {
  if (const RankContext* rank = current_rank()) return time_[rank->rank()];
  return *std::max_element(time_.begin(), time_.end());
}

void SimClock::wait_until(int rank, int64_t end_ns) {
  if (end_ns > time_[rank]) {
    exposed_[rank] += end_ns - time_[rank];
    time_[rank] = end_ns;
  }
}

void SimClock::charge(int rank) {
  const auto now = std::chrono::steady_clock::now();
  if (in_backend_[rank] == 0) {
    const int64_t charged = slice_cost(now - slice_start_[rank]);
    time_[rank] += charged;
    compute_[rank] += charged;
  }
  slice_start_[rank] = now;
}

int64_t SimClock::slice_cost(std::chrono::steady_clock::duration real) const {
  switch (compute_mode_) {
    case ComputeTime::Measured:
      return static_cast<int64_t>(
          static_cast<double>(std::chrono::duration_cast<std::chrono::nanoseconds>(real).count()) * compute_scale_);
    case ComputeTime::Fixed: return fixed_compute_ns_;
    case ComputeTime::Zero:
    case ComputeTime::OpCosts: return 0;  // OpCosts: charged per op (charge_compute)
  }
  return 0;
}

OpCostUsage SimClock::op_cost_usage() const {
  OpCostUsage total;
  for (const auto& used : op_cost_usage_) {
    total.exact += used.exact;
    total.by_name += used.by_name;
    total.unknown += used.unknown;
  }
  return total;
}

int64_t SimClock::compute_so_far_ns(int rank) const {
  if (in_backend_[rank] > 0) return compute_[rank];
  return compute_[rank] + slice_cost(std::chrono::steady_clock::now() - slice_start_[rank]);
}

void SimClock::on_switch_in(int rank) { slice_start_[rank] = std::chrono::steady_clock::now(); }
void SimClock::on_switch_out(int rank) { charge(rank); }

void SimClock::enter_backend(int rank) {
  charge(rank);
  ++in_backend_[rank];
}

void SimClock::leave_backend(int rank) {
  if (--in_backend_[rank] == 0) slice_start_[rank] = std::chrono::steady_clock::now();
}

}  // namespace fsdpsim::sim
