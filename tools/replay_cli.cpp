// `fsdpsim replay check|run|predict` (CLI11) and what each prints.

#include <ATen/ATen.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <thread>

#include <fmt/ranges.h>

#include "tools/cli.h"
#include "tools/format_util.h"
#include "tools/replay_lib.h"

namespace fsdpsim::tools {

namespace {

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
      case 'K':
      case 'k': scale = int64_t{1} << 10; break;
      case 'M':
      case 'm': scale = int64_t{1} << 20; break;
      case 'G':
      case 'g': scale = int64_t{1} << 30; break;
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

ReplayBackend parse_backend(const std::string& flag, const std::string& text) {
  try {
    return replay_backend_from_string(text);
  } catch (const std::invalid_argument& e) {
    throw UsageError(flag + std::strchr(e.what(), ' '));  // the message names --backend
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
  bool data_free = false;
};

// Options of run and predict.
void bind_replay_options(CLI::App& app, Args& a) {
  add_value(app, "--backend", "B", "fake-threads|fake-fibers|gloo-threads|gloo-processes (default fake-threads)",
            [&a](const std::string& v) { a.backend = parse_backend("--backend", v); });
  add_value(app, "--world-size", "N",
            "replay at another world size: all_gather / reduce_scatter keep their total size S (per-rank counts "
            "S/N, padded up); only groups over the whole world can be rescaled",
            [&a](const std::string& v) { a.world_size = static_cast<int>(parse_int("--world-size", v, 1, 65536)); });
  add_value(app, "--iterations", "K", "replay the whole trace K times (default 1)", [&a](const std::string& v) {
    a.options.iterations = static_cast<int>(parse_int("--iterations", v, 1, 1000000));
  });
  add_value(app, "--timeout-s", "S", "per-collective timeout (default 60)", [&a](const std::string& v) {
    a.options.timeout =
        std::chrono::milliseconds(static_cast<int64_t>(parse_double("--timeout-s", v, 0.001, 86400) * 1000));
  });
  add_value(app, "--max-bytes", "B", "one rank, one collective (default 1G; K, M, G suffixes)",
            [&a](const std::string& v) { a.options.limits.max_bytes_per_collective = parse_bytes("--max-bytes", v); });
  add_value(app, "--max-memory", "B", "all in-process ranks at once (default 8G)",
            [&a](const std::string& v) { a.options.limits.max_memory_bytes = parse_bytes("--max-memory", v); });
}

void bind_run_only_options(CLI::App& app, Args& a) {
  app.add_flag("--use-timestamps", a.options.use_timestamps, "sleep each rank's recorded gap before each collective");
  app.add_flag("--dry-run", a.dry_run, "print the trace's statistics only");
  app.add_flag("--check-data", a.options.check_data, "crafted inputs, every output verified bit for bit");
  app.add_flag("--per-op", a.per_op, "print every replayed collective's latency");
  add_value(app, "--max-sleep-s", "S", "--use-timestamps: limit on a rank's recorded gaps (default 60)",
            [&a](const std::string& v) { a.options.limits.max_sleep_s = parse_double("--max-sleep-s", v, 0, 86400); });
}

void bind_predict_only_options(CLI::App& app, Args& a) {
  add_value(app, "--calibrate-backend", "B",
            "fit latency and bandwidth to a replay of a few sizes on B "
            "(default fake-threads)",
            [&a](const std::string& v) { a.calibrate_backend = parse_backend("--calibrate-backend", v); });
  add_value(app, "--calibrate-world-sizes", "A,B",
            "worlds of the calibration replays (default: 2 and the trace's world, or 2 and 4 for a trace of 2 ranks)",
            [&a](const std::string& v) {
              a.calibrate_world_sizes.clear();
              for (int64_t world : parse_integer_list<UsageError>("--calibrate-world-sizes", v, 2, 65536)) {
                a.calibrate_world_sizes.push_back(static_cast<int>(world));
              }
            });
  add_value(app, "--latency-us", "X", "with --bandwidth-gbps: use these instead of calibrating",
            [&a](const std::string& v) { a.latency_us = parse_double("--latency-us", v, 0, 1e9); });
  add_value(app, "--bandwidth-gbps", "Y", "with --latency-us",
            [&a](const std::string& v) { a.bandwidth_gbps = parse_double("--bandwidth-gbps", v, 1e-9, 1e9); });
  add_value(app, "--preset", "NAME",
            "a named cost model (nvlink-h100, ib-ndr400, pcie4, ethernet-100g, gloo-loopback, fake-2core)",
            [&a](const std::string& v) {
              try {
                (void)sim::cost_model_preset(v);
              } catch (const std::invalid_argument& e) {
                throw UsageError(e.what());
              }
              a.preset = v;
            });
  add_value(
      app, "--parallel-links", "C",
      "links that move data at once (default: one per rank for given parameters; when calibrating, the cores "
      "of this host, 1 for fibers)",
      [&a](const std::string& v) { a.parallel_links = static_cast<int>(parse_int("--parallel-links", v, 0, 65536)); });
  app.add_flag("--measure", a.measure, "also replay at N and print prediction vs measurement with the error");
  app.add_flag("--data-free", a.data_free,
               "also replay at N on fiber ranks with meta tensors (no memory, no data moved) on a simulated clock: "
               "each rank computes for its recorded gaps and waits for its collectives (the cost model's time); "
               "prints the makespan of one pass");
}

// What needs the whole line.
void check_args(Args& a) {
  if (a.command == "run" && a.backend) a.options.backend = *a.backend;
  if (a.command != "predict") return;
  if (a.world_size == 0) throw UsageError("predict needs --world-size N");
  if (a.latency_us.has_value() != a.bandwidth_gbps.has_value()) {
    throw UsageError("--latency-us and --bandwidth-gbps go together");
  }
  const int sources = (a.latency_us ? 1 : 0) + (a.preset ? 1 : 0) + (a.calibrate_backend ? 1 : 0);
  if (sources > 1) throw UsageError("give one of --calibrate-backend, --preset, --latency-us/--bandwidth-gbps");
  if (a.backend && !a.measure) throw UsageError("--backend applies to predict with --measure");
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
  out << "fsdpsim replay check: " << a.trace << ": " << report.text();
  return report.clean() ? 0 : 1;
}

void print_yardstick(const ReplayPlan& plan, const ReplayResult& result, std::ostream& out) {
  int64_t largest = 0;
  for (const auto& t : result.collectives) largest = std::max(largest, t.total_bytes);
  if (largest == 0) return;
  const int64_t bytes = std::min<int64_t>(largest, int64_t{64} << 20);
  const double copy = memcpy_gbps(bytes);
  out << "memory yardstick: one thread copies " << human_bytes(static_cast<double>(bytes)) << " at "
      << fmt::format("{:.2f}", copy) << " GB/s here";
  for (const auto& s : summarize(result.collectives)) {
    if ((s.op == CollectiveOp::AllGather || s.op == CollectiveOp::ReduceScatter) && s.busbw_gbps > 0 && copy > 0) {
      out << "; " << to_string(s.op) << " busbw is " << fmt::format("{:.2f}", s.busbw_gbps / copy) << "x of it";
    }
  }
  out << "\n";
  (void)plan;
}

int cmd_run(const Args& a, std::ostream& out, std::ostream& err) {
  const ReplayTrace trace = load_replay_trace(a.trace);
  const ReplayPlan plan = make_replay_plan(trace, a.world_size, a.options.limits);
  if (a.dry_run) {
    out << "fsdpsim replay run --dry-run: " << a.trace << "\n" << format_plan_statistics(trace, plan);
    return 0;
  }
  out << "fsdpsim replay run: " << a.trace << ": world " << plan.world_size << " (trace world " << plan.trace_world_size
      << "), backend " << to_string(a.options.backend) << ", " << a.options.iterations
      << (a.options.iterations == 1 ? " iteration, " : " iterations, ") << plan.collectives
      << " collectives per iteration" << (a.options.use_timestamps ? ", recorded gaps" : "")
      << (a.options.check_data ? ", data check" : "") << (plan.padded ? ", per-rank counts padded" : "") << std::endl;
  const ReplayResult result = run_replay(plan, a.options);
  out << format_summary(summarize(result.collectives));
  out << "wall " << fmt::format("{:.3f}", result.wall_s) << " s; communication "
      << fmt::format("{:.3f}", ns_to_ms(result.total_latency_ns())) << " ms (sum of collective latencies)\n";
  if (a.per_op) {
    out << "per collective (iteration, group, seq, op, S, latency us):\n";
    for (const auto& t : result.collectives) {
      out << "  " << t.iteration + 1 << " " << plan.groups[t.group_index].name << " " << t.seq << " " << to_string(t.op)
          << " " << t.total_bytes << " " << fmt::format("{:.1f}", ns_to_us(t.latency_ns)) << "\n";
    }
  }
  if (is_fake(a.options.backend)) print_yardstick(plan, result, out);
  if (a.options.check_data) {
    if (!result.data_error.empty()) {
      out << "data check FAILED: " << result.data_error << "\n";
      err << "fsdpsim: error: " << result.data_error << std::endl;
      return 1;
    }
    out << "data check: " << result.checked_outputs
        << " outputs verified bit for bit (the latencies above include "
           "other ranks' verification work; time without --check-data)\n";
  }
  return 0;
}

// The cost model predict uses: given, a preset, or fitted to a calibration replay.
sim::CostModelParams predict_cost_model(const Args& a, const ReplayTrace& trace, ReplayBackend calibrate_on,
                                        std::ostream& out) {
  sim::CostModelParams params;
  if (a.latency_us) {
    params.latency_us = *a.latency_us;
    params.bandwidth_gbps = *a.bandwidth_gbps;
    params.max_parallel_links = a.parallel_links.value_or(0);
    out << "cost model: given, " << params.to_string() << "\n";
    return params;
  }
  if (a.preset) {
    params = sim::cost_model_preset(*a.preset);
    if (a.parallel_links) params.max_parallel_links = *a.parallel_links;
    out << "cost model: preset " << *a.preset << ", " << params.to_string() << "\n";
    return params;
  }
  std::vector<int> worlds = a.calibrate_world_sizes;
  if (worlds.empty()) worlds = {2, trace.world_size > 2 ? trace.world_size : 4};
  const int links = a.parallel_links.value_or(default_links(calibrate_on));
  ReplayOptions options = a.options;
  options.backend = calibrate_on;
  const auto samples = calibrate(make_replay_plan(trace, 0, a.options.limits), worlds, options);
  params = sim::fit_cost_model(samples, links);
  out << fmt::format("calibration: {} samples on {}, worlds {} (median of 5 after 1 untimed each):\n", samples.size(),
                     to_string(calibrate_on), fmt::join(worlds, ", "));
  out << fmt::format("  {:<15} {:>5} {:>11} {:>12} {:>12} {:>8}\n", "op", "world", "S", "measured us", "model us",
                     "error");
  for (const auto& s : samples) {
    const double model = static_cast<double>(sim::predict_ns(s.op, s.bytes, s.world_size, params));
    out << fmt::format("  {:<15} {:>5} {:>11} {:>12.1f} {:>12.1f} {:>7.1f}%\n", to_string(s.op), s.world_size,
                       human_bytes(static_cast<double>(s.bytes)), ns_to_us(s.time_ns), ns_to_us(model),
                       (model - s.time_ns) / s.time_ns * 100);
  }
  out << fmt::format("cost model: fitted, {} (rms error {:.1f}% over the calibration sizes)\n", params.to_string(),
                     100 * sim::rms_relative_error(samples, params));
  return params;
}

// Collectives of the plan per op: each (group, seq) once.
std::map<CollectiveOp, size_t> count_by_op(const ReplayPlan& plan) {
  std::map<CollectiveOp, size_t> counts;
  std::set<std::pair<size_t, uint64_t>> seen;
  for (const auto& program : plan.per_rank) {
    for (const auto& op : program) {
      if (seen.insert({op.group_index, op.seq}).second) ++counts[op.op];
    }
  }
  return counts;
}

void print_prediction(const Args& a, const ReplayPlan& target, const sim::CostModelParams& params,
                      const std::optional<ReplayResult>& measured_run, std::ostream& out) {
  std::map<CollectiveOp, int64_t> predicted_by_op;
  const int64_t predicted = predict_plan_ns(target, params, &predicted_by_op);
  std::map<CollectiveOp, int64_t> measured_by_op;
  int64_t measured = 0;
  const int iterations = a.options.iterations;
  if (measured_run) {
    for (const auto& t : measured_run->collectives) measured_by_op[t.op] += t.latency_ns;
    measured = measured_run->total_latency_ns() / iterations;
    for (auto& [op, ns] : measured_by_op) ns /= iterations;
  }
  const auto counts = count_by_op(target);
  out << "prediction at world " << a.world_size << " (communication time of one pass over the trace):\n";
  out << (a.measure ? fmt::format("  {:<15} {:>6} {:>13} {:>13} {:>8}\n", "op", "count", "predicted ms", "measured ms",
                                  "error")
                    : fmt::format("  {:<15} {:>6} {:>13}\n", "op", "count", "predicted ms"));
  auto row = [&](const std::string& name, size_t count, int64_t p, int64_t m) {
    if (!a.measure) {
      out << fmt::format("  {:<15} {:>6} {:>13.3f}\n", name, count, ns_to_ms(p));
      return;
    }
    const std::string error =
        m > 0 ? fmt::format("{:.1f}%", 100.0 * static_cast<double>(p - m) / static_cast<double>(m)) : "-";
    out << fmt::format("  {:<15} {:>6} {:>13.3f} {:>13.3f} {:>8}\n", name, count, ns_to_ms(p), ns_to_ms(m), error);
  };
  size_t total_count = 0;
  for (const auto& [op, p] : predicted_by_op) {
    const size_t count = counts.count(op) ? counts.at(op) : 0;
    row(to_string(op), count, p, measured_by_op[op]);
    total_count += count;
  }
  row("total", total_count, predicted, measured);
  if (a.measure) {
    out << fmt::format(
        "measured on {} at world {}{}; prediction error {:.1f}% (predicted {:.3f} ms, measured {:.3f} ms)\n",
        to_string(a.backend.value_or(a.calibrate_backend.value_or(ReplayBackend::FakeThreads))), a.world_size,
        iterations > 1 ? fmt::format(", mean of {} iterations", iterations) : "",
        100.0 * static_cast<double>(predicted - measured) / std::max<int64_t>(1, measured), ns_to_ms(predicted),
        ns_to_ms(measured));
  }
}

// The plan replayed data-free at the target world: critical path of the recorded gaps and modelled collectives.
void print_data_free_replay(const Args& a, const ReplayPlan& target, const sim::CostModelParams& params,
                            std::ostream& out) {
  ReplayOptions options = a.options;
  options.backend = ReplayBackend::FakeFibers;
  options.data_free = true;
  options.use_timestamps = true;
  options.check_data = false;
  options.cost_model = params;
  const ReplayResult result = run_replay(target, options);
  const int iterations = a.options.iterations;
  out << fmt::format(
      "data-free replay at world {} (fiber ranks, meta tensors, simulated clock; recorded gaps as compute): "
      "{:.3f} ms per pass on the slowest rank, of which collectives {:.3f} ms summed; {:.2f} s wall\n",
      a.world_size, ns_to_ms(result.simulated_end_ns / iterations), ns_to_ms(result.total_latency_ns() / iterations),
      result.wall_s);
}

int cmd_predict(const Args& a, std::ostream& out) {
  const ReplayTrace trace = load_replay_trace(a.trace);
  const ReplayPlan target = make_replay_plan(trace, a.world_size, a.options.limits);
  out << "fsdpsim replay predict: " << a.trace << ": trace world " << trace.world_size << " -> world " << a.world_size
      << ", " << target.collectives << " collectives" << (target.padded ? " (per-rank counts padded)" : "")
      << std::endl;
  const ReplayBackend calibrate_on = a.calibrate_backend.value_or(ReplayBackend::FakeThreads);
  const sim::CostModelParams params = predict_cost_model(a, trace, calibrate_on, out);
  std::optional<ReplayResult> measured;
  if (a.measure) {
    ReplayOptions options = a.options;
    options.backend = a.backend.value_or(calibrate_on);
    measured = run_replay(target, options);
  }
  print_prediction(a, target, params, measured, out);
  if (a.data_free) print_data_free_replay(a, target, params, out);
  return 0;
}

// Runs the parsed command; a trace that cannot be read or replayed exits 2.
int replay_action(Args& a, Command& command) {
  check_args(a);
  std::ostream& err = command.err;
  try {
    if (a.command == "check") return cmd_check(a, command.out);
    if (a.command == "run") return cmd_run(a, command.out, err);
    return cmd_predict(a, command.out);
  } catch (const TraceFileError& e) {
    err << "fsdpsim: error: " << a.trace << ": " << first_line(e.what()) << std::endl;
    return 2;
  } catch (const ReplayPlanError& e) {
    err << "fsdpsim: error: " << a.trace << ": " << first_line(e.what()) << std::endl;
    return 2;
  } catch (const ReplayRunError& e) {
    err << "fsdpsim: error: " << e.what() << std::endl;  // with each rank's report
    return 1;
  }
}

}  // namespace

void add_replay_command(CLI::App& root, Command& command, const std::vector<std::string>& worker_command) {
  CLI::App* replay = root.add_subcommand("replay", "check, replay and predict JSONL traces of fsdpsim worlds");
  replay->require_subcommand(1);
  replay->footer(
      "exit: 0 success / clean, 1 problems found or the replay failed, 2 usage error or a trace that cannot be "
      "read or replayed.");
  auto a = std::make_shared<Args>();
  a->options.worker_command = worker_command;
  auto add = [&](const std::string& name, const std::string& help) {
    CLI::App* sub = replay->add_subcommand(name, help);
    sub->add_option("trace", a->trace, "the trace (PATH.jsonl of fsdpsim run --trace PATH)")
        ->required()
        ->type_name("TRACE.jsonl");
    sub->callback([a, name, &command] {
      a->command = name;
      command.action = [a, &command] { return replay_action(*a, command); };
    });
    return sub;
  };
  add("check",
      "match every collective of every group across ranks by (group, seq); report op / dtype / size mismatches, "
      "missing ranks, ranks that stopped early, failed and in-flight collectives, a trace without collectives or "
      "with ranks the records do not back. Everything 'run' refuses is a problem here. Exit 0 clean, 1 problems.");
  CLI::App* run = add("run",
                      "replay the collectives with the recorded sizes, dtypes and order; per op: count, "
                      "p50/p95 latency, algbw, busbw");
  bind_replay_options(*run, *a);
  bind_run_only_options(*run, *a);
  CLI::App* predict = add("predict", "predict the trace's communication time at world size N with the cost model");
  bind_replay_options(*predict, *a);
  bind_predict_only_options(*predict, *a);
}

int replay_main(const std::vector<std::string>& args, std::ostream& out, std::ostream& err,
                const std::vector<std::string>& worker_command) {
  Command command{{"replay"}, out, err, {}};
  command.args.insert(command.args.end(), args.begin(), args.end());
  CLI::App root("fsdpsim", "fsdpsim");
  add_replay_command(root, command, worker_command);
  try {
    return run_command_line(root, command);
  } catch (const std::exception& e) {
    err << "fsdpsim: error: " << first_line(e.what()) << std::endl;
    return 1;
  }
}

}  // namespace fsdpsim::tools
