#include "tools/runner.h"
#include "tools/format_util.h"

#include <ATen/ATen.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>
#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>

#include "backends/clock.h"
#include "backends/comm_hooks.h"
#include "backends/errors.h"
#include "backends/gloo/gloo_process_group.h"
#include "backends/observe/chrome_trace.h"
#include "backends/observe/flight_recorder.h"
#include "backends/observe/jsonl.h"
#include "backends/observe/observed_process_group.h"
#include "backends/observe/record.h"
#include "backends/observe/trace_recorder.h"
#include "fsdp/distributed_checkpoint.h"
#include "scenarios/engine_trace.h"
#include "scenarios/models.h"
#include "sim/cost_model.h"
#include "sim/fake_process_group.h"
#include "sim/fiber_autograd.h"
#include "sim/representative_ranks.h"
#include "tools/process_launcher.h"
#include "tools/worker.h"

namespace fsdpsim::tools {

namespace {

using Ms = std::chrono::duration<double, std::milli>;

/// Sleeps in on_reshard: the free of gathered params waits.
class ReshardDelayHooks final : public fsdp::NoEngineHooks {
 public:
  explicit ReshardDelayHooks(std::chrono::nanoseconds delay) : delay_(delay) {}
  void on_reshard(const std::string&, fsdp::TrainingState) override { sim::sleep_for(delay_); }

 private:
  std::chrono::nanoseconds delay_;
};

struct RankStats {
  std::vector<double> losses;
  std::vector<int64_t> step_ns;       // measured (the world's clock: simulated on simulated worlds)
  std::vector<int64_t> wall_step_ns;  // real time
  std::vector<int64_t> exposed_ns;    // simulated worlds
  int64_t peak_unsharded_bytes = 0;
  int64_t model_bytes = 0;  // the rank's sharded params and their grads after the last step
  int64_t first_step = 0;   // the step training began at (a resumed checkpoint's)
  int64_t saved_bytes = 0;  // this rank's checkpoint data written (--save)
};

nlohmann::json to_json(const RankStats& stats) {
  return {{"losses", stats.losses},
          {"step_ns", stats.step_ns},
          {"wall_step_ns", stats.wall_step_ns},
          {"exposed_ns", stats.exposed_ns},
          {"peak_unsharded_bytes", stats.peak_unsharded_bytes},
          {"model_bytes", stats.model_bytes},
          {"first_step", stats.first_step},
          {"saved_bytes", stats.saved_bytes}};
}

RankStats stats_from_json(const nlohmann::json& j) {
  RankStats stats;
  stats.losses = j.at("losses").get<std::vector<double>>();
  stats.step_ns = j.at("step_ns").get<std::vector<int64_t>>();
  stats.wall_step_ns = j.at("wall_step_ns").get<std::vector<int64_t>>();
  stats.exposed_ns = j.at("exposed_ns").get<std::vector<int64_t>>();
  stats.peak_unsharded_bytes = j.at("peak_unsharded_bytes").get<int64_t>();
  stats.model_bytes = j.at("model_bytes").get<int64_t>();
  stats.first_step = j.at("first_step").get<int64_t>();
  stats.saved_bytes = j.at("saved_bytes").get<int64_t>();
  return stats;
}

bool has_comm_delays(const sim::DelayOptions& delays) {
  return delays.before_reduce_scatter.count() > 0 || delays.before_all_gather.count() > 0 ||
         delays.after_all_gather.count() > 0 || (delays.straggler_rank >= 0 && delays.straggler_delay.count() > 0);
}

// One rank's training loop, the same for every backend: the shared trainer,
// with the runner's delays, trace hooks and per-step statistics around it.
// `rank`: the global rank trained; `clock_rank`: its index on `sim_clock`
// (they differ for representative ranks, sim/world.h).
RankStats train_rank(const RunOptions& options, int rank, ProcessGroupPtr world_group, const Clock& clock,
                     sim::SimClock* sim_clock, int clock_rank, const std::shared_ptr<observe::TraceRecorder>& trace,
                     const std::function<void(int step, const RankStats&)>& on_step) {
  if (has_comm_delays(options.delays)) {
    world_group = std::make_shared<HookedProcessGroup>(std::move(world_group),
                                                       std::make_shared<sim::DelayHooks>(options.delays, rank));
  }
  std::vector<std::shared_ptr<fsdp::EngineHooks>> engine_hooks;
  if (trace) engine_hooks.push_back(std::make_shared<scenarios::TraceEngineHooks>(trace, rank, clock));
  if (options.delay_before_reshard_ms > 0) {
    engine_hooks.push_back(std::make_shared<ReshardDelayHooks>(ms_to_ns(options.delay_before_reshard_ms)));
  }
  scenarios::Trainer trainer(options, rank, world_group, std::move(engine_hooks));
  fsdp::Engine& engine = *trainer.engine();
  RankStats stats;
  if (!options.resume_dir.empty()) {
    stats.first_step =
        fsdp::load_checkpoint(options.resume_dir, engine, *trainer.scenario().module(), &trainer.optimizer());
  }
  int64_t start = 0;
  int64_t exposed_before = 0;
  std::chrono::steady_clock::time_point wall_start;
  scenarios::StepCallbacks callbacks;
  callbacks.before_forward = [&](int) {
    start = clock.now_ns();
    exposed_before = sim_clock ? sim_clock->exposed_comm_ns(clock_rank) : 0;
    wall_start = std::chrono::steady_clock::now();
    engine.reset_peak_unsharded_bytes();
  };
  callbacks.after_loss = [&](int, const at::Tensor&) {
    if (options.delay_after_loss_ms > 0) sim::sleep_for(ms_to_ns(options.delay_after_loss_ms));
  };
  callbacks.after_backward = [&](int, const at::Tensor&) {
    if (options.delay_before_step_ms > 0) sim::sleep_for(ms_to_ns(options.delay_before_step_ms));
  };
  callbacks.after_step = [&](int step, const at::Tensor& loss) {
    // The step's times first: reading the loss is the runner's, not the step's (a data-free run has none).
    stats.step_ns.push_back(clock.now_ns() - start);
    stats.wall_step_ns.push_back(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - wall_start).count());
    stats.exposed_ns.push_back(sim_clock ? sim_clock->exposed_comm_ns(clock_rank) - exposed_before : 0);
    if (!options.data_free) stats.losses.push_back(loss.item<double>());  // a meta loss has no value
    stats.peak_unsharded_bytes = std::max(stats.peak_unsharded_bytes, engine.peak_unsharded_bytes());
    if (on_step) on_step(static_cast<int>(step - stats.first_step), stats);
  };
  // The data of step k is the scenario's batch k: a resumed run goes on with
  // the batches the uninterrupted run would have seen.
  for (int i = 0; i < options.steps; ++i) trainer.step(static_cast<int>(stats.first_step) + i, callbacks);
  if (!options.save_dir.empty()) {
    stats.saved_bytes =
        fsdp::save_checkpoint(options.save_dir, engine, *trainer.scenario().module(), &trainer.optimizer(),
                              fsdp::dcp::process_group_coordinator(*world_group), stats.first_step + options.steps);
  }
  for (const at::Tensor& param : trainer.params()) {
    stats.model_bytes += static_cast<int64_t>(param.nbytes());
    if (param.grad().defined()) stats.model_bytes += static_cast<int64_t>(param.grad().nbytes());
  }
  return stats;
}

int64_t median(std::vector<int64_t> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

std::string compute_time_text(const RunOptions& options) {
  switch (options.world.compute_time) {
    case sim::ComputeTime::Measured: return "measured";
    case sim::ComputeTime::Zero: return "zero";
    case sim::ComputeTime::Fixed:
      return fmt::format("{:.3f} us per slice", static_cast<double>(options.world.fixed_compute_ns) / 1000);
    case sim::ComputeTime::OpCosts: return "per op from " + options.op_costs_path;
  }
  return "?";
}

std::string describe(const RunOptions& options) {
  std::ostringstream out;
  out << "scenario " << options.scenario.name << ", " << options.world.world_size << " ranks as "
      << (options.processes ? "processes" : sim::to_string(options.world.rank_kind)) << " on "
      << sim::to_string(options.world.backend) << ", " << fsdp::to_string(options.strategy);
  if (options.strategy == fsdp::ShardingStrategy::HybridShard) {
    out << " " << options.replicate_size << "x" << options.world.world_size / options.replicate_size;
  }
  out << ", prefetch " << fsdp::to_string(options.backward_prefetch) << (options.forward_prefetch ? " + forward" : "")
      << ", " << options.steps << " steps, seed " << options.scenario.seed << (options.data_free ? ", data-free" : "");
  if (options.world.simulated_time) {
    out << ", simulated time (" << options.cost_model << ", compute " << compute_time_text(options) << ")";
  }
  return out.str();
}

void print_progress(std::ostream& out, const RunOptions& options, int step, const RankStats& stats, bool simulated) {
  const std::string loss = stats.losses.empty() ? "n/a (data-free)" : fmt::format("{:.6g}", stats.losses.back());
  std::string line = fmt::format("  step {}/{}  loss(rank 0) {}  {:.2f} ms", step + 1, options.steps, loss,
                                 ns_to_ms(stats.wall_step_ns.back()));
  if (simulated) {
    const double predicted = static_cast<double>(stats.step_ns.back());
    line += fmt::format("  predicted {:.2f} ms, exposed comm {:.2f}%", ns_to_ms(predicted),
                        predicted > 0 ? 100.0 * stats.exposed_ns.back() / predicted : 0.0);
  }
  out << line << std::endl;
}

// <trace>.jsonl, opened before the first record: the recorder streams each
// record to it once final, so the run holds only what is in flight.
std::unique_ptr<std::ofstream> start_trace_stream(const RunOptions& options, observe::TraceRecorder& recorder) {
  const std::string path = options.trace_path + ".jsonl";
  auto file = std::make_unique<std::ofstream>(path, std::ios::binary | std::ios::trunc);
  if (!*file) throw RunFailedError("cannot write the trace to " + path + ": " + std::strerror(errno));
  recorder.stream_to(*file, path);
  return file;
}

// Finishes <trace>.jsonl, then makes the Chrome trace from it.
void write_traces(const RunOptions& options, observe::TraceRecorder& recorder, std::ofstream& jsonl) {
  try {
    recorder.finish_stream();
  } catch (const std::runtime_error& e) {
    throw RunFailedError(e.what());
  }
  jsonl.close();
  std::ifstream lines(options.trace_path + ".jsonl", std::ios::binary);
  std::ofstream chrome(options.trace_path);
  if (!lines || !chrome) {
    throw RunFailedError("cannot write the trace to " + options.trace_path + ": " + std::strerror(errno));
  }
  try {
    observe::write_chrome_trace_from_jsonl(lines, chrome);
  } catch (const std::runtime_error& e) {
    throw RunFailedError("cannot read back " + options.trace_path + ".jsonl: " + e.what());
  }
  if (!chrome.flush()) {
    throw RunFailedError("cannot write the trace to " + options.trace_path + ": " + std::strerror(errno));
  }
}

// One line for a failed world: the failed ranks and the first one's error.
std::string world_failure_summary(const sim::WorldResult& result) {
  std::vector<int> failed;
  const sim::RankOutcome* first = nullptr;
  for (const auto& rank : result.ranks) {
    if (rank.ok) continue;
    failed.push_back(rank.rank);
    if (!first) first = &rank;
  }
  return "the run failed on " + sim::ranks_text(failed) + "; rank " + std::to_string(first->rank) + ": " +
         first_line(first->error);
}

// Peak resident memory of this process (getrusage), in bytes.
int64_t peak_rss_bytes() {
  rusage usage{};
  if (getrusage(RUSAGE_SELF, &usage) != 0) return 0;
  return static_cast<int64_t>(usage.ru_maxrss) * 1024;  // Linux reports KiB
}

// The process's peak RSS over the ranks it ran and what one rank holds: its
// model state (sharded params and grads), its peak of gathered params, its
// stack reservation; and the most trace records it held at once (the rest
// were streamed to the trace file).
void print_memory(std::ostream& out, const RunOptions& options, const std::vector<RankStats>& ranks,
                  size_t trace_records) {
  const auto n = static_cast<int64_t>(ranks.size());
  int64_t model = 0, peak = 0;
  for (const auto& r : ranks) {
    model = std::max(model, r.model_bytes);
    peak = std::max(peak, r.peak_unsharded_bytes);
  }
  if (options.processes) {
    out << "\n  memory: one process per rank (each its own RSS); per rank: sharded params + grads "
        << human_bytes(static_cast<double>(model)) << ", peak gathered params "
        << human_bytes(static_cast<double>(peak));
    return;
  }
  const bool fibers = options.world.rank_kind == sim::RankKind::Fibers;
  const auto stack = static_cast<double>(fibers ? options.world.fiber_stack_bytes : options.world.thread_stack_bytes);
  const auto rss = static_cast<double>(peak_rss_bytes());
  out << "\n  memory: peak RSS " << human_bytes(rss) << " = " << human_bytes(rss / static_cast<double>(n))
      << " per rank; per rank (max): sharded params + grads " << human_bytes(static_cast<double>(model))
      << ", peak gathered params " << human_bytes(static_cast<double>(peak)) << ", " << (fibers ? "fiber" : "thread")
      << " stack reserved " << human_bytes(stack) << "; trace records in memory: peak " << trace_records;
}

// Most lines of a failure report on the terminal; the rest go to a file.
constexpr size_t kFailureGroups = 12;
constexpr size_t kFlightRecorderLines = 40;

// The failed ranks grouped by their error's first line with the numbers
// masked (ranks' messages differ only in them), largest group first, each
// with its ranks, count and the first rank's message.
std::vector<std::string> grouped_failures(const sim::WorldResult& result) {
  struct Group {
    std::vector<int> ranks;
    std::string example;
  };
  std::map<std::string, Group> groups;
  for (const auto& rank : result.ranks) {
    if (rank.ok) continue;
    const std::string line = first_line(rank.error);  // no c10 backtraces
    std::string key;
    for (char c : line) {
      const bool digit = std::isdigit(static_cast<unsigned char>(c)) != 0;
      if (!digit || key.empty() || key.back() != '#') key += digit ? '#' : c;
    }
    Group& group = groups[key];
    if (group.ranks.empty()) group.example = "rank " + std::to_string(rank.rank) + ": " + line;
    group.ranks.push_back(rank.rank);
  }
  std::vector<const Group*> order;
  for (const auto& [key, group] : groups) order.push_back(&group);
  std::stable_sort(order.begin(), order.end(),
                   [](const Group* a, const Group* b) { return a->ranks.size() > b->ranks.size(); });
  std::vector<std::string> lines;
  for (const Group* group : order) {
    lines.push_back(group->ranks.size() == 1
                        ? group->example
                        : sim::ranks_text(group->ranks) + " (" + std::to_string(group->ranks.size()) +
                              " ranks), e.g. " + group->example);
  }
  return lines;
}

// A screenful on `err` at any world size: failures grouped, the head of the
// flight recorder; everything (each rank's whole error, every rank's last
// collectives) in <trace>.failure.txt.
void report_world_failure(const RunOptions& options, const sim::WorldResult& result, std::ostream& err) {
  const std::string dump_path = options.trace_path + ".failure.txt";
  {
    std::ofstream dump(dump_path);
    for (const auto& rank : result.ranks) {
      if (!rank.ok) dump << "rank " << rank.rank << ": " << rank.error << "\n";
    }
    dump << result.flight_recorder;
  }
  err << "fsdpsim: the run failed:\n";
  const std::vector<std::string> groups = grouped_failures(result);
  for (size_t i = 0; i < groups.size() && i < kFailureGroups; ++i) err << groups[i] << "\n";
  if (groups.size() > kFailureGroups) err << "... " << groups.size() - kFailureGroups << " more kinds of failure\n";
  // Where each rank was: its last collectives.
  std::istringstream recorder(result.flight_recorder);
  std::string line;
  size_t shown = 0, hidden = 0;
  while (std::getline(recorder, line)) {
    if (shown < kFlightRecorderLines) {
      err << line << "\n";
      ++shown;
    } else {
      ++hidden;
    }
  }
  if (hidden > 0) err << "... " << hidden << " more lines\n";
  err << "fsdpsim: every rank's error and last collectives: " << dump_path << "\n"
      << "fsdpsim: analyse with 'fsdpsim replay check " << options.trace_path << ".jsonl'" << std::endl;
}

void print_summary(std::ostream& out, const RunOptions& options, const std::vector<RankStats>& ranks,
                   const observe::TraceRecorder* recorder, bool simulated, double wall_seconds) {
  const int n = static_cast<int>(ranks.size());
  out << "\nsummary\n  loss per step (mean over ranks):";
  for (int step = 0; step < options.steps && !options.data_free; ++step) {
    double sum = 0;
    for (const auto& r : ranks) sum += r.losses[step];
    out << fmt::format(" {:.6g}", sum / n);
  }
  if (options.data_free) out << " none (data-free: tensors have shapes, no values)";
  std::vector<int64_t> wall;
  std::vector<int64_t> predicted;
  int64_t exposed = 0;
  int64_t total = 0;
  int64_t peak = 0;
  for (const auto& r : ranks) {
    wall.insert(wall.end(), r.wall_step_ns.begin(), r.wall_step_ns.end());
    predicted.insert(predicted.end(), r.step_ns.begin(), r.step_ns.end());
    for (size_t s = 0; s < r.step_ns.size(); ++s) {
      exposed += r.exposed_ns[s];
      total += r.step_ns[s];
    }
    peak = std::max(peak, r.peak_unsharded_bytes);
  }
  out << fmt::format("\n  step time measured (median over ranks and steps): {:.2f} ms", ns_to_ms(median(wall)));
  if (simulated) {
    out << fmt::format(
        "\n  step time predicted (simulated clock, {}): {:.2f} ms\n  exposed communication: {:.2f}% of the simulated "
        "step time",
        options.cost_model, ns_to_ms(median(predicted)), total > 0 ? 100.0 * exposed / total : 0.0);
  } else {
    out << "\n  exposed communication: measured only with simulated time (--ranks fibers --simulated-time)";
  }
  if (recorder) {
    // Bytes from each record's own dtype (c10's element size).
    const observe::CommVolume volume = recorder->comm_volume(0);
    out << "\n  per rank (rank 0): gathered " << human_bytes(static_cast<double>(volume.gathered_bytes)) << ", reduced "
        << human_bytes(static_cast<double>(volume.reduced_bytes)) << " over " << options.steps << " steps;";
    for (const auto& [op, count] : volume.op_counts) out << " " << op << " x" << count;
  }
  out << "\n  peak unsharded params (max over ranks): " << human_bytes(static_cast<double>(peak));
  if (!options.resume_dir.empty()) {
    out << "\n  resumed from " << options.resume_dir << " at step " << ranks.front().first_step;
  }
  if (!options.save_dir.empty()) {
    int64_t saved = 0;
    for (const auto& r : ranks) saved += r.saved_bytes;
    out << "\n  checkpoint saved to " << options.save_dir << " at step " << ranks.front().first_step + options.steps
        << " (" << human_bytes(static_cast<double>(saved)) << " over " << n << " ranks)";
  }
  print_memory(out, options, ranks, recorder ? recorder->peak_size() : 0);
  out << fmt::format("\n  wall time {:.2f} s", wall_seconds);
  if (recorder) {
    out << fmt::format("\n  trace: {} (Perfetto / chrome://tracing), {}.jsonl ({} events)", options.trace_path,
                       options.trace_path, recorder->recorded());
  }
  out << std::endl;
}

// The name alone: building the scenario to check it would allocate the
// whole model (--mlp-dim 65536 is gigabytes) while parsing the command line.
void check_scenario_name(const std::string& name) {
  const auto names = scenarios::scenario_names();
  if (std::find(names.begin(), names.end(), name) != names.end()) return;
  std::string known;
  for (const auto& candidate : names) known += (known.empty() ? "" : ", ") + candidate;
  throw std::invalid_argument("unknown scenario '" + name + "'; known: " + known);
}

sim::WorldOptions world_options(const RunOptions& options, std::shared_ptr<observe::TraceRecorder> recorder) {
  sim::WorldOptions world = options.world;
  world.seed = options.scenario.seed;  // --seed seeds the schedule too
  world.trace = std::move(recorder);
  if (world.simulated_time) world.cost_model = sim::cost_model_preset(options.cost_model);
  if (world.compute_time == sim::ComputeTime::OpCosts && !options.op_costs_path.empty()) {
    try {
      world.op_costs = std::make_shared<sim::OpCostTable>(sim::OpCostTable::load(options.op_costs_path));
    } catch (const std::runtime_error& e) {
      throw std::invalid_argument(std::string("--op-costs: ") + e.what());
    }
  }
  // No flight recorder where it cannot hold the world (its rank limit); failures still report each rank's error.
  if (world.world_size > observe::kMaxWorldSize) world.flight_recorder_entries = 0;
  return world;
}

int run_parity_check(const RunOptions& options, std::ostream& out) {
  scenarios::ParityConfig config;
  static_cast<scenarios::TrainConfig&>(config) = options;
  config.world = world_options(options, nullptr);
  if (options.strategy == fsdp::ShardingStrategy::HybridShard ||
      (options.world.backend == sim::CommBackend::Gloo && options.strategy == fsdp::ShardingStrategy::NoShard)) {
    config.tolerance = {1e-5, 1e-5};  // two-stage or Gloo-ordered sums: not the reference's arithmetic
  }
  auto report = scenarios::run_parity(config);
  out << "\nparity with the unsharded reference: " << (report.ok() ? "OK" : "BROKEN") << " ("
      << (config.tolerance.exact() ? "bitwise" : "within 1e-5") << ")\n";
  if (!report.ok()) out << report.summary() << "\n";
  return report.ok() ? 0 : 1;
}

}  // namespace

namespace {

// Guarded stacks map two regions per fiber; vm.max_map_count is 65530 by default.
constexpr int kMaxGuardedFibers = 30000;

// --data-free and the op cost table: what they need and what they exclude.
void validate_data_free(const RunOptions& o) {
  if (o.world.compute_time == sim::ComputeTime::OpCosts && o.op_costs_path.empty()) {
    throw std::invalid_argument("compute time from op costs needs --op-costs FILE");
  }
  if (!o.record_op_costs_path.empty()) {
    if (o.data_free) {
      throw std::invalid_argument("--record-op-costs measures the ops of a data run: drop --data-free to record");
    }
    if (!o.world.simulated_time || o.world.compute_time != sim::ComputeTime::Measured) {
      throw std::invalid_argument(
          "--record-op-costs measures compute on the simulated clock: add --ranks fibers --simulated-time (compute "
          "time measured)");
    }
  }
  if (o.world.rank_kind == sim::RankKind::Fibers && o.world.fiber_stacks == sim::FiberStacks::Guarded &&
      o.world.world_size > kMaxGuardedFibers) {
    throw std::invalid_argument("--world-size " + std::to_string(o.world.world_size) +
                                ": guarded fiber stacks take two memory mappings each (Linux allows 65530); add "
                                "--fiber-stacks pooled");
  }
  if (o.world.world_size > observe::kMaxWorldSize && !o.no_trace) {
    throw std::invalid_argument("--world-size " + std::to_string(o.world.world_size) + " is over the trace's " +
                                std::to_string(observe::kMaxWorldSize) + " ranks: add --no-trace");
  }
  if (!o.data_free) return;
  if (o.processes || o.world.rank_kind != sim::RankKind::Fibers || !o.world.simulated_time) {
    throw std::invalid_argument(
        "--data-free predicts the step time on the simulated clock: it needs --ranks fibers --simulated-time");
  }
  if (o.world.compute_time == sim::ComputeTime::Measured) {
    throw std::invalid_argument(
        "--data-free: ops on meta tensors take no real time, so measured compute would predict nothing; give "
        "--op-costs FILE (written by --record-op-costs on a small data run) or --compute-time fixed:US|zero");
  }
  if (o.check_parity || !o.resume_dir.empty() || !o.save_dir.empty()) {
    throw std::invalid_argument(
        "--data-free has no values to compare, load or save: not with --check-parity, --resume or --save");
  }
}

// --representative-ranks: a rank stands in for the ranks like it, so nothing
// may hold values or treat ranks differently.
void validate_representatives(const RunOptions& o) {
  if (o.representative_ranks.empty()) return;
  const std::string flag = "--representative-ranks";
  if (!o.data_free) {
    throw std::invalid_argument(flag +
                                " stands absent ranks in by their representatives' shapes and times: it needs "
                                "--data-free (a data run needs every rank's values; drop the flag)");
  }
  if (o.strategy == fsdp::ShardingStrategy::HybridShard || o.replicate_size != 1) {
    throw std::invalid_argument(flag +
                                " plays a 1-D FSDP world: not with --strategy hybrid_shard / --mesh (its "
                                "replica groups would need the absent ranks; drop one of them)");
  }
  if (o.delays.only_rank >= 0 || o.delays.straggler_rank >= 0) {
    throw std::invalid_argument(flag +
                                ": --delay-rank / --straggler slow one rank, so the ranks are no longer alike; "
                                "drop them or run every rank");
  }
  if (o.representative_ranks != "auto") sim::parse_rank_list(o.representative_ranks, o.world.world_size, flag);
}

}  // namespace

RunOptions::RunOptions() {
  scenario.name = "mlp_stack";
  scenario.mlp_dim = 64;
  steps = 40;  // the demo's loss falls for ~30 steps, then levels off
  world.world_size = 4;
}

void RunOptions::validate() const {
  check_scenario_name(scenario.name);
  const int world_size = world.world_size;
  if (world_size < 1) throw std::invalid_argument("--world-size must be >= 1");
  if (world.collective_timeout.count() <= 0) throw std::invalid_argument("--timeout must be positive");
  if (check_parity && !resume_dir.empty()) {
    throw std::invalid_argument("--check-parity compares with a reference trained from step 0: not with --resume");
  }
  if (processes && world.backend != sim::CommBackend::Gloo) {
    throw std::invalid_argument("--ranks processes needs --backend gloo");
  }
  if (replicate_size < 1 || world_size % replicate_size != 0) {
    throw std::invalid_argument("world size " + std::to_string(world_size) + " does not split into " +
                                std::to_string(replicate_size) + " replicas (--mesh RxS)");
  }
  if (strategy == fsdp::ShardingStrategy::HybridShard && replicate_size < 2) {
    throw std::invalid_argument("hybrid_shard needs --mesh RxS with R >= 2 replicas");
  }
  if (strategy != fsdp::ShardingStrategy::HybridShard && replicate_size != 1) {
    throw std::invalid_argument("--mesh applies to --strategy hybrid_shard only");
  }
  if (world.simulated_time) sim::cost_model_preset(cost_model);  // unknown presets throw, listing the names
  validate_data_free(*this);
  validate_representatives(*this);
  delays.validate();
  if (delays.straggler_rank >= world_size || delays.only_rank >= world_size) {
    throw std::invalid_argument("a delay names a rank outside the world of " + std::to_string(world_size));
  }
  if (!processes) {
    world_options(*this, nullptr).validate();
  } else if (world_size > 64) {
    throw std::invalid_argument("--ranks processes is limited to 64 processes");
  }
}

void check_trace_writable(const std::string& path) {
  for (const std::string& file : {path, path + ".jsonl"}) {
    std::error_code ignored;
    const bool existed = std::filesystem::exists(file, ignored);
    const int fd = open(file.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) throw std::invalid_argument("--trace: cannot write '" + file + "': " + std::strerror(errno));
    close(fd);
    if (!existed) unlink(file.c_str());  // the probe leaves nothing behind
  }
}

int run_process_worker(const WorkerContext& context) {
  const RunOptions options = parse_run_options(context.job().at("args").get<std::vector<std::string>>());
  const LaunchEnv env = LaunchEnv::from_env();
  auto trace = std::make_shared<observe::TraceRecorder>(env.world_size);
  auto flight = std::make_shared<observe::FlightRecorder>(env.world_size, 16);
  ProcessGroupPtr group = make_gloo_process_group_from_env(options.world.collective_timeout);
  group =
      std::make_shared<observe::ObservedProcessGroup>(group, std::vector<observe::SinkPtr>{trace, flight}, env.rank);
  RankStats stats;
  try {
    stats = train_rank(options, env.rank, group, SteadyClock::instance(), nullptr, env.rank, trace,
                       [&](int step, const RankStats& s) {
                         if (env.rank == 0) print_progress(std::cout, options, step, s, false);
                       });
  } catch (const std::exception& e) {
    // The launcher shows each rank's last lines: this rank's recent collectives.
    std::cerr << "fsdpsim worker rank " << env.rank << ": " << first_line(e.what()) << "\n"
              << flight->dump() << std::flush;
    return dynamic_cast<const CollectiveTimeoutError*>(&e) ? kWorkerTimedOutExit : 1;
  }
  std::ostringstream events;
  trace->write_jsonl(events);
  context.write_result({{"stats", to_json(stats)}, {"trace_jsonl", events.str()}});
  return 0;
}

namespace {

volatile std::sig_atomic_t stop_signal = 0;

extern "C" void note_stop_signal(int signal) { stop_signal = signal; }

// While it lives, SIGINT, SIGTERM and SIGHUP only set stop_signal: the
// launcher then stops the ranks and the run unwinds (and cleans up).
class ScopedStopSignals {
 public:
  ScopedStopSignals() {
    stop_signal = 0;
    struct sigaction action {};
    action.sa_handler = note_stop_signal;
    action.sa_flags = SA_RESTART;  // writes of the ranks' output go on; poll() still wakes
    sigemptyset(&action.sa_mask);
    for (size_t i = 0; i < kSignals.size(); ++i) sigaction(kSignals[i], &action, &previous_[i]);
  }
  ~ScopedStopSignals() {
    for (size_t i = 0; i < kSignals.size(); ++i) sigaction(kSignals[i], &previous_[i], nullptr);
  }
  ScopedStopSignals(const ScopedStopSignals&) = delete;
  ScopedStopSignals& operator=(const ScopedStopSignals&) = delete;

 private:
  static constexpr std::array<int, 3> kSignals = {SIGINT, SIGTERM, SIGHUP};
  std::array<struct sigaction, 3> previous_{};
};

// One line for a failed launch: who stopped making progress, who failed
// first, and which timeout fired where.
std::string launch_failure_summary(const LaunchResult& launched, const RunOptions& options) {
  std::string summary = "rank processes failed" + launched.headline();
  std::vector<int> timed_out;
  for (const auto& rank : launched.ranks) {
    if (rank.exit_code == kWorkerTimedOutExit && !rank.stopped_by_launcher) timed_out.push_back(rank.rank);
  }
  if (!timed_out.empty()) {
    summary +=
        "; the collective timeout (" +
        fmt::format(
            "{:.1f}",
            ns_to_s(std::chrono::duration_cast<std::chrono::nanoseconds>(options.world.collective_timeout).count())) +
        " s, --timeout) fired on " + sim::ranks_text(timed_out);
  }
  return summary;
}

RankStats read_rank_stats(const std::optional<nlohmann::json>& result, int rank, observe::TraceRecorder& merged) {
  if (!result) throw RunFailedError("rank " + std::to_string(rank) + " wrote no results");
  try {
    RankStats stats = stats_from_json(result->at("stats"));
    std::istringstream events(result->at("trace_jsonl").get<std::string>());
    merged.import_events(observe::read_jsonl(events));
    return stats;
  } catch (const std::exception& e) {
    throw RunFailedError("rank " + std::to_string(rank) + "'s results: " + first_line(e.what()));
  }
}

// Re-executes this binary as each rank (tools/worker.h), with the same options.
int run_processes(const RunOptions& options, std::ostream& out, std::ostream& err) {
  const ScopedStopSignals signals;
  LaunchOptions launch;
  launch.nproc = options.world.world_size;
  // Ranks blocked with a failed one time out within one collective timeout.
  launch.timeout = options.world.collective_timeout;
  launch.output = &out;
  launch.stop_signal = &stop_signal;
  const auto started = std::chrono::steady_clock::now();
  const WorkerRun run = launch_workers({{"kind", kRunWorker}, {"args", options.args}}, launch);
  const LaunchResult& launched = run.launched;
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (launched.interrupted_by != 0) throw RunInterruptedError(launched.interrupted_by);
  if (!launched.ok()) {
    err << "fsdpsim: a rank process failed:\n" << launched.report();
    throw RunFailedError(launch_failure_summary(launched, options));
  }
  std::vector<RankStats> ranks;
  observe::TraceRecorder merged(options.world.world_size);
  const auto jsonl = start_trace_stream(options, merged);
  for (int r = 0; r < options.world.world_size; ++r) ranks.push_back(read_rank_stats(run.results[r], r, merged));
  write_traces(options, merged, *jsonl);
  print_summary(out, options, ranks, &merged, false, wall);
  return 0;
}

}  // namespace

namespace {

// The op cost table recorded (--record-op-costs) or how the charged one served the run (--op-costs).
void print_op_costs(std::ostream& out, const RunOptions& options, const sim::WorldOptions& world,
                    const sim::SimClock* clock) {
  if (world.record_op_costs) {
    world.record_op_costs->save(options.record_op_costs_path);
    out << "  op costs: " << world.record_op_costs->size() << " ops (name and input shapes) recorded to "
        << options.record_op_costs_path << "\n";
  }
  if (clock != nullptr && world.compute_time == sim::ComputeTime::OpCosts) {
    const sim::OpCostUsage used = clock->op_cost_usage();
    out << "  op costs charged: " << used.exact << " ops by name and shapes, " << used.by_name
        << " by name only (shapes not recorded: the name's mean), " << used.unknown << " unknown (charged 0)\n";
  }
}

}  // namespace

namespace {

// The global ranks --representative-ranks names; auto: the shard classes of
// the scenario's params (the model built once on the CPU for their shapes).
std::vector<int> representative_ranks(const RunOptions& options) {
  const int n = options.world.world_size;
  if (options.representative_ranks != "auto") {
    return sim::parse_rank_list(options.representative_ranks, n, "--representative-ranks");
  }
  const auto scenario = scenarios::make_scenario(options.scenario, 0);
  std::vector<int64_t> dim0s;
  for (const at::Tensor& param : scenarios::unique_parameters(*scenario->module())) {
    dim0s.push_back(param.dim() == 0 ? 1 : param.size(0));
  }
  return sim::shard_class_ranks(dim0s, n);
}

}  // namespace

int run_scenario(const RunOptions& options, std::ostream& out, std::ostream& err) {
  out << "fsdpsim: " << describe(options) << std::endl;
  if (options.processes) return run_processes(options, out, err);
  auto recorder = options.no_trace ? nullptr : std::make_shared<observe::TraceRecorder>(options.world.world_size);
  const auto jsonl = recorder ? start_trace_stream(options, *recorder) : nullptr;
  sim::WorldOptions world_opts = world_options(options, recorder);
  if (!options.record_op_costs_path.empty()) world_opts.record_op_costs = std::make_shared<sim::OpCostTable>();
  if (!options.representative_ranks.empty()) world_opts.played_ranks = representative_ranks(options);
  std::mutex progress;
  std::atomic<int> steps_done{0};  // rank 0's
  const auto started = std::chrono::steady_clock::now();
  if (options.heartbeat_s > 0 && options.world.backend == sim::CommBackend::Fake) {
    world_opts.heartbeat_interval =
        std::chrono::milliseconds(std::max<int64_t>(1, std::llround(options.heartbeat_s * 1000)));
    world_opts.heartbeat = [&out, &progress, &steps_done, &options, started](std::string where) {
      // One line: ranks in many different places would list many groups.
      constexpr size_t kMaxWhere = 1000;
      if (where.size() > kMaxWhere) {
        where = where.substr(0, kMaxWhere) + fmt::format(" ... ({} more characters)", where.size() - kMaxWhere);
      }
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
      std::lock_guard<std::mutex> lock(progress);
      out << fmt::format("  ... {:.1f} s, step {}/{} of rank 0 running; where each rank is: {}", elapsed,
                         std::min(steps_done.load() + 1, options.steps), options.steps, where)
          << std::endl;
    };
  }
  sim::World world(world_opts);
  std::vector<RankStats> ranks(world_opts.ranks_run());
  auto result = world.run([&](sim::RankContext& ctx) {
    ranks[ctx.rank()] = train_rank(options, ctx.played_rank(), ctx.world_group(), ctx.clock(), ctx.sim_clock(),
                                   ctx.rank(), recorder, [&](int step, const RankStats& stats) {
                                     if (ctx.rank() != 0) return;
                                     steps_done = step + 1;
                                     std::lock_guard<std::mutex> lock(progress);
                                     print_progress(out, options, step, stats, ctx.sim_clock() != nullptr);
                                   });
  });
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (recorder) write_traces(options, *recorder, *jsonl);
  if (!result.ok()) {
    report_world_failure(options, result, err);
    throw RunFailedError(world_failure_summary(result));
  }
  print_summary(out, options, ranks, recorder.get(), options.world.simulated_time, wall);
  if (!world_opts.played_ranks.empty()) {
    out << "  representative ranks: " << world_opts.played_ranks.size() << " ran, standing for "
        << options.world.world_size << " ranks (global ranks " << sim::rank_set_string(world_opts.played_ranks)
        << "); step times and memory are theirs, each absent rank assumed to run like the one of its shard class\n";
  }
  print_op_costs(out, options, world_opts, world.sim_clock().get());
  if (result.fiber_stack_resident_bytes > 0) {
    out << "  fiber stacks (pooled): deepest " << human_bytes(static_cast<double>(result.fiber_stack_deepest_bytes))
        << " of " << human_bytes(static_cast<double>(options.world.fiber_stack_bytes)) << " reserved per rank; "
        << human_bytes(static_cast<double>(result.fiber_stack_resident_bytes)) << " resident over all ranks\n";
  }
  if (options.check_parity) return run_parity_check(options, out);
  return 0;
}

}  // namespace fsdpsim::tools
