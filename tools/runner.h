#pragma once
// The scenario runner behind `fsdpsim run`: trains a named scenario with the
// FSDP engine on a chosen backend and prints a progress line per step and a
// summary (loss per step, measured and predicted step time, bytes gathered
// and reduced per rank, peak unsharded memory, exposed communication).
//
// Thread-safety: run_scenario and run_process_worker may be called from any
// thread, one run at a time per process (process ranks catch SIGINT/SIGTERM/
// SIGHUP while they run); RunOptions is a plain value.

#include <chrono>
#include <cstdint>
#include <iosfwd>
#include <stdexcept>
#include <string>
#include <vector>

#include "fsdp/fully_shard.h"
#include "scenarios/parity.h"
#include "scenarios/trainer.h"
#include "sim/delay_hooks.h"
#include "sim/world.h"

namespace fsdpsim::tools {

/// What to train (TrainConfig: scenario, strategy, prefetch, steps,
/// optimiser), where (WorldOptions) and what the runner adds around it.
struct RunOptions : scenarios::TrainConfig {
  /// The defaults of `fsdpsim run`: mlp_stack (dim 64), 40 steps, on 4 fake
  /// thread ranks.
  RunOptions();
  /// The ranks' world. A collective not joined by every rank within
  /// world.collective_timeout fails (fake and Gloo); process ranks: also the
  /// launcher's grace for the others after a failure. `--seed` is
  /// scenario.seed, which also seeds the fiber schedule (world.seed is not
  /// read); world.trace and world.cost_model are the runner's to set.
  sim::WorldOptions world;
  /// Gloo only: one process per rank (the runner re-executes itself).
  bool processes = false;
  /// world.simulated_time: the cost model preset.
  std::string cost_model = "fake-2core";
  /// Comm delays (real on threads, simulated on fibers with simulated time).
  sim::DelayOptions delays;
  /// Extra delays at points outside collectives, milliseconds (0 = none).
  double delay_after_loss_ms = 0;
  double delay_before_step_ms = 0;
  double delay_before_reshard_ms = 0;
  /// Fake backend: every heartbeat_s seconds of a run, a line saying where
  /// each rank is (WorldOptions::heartbeat), so a long step shows progress.
  /// 0: off.
  double heartbeat_s = 30;
  /// Chrome trace path; PATH.jsonl gets the line-per-event form.
  std::string trace_path = "fsdpsim-trace.json";
  /// Also run the unsharded reference and compare every step.
  bool check_parity = false;
  /// Data-free only: "auto" or a comma-separated list of global ranks; the
  /// world then runs only these ranks, each playing its global rank of
  /// world.world_size (WorldOptions::played_ranks; auto:
  /// sim::shard_class_ranks of the model's params). Empty: every rank.
  std::string representative_ranks;
  /// No trace files, no trace records in memory (large data-free worlds);
  /// the summary then gives no per-rank byte counts.
  bool no_trace = false;
  /// ComputeTime::OpCosts: the op cost table charged (sim/op_costs.h), as
  /// --record-op-costs wrote it.
  std::string op_costs_path;
  /// After a simulated-time run with measured compute: save the op cost
  /// table of every rank's ops here (the calibration for --data-free).
  std::string record_op_costs_path;
  /// Before training: load this checkpoint (fsdp/distributed_checkpoint.h;
  /// any world size or strategy) and go on from its step. After training:
  /// save one here. Empty: neither.
  std::string resume_dir;
  std::string save_dir;
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
