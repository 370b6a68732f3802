#pragma once
// The scheduler of fiber ranks: all fibers of a world on one OS thread,
// picked round-robin or in a seeded-random order (same seed, same
// interleaving), and each fiber with its own LibTorch thread-local state.
//
// Why the state swap: LibTorch keeps grad mode, inference mode and the
// dispatch-key guards in thread-locals; fibers on one thread would leak them
// into each other (one fiber's no_grad block would stop another fiber's
// forward from recording a graph). On every switch the scheduler saves the
// outgoing fiber's at::ThreadLocalState and installs the incoming one's.
//
// Thread-safety: one scheduler per OS thread (Boost.Fiber's contract);
// notify() may come from other threads.

#include <boost/fiber/algo/algorithm.hpp>
#include <boost/fiber/context.hpp>
#include <boost/fiber/properties.hpp>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>

#include <ATen/ThreadLocalState.h>

#include "sim/ready_queue.h"
#include "sim/world.h"

namespace fsdpsim::sim {

/// Per-fiber state the scheduler swaps in and out.
class RankFiberProperties : public boost::fibers::fiber_properties {
 public:
  explicit RankFiberProperties(boost::fibers::context* context) : fiber_properties(context) {}
  std::optional<at::ThreadLocalState> torch_state;
  RankContext* rank = nullptr;
  std::string collective_label;  // backends/collective_label.h's slot while switched out
};

class RankScheduler final : public boost::fibers::algo::algorithm_with_properties<RankFiberProperties> {
 public:
  /// `clock` (may be null): charged with each rank's fiber run time.
  RankScheduler(SchedulePolicy policy, uint64_t seed, SimClock* clock = nullptr);
  ~RankScheduler() override;

  void awakened(boost::fibers::context* context, RankFiberProperties& properties) noexcept override;
  boost::fibers::context* pick_next() noexcept override;
  bool has_ready_fibers() const noexcept override;
  void suspend_until(std::chrono::steady_clock::time_point const& deadline) noexcept override;
  void notify() noexcept override;

  /// The scheduler of the calling thread, or nullptr if it has none of ours.
  static RankScheduler* current();
  /// A rank fiber calls this as its last step: its state needs no saving,
  /// and its context is about to be destroyed.
  void fiber_finishing() noexcept { installed_ = nullptr; }

 private:
  void switch_state(boost::fibers::context* next) noexcept;
  // properties() for any context, creating them for contexts (the thread's
  // main fiber) that never passed through awakened().
  RankFiberProperties& state_of(boost::fibers::context* context) noexcept;

  SchedulePolicy policy_;
  SimClock* clock_;
  std::mt19937_64 random_;
  ReadyQueue<boost::fibers::context*> ready_;  // seeded-random: O(log n) pick at any position; else FIFO
  // The fiber whose thread-local state is installed right now.
  boost::fibers::context* installed_ = nullptr;
  at::ThreadLocalState initial_state_;
  std::mutex mutex_;
  std::condition_variable wakeup_;
  bool notified_ = false;
};

namespace detail {
/// The thread-local slot behind current_rank(); the scheduler swaps it.
RankContext*& current_rank_slot();
}  // namespace detail

}  // namespace fsdpsim::sim
