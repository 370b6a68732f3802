#pragma once
// The parity harness: trains a scenario sharded through fsdp::Engine on a
// World of ranks and checks it, step by step and rank by rank, against an
// unsharded reference with DDP semantics (PyTorch's FSDP parity tests).
//
// Reference: W replicas (make_scenario(config, r)), each runs forward and
// LibTorch's backward on input(r, step); every param that is not rank-local
// then gets the mean of the replicas' grads, summed in rank order 0..W-1 and
// divided by W -- the fake backend's reduce-scatter / all-reduce arithmetic,
// so FullShard, ShardGradOp and NoShard must match bitwise; rank-local params
// keep their own grad; each replica's optimiser steps. It runs on the calling
// thread with at::set_num_threads(1) (the rank threads also run one intra-op
// thread each: the thread count changes matmul summation order).
//
// Checks on every rank r, every step: the loss equals replica r's; after
// backward and after the optimiser step each param (by FQN, each tied
// TensorImpl once) equals its slice of the reference -- rows [i c, i c + n)
// of the full param, c = ceil(dim0 / S), where i and S are the rank and size
// of the group the unit shards the param over (HybridShard: the shard group;
// NoShard and MoE experts: a size-1 group, i.e. the whole param) -- and so
// does its grad (reference grad undefined <=> sharded grad undefined). A shard
// of c rows past the end of the param (padded) is compared on its valid rows.
// After the step, each param's optimiser state (SGD: momentum_buffer; Adam:
// step, exp_avg, exp_avg_sq) equals the same rows of the replica's state.
//
// Round trip (ParityConfig::round_trip, as PyTorch's _train_for_several_steps
// with save_model): after one step the sharded side takes its model and
// optimiser state dicts (fsdp/state_dict.h, sharded) and keeps a copy; zeroes
// every param and buffer; then either zeroes the optimiser state in place
// (and the learning rate) and loads the copy back in memory, or drops the
// optimiser state and loads a DCP checkpoint written to a temporary
// directory (fsdp::save_checkpoint / load_checkpoint: the load rebuilds it);
// checks the state dicts equal the copy bitwise, and trains on: a load that
// restored nothing breaks the comparisons above.
//
// Thread-safety: run_parity may be called from any thread; it blocks until
// the world ends. Concurrent calls share nothing but LibTorch's globals.

#include <ATen/Tensor.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backends/comm_hooks.h"
#include "backends/process_group.h"
#include "fsdp/fully_shard.h"
#include "scenarios/models.h"
#include "scenarios/trainer.h"
#include "sim/world.h"

namespace fsdpsim::observe {
class TraceRecorder;
}

namespace fsdpsim::scenarios {

/// Comparison rule: exact (bitwise, the default) or |a - b| <= atol + rtol |b|.
struct Tolerance {
  double atol = 0.0;
  double rtol = 0.0;
  bool exact() const { return atol == 0.0 && rtol == 0.0; }
};

/// How ParityConfig::round_trip carries the state out and back.
enum class RoundTripVia {
  StateDict,   ///< get/set_model_state_dict and get/set_optimizer_state_dict in memory
  Checkpoint,  ///< fsdp::save_checkpoint to a fresh temporary directory, then load_checkpoint
};
const char* to_string(RoundTripVia via);

struct RoundTrip {
  /// The step (0-based) after whose optimiser step the state goes out and
  /// back; -1: never.
  int after_step = -1;
  RoundTripVia via = RoundTripVia::StateDict;
  /// false: take the state out and scramble the live state but load nothing
  /// back -- the harness's own test that its checks catch a load that
  /// restores nothing (parity must then break).
  bool load_back = true;
};

/// What to train (TrainConfig: the scenario, strategy, optimiser, zero_grad
/// placement; where the sharded run zeroes its grads is its zero_grad_at, the
/// reference zeroes before its forward: the same step there), on which world,
/// and how to compare.
struct ParityConfig : TrainConfig {
  /// The sharded run's world (world_size 2 unless set). world.trace, when
  /// set, records every collective; world.simulated_time (fibers on the fake
  /// backend) makes sleeps, e.g. injected delays, cost no real time.
  sim::WorldOptions world = default_world();
  Tolerance tolerance;
  /// false: only the sharded run (no reference, no comparisons).
  bool run_reference = true;
  /// When set, called on each rank before its groups are built; a non-null
  /// result hooks every collective of that rank (delays, failures), outside
  /// the harness's own counting hooks.
  std::function<std::shared_ptr<CommHooks>(int rank)> comm_hooks;
  /// When set, called on each rank before its engine is built; a non-null
  /// result joins the engine's hooks (observe engine events, or delay them:
  /// a hook that sleeps in on_reshard delays the free).
  std::function<std::shared_ptr<fsdp::EngineHooks>(int rank)> engine_hooks;
  /// When set, called on each rank at every step's "after_loss" (the loss
  /// computed, before backward) and "before_step" (after the checks, just
  /// before the optimiser step), e.g. to sleep there.
  std::function<void(int rank, const char* point)> delay;
  /// A save/load round trip of the sharded side's state mid-training.
  RoundTrip round_trip;

  /// "transformer FullShard world 4 threads fake sgd".
  std::string describe() const;

  static sim::WorldOptions default_world() {
    sim::WorldOptions options;
    options.world_size = 2;
    return options;
  }
};

/// Collectives issued on one rank, by op.
struct CollectiveCounts {
  std::array<int64_t, 5> by_op{};  ///< indexed by CollectiveOp
  int64_t of(CollectiveOp op) const { return by_op[static_cast<size_t>(op)]; }
  int64_t total() const;
};

/// One rank's collectives in one step, by phase.
struct StepCommCounts {
  CollectiveCounts forward;    ///< zero_grad + forward_loss
  CollectiveCounts backward;   ///< sim::backward (its end-of-backward callbacks included)
  CollectiveCounts optimizer;  ///< the checks and the optimiser step
};

/// Largest |sharded - reference| in one step, over ranks and params.
struct StepDiff {
  double loss = 0.0;
  double param_after_backward = 0.0;
  double grad = 0.0;
  double param_after_step = 0.0;
  double optimizer_state = 0.0;
};

struct Mismatch {
  int step = 0;
  int rank = 0;
  /// "loss", "param after backward", "grad", "param after step", "optimizer
  /// state" (fqn: "<param>.<state name>"), "round trip" (a state dict key not
  /// restored, or the load failed).
  std::string what;
  std::string fqn;  ///< empty for the loss
  double max_abs_diff = 0.0;
  std::string detail;  ///< shapes, definedness, first differing element
  std::string to_string() const;
};

struct ParityReport {
  ParityConfig config;
  /// Non-empty when a rank failed (WorldResult::error_report()) or the
  /// reference threw.
  std::string error;
  std::vector<StepDiff> steps;
  /// The earliest mismatches in (step, phase, rank, param) order, at most kMaxMismatches.
  std::vector<Mismatch> mismatches;
  int64_t mismatch_count = 0;
  /// [rank][step].
  std::vector<std::vector<StepCommCounts>> comm_counts;
  /// [rank][step]: each rank's loss.
  std::vector<std::vector<double>> losses;
  /// [rank]: FQN -> the rank's shard after the last step (a copy).
  std::vector<std::map<std::string, at::Tensor>> final_shards;
  double seconds_reference = 0.0;
  double seconds_sharded = 0.0;

  static constexpr size_t kMaxMismatches = 20;
  bool ok() const { return error.empty() && mismatch_count == 0; }
  /// The config, per-step max diffs, the first mismatches or the error.
  std::string summary() const;
};

/// Runs the reference (unless !config.run_reference) and the sharded world,
/// and reports. Never throws for a parity failure or a failed rank (see
/// ParityReport::error); throws std::invalid_argument for a bad config
/// (round_trip.after_step outside [-1, steps)). A Checkpoint round trip
/// writes under std::filesystem::temp_directory_path() and removes it.
ParityReport run_parity(const ParityConfig& config);

/// One rank of a parity run whose ranks live elsewhere (Gloo processes):
/// this process computes the whole reference (the same arithmetic on every
/// process) and compares its own shards. `world_group` spans config.world.world_size
/// ranks; the rest of config.world (rank kind, backend) is ignored. A
/// Checkpoint round trip is refused (std::invalid_argument): the processes
/// share no directory here; StateDict works.
ParityReport run_parity_rank(const ParityConfig& config, int rank, const ProcessGroupPtr& world_group);

}  // namespace fsdpsim::scenarios
