// fsdpsim_replay's command line (replay_main); tools/replay.cpp is the
// executable around it.

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>
#include <iomanip>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <thread>

#include "tools/format_util.h"
#include "tools/replay_lib.h"

namespace fsdpsim::tools {

namespace {

const char* kUsage =
    "usage:\n"
    "  fsdpsim_replay check TRACE.jsonl\n"
    "      match every collective of every group across ranks by (group, seq); report op / dtype / size\n"
    "      mismatches, missing ranks, ranks that stopped early, failed and in-flight collectives, a trace\n"
    "      without collectives or with ranks the records do not back. Everything 'run' refuses is a\n"
    "      problem here (one verdict for both). exit 0 clean, 1 problems found.\n"
    "  fsdpsim_replay run TRACE.jsonl [options]\n"
    "      replay the collectives with the recorded sizes, dtypes and order; per op: count, p50/p95\n"
    "      latency, algbw, busbw.\n"
    "      --backend fake-threads|fake-fibers|gloo-threads|gloo-processes   (default fake-threads)\n"
    "      --world-size N      replay at another world size: all_gather / reduce_scatter keep their\n"
    "                          total size S (per-rank counts S/N, padded up); only groups over the\n"
    "                          whole world can be rescaled\n"
    "      --iterations K      replay the whole trace K times (default 1)\n"
    "      --use-timestamps    sleep each rank's recorded gap before each of its collectives\n"
    "      --dry-run           print the trace's statistics only\n"
    "      --check-data        crafted inputs, every output verified bit for bit\n"
    "      --per-op            print every replayed collective's latency\n"
    "      --timeout-s S       per-collective timeout (default 60)\n"
    "  fsdpsim_replay predict TRACE.jsonl --world-size N [options]\n"
    "      predict the trace's communication time at world size N with the cost model\n"
    "      --calibrate-backend B   fit latency and bandwidth to a replay of a few sizes on B\n"
    "                              (default fake-threads)\n"
    "      --calibrate-world-sizes A,B   worlds of the calibration replays (default: 2 and the\n"
    "                          trace's world, or 2 and 4 for a trace of 2 ranks)\n"
    "      --latency-us X --bandwidth-gbps Y   use these instead of calibrating\n"
    "      --preset NAME       use a named preset (nvlink-h100, ib-ndr400, pcie4, ethernet-100g,\n"
    "                          gloo-loopback, fake-2core)\n"
    "      --parallel-links C  links that move data at once (default: one per rank for given\n"
    "                          parameters; when calibrating, the cores of this host, 1 for fibers)\n"
    "      --measure           also replay at N (--backend, default the calibration backend) and\n"
    "                          print prediction vs measurement with the percentage error\n"
    "      --iterations K      iterations of the measured replay (default 1)\n"
    "limits (run, predict): --max-bytes B (one rank, one collective; default 1G), --max-memory B\n"
    "  (all in-process ranks at once; default 8G), --max-sleep-s S (--use-timestamps; default 60).\n"
    "  Sizes take K, M, G suffixes (powers of 1024).\n"
    "exit: 0 success / clean, 1 problems found or the replay failed, 2 usage error or a trace that\n"
    "  cannot be read or replayed.\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

int64_t parse_int(const std::string& flag, const std::string& text, int64_t min, int64_t max) {
  return parse_integer<UsageError>(flag, text, min, max);
}

double parse_double(const std::string& flag, const std::string& text, double min, double max) {
  return parse_number<UsageError>(flag, text, min, max);
}

int64_t parse_bytes(const std::string& flag, const std::string& text) {
  std::string digits = text;
  int64_t scale = 1;
  if (!digits.empty()) {
    switch (digits.back()) {
      case 'K': case 'k': scale = int64_t{1} << 10; break;
      case 'M': case 'm': scale = int64_t{1} << 20; break;
      case 'G': case 'g': scale = int64_t{1} << 30; break;
      default: break;
    }
    if (scale != 1) digits.pop_back();
  }
  const int64_t max = (int64_t{1} << 50) / scale;
  try {
    return parse_int(flag, digits, 1, max) * scale;
  } catch (const UsageError&) {
    throw UsageError(flag + " needs a byte count (an integer, optionally with K, M or G) up to 1024T, got '" + text +
                     "'");
  }
}

struct Args {
  std::string command;
  std::string trace;
  ReplayOptions options;
  int world_size = 0;
  bool dry_run = false;
  bool per_op = false;
  // predict
  std::optional<ReplayBackend> backend;  // --backend as given
  std::optional<ReplayBackend> calibrate_backend;
  std::vector<int> calibrate_world_sizes;
  std::optional<double> latency_us;
  std::optional<double> bandwidth_gbps;
  std::optional<std::string> preset;
  std::optional<int> parallel_links;
  bool measure = false;
};

Args parse(const std::vector<std::string>& argv) {
  Args a;
  if (argv.empty()) throw UsageError("missing command (check, run or predict)");
  a.command = argv[0];
  if (a.command != "check" && a.command != "run" && a.command != "predict") {
    throw UsageError("unknown command '" + a.command + "' (check, run or predict)");
  }
  bool is_run = a.command == "run", is_predict = a.command == "predict";
  for (size_t i = 1; i < argv.size(); ++i) {
    const std::string& flag = argv[i];
    auto value = [&]() -> const std::string& {
      if (i + 1 >= argv.size()) throw UsageError(flag + " needs a value");
      return argv[++i];
    };
    auto only = [&](bool allowed) {
      if (!allowed) throw UsageError(flag + " does not apply to '" + a.command + "'");
    };
    if (flag.empty() || flag[0] != '-') {
      if (!a.trace.empty()) throw UsageError("one trace file, got '" + a.trace + "' and '" + flag + "'");
      a.trace = flag;
    } else if (flag == "--backend") {
      only(is_run || is_predict);
      try {
        a.backend = replay_backend_from_string(value());
      } catch (const std::invalid_argument& e) {
        throw UsageError(e.what());
      }
    } else if (flag == "--calibrate-backend") {
      only(is_predict);
      try {
        a.calibrate_backend = replay_backend_from_string(value());
      } catch (const std::invalid_argument& e) {
        throw UsageError(std::string("--calibrate-backend") + std::strchr(e.what(), ' '));
      }
    } else if (flag == "--world-size") {
      only(is_run || is_predict);
      a.world_size = static_cast<int>(parse_int(flag, value(), 1, 65536));
    } else if (flag == "--calibrate-world-sizes") {
      only(is_predict);
      a.calibrate_world_sizes.clear();
      for (int64_t world : parse_integer_list<UsageError>(flag, value(), 2, 65536)) {
        a.calibrate_world_sizes.push_back(static_cast<int>(world));
      }
    } else if (flag == "--iterations") {
      only(is_run || is_predict);
      a.options.iterations = static_cast<int>(parse_int(flag, value(), 1, 1000000));
    } else if (flag == "--use-timestamps") {
      only(is_run);
      a.options.use_timestamps = true;
    } else if (flag == "--dry-run") {
      only(is_run);
      a.dry_run = true;
    } else if (flag == "--check-data") {
      only(is_run);
      a.options.check_data = true;
    } else if (flag == "--per-op") {
      only(is_run);
      a.per_op = true;
    } else if (flag == "--timeout-s") {
      only(is_run || is_predict);
      a.options.timeout = std::chrono::milliseconds(
          static_cast<int64_t>(parse_double(flag, value(), 0.001, 86400) * 1000));
    } else if (flag == "--max-bytes") {
      only(is_run || is_predict);
      a.options.limits.max_bytes_per_collective = parse_bytes(flag, value());
    } else if (flag == "--max-memory") {
      only(is_run || is_predict);
      a.options.limits.max_memory_bytes = parse_bytes(flag, value());
    } else if (flag == "--max-sleep-s") {
      only(is_run);
      a.options.limits.max_sleep_s = parse_double(flag, value(), 0, 86400);
    } else if (flag == "--latency-us") {
      only(is_predict);
      a.latency_us = parse_double(flag, value(), 0, 1e9);
    } else if (flag == "--bandwidth-gbps") {
      only(is_predict);
      a.bandwidth_gbps = parse_double(flag, value(), 1e-9, 1e9);
    } else if (flag == "--preset") {
      only(is_predict);
      a.preset = value();
      try {
        (void)sim::cost_model_preset(*a.preset);
      } catch (const std::invalid_argument& e) {
        throw UsageError(e.what());
      }
    } else if (flag == "--parallel-links") {
      only(is_predict);
      a.parallel_links = static_cast<int>(parse_int(flag, value(), 0, 65536));
    } else if (flag == "--measure") {
      only(is_predict);
      a.measure = true;
    } else {
      throw UsageError("unknown option '" + flag + "'");
    }
  }
  if (a.trace.empty()) throw UsageError(a.command + " needs a trace file");
  if (is_run && a.backend) a.options.backend = *a.backend;
  if (is_predict) {
    if (a.world_size == 0) throw UsageError("predict needs --world-size N");
    if (a.latency_us.has_value() != a.bandwidth_gbps.has_value()) {
      throw UsageError("--latency-us and --bandwidth-gbps go together");
    }
    const int sources = (a.latency_us ? 1 : 0) + (a.preset ? 1 : 0) + (a.calibrate_backend ? 1 : 0);
    if (sources > 1) throw UsageError("give one of --calibrate-backend, --preset, --latency-us/--bandwidth-gbps");
    if (a.backend && !a.measure) throw UsageError("--backend applies to predict with --measure");
  }
  return a;
}

// A single-thread memcpy of `bytes`, median of a few, in GB/s: the in-memory
// yardstick for fake ranks.
double memcpy_gbps(int64_t bytes) {
  bytes = std::max<int64_t>(bytes, 4096);
  std::unique_ptr<char[]> src(new char[static_cast<size_t>(bytes)]);
  std::unique_ptr<char[]> dst(new char[static_cast<size_t>(bytes)]);
  std::memset(src.get(), 1, static_cast<size_t>(bytes));
  std::memset(dst.get(), 2, static_cast<size_t>(bytes));
  std::vector<double> ns;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    std::memcpy(dst.get(), src.get(), static_cast<size_t>(bytes));
    const auto t1 = std::chrono::steady_clock::now();
    ns.push_back(static_cast<double>(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count()));
    src[static_cast<size_t>(i)] = dst[static_cast<size_t>(bytes - 1 - i)];
  }
  std::sort(ns.begin(), ns.end());
  return ns[2] > 0 ? static_cast<double>(bytes) / ns[2] : 0;
}

bool is_fake(ReplayBackend b) { return b == ReplayBackend::FakeThreads || b == ReplayBackend::FakeFibers; }

int default_links(ReplayBackend b) {
  if (b == ReplayBackend::FakeFibers) return 1;  // every fiber rank copies on one OS thread
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

int cmd_check(const Args& a, std::ostream& out) {
  const ReplayTrace trace = load_replay_trace(a.trace);
  const CheckReport report = check_trace(trace);
  out << "fsdpsim_replay check: " << a.trace << ": " << report.text();
  return report.clean() ? 0 : 1;
}

void print_yardstick(const ReplayPlan& plan, const ReplayResult& result, std::ostream& out) {
  int64_t largest = 0;
  for (const auto& t : result.collectives) largest = std::max(largest, t.total_bytes);
  if (largest == 0) return;
  const int64_t bytes = std::min<int64_t>(largest, int64_t{64} << 20);
  const double copy = memcpy_gbps(bytes);
  out << "memory yardstick: one thread copies " << human_bytes(static_cast<double>(bytes)) << " at " << fixed(copy, 2)
      << " GB/s here";
  for (const auto& s : summarize(result.collectives)) {
    if ((s.op == CollectiveOp::AllGather || s.op == CollectiveOp::ReduceScatter) && s.busbw_gbps > 0 && copy > 0) {
      out << "; " << to_string(s.op) << " busbw is " << fixed(s.busbw_gbps / copy, 2) << "x of it";
    }
  }
  out << "\n";
  (void)plan;
}

int cmd_run(const Args& a, std::ostream& out, std::ostream& err) {
  const ReplayTrace trace = load_replay_trace(a.trace);
  const ReplayPlan plan = make_replay_plan(trace, a.world_size, a.options.limits);
  if (a.dry_run) {
    out << "fsdpsim_replay run --dry-run: " << a.trace << "\n" << format_plan_statistics(trace, plan);
    return 0;
  }
  out << "fsdpsim_replay run: " << a.trace << ": world " << plan.world_size << " (trace world "
      << plan.trace_world_size << "), backend " << to_string(a.options.backend) << ", " << a.options.iterations
      << (a.options.iterations == 1 ? " iteration, " : " iterations, ") << plan.collectives
      << " collectives per iteration" << (a.options.use_timestamps ? ", recorded gaps" : "")
      << (a.options.check_data ? ", data check" : "") << (plan.padded ? ", per-rank counts padded" : "") << std::endl;
  const ReplayResult result = run_replay(plan, a.options);
  out << format_summary(summarize(result.collectives));
  out << "wall " << fixed(result.wall_s, 3) << " s; communication " << fixed(result.total_latency_ns() / 1e6, 3)
      << " ms (sum of collective latencies)\n";
  if (a.per_op) {
    out << "per collective (iteration, group, seq, op, S, latency us):\n";
    for (const auto& t : result.collectives) {
      out << "  " << t.iteration + 1 << " " << plan.groups[t.group_index].name << " " << t.seq << " "
          << to_string(t.op) << " " << t.total_bytes << " " << fixed(t.latency_ns / 1e3, 1) << "\n";
    }
  }
  if (is_fake(a.options.backend)) print_yardstick(plan, result, out);
  if (a.options.check_data) {
    if (!result.data_error.empty()) {
      out << "data check FAILED: " << result.data_error << "\n";
      err << "fsdpsim_replay: " << result.data_error << std::endl;
      return 1;
    }
    out << "data check: " << result.checked_outputs << " outputs verified bit for bit (the latencies above include "
           "other ranks' verification work; time without --check-data)\n";
  }
  return 0;
}

int cmd_predict(const Args& a, std::ostream& out) {
  const ReplayTrace trace = load_replay_trace(a.trace);
  const ReplayPlan target = make_replay_plan(trace, a.world_size, a.options.limits);
  out << "fsdpsim_replay predict: " << a.trace << ": trace world " << trace.world_size << " -> world "
      << a.world_size << ", " << target.collectives << " collectives"
      << (target.padded ? " (per-rank counts padded)" : "") << std::endl;

  sim::CostModelParams params;
  ReplayBackend calibrate_on = a.calibrate_backend.value_or(ReplayBackend::FakeThreads);
  if (a.latency_us) {
    params.latency_us = *a.latency_us;
    params.bandwidth_gbps = *a.bandwidth_gbps;
    params.max_parallel_links = a.parallel_links.value_or(0);
    out << "cost model: given, " << params.to_string() << "\n";
  } else if (a.preset) {
    params = sim::cost_model_preset(*a.preset);
    if (a.parallel_links) params.max_parallel_links = *a.parallel_links;
    out << "cost model: preset " << *a.preset << ", " << params.to_string() << "\n";
  } else {
    std::vector<int> worlds = a.calibrate_world_sizes;
    if (worlds.empty()) worlds = {2, trace.world_size > 2 ? trace.world_size : 4};
    const int links = a.parallel_links.value_or(default_links(calibrate_on));
    ReplayOptions options = a.options;
    options.backend = calibrate_on;
    const ReplayPlan source = make_replay_plan(trace, 0, a.options.limits);
    const auto samples = calibrate(source, worlds, options);
    params = sim::fit_cost_model(samples, links);
    std::string world_list;
    for (int w : worlds) world_list += (world_list.empty() ? "" : ", ") + std::to_string(w);
    out << "calibration: " << samples.size() << " samples on " << to_string(calibrate_on) << ", worlds " << world_list
        << " (median of 5 after 1 untimed each):\n";
    char line[200];
    std::snprintf(line, sizeof line, "  %-15s %5s %11s %12s %12s %8s\n", "op", "world", "S", "measured us",
                  "model us", "error");
    out << line;
    for (const auto& s : samples) {
      const double model = static_cast<double>(sim::predict_ns(s.op, s.bytes, s.world_size, params));
      std::snprintf(line, sizeof line, "  %-15s %5d %11s %12.1f %12.1f %7.1f%%\n", to_string(s.op), s.world_size,
                    human_bytes(static_cast<double>(s.bytes)).c_str(), s.time_ns / 1e3, model / 1e3,
                    (model - s.time_ns) / s.time_ns * 100);
      out << line;
    }
    out << "cost model: fitted, " << params.to_string() << " (rms error " << fixed(100 * sim::rms_relative_error(samples, params), 1)
        << "% over the calibration sizes)\n";
  }

  std::map<CollectiveOp, int64_t> predicted_by_op;
  const int64_t predicted = predict_plan_ns(target, params, &predicted_by_op);
  std::map<CollectiveOp, int64_t> measured_by_op;
  std::map<CollectiveOp, size_t> count_by_op;
  int64_t measured = 0;
  const int iterations = a.options.iterations;
  ReplayBackend measure_on = a.backend.value_or(calibrate_on);
  if (a.measure) {
    ReplayOptions options = a.options;
    options.backend = measure_on;
    const ReplayResult result = run_replay(target, options);
    for (const auto& t : result.collectives) measured_by_op[t.op] += t.latency_ns;
    measured = result.total_latency_ns() / iterations;
    for (auto& [op, ns] : measured_by_op) ns /= iterations;
  }
  {
    std::set<std::pair<size_t, uint64_t>> seen;
    for (const auto& program : target.per_rank) {
      for (const auto& op : program) {
        if (seen.insert({op.group_index, op.seq}).second) ++count_by_op[op.op];
      }
    }
  }
  out << "prediction at world " << a.world_size << " (communication time of one pass over the trace):\n";
  char line[200];
  if (a.measure) {
    std::snprintf(line, sizeof line, "  %-15s %6s %13s %13s %8s\n", "op", "count", "predicted ms", "measured ms",
                  "error");
  } else {
    std::snprintf(line, sizeof line, "  %-15s %6s %13s\n", "op", "count", "predicted ms");
  }
  out << line;
  auto row = [&](const std::string& name, size_t count, int64_t p, int64_t m) {
    if (a.measure) {
      const std::string error = m > 0 ? fixed(100.0 * static_cast<double>(p - m) / static_cast<double>(m), 1) + "%" : "-";
      std::snprintf(line, sizeof line, "  %-15s %6zu %13.3f %13.3f %8s\n", name.c_str(), count, p / 1e6, m / 1e6,
                    error.c_str());
    } else {
      std::snprintf(line, sizeof line, "  %-15s %6zu %13.3f\n", name.c_str(), count, p / 1e6);
    }
    out << line;
  };
  size_t total_count = 0;
  for (const auto& [op, p] : predicted_by_op) {
    row(to_string(op), count_by_op[op], p, measured_by_op[op]);
    total_count += count_by_op[op];
  }
  row("total", total_count, predicted, measured);
  if (a.measure) {
    out << "measured on " << to_string(measure_on) << " at world " << a.world_size
        << (iterations > 1 ? ", mean of " + std::to_string(iterations) + " iterations" : "")
        << "; prediction error " << fixed(100.0 * static_cast<double>(predicted - measured) / std::max<int64_t>(1, measured), 1)
        << "% (predicted " << fixed(predicted / 1e6, 3) << " ms, measured " << fixed(measured / 1e6, 3) << " ms)\n";
  }
  return 0;
}

}  // namespace

int replay_main(const std::vector<std::string>& args, std::ostream& out, std::ostream& err,
                const std::vector<std::string>& worker_command) {
  if (!args.empty() && (args[0] == "--help" || args[0] == "-h" || args[0] == "help")) {
    out << kUsage;
    return 0;
  }
  Args a;
  try {
    a = parse(args);
  } catch (const UsageError& e) {
    err << "fsdpsim_replay: " << e.what() << " (see 'fsdpsim_replay --help')" << std::endl;
    return 2;
  }
  a.options.worker_command = worker_command;
  try {
    if (a.command == "check") return cmd_check(a, out);
    if (a.command == "run") return cmd_run(a, out, err);
    return cmd_predict(a, out);
  } catch (const TraceFileError& e) {
    err << "fsdpsim_replay: " << a.trace << ": " << e.what() << std::endl;
    return 2;
  } catch (const ReplayPlanError& e) {
    err << "fsdpsim_replay: " << a.trace << ": " << e.what() << std::endl;
    return 2;
  } catch (const ReplayRunError& e) {
    err << "fsdpsim_replay: " << e.what() << std::endl;
    return 1;
  } catch (const std::exception& e) {
    err << "fsdpsim_replay: " << e.what() << std::endl;
    return 1;
  }
}

}  // namespace fsdpsim::tools
