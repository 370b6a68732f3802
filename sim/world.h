#pragma once
// A World runs one function on each of N ranks inside this process, ranks as
// OS threads or as Boost.Fiber fibers on one OS thread, and hands each rank a
// process group over all ranks: the in-memory fake (real data moves between
// ranks) or real Gloo over loopback (threads only).
//
// Failure contract: a rank that throws aborts the world; ranks blocked in a
// fake collective wake with WorldAbortedError; a collective that not every
// rank reaches within the timeout fails and names the missing ranks and where
// each rank was. run() returns every rank's outcome and never deadlocks on a
// fake backend (a rank stuck in its own code is the one thing it cannot end).
//
// Determinism: fiber ranks run on one OS thread under a scheduler that is
// round-robin or seeded-random; the same seed and the same code give the same
// interleaving, hence the same trace and bitwise-identical results.
//
// Representative ranks (WorldOptions::played_ranks, data-free worlds): the
// World runs K ranks, rank i *playing* global rank played_ranks[i] of a world
// of world_size N; its world group reports that rank and size N, so an FSDP
// engine shards as that rank would. A collective completes when the K present
// ranks arrived, is checked across them and is charged at group size N on the
// simulated clock. Assumption: the N - K absent ranks are symmetric to a
// present one (same shard shapes, same code path, same compute costs) and so
// issue each collective no later than the latest present rank; it holds for
// a 1-D FSDP world without per-rank delays, not for anything that treats
// ranks differently (a 2-D mesh, a straggler), which the caller must refuse.
//
// Thread-safety: a World runs one run() at a time, from one thread; the rank
// function runs on every rank at once, each with its own RankContext.

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backends/clock.h"
#include "backends/process_group.h"
#include "sim/cost_model.h"
#include "sim/op_costs.h"
#include "sim/sim_clock.h"

namespace fsdpsim::observe {
class TraceRecorder;
}  // namespace fsdpsim::observe

namespace fsdpsim::sim {

class FakeWorldState;

enum class RankKind { Threads, Fibers };
enum class SchedulePolicy { RoundRobin, SeededRandom };
enum class CommBackend { Fake, Gloo };
/// Where fiber ranks' stacks live.
enum class FiberStacks {
  /// One mapping per fiber with a guard page: an overflow faults at once.
  /// Two memory mappings per fiber: Linux's vm.max_map_count (65530 by
  /// default) stops a world at about 32000 fibers.
  Guarded,
  /// Carved from one reserved mapping (sim/fiber_stacks.h), committed as
  /// touched: any world size. No guard page: a canary at each stack's bottom
  /// is checked when its fiber ends (the rank then fails naming the fix).
  Pooled,
};

const char* to_string(RankKind kind);
const char* to_string(SchedulePolicy policy);
const char* to_string(CommBackend backend);

struct WorldOptions {
  int world_size = 1;
  RankKind rank_kind = RankKind::Threads;
  CommBackend backend = CommBackend::Fake;
  /// Fibers only: which ready fiber runs next.
  SchedulePolicy schedule = SchedulePolicy::RoundRobin;
  /// Seed of the SeededRandom schedule.
  uint64_t seed = 0;
  /// A collective that not every rank reaches within this fails.
  std::chrono::milliseconds collective_timeout{60000};
  /// Gloo: check each collective across ranks before it runs
  /// (GlooOptions::check_collectives); the fake backend always checks.
  bool gloo_check_collectives = true;
  /// Stack of each fiber rank (LibTorch ops need more than Boost's default).
  size_t fiber_stack_bytes = 512 * 1024;
  FiberStacks fiber_stacks = FiberStacks::Guarded;
  /// Stack of each thread rank.
  size_t thread_stack_bytes = 4 * 1024 * 1024;
  /// When set, every collective of every rank is recorded here.
  std::shared_ptr<observe::TraceRecorder> trace;
  /// Each rank's last collectives kept in a ring buffer (0: off); a failed
  /// run returns their dump in WorldResult::flight_recorder.
  size_t flight_recorder_entries = 16;
  /// Fiber ranks on the fake backend only: simulated time (see
  /// sim/sim_clock.h). Sleeps cost no real time, collectives take the cost
  /// model's time, and traces and Work times are in simulated nanoseconds.
  bool simulated_time = false;
  CostModelParams cost_model = cost_model_preset("fake-2core");
  ComputeTime compute_time = ComputeTime::Measured;
  double compute_scale = 1.0;
  /// ComputeTime::Fixed: what each slice of rank code costs.
  int64_t fixed_compute_ns = 0;
  /// ComputeTime::OpCosts: what each op costs (sim/op_costs.h).
  std::shared_ptr<const OpCostTable> op_costs;
  /// Simulated time with ComputeTime::Measured: each rank's outermost ops
  /// and their measured compute are added here (the calibration a data-free
  /// run charges from). Fibers only (recorded on their one OS thread).
  std::shared_ptr<OpCostTable> record_op_costs;
  /// Representative ranks (fake backend, data-free collectives only; see the
  /// header comment): when not empty, the World runs one rank per entry, rank
  /// i playing global rank played_ranks[i] of [0, world_size). Distinct.
  std::vector<int> played_ranks;
  /// Long runs: while run() runs, called every heartbeat_interval from a
  /// helper thread with where each rank is (the fake backend's grouped
  /// text, e.g. "ranks {0-4095}: waiting in all_gather group world seq 17";
  /// a screenful at any world size). Not called when the run ends sooner.
  /// Must be thread-safe. Empty: off.
  std::function<void(const std::string& where)> heartbeat;
  std::chrono::milliseconds heartbeat_interval{30000};
  /// The ranks the World runs: played_ranks.size(), or world_size.
  int ranks_run() const { return played_ranks.empty() ? world_size : static_cast<int>(played_ranks.size()); }
  /// Checks the options; throws std::invalid_argument naming the bad one.
  void validate() const;
};

/// What a rank function sees of its world.
class RankContext {
 public:
  /// This rank's index among the ranks the World runs, in [0, world_size()):
  /// what per-rank state (the simulated clock, result vectors) is indexed by.
  int rank() const { return rank_; }
  /// The ranks the World runs (WorldOptions::ranks_run()).
  int world_size() const { return world_size_; }
  /// The global rank this rank plays and the world it plays in (what its
  /// world group reports): rank() and world_size() unless
  /// WorldOptions::played_ranks is set.
  int played_rank() const { return played_rank_ < 0 ? rank_ : played_rank_; }
  int played_world_size() const { return played_world_size_ < 0 ? world_size_ : played_world_size_; }
  RankKind rank_kind() const { return kind_; }
  /// This rank's group over every rank of the world (traced if the world is).
  const ProcessGroupPtr& world_group() const { return world_group_; }
  /// The world's clock: simulated time when the world simulates it.
  const Clock& clock() const { return *clock_; }
  /// The simulated clock, or nullptr in real time.
  SimClock* sim_clock() const { return sim_clock_; }

  /// `played_rank`, `played_world_size`: -1 when the rank plays itself.
  RankContext(int rank, int world_size, RankKind kind, ProcessGroupPtr world_group, const Clock* clock,
              SimClock* sim_clock, int played_rank = -1, int played_world_size = -1)
      : rank_(rank),
        world_size_(world_size),
        played_rank_(played_rank),
        played_world_size_(played_world_size),
        kind_(kind),
        world_group_(std::move(world_group)),
        clock_(clock),
        sim_clock_(sim_clock) {}

 private:
  int rank_;
  int world_size_;
  int played_rank_;
  int played_world_size_;
  RankKind kind_;
  ProcessGroupPtr world_group_;
  const Clock* clock_;
  SimClock* sim_clock_;
};

struct RankOutcome {
  int rank = 0;
  bool ok = true;
  std::string error;  ///< what() of the exception the rank ended with
};

struct WorldResult {
  std::vector<RankOutcome> ranks;
  /// When a rank failed: every rank's recent collectives and where each
  /// rank was (backends/observe/flight_recorder.h), for hang and desync diagnosis.
  std::string flight_recorder;
  /// FiberStacks::Pooled: the deepest any rank's stack went and every
  /// stack's resident bytes together (pages touched; 0 for guarded stacks).
  int64_t fiber_stack_deepest_bytes = 0;
  int64_t fiber_stack_resident_bytes = 0;
  bool ok() const;
  /// One line per failed rank: "rank 3: <error>".
  std::string error_report() const;
  /// Throws std::runtime_error with error_report() if any rank failed.
  void throw_if_failed() const;
};

class World {
 public:
  explicit World(WorldOptions options);
  ~World();
  World(const World&) = delete;
  World& operator=(const World&) = delete;

  /// Runs rank_main on every rank and returns when all have ended.
  WorldResult run(const std::function<void(RankContext&)>& rank_main);

  const WorldOptions& options() const { return options_; }
  /// The simulated clock of the last run (per-rank times, exposed
  /// communication), or nullptr when the world runs in real time.
  std::shared_ptr<SimClock> sim_clock() const { return sim_clock_; }

 private:
  WorldOptions options_;
  std::shared_ptr<FakeWorldState> fake_state_;
  std::shared_ptr<SimClock> sim_clock_;
};

/// The rank the calling thread or fiber runs as, or nullptr outside a World.
RankContext* current_rank();
/// Sleeps without blocking other fiber ranks on the same OS thread; in a
/// world with simulated time it advances the rank's clock and costs no real
/// time.
void sleep_for(std::chrono::nanoseconds duration);
/// Lets other ranks run (a no-op for thread ranks).
void yield();

}  // namespace fsdpsim::sim
