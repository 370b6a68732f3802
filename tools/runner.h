#pragma once
// The scenario runner behind `fsdpsim run`: trains a named scenario with the
// FSDP engine on a chosen backend and prints a progress line per step and a
// summary (loss per step, measured and predicted step time, bytes gathered
// and reduced per rank, peak unsharded memory, exposed communication).
// Thread-safety: run_scenario() runs one run at a time per process (process
// ranks install signal handlers for the run's duration).

#include <chrono>
#include <cstdint>
#include <iosfwd>
#include <stdexcept>
#include <string>
#include <vector>

#include "fsdp/fully_shard.h"
#include "scenarios/parity.h"
#include "sim/delay_hooks.h"
#include "sim/world.h"

namespace fsdpsim::tools {

struct RunOptions {
  std::string scenario = "mlp_stack";
  sim::RankKind rank_kind = sim::RankKind::Threads;
  /// Gloo only: one process per rank (the runner re-executes itself).
  bool processes = false;
  sim::CommBackend backend = sim::CommBackend::Fake;
  int world_size = 4;
  /// HybridShard: replicas (the mesh is replicate_size x world/replicate_size).
  int replicate_size = 1;
  /// A collective not joined by every rank within this fails (fake and Gloo);
  /// process ranks: also the launcher's grace for the others after a failure.
  std::chrono::milliseconds collective_timeout{60000};
  fsdp::ShardingStrategy strategy = fsdp::ShardingStrategy::FullShard;
  fsdp::BackwardPrefetch backward_prefetch = fsdp::BackwardPrefetch::BackwardPre;
  bool forward_prefetch = false;
  int steps = 5;
  uint64_t seed = 0;
  sim::SchedulePolicy schedule = sim::SchedulePolicy::RoundRobin;
  /// Fibers: simulated time with this cost model preset.
  bool simulated_time = false;
  std::string cost_model = "fake-2core";
  /// Simulated time: what the ranks' compute costs (Zero and Fixed make a
  /// seeded run's times reproducible bit for bit).
  sim::ComputeTime compute_time = sim::ComputeTime::Measured;
  int64_t fixed_compute_ns = 0;
  scenarios::OptimizerKind optimizer = scenarios::OptimizerKind::SGD;
  int64_t mlp_dim = 64;
  /// Comm delays (real on threads, simulated on fibers with simulated time).
  sim::DelayOptions delays;
  /// Extra delays at points outside collectives, milliseconds (0 = none).
  double delay_after_loss_ms = 0;
  double delay_before_step_ms = 0;
  double delay_before_reshard_ms = 0;
  /// Chrome trace path; PATH.jsonl gets the line-per-event form.
  std::string trace_path = "fsdpsim-trace.json";
  /// Also run the unsharded reference and compare every step.
  bool check_parity = false;
  /// The arguments these options were parsed from (process ranks get them).
  std::vector<std::string> args;

  /// Throws std::invalid_argument with one line naming the bad option.
  void validate() const;
};

/// Parses `fsdpsim run` arguments (tools/run_cli.cpp); throws UsageError, an
/// std::invalid_argument (one line naming the option).
RunOptions parse_run_options(const std::vector<std::string>& args);

/// Throws std::invalid_argument (one line) unless the trace and its .jsonl
/// can be written at `path`; checked before a run, not after it.
void check_trace_writable(const std::string& path);

/// The run failed (a rank, a process, the launcher); one line, after the
/// details went to `err`.
class RunFailedError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// SIGINT, SIGTERM or SIGHUP reached a run of process ranks: the ranks were
/// stopped and the temporary files removed; the caller may re-raise it.
class RunInterruptedError : public RunFailedError {
 public:
  explicit RunInterruptedError(int signal)
      : RunFailedError("interrupted by signal " + std::to_string(signal) + "; the rank processes were stopped"),
        signal_(signal) {}
  int signal() const { return signal_; }

 private:
  int signal_;
};

/// Runs the scenario; returns 0 (or 1 when --check-parity finds a
/// difference). Throws RunFailedError when the run fails, after writing what
/// each rank did to `err`.
int run_scenario(const RunOptions& options, std::ostream& out, std::ostream& err);

/// Exit code of a process rank whose collective timed out (others: 1).
constexpr int kWorkerTimedOutExit = 3;

/// The worker kind (tools/worker.h) of a Gloo process rank, and its entry:
/// the job holds the run's arguments ("args"), the result the rank's stats
/// and trace; RANK / WORLD_SIZE / MASTER_* come from the launcher.
inline constexpr const char* kRunWorker = "run";
class WorkerContext;
int run_process_worker(const WorkerContext& context);

}  // namespace fsdpsim::tools
