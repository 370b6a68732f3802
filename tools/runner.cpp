#include "tools/format_util.h"
#include "tools/runner.h"

#include <ATen/ATen.h>
#include <torch/optim/adam.h>
#include <torch/optim/sgd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <unistd.h>

#include "backends/comm_hooks.h"
#include "backends/gloo_process_group.h"
#include "scenarios/engine_trace.h"
#include "scenarios/models.h"
#include "sim/cost_model.h"
#include "sim/fiber_autograd.h"
#include "sim/flight_recorder.h"
#include "sim/trace.h"
#include "tools/process_launcher.h"

namespace fsdpsim::tools {

namespace {

using Ms = std::chrono::duration<double, std::milli>;

std::chrono::nanoseconds ms_to_ns(double ms) {
  return std::chrono::nanoseconds(static_cast<int64_t>(ms * 1e6));
}

int64_t parse_int(const std::string& flag, const std::string& value, int64_t min, int64_t max) {
  return parse_integer(flag, value, min, max);
}

double parse_ms(const std::string& flag, const std::string& value) {
  size_t used = 0;
  double parsed = 0;
  try {
    parsed = std::stod(value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != value.size() || !(parsed >= 0) || parsed > 3.6e6) {
    throw std::invalid_argument(flag + " needs milliseconds in [0, 3600000], got '" + value + "'");
  }
  return parsed;
}

template <typename Enum>
Enum parse_choice(const std::string& flag, const std::string& value, const std::map<std::string, Enum>& choices) {
  auto it = choices.find(value);
  if (it != choices.end()) return it->second;
  std::string names;
  for (const auto& [name, unused] : choices) names += (names.empty() ? "" : ", ") + name;
  throw std::invalid_argument(flag + " must be one of " + names + ", got '" + value + "'");
}

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
};

nlohmann::json to_json(const RankStats& stats) {
  return {{"losses", stats.losses},
          {"step_ns", stats.step_ns},
          {"wall_step_ns", stats.wall_step_ns},
          {"exposed_ns", stats.exposed_ns},
          {"peak_unsharded_bytes", stats.peak_unsharded_bytes}};
}

RankStats stats_from_json(const nlohmann::json& j) {
  RankStats stats;
  stats.losses = j.at("losses").get<std::vector<double>>();
  stats.step_ns = j.at("step_ns").get<std::vector<int64_t>>();
  stats.wall_step_ns = j.at("wall_step_ns").get<std::vector<int64_t>>();
  stats.exposed_ns = j.at("exposed_ns").get<std::vector<int64_t>>();
  stats.peak_unsharded_bytes = j.at("peak_unsharded_bytes").get<int64_t>();
  return stats;
}

scenarios::ScenarioConfig scenario_config(const RunOptions& options) {
  scenarios::ScenarioConfig config;
  config.name = options.scenario;
  config.seed = options.seed;
  config.mlp_dim = options.mlp_dim;
  return config;
}

bool has_comm_delays(const sim::DelayOptions& delays) {
  return delays.before_reduce_scatter.count() > 0 || delays.before_all_gather.count() > 0 ||
         delays.after_all_gather.count() > 0 || (delays.straggler_rank >= 0 && delays.straggler_delay.count() > 0);
}

// One rank's training loop, the same for every backend.
RankStats train_rank(const RunOptions& options, int rank, ProcessGroupPtr world_group, const Clock& clock,
                     sim::SimClock* sim_clock, const std::shared_ptr<sim::TraceRecorder>& trace,
                     const std::function<void(int step, const RankStats&)>& on_step) {
  if (has_comm_delays(options.delays)) {
    world_group = std::make_shared<HookedProcessGroup>(std::move(world_group),
                                                       std::make_shared<sim::DelayHooks>(options.delays, rank));
  }
  auto scenario = scenarios::make_scenario(scenario_config(options), rank);
  auto setup = scenarios::make_sharding_setup(world_group, options.strategy, options.replicate_size);
  fsdp::EngineOptions engine_options;
  engine_options.queue_backward_callback = sim::queue_backward_callback;
  engine_options.backward_prefetch = options.backward_prefetch;
  engine_options.forward_prefetch = options.forward_prefetch;
  if (trace) engine_options.hooks.push_back(std::make_shared<scenarios::TraceEngineHooks>(trace, rank, clock));
  if (options.delay_before_reshard_ms > 0) {
    engine_options.hooks.push_back(std::make_shared<ReshardDelayHooks>(ms_to_ns(options.delay_before_reshard_ms)));
  }
  fsdp::Engine engine(engine_options);
  scenario->shard(engine, setup);
  auto params = scenarios::unique_parameters(*scenario->module());
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  if (options.optimizer == scenarios::OptimizerKind::SGD) {
    optimizer = std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(1e-2).momentum(0.9));
  } else {
    optimizer = std::make_unique<torch::optim::Adam>(params, torch::optim::AdamOptions(1e-2));
  }
  RankStats stats;
  for (int step = 0; step < options.steps; ++step) {
    const int64_t start = clock.now_ns();
    const int64_t exposed_before = sim_clock ? sim_clock->exposed_comm_ns(rank) : 0;
    const auto wall_start = std::chrono::steady_clock::now();
    engine.reset_peak_unsharded_bytes();
    optimizer->zero_grad();
    at::Tensor loss = scenario->forward_loss(scenario->input(rank, step));
    if (options.delay_after_loss_ms > 0) sim::sleep_for(ms_to_ns(options.delay_after_loss_ms));
    sim::backward(loss);
    if (options.delay_before_step_ms > 0) sim::sleep_for(ms_to_ns(options.delay_before_step_ms));
    optimizer->step();
    stats.losses.push_back(loss.item<double>());
    stats.step_ns.push_back(clock.now_ns() - start);
    stats.wall_step_ns.push_back(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - wall_start).count());
    stats.exposed_ns.push_back(sim_clock ? sim_clock->exposed_comm_ns(rank) - exposed_before : 0);
    stats.peak_unsharded_bytes = std::max(stats.peak_unsharded_bytes, engine.peak_unsharded_bytes());
    if (on_step) on_step(step, stats);
  }
  return stats;
}

int64_t median(std::vector<int64_t> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

std::string describe(const RunOptions& options) {
  std::ostringstream out;
  out << "scenario " << options.scenario << ", " << options.world_size << " ranks as "
      << (options.processes ? "processes" : sim::to_string(options.rank_kind)) << " on "
      << sim::to_string(options.backend) << ", " << fsdp::to_string(options.strategy);
  if (options.strategy == fsdp::ShardingStrategy::HybridShard) {
    out << " " << options.replicate_size << "x" << options.world_size / options.replicate_size;
  }
  out << ", prefetch " << fsdp::to_string(options.backward_prefetch)
      << (options.forward_prefetch ? " + forward" : "") << ", " << options.steps << " steps, seed "
      << options.seed;
  if (options.simulated_time) out << ", simulated time (" << options.cost_model << ")";
  return out.str();
}

void print_progress(std::ostream& out, const RunOptions& options, int step, const RankStats& stats,
                    bool simulated) {
  out << "  step " << step + 1 << "/" << options.steps << "  loss(rank 0) " << std::setprecision(6)
      << stats.losses.back() << "  " << std::fixed << std::setprecision(2) << stats.wall_step_ns.back() / 1e6
      << " ms";
  if (simulated) {
    const double predicted = static_cast<double>(stats.step_ns.back());
    out << "  predicted " << predicted / 1e6 << " ms, exposed comm "
        << (predicted > 0 ? 100.0 * stats.exposed_ns.back() / predicted : 0.0) << "%";
  }
  out << std::defaultfloat << std::endl;
}

void write_traces(const RunOptions& options, sim::TraceRecorder& recorder, std::ostream& err) {
  std::ofstream chrome(options.trace_path);
  std::ofstream lines(options.trace_path + ".jsonl");
  if (!chrome || !lines) {
    err << "fsdpsim: cannot write the trace to " << options.trace_path << std::endl;
    return;
  }
  recorder.write_chrome_trace(chrome);
  recorder.write_jsonl(lines);
}

void print_summary(std::ostream& out, const RunOptions& options, const std::vector<RankStats>& ranks,
                   const sim::TraceRecorder& recorder, bool simulated, double wall_seconds) {
  const int n = static_cast<int>(ranks.size());
  out << "\nsummary\n  loss per step (mean over ranks):";
  for (int step = 0; step < options.steps; ++step) {
    double sum = 0;
    for (const auto& r : ranks) sum += r.losses[step];
    out << " " << std::setprecision(6) << sum / n;
  }
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
  out << std::fixed << std::setprecision(2) << "\n  step time measured (median over ranks and steps): "
      << median(wall) / 1e6 << " ms";
  if (simulated) {
    out << "\n  step time predicted (simulated clock, " << options.cost_model << "): " << median(predicted) / 1e6
        << " ms\n  exposed communication: " << (total > 0 ? 100.0 * exposed / total : 0.0)
        << "% of the simulated step time";
  } else {
    out << "\n  exposed communication: measured only with simulated time (--ranks fibers --simulated-time)";
  }
  int64_t gathered = 0;
  int64_t reduced = 0;
  std::map<std::string, int64_t> counts;
  for (const auto& event : recorder.events()) {
    if (!event.is_collective() || event.rank != 0) continue;
    const int64_t element = c10::elementSize(
        event.dtype == "Double" || event.dtype == "Long"        ? at::kDouble
        : event.dtype == "Half" || event.dtype == "BFloat16"    ? at::kHalf
                                                                 : at::kFloat);
    if (event.op == CollectiveOp::AllGather) gathered += event.out_numel * element;
    if (event.op == CollectiveOp::ReduceScatter || event.op == CollectiveOp::AllReduce) {
      reduced += event.in_numel * element;
    }
    ++counts[to_string(event.op)];
  }
  out << "\n  per rank (rank 0): gathered " << human_bytes(static_cast<double>(gathered)) << ", reduced "
      << human_bytes(static_cast<double>(reduced)) << " over " << options.steps << " steps;";
  for (const auto& [op, count] : counts) out << " " << op << " x" << count;
  out << "\n  peak unsharded params (max over ranks): " << human_bytes(static_cast<double>(peak));
  out << "\n  wall time " << wall_seconds << " s\n  trace: " << options.trace_path
      << " (Perfetto / chrome://tracing), " << options.trace_path << ".jsonl (" << recorder.size() << " events)"
      << std::defaultfloat << std::endl;
}

int run_parity_check(const RunOptions& options, std::ostream& out) {
  scenarios::ParityConfig config;
  config.scenario = scenario_config(options);
  config.strategy = options.strategy;
  config.world_size = options.world_size;
  config.replicate_size = options.replicate_size;
  config.rank_kind = options.rank_kind;
  config.backend = options.backend;
  config.schedule = options.schedule;
  config.schedule_seed = options.seed;
  config.steps = options.steps;
  config.optimizer = options.optimizer;
  if (options.strategy == fsdp::ShardingStrategy::HybridShard ||
      (options.backend == sim::CommBackend::Gloo && options.strategy == fsdp::ShardingStrategy::NoShard)) {
    config.tolerance = {1e-5, 1e-5};  // two-stage or Gloo-ordered sums: not the reference's arithmetic
  }
  auto report = scenarios::run_parity(config);
  out << "\nparity with the unsharded reference: " << (report.ok() ? "OK" : "BROKEN") << " ("
      << (config.tolerance.exact() ? "bitwise" : "within 1e-5") << ")\n";
  if (!report.ok()) out << report.summary() << "\n";
  return report.ok() ? 0 : 1;
}

}  // namespace

void RunOptions::validate() const {
  scenarios::make_scenario(scenario_config(*this), 0);  // unknown names throw, listing the known ones
  if (world_size < 1) throw std::invalid_argument("--world-size must be >= 1");
  if (processes && backend != sim::CommBackend::Gloo) {
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
  if (simulated_time) sim::cost_model_preset(cost_model);  // unknown presets throw, listing the names
  delays.validate();
  if (delays.straggler_rank >= world_size || delays.only_rank >= world_size) {
    throw std::invalid_argument("a delay names a rank outside the world of " + std::to_string(world_size));
  }
  if (!processes) {
    sim::WorldOptions world;
    world.world_size = world_size;
    world.rank_kind = rank_kind;
    world.backend = backend;
    world.simulated_time = simulated_time;
    world.validate();
  } else if (world_size > 64) {
    throw std::invalid_argument("--ranks processes is limited to 64 processes");
  }
}

std::string run_usage() {
  return "usage: fsdpsim run [options]\n"
         "  --scenario NAME           test model (default mlp_stack; 'fsdpsim list')\n"
         "  --backend fake|gloo       in-memory fake or Gloo over loopback (default fake)\n"
         "  --ranks threads|fibers|processes   (processes: Gloo only)\n"
         "  --world-size N            ranks (default 4)\n"
         "  --strategy full_shard|shard_grad_op|no_shard|hybrid_shard\n"
         "  --mesh RxS                hybrid_shard: R replicas of S shards (R*S = world size)\n"
         "  --prefetch backward_pre|backward_post|none   backward prefetch (default backward_pre)\n"
         "  --forward-prefetch        implicit forward prefetch\n"
         "  --steps N  --seed N  --optimizer sgd|adam  --mlp-dim N\n"
         "  --schedule round-robin|seeded-random        fiber schedule (seeded by --seed)\n"
         "  --simulated-time [--cost-model PRESET]     fibers: simulated clock, predicted step time\n"
         "  --delay-reduce-scatter MS --delay-all-gather MS --delay-after-all-gather MS\n"
         "  --delay-rank R            the comm delays above on rank R only\n"
         "  --straggler R:MS          rank R sleeps MS before every collective\n"
         "  --delay-after-loss MS --delay-before-step MS --delay-before-reshard MS\n"
         "  --trace PATH              Chrome trace (default fsdpsim-trace.json); PATH.jsonl too\n"
         "  --check-parity            also run the unsharded reference and compare every step\n";
}

RunOptions parse_run_options(const std::vector<std::string>& args) {
  RunOptions options;
  options.args = args;
  bool explicit_world = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& flag = args[i];
    auto value = [&]() -> const std::string& {
      if (i + 1 >= args.size()) throw std::invalid_argument(flag + " needs a value");
      return args[++i];
    };
    if (flag == "--scenario") {
      options.scenario = value();
    } else if (flag == "--backend") {
      options.backend = parse_choice<sim::CommBackend>(
          flag, value(), {{"fake", sim::CommBackend::Fake}, {"gloo", sim::CommBackend::Gloo}});
    } else if (flag == "--ranks") {
      const std::string& v = value();
      options.processes = v == "processes";
      if (!options.processes) {
        options.rank_kind = parse_choice<sim::RankKind>(
            flag, v, {{"threads", sim::RankKind::Threads}, {"fibers", sim::RankKind::Fibers}});
      }
    } else if (flag == "--world-size") {
      options.world_size = static_cast<int>(parse_int(flag, value(), 1, 8192));
      explicit_world = true;
    } else if (flag == "--strategy") {
      options.strategy = parse_choice<fsdp::ShardingStrategy>(
          flag, value(),
          {{"full_shard", fsdp::ShardingStrategy::FullShard},
           {"shard_grad_op", fsdp::ShardingStrategy::ShardGradOp},
           {"no_shard", fsdp::ShardingStrategy::NoShard},
           {"hybrid_shard", fsdp::ShardingStrategy::HybridShard}});
    } else if (flag == "--mesh") {
      const std::string& v = value();
      const size_t x = v.find('x');
      if (x == std::string::npos) throw std::invalid_argument("--mesh needs RxS, got '" + v + "'");
      options.replicate_size = static_cast<int>(parse_int(flag, v.substr(0, x), 1, 8192));
      const int shard = static_cast<int>(parse_int(flag, v.substr(x + 1), 1, 8192));
      if (explicit_world && options.world_size != options.replicate_size * shard) {
        throw std::invalid_argument("--mesh " + v + " does not multiply to --world-size " +
                                    std::to_string(options.world_size));
      }
      options.world_size = options.replicate_size * shard;
    } else if (flag == "--prefetch") {
      options.backward_prefetch = parse_choice<fsdp::BackwardPrefetch>(
          flag, value(),
          {{"backward_pre", fsdp::BackwardPrefetch::BackwardPre},
           {"backward_post", fsdp::BackwardPrefetch::BackwardPost},
           {"none", fsdp::BackwardPrefetch::None}});
    } else if (flag == "--forward-prefetch") {
      options.forward_prefetch = true;
    } else if (flag == "--steps") {
      options.steps = static_cast<int>(parse_int(flag, value(), 1, 1000000));
    } else if (flag == "--seed") {
      options.seed = static_cast<uint64_t>(parse_int(flag, value(), 0, INT64_MAX));
    } else if (flag == "--optimizer") {
      options.optimizer = parse_choice<scenarios::OptimizerKind>(
          flag, value(), {{"sgd", scenarios::OptimizerKind::SGD}, {"adam", scenarios::OptimizerKind::Adam}});
    } else if (flag == "--mlp-dim") {
      options.mlp_dim = parse_int(flag, value(), 1, 1 << 16);
    } else if (flag == "--schedule") {
      options.schedule = parse_choice<sim::SchedulePolicy>(
          flag, value(),
          {{"round-robin", sim::SchedulePolicy::RoundRobin}, {"seeded-random", sim::SchedulePolicy::SeededRandom}});
    } else if (flag == "--simulated-time") {
      options.simulated_time = true;
    } else if (flag == "--cost-model") {
      options.cost_model = value();
    } else if (flag == "--delay-reduce-scatter") {
      options.delays.before_reduce_scatter = ms_to_ns(parse_ms(flag, value()));
    } else if (flag == "--delay-all-gather") {
      options.delays.before_all_gather = ms_to_ns(parse_ms(flag, value()));
    } else if (flag == "--delay-after-all-gather") {
      options.delays.after_all_gather = ms_to_ns(parse_ms(flag, value()));
    } else if (flag == "--delay-rank") {
      options.delays.only_rank = static_cast<int>(parse_int(flag, value(), 0, 8191));
    } else if (flag == "--straggler") {
      const std::string& v = value();
      const size_t colon = v.find(':');
      if (colon == std::string::npos) throw std::invalid_argument("--straggler needs RANK:MS, got '" + v + "'");
      options.delays.straggler_rank = static_cast<int>(parse_int(flag, v.substr(0, colon), 0, 8191));
      options.delays.straggler_delay = ms_to_ns(parse_ms(flag, v.substr(colon + 1)));
    } else if (flag == "--delay-after-loss") {
      options.delay_after_loss_ms = parse_ms(flag, value());
    } else if (flag == "--delay-before-step") {
      options.delay_before_step_ms = parse_ms(flag, value());
    } else if (flag == "--delay-before-reshard") {
      options.delay_before_reshard_ms = parse_ms(flag, value());
    } else if (flag == "--trace") {
      options.trace_path = value();
    } else if (flag == "--check-parity") {
      options.check_parity = true;
    } else {
      throw std::invalid_argument("unknown option '" + flag + "'");
    }
  }
  options.validate();
  return options;
}

int run_process_worker(const RunOptions& options, const std::string& stats_path, std::ostream& err) {
  try {
    const LaunchEnv env = LaunchEnv::from_env();
    auto trace = std::make_shared<sim::TraceRecorder>(env.world_size);
    auto flight = std::make_shared<sim::FlightRecorder>(env.world_size, 16);
    ProcessGroupPtr group = make_gloo_process_group_from_env(std::chrono::seconds(60));
    group = std::make_shared<sim::FlightRecordingProcessGroup>(group, flight, env.rank);
    group = std::make_shared<sim::TracedProcessGroup>(group, trace, env.rank);
    RankStats stats;
    try {
      stats = train_rank(options, env.rank, group, SteadyClock::instance(), nullptr, trace,
                         [&](int step, const RankStats& s) {
                           if (env.rank == 0) print_progress(std::cout, options, step, s, false);
                         });
    } catch (const std::exception& e) {
      // The launcher shows each rank's last lines: this rank's recent collectives.
      err << "fsdpsim worker rank " << env.rank << ": " << e.what() << "\n" << flight->dump() << std::flush;
      return 1;
    }
    std::ofstream file(stats_path + ".rank" + std::to_string(env.rank));
    file << to_json(stats).dump() << "\n";
    trace->write_jsonl(file);
    return file ? 0 : 1;
  } catch (const std::exception& e) {
    err << "fsdpsim worker: " << e.what() << std::endl;
    return 1;
  }
}

namespace {

int run_processes(const RunOptions& options, const std::vector<std::string>& worker_args, std::ostream& out,
                  std::ostream& err) {
  char dir_template[] = "/tmp/fsdpsim-run-XXXXXX";
  const char* dir = mkdtemp(dir_template);
  if (dir == nullptr) {
    err << "fsdpsim: cannot create a temporary directory" << std::endl;
    return 1;
  }
  const std::string stats_path = std::string(dir) + "/stats";
  LaunchOptions launch;
  launch.nproc = options.world_size;
  launch.command = worker_args;
  launch.command.push_back("--stats");
  launch.command.push_back(stats_path);
  launch.timeout = std::chrono::seconds(30);
  launch.output = &out;
  const auto started = std::chrono::steady_clock::now();
  LaunchResult launched = launch_processes(launch);
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (!launched.ok()) {
    err << "fsdpsim: a rank process failed:\n" << launched.report();
    std::filesystem::remove_all(dir);
    return 1;
  }
  std::vector<RankStats> ranks;
  sim::TraceRecorder merged(options.world_size);
  for (int r = 0; r < options.world_size; ++r) {
    std::ifstream file(stats_path + ".rank" + std::to_string(r));
    std::string first;
    std::getline(file, first);
    ranks.push_back(stats_from_json(nlohmann::json::parse(first)));
    merged.import_events(sim::TraceRecorder::read_jsonl(file));
  }
  std::filesystem::remove_all(dir);
  write_traces(options, merged, err);
  print_summary(out, options, ranks, merged, false, wall);
  return 0;
}

}  // namespace

int run_scenario(const RunOptions& options, std::ostream& out, std::ostream& err) {
  out << "fsdpsim: " << describe(options) << std::endl;
  if (options.processes) {
    // Re-execute this binary as each rank, passing the same options.
    std::vector<std::string> args = {"/proc/self/exe", "run-worker"};
    char self[4096];
    const ssize_t length = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (length > 0) args[0] = std::string(self, static_cast<size_t>(length));
    for (const auto& arg : options.args) args.push_back(arg);
    return run_processes(options, args, out, err);
  }
  auto recorder = std::make_shared<sim::TraceRecorder>(options.world_size);
  sim::WorldOptions world_options;
  world_options.world_size = options.world_size;
  world_options.rank_kind = options.rank_kind;
  world_options.backend = options.backend;
  world_options.schedule = options.schedule;
  world_options.seed = options.seed;
  world_options.trace = recorder;
  world_options.simulated_time = options.simulated_time;
  if (options.simulated_time) world_options.cost_model = sim::cost_model_preset(options.cost_model);
  sim::World world(world_options);
  const int n = options.world_size;
  std::vector<RankStats> ranks(n);
  std::mutex progress;
  const auto started = std::chrono::steady_clock::now();
  auto result = world.run([&](sim::RankContext& ctx) {
    ranks[ctx.rank()] = train_rank(options, ctx.rank(), ctx.world_group(), ctx.clock(), ctx.sim_clock(), recorder,
                                   [&](int step, const RankStats& stats) {
                                     if (ctx.rank() != 0) return;
                                     std::lock_guard<std::mutex> lock(progress);
                                     print_progress(out, options, step, stats, ctx.sim_clock() != nullptr);
                                   });
  });
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  write_traces(options, *recorder, err);
  if (!result.ok()) {
    err << "fsdpsim: the run failed:\n" << result.error_report();
    err << result.flight_recorder;  // where each rank was: its last collectives
    err << "fsdpsim: analyse with 'fsdpsim_replay check " << options.trace_path << ".jsonl'" << std::endl;
    return 1;
  }
  print_summary(out, options, ranks, *recorder, options.simulated_time, wall);
  if (options.check_parity) return run_parity_check(options, out);
  return 0;
}

}  // namespace fsdpsim::tools
