// fsdpsim: runs a named scenario on a simulated world and prints a summary.
//
//   fsdpsim run [--scenario NAME] [--ranks threads|fibers] [--backend fake|gloo]
//               [--world-size N] [--steps N] [--seed N] [--schedule round-robin|seeded-random]
//               [--trace PATH]          (Chrome trace; PATH.jsonl gets the line-per-event form)
//   fsdpsim list

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "scenarios/data_parallel.h"
#include "sim/trace.h"
#include "sim/world.h"

namespace {

using namespace fsdpsim;

struct RunConfig {
  std::string scenario = "data_parallel_mlp";
  sim::WorldOptions world;
  int steps = 5;
  uint64_t seed = 0;
  std::string trace_path = "fsdpsim-trace.json";
};

const std::vector<std::pair<std::string, std::string>> kScenarios = {
    {"data_parallel_mlp", "MLP(64) trained data-parallel: all_reduce(avg) of every gradient, SGD momentum 0.9"},
};

[[noreturn]] void usage_error(const std::string& message) {
  std::cerr << "fsdpsim: " << message << " (see 'fsdpsim --help')" << std::endl;
  std::exit(2);
}

int64_t parse_int(const std::string& flag, const std::string& value, int64_t min, int64_t max) {
  size_t used = 0;
  int64_t parsed = 0;
  try {
    parsed = std::stoll(value, &used);
  } catch (const std::exception&) {
    usage_error(flag + " needs an integer, got '" + value + "'");
  }
  if (used != value.size()) usage_error(flag + " needs an integer, got '" + value + "'");
  if (parsed < min || parsed > max) {
    usage_error(flag + " must be in [" + std::to_string(min) + ", " + std::to_string(max) + "], got " + value);
  }
  return parsed;
}

void print_help() {
  std::cout << "usage: fsdpsim run [options] | fsdpsim list\n"
               "  --scenario NAME        scenario to run (default data_parallel_mlp; 'fsdpsim list')\n"
               "  --ranks threads|fibers how ranks run (default threads)\n"
               "  --backend fake|gloo    in-memory fake or Gloo over loopback (default fake)\n"
               "  --world-size N         number of ranks (default 4)\n"
               "  --steps N              training steps (default 5)\n"
               "  --seed N               model/data seed and fiber schedule seed (default 0)\n"
               "  --schedule round-robin|seeded-random   fiber schedule (default round-robin)\n"
               "  --trace PATH           Chrome trace output (default fsdpsim-trace.json);\n"
               "                         PATH.jsonl gets the line-per-event trace\n";
}

RunConfig parse_run(const std::vector<std::string>& args) {
  RunConfig config;
  config.world.world_size = 4;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& flag = args[i];
    auto value = [&]() -> const std::string& {
      if (i + 1 >= args.size()) usage_error(flag + " needs a value");
      return args[++i];
    };
    if (flag == "--scenario") {
      config.scenario = value();
    } else if (flag == "--ranks") {
      const auto& v = value();
      if (v == "threads") config.world.rank_kind = sim::RankKind::Threads;
      else if (v == "fibers") config.world.rank_kind = sim::RankKind::Fibers;
      else usage_error("--ranks must be threads or fibers, got '" + v + "'");
    } else if (flag == "--backend") {
      const auto& v = value();
      if (v == "fake") config.world.backend = sim::CommBackend::Fake;
      else if (v == "gloo") config.world.backend = sim::CommBackend::Gloo;
      else usage_error("--backend must be fake or gloo, got '" + v + "'");
    } else if (flag == "--world-size") {
      config.world.world_size = static_cast<int>(parse_int(flag, value(), 1, 8192));
    } else if (flag == "--steps") {
      config.steps = static_cast<int>(parse_int(flag, value(), 1, 1000000));
    } else if (flag == "--seed") {
      config.seed = static_cast<uint64_t>(parse_int(flag, value(), 0, INT64_MAX));
    } else if (flag == "--schedule") {
      const auto& v = value();
      if (v == "round-robin") config.world.schedule = sim::SchedulePolicy::RoundRobin;
      else if (v == "seeded-random") config.world.schedule = sim::SchedulePolicy::SeededRandom;
      else usage_error("--schedule must be round-robin or seeded-random, got '" + v + "'");
    } else if (flag == "--trace") {
      config.trace_path = value();
    } else {
      usage_error("unknown option '" + flag + "'");
    }
  }
  bool known = std::any_of(kScenarios.begin(), kScenarios.end(),
                           [&](const auto& s) { return s.first == config.scenario; });
  if (!known) usage_error("unknown scenario '" + config.scenario + "' ('fsdpsim list' shows them)");
  config.world.seed = config.seed;
  try {
    config.world.validate();
  } catch (const std::invalid_argument& e) {
    usage_error(e.what());
  }
  return config;
}

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB"};
  int unit = 0;
  while (bytes >= 1024 && unit < 3) {
    bytes /= 1024;
    ++unit;
  }
  std::ostringstream out;
  out << std::fixed << std::setprecision(unit ? 1 : 0) << bytes << " " << units[unit];
  return out.str();
}

int run(const RunConfig& config) {
  auto recorder = std::make_shared<sim::TraceRecorder>(config.world.world_size);
  sim::WorldOptions world_options = config.world;
  world_options.trace = recorder;
  sim::World world(world_options);

  std::cout << "fsdpsim: scenario " << config.scenario << ", " << config.world.world_size << " "
            << "ranks as " << sim::to_string(config.world.rank_kind) << " on the " << sim::to_string(config.world.backend)
            << " backend, " << config.steps << " steps, seed " << config.seed << std::endl;

  scenarios::DataParallelOptions options;
  options.steps = config.steps;
  options.seed = config.seed;
  const int n = config.world.world_size;
  std::vector<std::vector<scenarios::StepStats>> per_rank(n);
  std::mutex progress_mutex;
  const auto started = std::chrono::steady_clock::now();
  auto result = world.run([&](sim::RankContext& ctx) {
    per_rank[ctx.rank()] = scenarios::train_data_parallel_mlp(
        ctx, options, [&](int step, const scenarios::StepStats& stats) {
          if (ctx.rank() != 0) return;
          std::lock_guard<std::mutex> lock(progress_mutex);
          std::cout << "  step " << step + 1 << "/" << config.steps << "  rank 0 loss " << std::setprecision(6)
                    << stats.loss << "  " << std::fixed << std::setprecision(2) << stats.step_ns / 1e6 << " ms"
                    << std::defaultfloat << std::endl;
        });
  });
  const double total_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

  {
    std::ofstream chrome(config.trace_path);
    if (!chrome) {
      std::cerr << "fsdpsim: cannot write trace to " << config.trace_path << std::endl;
      return 1;
    }
    recorder->write_chrome_trace(chrome);
    std::ofstream lines(config.trace_path + ".jsonl");
    recorder->write_jsonl(lines);
  }

  if (!result.ok()) {
    std::cerr << "fsdpsim: the run failed:\n" << result.error_report();
    std::cerr << "fsdpsim: partial trace written to " << config.trace_path << std::endl;
    return 1;
  }

  std::cout << "\nsummary\n";
  std::cout << "  loss per step (mean over ranks):";
  for (int step = 0; step < config.steps; ++step) {
    double sum = 0;
    for (int r = 0; r < n; ++r) sum += per_rank[r][step].loss;
    std::cout << " " << std::setprecision(6) << sum / n;
  }
  std::cout << "\n";
  std::vector<int64_t> step_times;
  for (int r = 0; r < n; ++r) {
    for (const auto& s : per_rank[r]) step_times.push_back(s.step_ns);
  }
  std::sort(step_times.begin(), step_times.end());
  std::cout << "  step time (all ranks): median " << std::fixed << std::setprecision(2)
            << step_times[step_times.size() / 2] / 1e6 << " ms, max " << step_times.back() / 1e6 << " ms"
            << std::defaultfloat << "\n";

  std::map<std::string, int64_t> count_by_op;
  std::map<std::string, double> bytes_by_op;
  int failed = 0;
  for (const auto& event : recorder->events()) {
    if (!event.is_collective() || event.rank != 0) continue;
    count_by_op[to_string(event.op)] += 1;
    const double element = event.dtype == "Double" || event.dtype == "Long" ? 8
                           : event.dtype == "Half" || event.dtype == "BFloat16" ? 2
                                                                                 : 4;
    bytes_by_op[to_string(event.op)] += static_cast<double>(std::max(event.in_numel, event.out_numel)) * element;
    if (event.status != "completed") ++failed;
  }
  std::cout << "  collectives on rank 0:";
  for (const auto& [op, count] : count_by_op) {
    std::cout << " " << op << " x" << count << " (" << human_bytes(bytes_by_op[op]) << ")";
  }
  std::cout << (failed ? ", " + std::to_string(failed) + " not completed" : "") << "\n";
  std::cout << "  wall time " << std::fixed << std::setprecision(2) << total_s << " s\n";
  std::cout << "  trace: " << config.trace_path << " (open in https://ui.perfetto.dev), " << config.trace_path
            << ".jsonl (" << recorder->size() << " events)" << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h") {
    print_help();
    return args.empty() ? 2 : 0;
  }
  if (args[0] == "list") {
    for (const auto& [name, description] : kScenarios) std::cout << name << "  " << description << "\n";
    return 0;
  }
  if (args[0] != "run") usage_error("unknown command '" + args[0] + "'");
  at::set_num_threads(1);
  RunConfig config = parse_run(std::vector<std::string>(args.begin() + 1, args.end()));
  try {
    return run(config);
  } catch (const std::exception& e) {
    std::cerr << "fsdpsim: " << e.what() << std::endl;
    return 1;
  }
}
