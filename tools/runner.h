#pragma once
// The scenario runner behind `fsdpsim run`: trains a named scenario with the
// FSDP engine on a chosen backend and prints a progress line per step and a
// summary (loss per step, measured and predicted step time, bytes gathered
// and reduced per rank, peak unsharded memory, exposed communication).

#include <cstdint>
#include <iosfwd>
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
  fsdp::ShardingStrategy strategy = fsdp::ShardingStrategy::FullShard;
  fsdp::BackwardPrefetch backward_prefetch = fsdp::BackwardPrefetch::BackwardPre;
  bool forward_prefetch = false;
  int steps = 5;
  uint64_t seed = 0;
  sim::SchedulePolicy schedule = sim::SchedulePolicy::RoundRobin;
  /// Fibers: simulated time with this cost model preset.
  bool simulated_time = false;
  std::string cost_model = "fake-2core";
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

/// Parses `fsdpsim run` arguments; throws std::invalid_argument (one line).
RunOptions parse_run_options(const std::vector<std::string>& args);
std::string run_usage();

/// Runs the scenario; returns the process exit code (0 ok, 1 failed).
int run_scenario(const RunOptions& options, std::ostream& out, std::ostream& err);

/// Entry of a Gloo process rank (the runner re-executes itself with
/// `--worker`): reads RANK / WORLD_SIZE / MASTER_* and the run options.
int run_process_worker(const RunOptions& options, const std::string& stats_path, std::ostream& err);

}  // namespace fsdpsim::tools
