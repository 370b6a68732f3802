#pragma once
// DelayHooks: CommHooks that sleep around collectives, to check that nothing
// depends on timing (PyTorch's FSDP tests sleep 100-250 ms before each
// reduce-scatter and around each all-gather; training must stay in exact
// parity). The sleeps go through sim::sleep_for: real time on thread ranks,
// simulated time on fiber ranks of a world with simulated time (they then
// cost no real time), real fiber-aware sleeps on other fiber worlds.
//
//   DelayOptions delays;
//   delays.before_reduce_scatter = std::chrono::milliseconds(5);
//   delays.straggler_rank = 1;                       // rank 1 is slow everywhere
//   delays.straggler_delay = std::chrono::milliseconds(2);
//   auto hooks = std::make_shared<DelayHooks>(delays, rank);
//   ProcessGroupPtr slow = std::make_shared<HookedProcessGroup>(group, hooks);
//
// Thread-safety: one DelayHooks per rank (it knows its rank); the counters
// are atomic, so reading them from another thread is safe.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

#include "backends/comm_hooks.h"

namespace fsdpsim::sim {

struct DelayOptions {
  /// Before each reduce-scatter is issued.
  std::chrono::nanoseconds before_reduce_scatter{0};
  /// Before each all-gather is issued.
  std::chrono::nanoseconds before_all_gather{0};
  /// After each all-gather was issued, before its Work is returned (the
  /// collective may be in flight meanwhile).
  std::chrono::nanoseconds after_all_gather{0};
  /// The delays above apply on this global rank only; -1: on every rank.
  int only_rank = -1;
  /// This global rank (-1: none) also sleeps straggler_delay before every
  /// collective of any kind.
  int straggler_rank = -1;
  std::chrono::nanoseconds straggler_delay{0};

  /// Throws std::invalid_argument for a negative delay or a rank below -1.
  void validate() const;
  /// "rs 5ms, ag before 2ms, on rank 1, straggler 0 2ms" (for test names and reports).
  std::string describe() const;
};

class DelayHooks final : public CommHooks {
 public:
  /// `rank`: the global rank whose groups these hooks wrap.
  DelayHooks(DelayOptions options, int rank);

  void before(const CollectiveDesc& desc) override;
  WorkPtr run(const CollectiveDesc& desc, const std::function<WorkPtr()>& issue) override;
  void after(const CollectiveDesc& desc, const WorkPtr& work) override;

  /// Sleeps taken so far and their total requested length.
  int64_t sleeps() const { return sleeps_.load(); }
  std::chrono::nanoseconds slept() const { return std::chrono::nanoseconds(slept_ns_.load()); }
  const DelayOptions& options() const { return options_; }

 private:
  bool delays_here() const { return options_.only_rank < 0 || options_.only_rank == rank_; }
  void sleep(std::chrono::nanoseconds duration);

  const DelayOptions options_;
  const int rank_;
  std::atomic<int64_t> sleeps_{0};
  std::atomic<int64_t> slept_ns_{0};
};

}  // namespace fsdpsim::sim
