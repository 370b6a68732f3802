#pragma once
// The in-memory fake backend: ranks of one process (threads or fibers) move
// real data between their tensors.
//
// How a collective runs: each rank's call posts an arrival (its desc and
// tensors) under (group, seq) and returns a Work at once. Each arrival is
// checked against the first one, so a mismatch (op, dtype, shape, reduce op,
// root) fails the collective for every rank as soon as it happens. When the
// last rank arrives the collective is ready and its data movement is split
// into tasks (one per destination rank, or per element chunk for
// all-reduce); any rank waiting on it claims and runs unclaimed tasks, so the
// copies run in parallel on thread ranks and nothing depends on one rank
// doing everybody's work. Thread worlds also run a progress thread that
// starts on ready collectives at once, so a collective moves data while its
// ranks compute. A rank's Work completes once all tasks finished, i.e. once
// no rank reads its input any more.
//
// Fiber worlds (one OS thread, nothing to run in parallel) stage all-gathers
// and reduce-scatters instead, so that N ranks cost O(N x bytes per rank):
// each input is folded in as its rank arrives (copied to its place, or
// reduced into the running result in rank order) and let go of; a
// reduce-scatter's outputs are written when the last rank arrives, an
// all-gather's output when its own rank waits (or polls is_completed, issues
// another collective, or exits), and that rank's Work completes then. A
// completed collective keeps none of its ranks' tensors.
//
// Arithmetic: reductions run in rank order (in_0 op in_1 op ... op in_{n-1})
// element by element in the tensor's dtype (half/bf16 through float, rounded
// after each step, as ATen's CPU kernels do), so results are bitwise
// reproducible whatever the schedule. Avg and the post-divide factor divide
// the sum with at::div_; the pre-divide factor divides each input in the
// dtype's compute type (float or double). Tensors must live on the CPU.
//
// Thread-safety: one FakeWorldState per world, shared by all ranks; its state
// is guarded by one mutex, held only for bookkeeping; waits use a condition
// variable that suits the rank kind. A FakeProcessGroup belongs to one rank.

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backends/clock.h"
#include "backends/collective_checks.h"
#include "backends/process_group.h"
#include "sim/cost_model.h"
#include "sim/sim_clock.h"

namespace fsdpsim::sim {

class FakeGroupState;
struct PendingCollective;

class FakeWorldState : public std::enable_shared_from_this<FakeWorldState> {
 public:
  /// `fibers`: the ranks are fibers of one OS thread (waits must be fiber-aware).
  FakeWorldState(int world_size, bool fibers, std::chrono::milliseconds timeout, const Clock& clock);
  ~FakeWorldState();

  int world_size() const { return world_size_; }
  bool fibers() const { return fibers_; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  const Clock& clock() const { return clock_; }

  /// Simulated time (fiber worlds): each collective starts at the latest
  /// issue time of its ranks and lasts the cost model's time; waiting ranks'
  /// clocks jump to its end. `clock` must be the clock passed at construction.
  void use_simulated_time(SimClock* clock, const CostModelParams& cost_model);

  /// Representative ranks (sim/world.h): rank i of this state plays global
  /// rank played_ranks[i] of a world of `played_world_size`. Its world group
  /// reports that rank and size and accepts data-free (meta) collectives
  /// only; they complete when the present ranks arrived and are charged at
  /// the played size. No split. Call before world_group().
  void play(std::vector<int> played_ranks, int played_world_size);

  /// The group over every rank, as seen by `rank`.
  ProcessGroupPtr world_group(int rank);

  /// Fails every collective still gathering ranks and every later call with
  /// WorldAbortedError(reason). The first reason wins.
  void abort(const std::string& reason);
  bool aborted() const;

  /// Called when a rank's function returned (failed = it threw). Collectives
  /// that still wait for this rank fail at once instead of timing out.
  void rank_exited(int global_rank, bool failed, const std::string& error);

  /// "ranks {0,1}: waiting in all_gather group world seq 3; rank 2: exited".
  std::string where_ranks_are() const;

  struct Impl;  // fake_process_group.cpp's

 private:
  friend class FakeProcessGroup;
  friend class FakeWork;
  void progress_loop(Impl& impl);
  const int world_size_;
  const bool fibers_;
  const std::chrono::milliseconds timeout_;
  const Clock& clock_;
  SimClock* sim_clock_ = nullptr;
  CostModelParams cost_model_;
  std::vector<int> played_ranks_;  // empty: every rank plays itself
  int played_world_size_ = 0;
  std::shared_ptr<Impl> impl_;  // shared with the progress thread
};

// Rank-set formatting lives beside the other report helpers (backends/collective_checks.h).
using fsdpsim::rank_set_string;
using fsdpsim::ranks_text;

}  // namespace fsdpsim::sim
