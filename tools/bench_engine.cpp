// `fsdpsim bench engine`: measures the FSDP engine side by side with the plain
// (unsharded) model in one run and prints three tables:
//   1. step time of the engine at world size 1 (FullShard, one thread rank)
//      against the plain model, with the overhead in percent and the target
//      line "world-size-1 overhead < 15%";
//   2. step time at 2, 4, 8 fake ranks (thread ranks and fiber ranks),
//      FullShard and ShardGradOp, against the plain model's step;
//   3. the peak of gathered (unsharded) param bytes per rank over a step
//      against the theoretical peak of the engine's schedule;
//   4. mixed precision (mp_policy bf16) against fp32 at world 2: step time and
//      bytes gathered and reduced per rank, as ratios.
//   5. gradient accumulation (3 micro-batches per step, the first two without
//      gradient sync, params resharded or kept after backward): peak
//      gathered-param bytes vs theory and step time vs syncing every
//      micro-batch; clip_grad_norm_ over shards against LibTorch's
//      clip_grad_norm_ of the plain model (time, and the norms agree).
//   6. distributed checkpoints (tools/bench_checkpoint.h): dcp save MiB/s vs
//      one fwrite + fsync of the same bytes, load MiB/s, resharding load
//      (world 2 -> 3) vs plain load time.
//
// A step is zero_grad (grads set to none) + forward + backward + SGD step.
// The plain model is the same scenario module (same init, same data) with no
// engine: fsdp::call falls through to forward, backward is loss.backward().
// Sharded steps run sim::backward (LibTorch's engine on thread ranks, the
// fiber-aware graph walk on fiber ranks).
//
// Timing: world size 1 alternates plain and engine steps on the same thread
// (the order flips every step), so both see the same machine load; tables
// quote medians over the timed steps after a warm-up. At world N every rank
// leaves a barrier, runs one step and stops its clock; a step's time is the
// last rank's end minus the first rank's start.
//
// Exit code: 0 when every measurement ran (a missed target is reported, not
// an error), 1 when one failed, 2 for bad usage.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include "backends/comm_hooks.h"
#include "backends/process_group.h"
#include "fsdp/clip_grad.h"
#include "fsdp/fully_shard.h"
#include "scenarios/models.h"
#include "scenarios/trainer.h"
#include "sim/world.h"
#include "tools/bench_checkpoint.h"
#include "tools/cli.h"
#include "tools/format_util.h"

namespace {

using namespace fsdpsim;
using namespace std::chrono_literals;

constexpr const char* kProgram = "fsdpsim bench engine";
constexpr double kTargetOverhead = 0.15;
constexpr double kLearningRate = 1e-4;  // small: the params stay in range over the run
constexpr uint64_t kSeed = 7;

scenarios::TrainConfig bench_train_config() {
  scenarios::TrainConfig train;
  train.scenario.seed = kSeed;
  train.optimizer = scenarios::OptimizerKind::SGD;
  train.learning_rate = kLearningRate;
  return train;
}

sim::WorldOptions bench_world() {
  sim::WorldOptions world;
  world.collective_timeout = 120s;
  world.fiber_stack_bytes = 1024 * 1024;
  return world;
}

struct Iterations {
  int warmup = 1;
  int timed = 1;
  int total() const { return warmup + timed; }
};

/// One benchmarked model: what to train (a scenario, SGD with momentum at a
/// small learning rate) and the batch each rank feeds it.
struct ModelSpec {
  std::string label;
  scenarios::TrainConfig train = bench_train_config();
  int64_t batch = 0;    ///< mlp_stack: rows of the input; transformer: 2 (its BatchNorm1d has 2 channels)
  int64_t src_len = 0;  ///< transformer: source and target sequence lengths
  int64_t tgt_len = 0;
  /// Also run at world sizes > 1 (section 2 and 3).
  bool multi = true;
  /// World size 1: the (plain, engine) step pairs; unset: Config::single.
  std::optional<Iterations> single;
};

struct Config {
  bool quick = false;
  /// Every measured world: these options with the world size and rank kind
  /// of the measurement.
  sim::WorldOptions world = bench_world();
  std::vector<ModelSpec> models;
  std::vector<int> worlds;
  Iterations single;  ///< world size 1: pairs of (plain, engine) steps
  Iterations multi;   ///< world N: steps per (strategy, rank kind)
};

ModelSpec mlp_model(int64_t dim, int64_t batch) {
  ModelSpec spec;
  spec.label = "mlp_stack d" + std::to_string(dim);
  spec.train.scenario.name = "mlp_stack";
  spec.train.scenario.mlp_dim = dim;
  spec.batch = batch;
  return spec;
}

ModelSpec transformer_model(int64_t src_len, int64_t tgt_len) {
  ModelSpec spec;
  spec.label = "transformer";
  spec.train.scenario.name = "transformer";
  spec.batch = 2;
  spec.src_len = src_len;
  spec.tgt_len = tgt_len;
  return spec;
}

// The models, worlds and iterations of a quick or a full run.
void complete(Config& config) {
  if (config.quick) {
    config.models = {mlp_model(32, 8), transformer_model(8, 6)};
    config.worlds = {2};
    config.single = {1, 1};
    config.multi = {1, 1};
  } else {
    // One mlp_stack d512 step (batch 64) takes ~0.4 s with this machine's
    // reference BLAS: world size 1 only, so the full run stays within ~3 min.
    ModelSpec large = mlp_model(512, 64);
    large.multi = false;
    large.single = Iterations{1, 7};
    // The transformer's step is short and noisier (per-op costs dominate): more pairs.
    ModelSpec transformer = transformer_model(128, 96);
    transformer.single = Iterations{3, 41};
    config.models = {mlp_model(256, 64), large, transformer};
    config.worlds = {2, 4, 8};
    config.single = {2, 11};
    config.multi = {1, 5};
  }
}

// ---------------------------------------------------------------------------
// Small helpers

using fsdpsim::tools::first_line;
using fsdpsim::tools::median;
using fsdpsim::tools::run_benchmark;
using fsdpsim::tools::seconds_since;

void progress(const std::string& line) { std::cout << line << std::endl; }

double kib(int64_t bytes) { return static_cast<double>(bytes) / 1024.0; }

const char* short_name(fsdp::ShardingStrategy strategy) {
  return strategy == fsdp::ShardingStrategy::FullShard ? "FullShard" : "ShardGradOp";
}

const fsdp::ShardingStrategy kStrategies[] = {fsdp::ShardingStrategy::FullShard, fsdp::ShardingStrategy::ShardGradOp};
const sim::RankKind kKinds[] = {sim::RankKind::Threads, sim::RankKind::Fibers};

// ---------------------------------------------------------------------------
// One rank's model: a scenario, its optimiser and its inputs.

/// The transformer's vocabulary, from an unsharded copy of its model.
int64_t transformer_vocab(const ModelSpec& spec) {
  auto scenario = scenarios::make_scenario(spec.train.scenario, 0);
  for (const auto& item : scenario->module()->named_parameters()) {
    if (item.key() == "embed_tokens.weight") return item.value().size(0);
  }
  throw std::logic_error("transformer: no embed_tokens.weight");
}

/// The inputs of `rank`, drawn from (seed, rank, index) by a private
/// generator (the global one is shared by rank threads). The scenarios' own
/// inputs are a few rows only; these are the benchmark's batch (mlp_stack:
/// the input and a random regression target of the same shape).
std::vector<std::vector<at::Tensor>> make_inputs(const ModelSpec& spec, int rank, int count) {
  const bool transformer = spec.train.scenario.name == "transformer";
  const int64_t vocab = transformer ? transformer_vocab(spec) : 0;
  std::vector<std::vector<at::Tensor>> inputs;
  for (int i = 0; i < count; ++i) {
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(kSeed * 1000003 + static_cast<uint64_t>(rank) * 1009 +
                                                                 static_cast<uint64_t>(i));
    if (transformer) {
      inputs.push_back({at::randint(vocab, {spec.src_len, spec.batch}, gen, at::kLong),
                        at::randint(vocab, {spec.tgt_len, spec.batch}, gen, at::kLong)});
    } else {
      const std::vector<int64_t> shape = {spec.batch, spec.train.scenario.mlp_dim};
      at::Tensor x = at::randn(shape, gen);
      inputs.push_back({x, at::randn(shape, gen)});
    }
  }
  return inputs;
}

// Two inputs alternate: different data every step, no allocation in the timing.
constexpr int kDistinctInputs = 2;

/// Records one rank's unshard / reshard events (unit FQN, +1 issued / -1
/// freed) for the live-bytes column of section 3: a unit counts from the
/// issue of its all-gather (a prefetch included) to its reshard.
class GatherEvents : public fsdp::NoEngineHooks {
 public:
  void on_unshard(const std::string& unit, fsdp::TrainingState) override { events_.emplace_back(unit, 1); }
  void on_reshard(const std::string& unit, fsdp::TrainingState) override { events_.emplace_back(unit, -1); }
  /// The events since the last take(), in order.
  std::vector<std::pair<std::string, int>> take() { return std::exchange(events_, {}); }

 private:
  std::vector<std::pair<std::string, int>> events_;
};

/// One rank's benchmarked model: the shared trainer (scenarios::Trainer) fed
/// the benchmark's batches, grads set to none before each step.
class Trainer {
 public:
  /// sharded: the scenario's units are sharded over `world` with `strategy`;
  /// otherwise (no world) the plain model.
  Trainer(const ModelSpec& spec, int rank, const ProcessGroupPtr& world = nullptr,
          fsdp::ShardingStrategy strategy = fsdp::ShardingStrategy::FullShard,
          std::shared_ptr<fsdp::EngineHooks> hooks = nullptr)
      : inputs_(make_inputs(spec, rank, kDistinctInputs)),
        trainer_(with_strategy(spec.train, strategy), rank, world, hooks_list(std::move(hooks))) {}

  /// One training step on input `index`; returns the loss.
  double step(int index) {
    return trainer_.step(index, inputs_[static_cast<size_t>(index % kDistinctInputs)]).item<double>();
  }

  /// The parts of a step, for loops of several micro-batches per step.
  void zero_grad(int index) { trainer_.zero_grad(index); }
  void forward_backward(int index) {
    trainer_.backward(trainer_.forward_loss(inputs_[static_cast<size_t>(index % kDistinctInputs)]));
  }
  void optimizer_step() { trainer_.optimizer_step(); }

  fsdp::Engine* engine() { return trainer_.engine(); }
  scenarios::Scenario& scenario() { return trainer_.scenario(); }
  const std::vector<at::Tensor>& params() const { return trainer_.params(); }

 private:
  static scenarios::TrainConfig with_strategy(scenarios::TrainConfig train, fsdp::ShardingStrategy strategy) {
    train.strategy = strategy;
    return train;
  }
  static std::vector<std::shared_ptr<fsdp::EngineHooks>> hooks_list(std::shared_ptr<fsdp::EngineHooks> hooks) {
    if (!hooks) return {};
    return {std::move(hooks)};
  }

  std::vector<std::vector<at::Tensor>> inputs_;
  scenarios::Trainer trainer_;
};

/// Per timed step: the last rank's end minus the first rank's start, in ms.
std::vector<double> step_durations_ms(const std::vector<std::vector<int64_t>>& starts,
                                      const std::vector<std::vector<int64_t>>& ends, int warmup) {
  std::vector<double> durations;
  for (auto i = static_cast<size_t>(warmup); i < starts.front().size(); ++i) {
    int64_t first_start = INT64_MAX, last_end = INT64_MIN;
    for (size_t r = 0; r < starts.size(); ++r) {
      first_start = std::min(first_start, starts[r][i]);
      last_end = std::max(last_end, ends[r][i]);
    }
    durations.push_back(ns_to_ms(last_end - first_start));
  }
  return durations;
}

// ---------------------------------------------------------------------------
// 1. World size 1: engine vs plain

/// Runs `rank_main` on a world of `options`; the first line of what failed, or "".
std::string run_world(const sim::WorldOptions& options, const std::function<void(sim::RankContext&)>& rank_main) {
  sim::WorldResult outcome;
  try {
    outcome = sim::World(options).run(rank_main);
  } catch (const std::exception& e) {
    return first_line(e.what());
  }
  return outcome.ok() ? "" : first_line(outcome.error_report());
}

/// Runs `run(0)` and `run(1)` once each for iteration `i`, the first of the
/// pair flipping every iteration (neither always runs second, on a warm
/// cache); past the warm-up, appends each one's time (ms) to ms[which].
void time_pair(int i, const Iterations& iterations, const std::function<void(int which)>& run,
               std::vector<double> (&ms)[2]) {
  int64_t ns[2] = {0, 0};
  for (int k = 0; k < 2; ++k) {
    const int which = (i + k) % 2;
    const int64_t start = steady_now_ns();
    run(which);
    ns[which] = steady_now_ns() - start;
  }
  if (i < iterations.warmup) return;
  for (int which = 0; which < 2; ++which) ms[which].push_back(ns_to_ms(ns[which]));
}

struct SingleResult {
  double plain_ms = 0;
  double engine_ms = 0;
  bool losses_equal = true;
  std::string error;
  double overhead() const { return plain_ms > 0 ? engine_ms / plain_ms - 1.0 : 0.0; }
};

SingleResult run_single(const ModelSpec& spec, Iterations iterations, sim::WorldOptions options) {
  SingleResult result;
  options.world_size = 1;
  options.rank_kind = sim::RankKind::Threads;
  std::vector<double> ms[2];  // plain, engine
  result.error = run_world(options, [&](sim::RankContext& ctx) {
    Trainer plain(spec, 0);
    Trainer sharded(spec, 0, ctx.world_group(), fsdp::ShardingStrategy::FullShard);
    for (int i = 0; i < iterations.total(); ++i) {
      double loss[2] = {0, 0};
      time_pair(
          i, iterations, [&](int which) { loss[which] = which == 0 ? plain.step(i) : sharded.step(i); }, ms);
      if (loss[0] != loss[1]) result.losses_equal = false;
    }
  });
  if (!result.error.empty()) return result;
  result.plain_ms = median(ms[0]);
  result.engine_ms = median(ms[1]);
  return result;
}

// ---------------------------------------------------------------------------
// 2 and 3. World N

/// What the theory says of one rank's param memory, from the engine's units.
struct MemoryTheory {
  int64_t shard_bytes = 0;    ///< sum over units of the padded shards this rank holds
  int64_t root_full = 0;      ///< the root unit's full params
  int64_t largest_child = 0;  ///< the largest non-root unit's full params
  int64_t all_full = 0;       ///< every unit's full params
  /// The largest full(u) + full(next) over non-root units consecutive in
  /// fully_shard order (the forward order of these models; backward runs it
  /// in reverse and prefetches the next unit).
  int64_t largest_adjacent_pair = 0;
  /// Unit FQN -> full(u).
  std::map<std::string, int64_t> unit_full;
  /// Gathered bytes at the peak of a step.
  ///   FullShard (reshard after forward, no prefetch): the root keeps its
  ///   params from forward to the end of backward, every other unit is
  ///   gathered alone: root + the largest other unit.
  ///   ShardGradOp: every unit keeps its params from forward to its
  ///   backward, so all of them are gathered at the end of forward.
  int64_t peak_unsharded(fsdp::ShardingStrategy strategy) const {
    return strategy == fsdp::ShardingStrategy::ShardGradOp ? all_full : root_full + largest_child;
  }
  /// Live gathered bytes counting a backward prefetch in flight: while unit
  /// u computes its gradient, the next unit's all-gather buffer exists.
  int64_t peak_with_prefetch(fsdp::ShardingStrategy strategy) const {
    return strategy == fsdp::ShardingStrategy::ShardGradOp ? all_full : root_full + largest_adjacent_pair;
  }
};

MemoryTheory memory_theory(const fsdp::Engine& engine, const ModelSpec& spec) {
  // Full shapes come from an unsharded copy of the model (same FQNs).
  auto reference = scenarios::make_scenario(spec.train.scenario, 0);
  std::unordered_map<std::string, at::Tensor> full;
  for (const auto& item : reference->module()->named_parameters()) full.emplace(item.key(), item.value());
  MemoryTheory theory;
  int64_t previous_child = -1;
  for (const fsdp::Unit* unit : engine.units()) {
    const std::vector<std::string> fqns = unit->param_fqns();
    const std::vector<int64_t> rows = unit->shard_rows();
    int64_t unit_full = 0;
    for (size_t i = 0; i < fqns.size(); ++i) {
      auto found = full.find(fqns[i]);
      if (found == full.end()) throw std::logic_error("unit '" + unit->fqn() + "': unknown param '" + fqns[i] + "'");
      const at::Tensor& param = found->second;
      unit_full += static_cast<int64_t>(param.nbytes());
      const int64_t row_bytes = param.size(0) > 0 ? static_cast<int64_t>(param.nbytes()) / param.size(0) : 0;
      theory.shard_bytes += rows.at(i) * row_bytes;
    }
    theory.all_full += unit_full;
    theory.unit_full[unit->fqn()] = unit_full;
    if (unit->is_root()) {
      theory.root_full = unit_full;
    } else {
      theory.largest_child = std::max(theory.largest_child, unit_full);
      theory.largest_adjacent_pair =
          std::max(theory.largest_adjacent_pair, previous_child < 0 ? unit_full : previous_child + unit_full);
      previous_child = unit_full;
    }
  }
  return theory;
}

struct MultiResult {
  double step_ms = 0;
  int64_t peak_bytes = 0;    ///< Engine::peak_unsharded_bytes(), max over ranks and timed steps
  int64_t issued_bytes = 0;  ///< the same for the full(u) of units issued (all-gather) and not yet freed
  std::string issued_error;  ///< an event of an unknown unit
  MemoryTheory theory;       ///< rank 0's
  bool ran = false;
  std::string error;
};

MultiResult run_multi(const ModelSpec& spec, int world_size, sim::RankKind kind, fsdp::ShardingStrategy strategy,
                      Iterations iterations, sim::WorldOptions options) {
  MultiResult result;
  options.world_size = world_size;
  options.rank_kind = kind;
  const size_t steps = static_cast<size_t>(iterations.total());
  // [rank][step]: each rank writes its own row only.
  std::vector<std::vector<int64_t>> starts(world_size, std::vector<int64_t>(steps));
  std::vector<std::vector<int64_t>> ends(world_size, std::vector<int64_t>(steps));
  std::vector<std::vector<int64_t>> peaks(world_size, std::vector<int64_t>(steps));
  std::vector<std::vector<std::vector<std::pair<std::string, int>>>> events(
      world_size, std::vector<std::vector<std::pair<std::string, int>>>(steps));
  MemoryTheory theory;
  result.error = run_world(options, [&](sim::RankContext& ctx) {
    const int rank = ctx.rank();
    auto gathers = std::make_shared<GatherEvents>();
    Trainer trainer(spec, rank, ctx.world_group(), strategy, gathers);
    fsdp::Engine& engine = *trainer.engine();
    for (size_t i = 0; i < steps; ++i) {
      ctx.world_group()->barrier()->wait();
      engine.reset_peak_unsharded_bytes();
      gathers->take();
      starts[rank][i] = steady_now_ns();
      trainer.step(static_cast<int>(i));
      ends[rank][i] = steady_now_ns();
      peaks[rank][i] = engine.peak_unsharded_bytes();
      events[rank][i] = gathers->take();
    }
    if (rank == 0) theory = memory_theory(engine, spec);
  });
  if (!result.error.empty()) return result;
  std::vector<double> durations;
  for (size_t i = static_cast<size_t>(iterations.warmup); i < steps; ++i) {
    int64_t first_start = INT64_MAX, last_end = INT64_MIN;
    for (int r = 0; r < world_size; ++r) {
      first_start = std::min(first_start, starts[r][i]);
      last_end = std::max(last_end, ends[r][i]);
      result.peak_bytes = std::max(result.peak_bytes, peaks[r][i]);
      int64_t live = 0;
      for (const auto& [unit, sign] : events[r][i]) {
        auto found = theory.unit_full.find(unit);
        if (found == theory.unit_full.end()) {
          result.issued_error = "event of unknown unit '" + unit + "'";
          continue;
        }
        live += sign * found->second;
        result.issued_bytes = std::max(result.issued_bytes, live);
      }
    }
    durations.push_back(ns_to_ms(last_end - first_start));
  }
  result.step_ms = median(durations);
  result.theory = theory;
  result.ran = true;
  return result;
}

/// The plain model alone on the calling thread: median step in ms.
double plain_step_ms(const ModelSpec& spec, Iterations iterations) {
  Trainer plain(spec, 0);
  std::vector<double> samples;
  for (int i = 0; i < iterations.total(); ++i) {
    const int64_t start = steady_now_ns();
    plain.step(i);
    const int64_t end = steady_now_ns();
    if (i >= iterations.warmup) samples.push_back(ns_to_ms(end - start));
  }
  return median(samples);
}

// ---------------------------------------------------------------------------
// Sections

struct Report {
  bool failed = false;
};

std::string engine_defaults() {
  const fsdp::EngineOptions defaults;
  return std::string("backward_prefetch ") + fsdp::to_string(defaults.backward_prefetch) + ", forward_prefetch " +
         (defaults.forward_prefetch ? "on" : "off") + ", max " + std::to_string(defaults.max_prefetches_in_flight) +
         " in flight";
}

std::string model_details(const ModelSpec& spec) {
  Trainer plain(spec, 0);
  int64_t params = 0;
  for (const auto& param : scenarios::unique_parameters(*plain.scenario().module())) params += param.numel();
  std::string input =
      spec.train.scenario.name == "transformer"
          ? fmt::format("src ({}, {}) + tgt ({}, {}) token ids", spec.src_len, spec.batch, spec.tgt_len, spec.batch)
          : fmt::format("input ({}, {})", spec.batch, spec.train.scenario.mlp_dim);
  return fmt::format("  {:<16} {:9} params ({:.1f} KiB), {} units, {}\n", spec.label, params,
                     kib(params * static_cast<int64_t>(sizeof(float))), plain.scenario().sharded_blocks() + 1, input);
}

void section_single(const Config& config, Report& report) {
  progress("[1/6] world size 1: engine (FullShard, one thread rank) vs the plain model ...");
  const int64_t started = steady_now_ns();
  std::vector<SingleResult> results;
  for (const auto& spec : config.models) {
    results.push_back(run_single(spec, spec.single.value_or(config.single), config.world));
    if (!results.back().error.empty()) report.failed = true;
  }
  std::cout << "\n== 1. world size 1: engine step vs plain step, same thread, same data ==\n"
            << "  step = zero_grad (set to none) + forward + backward + SGD (momentum) step, float32.\n"
            << "  plain: the same scenario module with no engine (fsdp::call is a plain forward),\n"
            << "         loss.backward(). engine: fully_shard (FullShard) over a world of 1 thread rank.\n"
            << "  The two alternate step by step on one thread (order flipped every step); medians over the\n"
            << "  timed steps after the warm-up (steps column: warm-up + timed, each). overhead = engine / plain - 1.\n"
            << "  same loss: plain and engine losses are bitwise equal on every step (world 1 moves no data).\n\n";
  for (const auto& spec : config.models) std::cout << model_details(spec);
  std::cout << "\n"
            << fmt::format("  {:<16} {:>10} {:>10} {:>9} {:>9} {:>7}\n", "model", "plain(ms)", "engine(ms)", "overhead",
                           "same loss", "steps");
  double worst = -1e9;
  std::string worst_label;
  bool any = false;
  for (size_t m = 0; m < config.models.size(); ++m) {
    const auto& r = results[m];
    const auto& label = config.models[m].label;
    if (!r.error.empty()) {
      std::cout << fmt::format("  {:<16} FAILED: {}\n", label, r.error);
      continue;
    }
    const Iterations iterations = config.models[m].single.value_or(config.single);
    std::cout << fmt::format("  {:<16} {:10.3f} {:10.3f} {:+8.1f}% {:>9} {:>7}\n", label, r.plain_ms, r.engine_ms,
                             100 * r.overhead(), r.losses_equal ? "yes" : "NO",
                             fmt::format("{}+{}", iterations.warmup, iterations.timed));
    if (r.overhead() > worst) {
      worst = r.overhead();
      worst_label = label;
    }
    any = true;
  }
  std::string target = fmt::format("target: world-size-1 overhead < {:.0f}%: ", 100 * kTargetOverhead);
  if (any) {
    target += fmt::format("{} ({:.1f}%, worst of {} models: {})", worst < kTargetOverhead ? "PASS" : "MISS",
                          100 * worst, config.models.size(), worst_label);
    if (config.quick) target += " [--quick: tiny models, per-call overhead dominates]";
  } else {
    target += "NOT MEASURED (every model failed)";
  }
  std::cout << "\n"
            << target << "\n"
            << fmt::format("(section 1 took {:.2f} s)\n", seconds_since(started)) << std::endl;
}

using MultiKey = std::tuple<size_t, int, sim::RankKind, fsdp::ShardingStrategy>;  // model, world, kind, strategy

void section_multi(const Config& config, Report& report, std::map<MultiKey, MultiResult>& results) {
  std::string worlds;
  for (int n : config.worlds) worlds += (worlds.empty() ? "" : ", ") + std::to_string(n);
  progress("[2/6] world sizes " + worlds + ": thread and fiber ranks, FullShard and ShardGradOp ...");
  const int64_t started = steady_now_ns();
  std::vector<double> plain(config.models.size());
  for (size_t m = 0; m < config.models.size(); ++m) {
    const auto& spec = config.models[m];
    if (!spec.multi) continue;
    try {
      plain[m] = plain_step_ms(spec, config.multi);
    } catch (const std::exception& e) {
      std::cout << "  plain " << spec.label << " failed: " << first_line(e.what()) << "\n";
      report.failed = true;
    }
    for (int n : config.worlds) {
      for (fsdp::ShardingStrategy strategy : kStrategies) {
        for (sim::RankKind kind : kKinds) {
          MultiResult r = run_multi(spec, n, kind, strategy, config.multi, config.world);
          if (!r.error.empty()) report.failed = true;
          results[{m, n, kind, strategy}] = r;
        }
      }
    }
  }
  std::cout << "\n== 2. world size N: step time on fake ranks vs the plain model ==\n"
            << "  Every rank trains on its own batch of the same size as the plain model's (per-rank work =\n"
            << "  one plain step + the engine's gathers and reductions). step = median over " << config.multi.timed
            << " timed steps after\n"
            << "  " << config.multi.warmup
            << " warm-up step(s) of (last rank's end - first rank's start), each step started from a barrier.\n"
            << "  plain = the plain model alone on one thread, measured right before the model's rows.\n"
            << "  ATen runs 1 intra-op thread per rank and the ranks share this machine's "
            << std::thread::hardware_concurrency() << " cores, so compute\n"
            << "  serializes: fiber ranks (one OS thread) take ~N x the per-rank work, thread ranks ~N/cores x\n"
            << "  at best (more when the machine is busy). x N*plain = step / (N x plain): 1.0 = fully serial\n"
            << "  with no engine cost; below 1 = thread ranks overlapping on the cores.\n"
            << "  engine options: the defaults (" << engine_defaults() << ").\n";
  for (size_t m = 0; m < config.models.size(); ++m) {
    if (!config.models[m].multi) {
      std::cout << "\n  " << config.models[m].label << ": world size 1 only (see section 1)\n";
      continue;
    }
    std::cout << "\n  " << config.models[m].label << fmt::format(": plain step {:.3f} ms\n", plain[m])
              << fmt::format("  {:>5} {:<12} {:<8} {:>10} {:>9} {:>10}\n", "world", "strategy", "ranks", "step(ms)",
                             "x plain", "x N*plain");
    for (int n : config.worlds) {
      for (fsdp::ShardingStrategy strategy : kStrategies) {
        for (sim::RankKind kind : kKinds) {
          const MultiResult& r = results[{m, n, kind, strategy}];
          if (!r.error.empty()) {
            std::cout << fmt::format("  {:5} {:<12} {:<8} FAILED: {}\n", n, short_name(strategy), sim::to_string(kind),
                                     r.error);
            continue;
          }
          const double x = plain[m] > 0 ? r.step_ms / plain[m] : 0.0;
          std::cout << fmt::format("  {:5} {:<12} {:<8} {:10.3f} {:9.2f} {:10.2f}\n", n, short_name(strategy),
                                   sim::to_string(kind), r.step_ms, x, x / n);
        }
      }
    }
  }
  std::cout << fmt::format("(section 2 took {:.2f} s)\n", seconds_since(started)) << std::endl;
}

void section_memory(const Config& config, const std::map<MultiKey, MultiResult>& results) {
  progress("[3/6] peak gathered-param bytes per rank vs theory (from the section 2 runs) ...");
  std::cout << "\n== 3. peak unsharded (gathered) param bytes per rank over a step vs theory ==\n"
            << "  peak = Engine::peak_unsharded_bytes() over one step (reset before it), max over ranks and\n"
            << "  timed steps: the full params of the units gathered at once (a unit counts from the wait of\n"
            << "  its all-gather to its reshard; not shards, grads, activations or all-gather buffers).\n"
            << "  full(u) = unit u's params at full size (a tied param once). theory, as the counter counts:\n"
            << "    FullShard   (reshard after forward; the root unit keeps its params until the end of\n"
            << "                 backward; one other unit at a time): full(root) + max_u full(u), u non-root\n"
            << "    ShardGradOp (params kept from forward to backward): sum over all units of full(u)\n"
            << "  ratio = peak / theory. shards = the padded shards one rank holds (ceil(dim0 / N) rows per\n"
            << "  param); total = shards + peak vs shards + theory: a rank's param memory at the peak.\n"
            << "  issued = the same peak, but a unit counts from the ISSUE of its all-gather (EngineHooks\n"
            << "    on_unshard, a prefetch included) to its reshard: the all-gather buffer is live memory.\n"
            << "  +prefetch = theory for `issued` with the engine defaults' backward prefetch: while unit u\n"
            << "    computes its gradient the next unit's gather is in flight, so for FullShard\n"
            << "    full(root) + max over consecutive non-root units of full(u) + full(next) (consecutive in\n"
            << "    fully_shard order, the forward order of these models); ShardGradOp as above.\n"
            << "  From thread ranks; fibers = the fiber ranks' peak and issued equal the threads' (yes/NO).\n";
  for (size_t m = 0; m < config.models.size(); ++m) {
    if (!config.models[m].multi) continue;
    std::cout << "\n  " << config.models[m].label << "\n"
              << fmt::format("  {:>5} {:<12} {:>9} {:>9} {:>9} {:>6} {:>9} {:>9} {:>9} {:>9} {:>6}\n", "world",
                             "strategy", "shards", "peak", "theory", "ratio", "total", "theory", "issued", "+prefetch",
                             "fibers")
              << fmt::format("  {:>5} {:<12} {:>9} {:>9} {:>9} {:>6} {:>9} {:>9} {:>9} {:>9} {:>6}\n", "", "", "KiB",
                             "KiB", "KiB", "", "KiB", "KiB", "KiB", "KiB", "");
    for (int n : config.worlds) {
      for (fsdp::ShardingStrategy strategy : kStrategies) {
        auto found = results.find({m, n, sim::RankKind::Threads, strategy});
        if (found == results.end() || !found->second.ran) {
          std::cout << fmt::format("  {:5} {:<12} {:>10}\n", n, short_name(strategy), "not measured");
          continue;
        }
        const MultiResult& r = found->second;
        const int64_t theory = r.theory.peak_unsharded(strategy);
        auto fibers = results.find({m, n, sim::RankKind::Fibers, strategy});
        const char* same = fibers == results.end() || !fibers->second.ran ? "-"
                           : fibers->second.peak_bytes == r.peak_bytes && fibers->second.issued_bytes == r.issued_bytes
                               ? "yes"
                               : "NO";
        std::cout << fmt::format(
            "  {:5} {:<12} {:9.1f} {:9.1f} {:9.1f} {:6.3f} {:9.1f} {:9.1f} {:9.1f} {:9.1f} {:>6}\n", n,
            short_name(strategy), kib(r.theory.shard_bytes), kib(r.peak_bytes), kib(theory),
            theory > 0 ? static_cast<double>(r.peak_bytes) / static_cast<double>(theory) : 0.0,
            kib(r.theory.shard_bytes + r.peak_bytes), kib(r.theory.shard_bytes + theory), kib(r.issued_bytes),
            kib(r.theory.peak_with_prefetch(strategy)), same);
        if (!r.issued_error.empty()) std::cout << "        issued: " << r.issued_error << "\n";
      }
    }
  }
  std::cout << std::endl;
}

// ---------------------------------------------------------------------------
// 4. Mixed precision

// Bytes one rank's all-gathers (output) and reduce-scatters (input) move, in
// the dtype each collective runs in.
class ByteCounter final : public DefaultCommHooks {
 public:
  void before(const CollectiveDesc& desc) override {
    const auto element = static_cast<int64_t>(c10::elementSize(desc.dtype));
    if (desc.op == CollectiveOp::AllGather) {
      gathered += desc.output_numel() * element;
      ++gathers;
    }
    if (desc.op == CollectiveOp::ReduceScatter) {
      reduced += desc.input_numel() * element;
      ++reductions;
    }
  }
  void reset() { gathered = reduced = gathers = reductions = 0; }
  int64_t gathered = 0;
  int64_t reduced = 0;
  int64_t gathers = 0;
  int64_t reductions = 0;
};

struct MixedResult {
  double step_ms = 0;
  double gathered_per_step = 0;  // rank 0's bytes per timed step
  double reduced_per_step = 0;
  std::string error;
};

MixedResult run_mixed(ModelSpec spec, const fsdp::MixedPrecisionPolicy& mp, int world_size, Iterations iterations,
                      sim::WorldOptions options) {
  spec.train.mp_policy = mp;
  options.world_size = world_size;
  options.rank_kind = sim::RankKind::Threads;
  const auto steps = static_cast<size_t>(iterations.total());
  std::vector<std::vector<int64_t>> starts(world_size, std::vector<int64_t>(steps));
  std::vector<std::vector<int64_t>> ends(world_size, std::vector<int64_t>(steps));
  MixedResult result;
  std::pair<int64_t, int64_t> bytes;
  result.error = run_world(options, [&](sim::RankContext& ctx) {
    const int rank = ctx.rank();
    auto counter = std::make_shared<ByteCounter>();
    auto group = std::make_shared<HookedProcessGroup>(ctx.world_group(), counter);
    Trainer trainer(spec, rank, group, fsdp::ShardingStrategy::FullShard);
    for (size_t i = 0; i < steps; ++i) {
      ctx.world_group()->barrier()->wait();
      if (i == static_cast<size_t>(iterations.warmup)) counter->reset();
      starts[rank][i] = steady_now_ns();
      trainer.step(static_cast<int>(i));
      ends[rank][i] = steady_now_ns();
    }
    if (rank == 0) bytes = {counter->gathered, counter->reduced};
  });
  if (!result.error.empty()) return result;
  result.step_ms = median(step_durations_ms(starts, ends, iterations.warmup));
  result.gathered_per_step = static_cast<double>(bytes.first) / iterations.timed;
  result.reduced_per_step = static_cast<double>(bytes.second) / iterations.timed;
  return result;
}

struct NamedPolicy {
  const char* name;
  fsdp::MixedPrecisionPolicy mp;
};

std::vector<NamedPolicy> mixed_policies() {
  fsdp::MixedPrecisionPolicy bf16;
  bf16.param_dtype = at::kBFloat16;
  bf16.reduce_dtype = at::kFloat;
  fsdp::MixedPrecisionPolicy bf16_bf16 = bf16;
  bf16_bf16.reduce_dtype = at::kBFloat16;
  return {{"fp32", {}}, {"bf16/fp32", bf16}, {"bf16/bf16", bf16_bf16}};
}

void section_mixed(const Config& config, Report& report) {
  const int world = config.worlds.front();
  progress("[4/6] mixed precision vs fp32 at world " + std::to_string(world) + " ...");
  const int64_t started = steady_now_ns();
  const std::vector<NamedPolicy> policies = mixed_policies();
  std::cout << "\n== 4. mixed precision (mp_policy) vs fp32: world " << world << ", FullShard, thread ranks ==\n"
            << "  policy = param_dtype/reduce_dtype on every unit; the shards and the optimiser stay fp32.\n"
            << "  step as in section 2 (median of " << config.multi.timed
            << " timed steps); gathered / reduced = rank 0's all-gather output and reduce-scatter input\n"
            << "  bytes per step, in the collective's dtype. The policies run back to back, twice, in\n"
            << "  alternating order (step = the mean of the two medians). x fp32 = the ratio to the fp32 row.\n"
            << "  CPU bf16 matmuls are not faster than fp32 here (no bf16 units): the bytes are the point.\n"
            << "  mlp_stack only: the transformer adds fp32 buffers to bf16 activations (buffers are not cast).\n";
  for (const auto& spec : config.models) {
    // The transformer adds fp32 buffers (BatchNorm statistics) to bf16
    // activations, which ATen refuses; FSDP2 casts no buffers either.
    if (!spec.multi || spec.train.scenario.name != "mlp_stack") continue;
    std::vector<MixedResult> results(policies.size());
    for (int round = 0; round < 2; ++round) {
      for (size_t k = 0; k < policies.size(); ++k) {
        const size_t p = round == 0 ? k : policies.size() - 1 - k;
        MixedResult r = run_mixed(spec, policies[p].mp, world, config.multi, config.world);
        if (!r.error.empty()) {
          results[p].error = r.error;
          report.failed = true;
          continue;
        }
        results[p].step_ms += r.step_ms / 2;
        results[p].gathered_per_step = r.gathered_per_step;
        results[p].reduced_per_step = r.reduced_per_step;
      }
    }
    std::cout << "\n  " << spec.label << "\n"
              << fmt::format("  {:<10} {:>9} {:>7} {:>13} {:>7} {:>13} {:>7}\n", "policy", "step(ms)", "x fp32",
                             "gathered KiB", "x fp32", "reduced KiB", "x fp32");
    const MixedResult& base = results[0];
    auto ratio = [](double a, double b) { return b > 0 ? a / b : 0.0; };
    for (size_t p = 0; p < policies.size(); ++p) {
      const MixedResult& r = results[p];
      if (!r.error.empty()) {
        std::cout << fmt::format("  {:<10} FAILED: {}\n", policies[p].name, r.error);
        continue;
      }
      std::cout << fmt::format("  {:<10} {:9.3f} {:7.2f} {:13.1f} {:7.3f} {:13.1f} {:7.3f}\n", policies[p].name,
                               r.step_ms, ratio(r.step_ms, base.step_ms), r.gathered_per_step / 1024.0,
                               ratio(r.gathered_per_step, base.gathered_per_step), r.reduced_per_step / 1024.0,
                               ratio(r.reduced_per_step, base.reduced_per_step));
    }
  }
  std::cout << fmt::format("(section 4 took {:.2f} s)\n", seconds_since(started)) << std::endl;
}

// ---------------------------------------------------------------------------
// 5. Gradient accumulation and clip_grad_norm_

constexpr int kMicroBatches = 3;

/// How a step's first kMicroBatches - 1 micro-batches run (the last one
/// always syncs and reshards after backward).
struct AccumulationMode {
  const char* name;
  bool sync;                    ///< set_requires_gradient_sync on the early micro-batches
  bool reshard_after_backward;  ///< set_reshard_after_backward on the early micro-batches
};

struct AccumulationResult {
  double step_ms = 0;
  int64_t peak_bytes = 0;  ///< Engine::peak_unsharded_bytes(), max over ranks and timed steps
  double gathers_per_step = 0;
  double reductions_per_step = 0;
  MemoryTheory theory;
  std::string error;
};

AccumulationResult run_accumulation(const ModelSpec& spec, const AccumulationMode& mode, int world_size,
                                    Iterations iterations, sim::WorldOptions options) {
  options.world_size = world_size;
  options.rank_kind = sim::RankKind::Threads;
  const auto steps = static_cast<size_t>(iterations.total());
  std::vector<std::vector<int64_t>> starts(world_size, std::vector<int64_t>(steps));
  std::vector<std::vector<int64_t>> ends(world_size, std::vector<int64_t>(steps));
  std::vector<int64_t> peaks(world_size, 0);
  AccumulationResult result;
  std::pair<int64_t, int64_t> counts;
  result.error = run_world(options, [&](sim::RankContext& ctx) {
    const int rank = ctx.rank();
    auto counter = std::make_shared<ByteCounter>();
    auto group = std::make_shared<HookedProcessGroup>(ctx.world_group(), counter);
    Trainer trainer(spec, rank, group, fsdp::ShardingStrategy::FullShard);
    fsdp::Engine& engine = *trainer.engine();
    for (size_t i = 0; i < steps; ++i) {
      ctx.world_group()->barrier()->wait();
      const bool timed = i >= static_cast<size_t>(iterations.warmup);
      if (i == static_cast<size_t>(iterations.warmup)) counter->reset();
      engine.reset_peak_unsharded_bytes();
      starts[rank][i] = steady_now_ns();
      trainer.zero_grad(static_cast<int>(i));
      for (int k = 0; k < kMicroBatches; ++k) {
        const bool last = k == kMicroBatches - 1;
        engine.set_requires_gradient_sync(last || mode.sync);
        engine.set_reshard_after_backward(last || mode.reshard_after_backward);
        trainer.forward_backward(static_cast<int>(i) * kMicroBatches + k);
      }
      trainer.optimizer_step();
      ends[rank][i] = steady_now_ns();
      if (timed) peaks[rank] = std::max(peaks[rank], engine.peak_unsharded_bytes());
    }
    if (rank == 0) {
      result.theory = memory_theory(engine, spec);
      counts = {counter->gathers, counter->reductions};
    }
  });
  if (!result.error.empty()) return result;
  result.step_ms = median(step_durations_ms(starts, ends, iterations.warmup));
  result.peak_bytes = *std::max_element(peaks.begin(), peaks.end());
  result.gathers_per_step = static_cast<double>(counts.first) / iterations.timed;
  result.reductions_per_step = static_cast<double>(counts.second) / iterations.timed;
  return result;
}

void section_accumulation(const Config& config, Report& report) {
  const int world = config.worlds.front();
  progress("[5/6] gradient accumulation and clip_grad_norm_ at world " + std::to_string(world) + " ...");
  const int64_t started = steady_now_ns();
  const std::vector<AccumulationMode> modes = {{"sync every micro-batch", true, true},
                                               {"no sync, reshard", false, true},
                                               {"no sync, keep gathered", false, false}};
  std::cout << "\n== 5a. gradient accumulation: world " << world << ", FullShard, thread ranks ==\n"
            << "  A step = zero_grad + " << kMicroBatches
            << " micro-batches (forward + backward) + SGD step. The first " << kMicroBatches - 1
            << " micro-batches run with\n"
            << "  set_requires_gradient_sync / set_reshard_after_backward as the mode says; the last syncs\n"
            << "  and reshards. peak = Engine::peak_unsharded_bytes() (gathered params) over a step, max over\n"
            << "  ranks and timed steps; theory: resharding after backward: full(root) + max_u full(u) as in\n"
            << "  section 3; keeping params gathered: every unit's full(u) (all stay gathered from the first\n"
            << "  micro-batch's backward to the last). gathers / reductions = rank 0's all-gathers and\n"
            << "  reduce-scatters per step. step: median of " << config.multi.timed
            << " timed steps; x sync = ratio to the first row.\n";
  for (const auto& spec : config.models) {
    if (!spec.multi || spec.train.scenario.name != "mlp_stack") continue;
    std::cout << "\n  " << spec.label << "\n"
              << fmt::format("  {:<24} {:>9} {:>7} {:>9} {:>9} {:>6} {:>8} {:>8}\n", "mode", "step(ms)", "x sync",
                             "peak KiB", "theory", "ratio", "gathers", "reduces");
    double sync_ms = 0;
    for (const AccumulationMode& mode : modes) {
      const AccumulationResult r = run_accumulation(spec, mode, world, config.multi, config.world);
      if (!r.error.empty()) {
        report.failed = true;
        std::cout << fmt::format("  {:<24} FAILED: {}\n", mode.name, r.error);
        continue;
      }
      if (mode.sync) sync_ms = r.step_ms;
      const int64_t theory =
          mode.reshard_after_backward ? r.theory.peak_unsharded(fsdp::ShardingStrategy::FullShard) : r.theory.all_full;
      std::cout << fmt::format("  {:<24} {:9.3f} {:7.2f} {:9.1f} {:9.1f} {:6.3f} {:8.1f} {:8.1f}\n", mode.name,
                               r.step_ms, sync_ms > 0 ? r.step_ms / sync_ms : 0.0, kib(r.peak_bytes), kib(theory),
                               theory > 0 ? static_cast<double>(r.peak_bytes) / static_cast<double>(theory) : 0.0,
                               r.gathers_per_step, r.reductions_per_step);
    }
  }
  std::cout << fmt::format("(section 5a took {:.2f} s)\n", seconds_since(started)) << std::endl;
}

constexpr double kClipMaxNorm = 1e-3;  // below these models' grad norms: every step scales its grads

struct ClipResult {
  double plain_clip_ms = 0;   ///< torch::nn::utils::clip_grad_norm_ on the plain model (world 1)
  double engine_clip_ms = 0;  ///< fsdp::clip_grad_norm_ at world 1
  double world_clip_ms = 0;   ///< fsdp::clip_grad_norm_ at world N, slowest rank
  double world_step_ms = 0;   ///< the whole step at world N (clip included)
  double worst_relative = 0;  ///< world 1: max over steps of |engine - plain| / plain norm
  std::string error;
};

/// World 1: the plain model and the engine train the same data on one thread;
/// each step times both clips (order flipped every step) and compares norms.
void measure_clip_world1(const ModelSpec& spec, Iterations iterations, const sim::WorldOptions& base, ClipResult& out) {
  sim::WorldOptions options = base;
  options.world_size = 1;
  options.rank_kind = sim::RankKind::Threads;
  std::vector<double> ms[2];  // plain, engine
  out.error = run_world(options, [&](sim::RankContext& ctx) {
    Trainer plain(spec, 0);
    Trainer sharded(spec, 0, ctx.world_group(), fsdp::ShardingStrategy::FullShard);
    for (int i = 0; i < iterations.total(); ++i) {
      double norm[2] = {0, 0};
      for (Trainer* t : {&plain, &sharded}) {
        t->zero_grad(i);
        t->forward_backward(i);
      }
      time_pair(
          i, iterations,
          [&](int which) {
            norm[which] = which == 0 ? torch::nn::utils::clip_grad_norm_(plain.params(), kClipMaxNorm)
                                     : fsdp::clip_grad_norm_(*sharded.engine(), kClipMaxNorm);
          },
          ms);
      plain.optimizer_step();
      sharded.optimizer_step();
      if (norm[0] > 0) out.worst_relative = std::max(out.worst_relative, std::abs(norm[1] - norm[0]) / norm[0]);
    }
  });
  if (!out.error.empty()) return;
  out.plain_clip_ms = median(ms[0]);
  out.engine_clip_ms = median(ms[1]);
}

/// World N: every rank clips its shards after backward; the clip's time is
/// the slowest rank's (it ends with an all-reduce).
void measure_clip_world(const ModelSpec& spec, int world_size, Iterations iterations, sim::WorldOptions options,
                        ClipResult& out) {
  options.world_size = world_size;
  options.rank_kind = sim::RankKind::Threads;
  const auto steps = static_cast<size_t>(iterations.total());
  std::vector<std::vector<int64_t>> starts(world_size, std::vector<int64_t>(steps));
  std::vector<std::vector<int64_t>> ends(world_size, std::vector<int64_t>(steps));
  std::vector<std::vector<int64_t>> clip_ns(world_size, std::vector<int64_t>(steps));
  out.error = run_world(options, [&](sim::RankContext& ctx) {
    const int rank = ctx.rank();
    Trainer trainer(spec, rank, ctx.world_group(), fsdp::ShardingStrategy::FullShard);
    for (size_t i = 0; i < steps; ++i) {
      ctx.world_group()->barrier()->wait();
      starts[rank][i] = steady_now_ns();
      trainer.zero_grad(static_cast<int>(i));
      trainer.forward_backward(static_cast<int>(i));
      const int64_t clip_start = steady_now_ns();
      fsdp::clip_grad_norm_(*trainer.engine(), kClipMaxNorm);
      clip_ns[rank][i] = steady_now_ns() - clip_start;
      trainer.optimizer_step();
      ends[rank][i] = steady_now_ns();
    }
  });
  if (!out.error.empty()) return;
  std::vector<double> clips;
  for (auto i = static_cast<size_t>(iterations.warmup); i < steps; ++i) {
    int64_t slowest = 0;
    for (int r = 0; r < world_size; ++r) slowest = std::max(slowest, clip_ns[r][i]);
    clips.push_back(ns_to_ms(slowest));
  }
  out.world_clip_ms = median(clips);
  out.world_step_ms = median(step_durations_ms(starts, ends, iterations.warmup));
}

void section_clip(const Config& config, Report& report) {
  const int world = config.worlds.front();
  const int64_t started = steady_now_ns();
  std::cout << "\n== 5b. clip_grad_norm_ (max_norm " << kClipMaxNorm << ", L2) over shards vs the plain model ==\n"
            << "  world 1: torch::nn::utils::clip_grad_norm_ on the plain model and fsdp::clip_grad_norm_ on\n"
            << "  the engine, same grads, alternating on one thread: medians of their times; x plain = ratio;\n"
            << "  rel diff = the largest |norm(engine) - norm(plain)| / norm(plain) over the steps (the sum\n"
            << "  order differs: shards in double vs LibTorch's per-param norms). world " << world
            << ": fsdp::clip_grad_norm_\n"
            << "  on thread ranks (slowest rank, one all-reduce included) and its share of the step.\n";
  for (const auto& spec : config.models) {
    if (!spec.multi) continue;
    ClipResult r;
    measure_clip_world1(spec, config.multi, config.world, r);
    if (r.error.empty()) measure_clip_world(spec, world, config.multi, config.world, r);
    std::cout << "\n  " << spec.label << "\n";
    if (!r.error.empty()) {
      report.failed = true;
      std::cout << "  FAILED: " << r.error << "\n";
      continue;
    }
    std::cout << fmt::format("  {:<34} {:9.3f} ms\n", "plain clip_grad_norm_ (world 1)", r.plain_clip_ms)
              << fmt::format("  {:<34} {:9.3f} ms  x plain {:.2f}  rel diff {:.1e}\n",
                             "fsdp::clip_grad_norm_ (world 1)", r.engine_clip_ms,
                             r.plain_clip_ms > 0 ? r.engine_clip_ms / r.plain_clip_ms : 0.0, r.worst_relative)
              << fmt::format("  {:<34} {:9.3f} ms  {:.1f}% of the {:.3f} ms step\n",
                             fmt::format("fsdp::clip_grad_norm_ (world {})", world), r.world_clip_ms,
                             r.world_step_ms > 0 ? 100 * r.world_clip_ms / r.world_step_ms : 0.0, r.world_step_ms);
    if (r.worst_relative > 1e-5) {
      report.failed = true;
      std::cout << "  NORMS DISAGREE beyond 1e-5 relative\n";
    }
  }
  std::cout << fmt::format("(section 5b took {:.2f} s)\n", seconds_since(started)) << std::endl;
}

int bench_engine_main(Config config) {
  complete(config);
  return run_benchmark(kProgram, config.quick,
                       "ATen intra-op threads 1 (at::set_num_threads(1): the ranks share the cores), float32",
                       [&config] {
                         Report report;
                         section_single(config, report);
                         std::map<MultiKey, MultiResult> multi;
                         section_multi(config, report, multi);
                         section_memory(config, multi);
                         section_mixed(config, report);
                         section_accumulation(config, report);
                         section_clip(config, report);
                         progress("[6/6] distributed checkpoint save and load vs fwrite ...");
                         tools::CheckpointBenchOptions checkpoint;
                         if (config.quick) {
                           checkpoint.rows = 512;
                           checkpoint.repeats = 1;
                         }
                         if (!tools::section_checkpoint(checkpoint)) report.failed = true;
                         return !report.failed;
                       });
}

}  // namespace

namespace fsdpsim::tools {

void add_bench_engine_command(CLI::App& bench, Command& command) {
  CLI::App* engine = bench.add_subcommand(
      "engine",
      "measure, in one run: the step time (forward + backward + SGD step) of the FSDP engine at world size 1 against "
      "the plain unsharded model; the step time at 2, 4, 8 fake ranks (thread and fiber ranks, FullShard and "
      "ShardGradOp); the peak gathered-param bytes per rank against the theoretical peak; bf16 mixed precision against "
      "fp32 (step time, bytes gathered and reduced); gradient accumulation (peak gathered bytes, step time) and "
      "clip_grad_norm_ against the plain model's; distributed checkpoint save and load throughput (64 MiB of fp32 at "
      "world 2) against one fwrite + fsync of the same bytes, and a resharding load at world 3. Models: mlp_stack (dim "
      "256 "
      "and 512, batch 64; dim 512 at world size 1 only) and transformer (the scenario's model, longer sequences).");
  auto config = std::make_shared<Config>();
  engine->add_flag("--quick", config->quick,
                   "tiny run: mlp_stack dim 32 and a short transformer, 2 steps, world 2 only; an 8 MiB checkpoint");
  engine->callback([config, &command] { command.action = [config] { return bench_engine_main(*config); }; });
}

}  // namespace fsdpsim::tools
