// `fsdpsim bench comm`: measures the communication backends side by side in one
// run and prints three tables:
//   1. the fake all-gather / reduce-scatter (thread ranks) against a plain
//      memcpy measured in the same run;
//   2. Gloo (thread ranks, and separate processes started with the process
//      launcher) against the fake;
//   3. a 4096-rank round on fiber ranks against thread ranks.
//
// Sizes follow nccl-tests: S is the TOTAL size (per-rank count x element size
// x n; the all-gather's output, the reduce-scatter's input), algbw = S / t and
// busbw = algbw x (n-1)/n. One collective's time t is, per iteration, the
// latest end minus the earliest start over all ranks (each rank starts its
// clock when it leaves a barrier and stops it when its wait() returns);
// tables quote the median over the timed iterations after a warm-up.
//
// Process mode: the parent re-executes this binary as workers
// (tools/worker.h, kind "bench-comm") under launch_processes(); each worker
// builds its group with make_gloo_process_group_from_env(), runs the same
// measurement, and rank 0 writes the medians as its result. The scale test
// runs each measurement in one worker (kind "bench-scale") so that it can be
// stopped.
//
// Exit code: 0 when every measurement ran (thread ranks that cannot be
// created in the scale test are reported, not an error), 1 when one failed,
// 2 for bad usage.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <exception>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "backends/gloo/gloo_process_group.h"
#include "backends/process_group.h"
#include "sim/world.h"
#include "tools/cli.h"
#include "tools/format_util.h"
#include "tools/process_launcher.h"
#include "tools/worker.h"

namespace {

using namespace fsdpsim;
using namespace std::chrono_literals;

constexpr const char* kProgram = "fsdpsim bench comm";
constexpr int64_t kMiB = 1024 * 1024;
constexpr int64_t kElementBytes = sizeof(float);
constexpr double kTargetRatio = 0.5;
constexpr int kTargetWorld = 8;
constexpr int64_t kTargetBytes = 16 * kMiB;

struct Config {
  bool quick = false;
  bool processes = true;
  bool gloo = true;
  std::vector<int64_t> sizes;  // total bytes S
  std::vector<int> worlds;
  int scale_ranks = 4096;
  bool scale_only = false;  // section 3 alone, fiber ranks only (profiling the round)
};

// The sizes and worlds of a quick or a full run; --scale-ranks overrides the default.
void complete(Config& config, std::optional<int> scale_ranks) {
  if (config.quick) {
    config.sizes = {1 * kMiB};
    config.worlds = {2};
    config.scale_ranks = 256;
  } else {
    config.sizes = {1 * kMiB, 4 * kMiB, 16 * kMiB, 64 * kMiB};
    config.worlds = {2, 4, 8};
  }
  if (scale_ranks) config.scale_ranks = *scale_ranks;
}

// ---------------------------------------------------------------------------
// Small helpers

using fsdpsim::tools::first_line;
using fsdpsim::tools::median;
using fsdpsim::tools::run_benchmark;
using fsdpsim::tools::seconds_since;

std::string size_label(int64_t bytes) {
  return bytes % kMiB == 0 ? fmt::format("{} MiB", bytes / kMiB)
                           : fmt::format("{:.2f} MiB", static_cast<double>(bytes) / kMiB);
}

double gbps(double bytes, double ns) { return ns > 0 ? bytes / ns : 0; }  // bytes/ns == GB/s

double bus_factor(int n) { return n > 1 ? static_cast<double>(n - 1) / n : 1.0; }

void progress(const std::string& line) { std::cout << line << std::endl; }

// ---------------------------------------------------------------------------
// Measurement

enum class Op { AllGather, ReduceScatter };
const Op kOps[] = {Op::AllGather, Op::ReduceScatter};

const char* op_name(Op op) { return op == Op::AllGather ? "all_gather" : "reduce_scatter"; }

struct Iterations {
  int warmup = 1;
  int timed = 1;
};

// Fewer iterations for large sizes keep the full run within a few minutes on
// two cores; Gloo moves data through loopback TCP and gets fewer still.
Iterations iterations_for(int64_t bytes, bool gloo, bool quick) {
  if (quick) return {0, 1};
  if (!gloo) {
    if (bytes <= 1 * kMiB) return {2, 15};
    if (bytes <= 4 * kMiB) return {2, 11};
    if (bytes <= 16 * kMiB) return {1, 7};
    return {1, 5};
  }
  if (bytes <= 1 * kMiB) return {1, 9};
  if (bytes <= 4 * kMiB) return {1, 7};
  if (bytes <= 16 * kMiB) return {1, 5};
  return {1, 3};
}

struct Measurement {
  double median_ns = 0;
  int iters = 0;
  bool ok() const { return iters > 0; }
};

/// Collective over `pg`: runs op with total size `bytes` (floats), `warmup`
/// untimed then `timed` timed iterations. Every rank returns the median over
/// iterations of (latest end - earliest start) across ranks; the per-rank
/// timestamps are exchanged with an all-gather, so this works the same for
/// ranks in this process and in other processes (steady_clock is
/// CLOCK_MONOTONIC, one clock for the whole host).
Measurement measure(ProcessGroup& pg, Op op, int64_t bytes, Iterations iterations) {
  const int n = pg.size();
  const int64_t chunk = bytes / kElementBytes / n;
  if (chunk * kElementBytes * n != bytes) {
    throw std::invalid_argument(size_label(bytes) + " does not split into " + std::to_string(n) + " float chunks");
  }
  at::Tensor small = at::full({chunk}, 1.0f + static_cast<float>(pg.rank()), at::kFloat);
  at::Tensor large = at::full({chunk * n}, 0.5f, at::kFloat);  // touched, so no page faults in the timing
  std::vector<int64_t> stamps(2 * static_cast<size_t>(iterations.timed));
  for (int i = 0; i < iterations.warmup + iterations.timed; ++i) {
    pg.barrier()->wait();
    const int64_t start = steady_now_ns();
    WorkPtr work = op == Op::AllGather ? pg.all_gather_into_tensor(large, small)
                                       : pg.reduce_scatter_tensor(small, large, ReduceScatterOptions{});
    work->wait();
    const int64_t end = steady_now_ns();
    if (i >= iterations.warmup) {
      stamps[2 * (i - iterations.warmup)] = start;
      stamps[2 * (i - iterations.warmup) + 1] = end;
    }
  }
  small = at::Tensor();
  large = at::Tensor();

  const int64_t per_rank = 2 * iterations.timed;
  at::Tensor mine = at::from_blob(stamps.data(), {per_rank}, at::kLong).clone();
  at::Tensor all = at::empty({per_rank * n}, at::kLong);
  pg.all_gather_into_tensor(all, mine)->wait();
  const int64_t* t = all.data_ptr<int64_t>();
  std::vector<double> durations;
  for (int i = 0; i < iterations.timed; ++i) {
    int64_t first_start = INT64_MAX, last_end = INT64_MIN;
    for (int r = 0; r < n; ++r) {
      first_start = std::min(first_start, t[r * per_rank + 2 * i]);
      last_end = std::max(last_end, t[r * per_rank + 2 * i + 1]);
    }
    durations.push_back(static_cast<double>(last_end - first_start));
  }
  return {median(durations), iterations.timed};
}

/// One thread copying `bytes` between two prefaulted buffers; median ns.
double memcpy_median_ns(int64_t bytes, Iterations iterations) {
  std::unique_ptr<char[]> src(new char[bytes]);
  std::unique_ptr<char[]> dst(new char[bytes]);
  std::memset(src.get(), 1, bytes);
  std::memset(dst.get(), 2, bytes);
  std::vector<double> samples;
  volatile char sink = 0;
  for (int i = 0; i < iterations.warmup + std::max(iterations.timed, 3); ++i) {
    src[i % bytes] = static_cast<char>(i);
    const int64_t start = steady_now_ns();
    std::memcpy(dst.get(), src.get(), bytes);
    const int64_t end = steady_now_ns();
    sink = sink + dst[(i * 4099) % bytes];
    if (i >= iterations.warmup) samples.push_back(static_cast<double>(end - start));
  }
  return median(samples);
}

// Results by (op, world, bytes).
using Key = std::tuple<Op, int, int64_t>;
using Results = std::map<Key, Measurement>;

/// Runs every (size, op) on one in-process world. With `memcpy_out`, rank 0
/// also measures the memcpy baseline of each size right before its
/// collectives, while the other ranks sleep in the barrier.
std::string run_world(sim::CommBackend backend, int world_size, const Config& config, Results& results,
                      std::map<Key, double>* memcpy_out) {
  sim::WorldOptions options;
  options.world_size = world_size;
  options.rank_kind = sim::RankKind::Threads;
  options.backend = backend;
  options.collective_timeout = 120s;
  options.gloo_check_collectives = false;  // raw Gloo: its per-call check would be timed too
  const bool gloo = backend == sim::CommBackend::Gloo;
  sim::World world(options);
  Results local;
  std::map<Key, double> memcpy_local;
  sim::WorldResult outcome;
  try {
    outcome = world.run([&](sim::RankContext& ctx) {
      ProcessGroup& pg = *ctx.world_group();
      for (int64_t bytes : config.sizes) {
        const Iterations iterations = iterations_for(bytes, gloo, config.quick);
        if (memcpy_out && ctx.rank() == 0) {
          memcpy_local[{Op::AllGather, world_size, bytes}] = memcpy_median_ns(bytes, iterations);
        }
        for (Op op : kOps) {
          Measurement m = measure(pg, op, bytes, iterations);
          if (ctx.rank() == 0) local[{op, world_size, bytes}] = m;
        }
      }
    });
  } catch (const std::exception& e) {
    return first_line(e.what());
  }
  if (!outcome.ok()) return first_line(outcome.error_report());
  results.insert(local.begin(), local.end());
  if (memcpy_out) memcpy_out->insert(memcpy_local.begin(), memcpy_local.end());
  return "";
}

/// Launches `world_size` worker processes; rank 0's result holds the medians.
std::string run_processes(int world_size, const std::vector<int64_t>& sizes, const Config& config, Results& results) {
  LaunchOptions options;
  options.nproc = world_size;
  std::ostringstream output;
  options.output = &output;
  options.timeout = 20s;
  options.deadline = 240s;
  const tools::WorkerRun run =
      tools::launch_workers({{"kind", "bench-comm"}, {"sizes", sizes}, {"quick", config.quick}}, options);
  if (!run.launched.ok()) return first_line(run.launched.report());
  if (!run.results[0]) return "rank 0 wrote no results";
  size_t parsed = 0;
  for (const auto& m : run.results[0]->at("measurements")) {
    const Op op = m.at("op").get<std::string>() == op_name(Op::AllGather) ? Op::AllGather : Op::ReduceScatter;
    results[{op, world_size, m.at("bytes").get<int64_t>()}] = {m.at("median_ns").get<double>(),
                                                               m.at("iters").get<int>()};
    ++parsed;
  }
  if (parsed != 2 * sizes.size()) {
    return "expected " + std::to_string(2 * sizes.size()) + " results from rank 0, got " + std::to_string(parsed);
  }
  return "";
}

// ---------------------------------------------------------------------------
// Scale: one round at thousands of ranks

struct ScaleResult {
  std::string error;           // empty when it ran
  double run_s = 0;            // World::run: start ranks, warm-up barrier, rounds, join
  double round_median_ns = 0;  // barrier + all_gather + reduce_scatter
  double memcpy_ns = 0;        // the round's bytes at memcpy speed, measured in the same process
  // CPU time of the same (fibers only: every rank runs on one OS thread, whose
  // clock then times the round): unlike wall time, not inflated by a loaded machine.
  double round_cpu_ns = 0;
  double memcpy_cpu_ns = 0;
  int rounds = 0;
};

int64_t thread_cpu_ns() {
  timespec now{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
  return static_cast<int64_t>(now.tv_sec) * 1'000'000'000 + now.tv_nsec;
}

// What a round's data costs at memory speed: the all-gather writes n x n
// floats (every rank's output) and the reduce-scatter reads as many (every
// rank's input), i.e. two copies of n x n floats; median of 3 (wall, CPU).
std::pair<double, double> round_memcpy_ns(int ranks) {
  const size_t count = static_cast<size_t>(ranks) * static_cast<size_t>(ranks);
  std::vector<float> from(count, 1.0F);
  std::vector<float> to(count, 0.0F);
  std::memcpy(to.data(), from.data(), count * sizeof(float));  // fault the pages in first
  std::vector<double> times, cpu_times;
  for (int i = 0; i < 3; ++i) {
    const int64_t start = steady_now_ns();
    const int64_t cpu_start = thread_cpu_ns();
    std::memcpy(to.data(), from.data(), count * sizeof(float));
    std::memcpy(from.data(), to.data(), count * sizeof(float));
    cpu_times.push_back(static_cast<double>(thread_cpu_ns() - cpu_start));
    times.push_back(static_cast<double>(steady_now_ns() - start));
  }
  return {median(times), median(cpu_times)};
}

ScaleResult run_scale(sim::RankKind kind, int ranks, int rounds) {
  sim::WorldOptions options;
  options.world_size = ranks;
  options.rank_kind = kind;
  options.thread_stack_bytes = 256 * 1024;
  options.collective_timeout = 300s;
  std::vector<int64_t> starts(static_cast<size_t>(ranks) * rounds), ends(starts.size());
  std::vector<int64_t> cpu_starts(starts.size()), cpu_ends(starts.size());
  ScaleResult result;
  result.rounds = rounds;
  const int64_t started = steady_now_ns();
  sim::WorldResult outcome;
  try {
    sim::World world(options);
    outcome = world.run([&](sim::RankContext& ctx) {
      ProcessGroup& pg = *ctx.world_group();
      const int r = ctx.rank();
      at::Tensor one = at::full({1}, static_cast<float>(r), at::kFloat);
      at::Tensor gathered = at::empty({ranks}, at::kFloat);
      at::Tensor reduced = at::empty({1}, at::kFloat);
      pg.barrier()->wait();  // every rank exists before the first round
      for (int i = 0; i < rounds; ++i) {
        starts[static_cast<size_t>(i) * ranks + r] = steady_now_ns();
        cpu_starts[static_cast<size_t>(i) * ranks + r] = thread_cpu_ns();
        pg.barrier()->wait();
        pg.all_gather_into_tensor(gathered, one)->wait();
        pg.reduce_scatter_tensor(reduced, gathered, ReduceScatterOptions{})->wait();
        cpu_ends[static_cast<size_t>(i) * ranks + r] = thread_cpu_ns();
        ends[static_cast<size_t>(i) * ranks + r] = steady_now_ns();
      }
    });
  } catch (const std::exception& e) {
    result.error = first_line(e.what());
    return result;
  }
  result.run_s = seconds_since(started);
  if (!outcome.ok()) {
    result.error = first_line(outcome.error_report());
    return result;
  }
  // Last end minus first start of each round, median over rounds.
  auto round_median = [&](const std::vector<int64_t>& from, const std::vector<int64_t>& to) {
    std::vector<double> durations;
    for (int i = 0; i < rounds; ++i) {
      const auto begin = static_cast<ptrdiff_t>(i) * ranks;
      const int64_t first = *std::min_element(from.begin() + begin, from.begin() + begin + ranks);
      const int64_t last = *std::max_element(to.begin() + begin, to.begin() + begin + ranks);
      durations.push_back(static_cast<double>(last - first));
    }
    return median(durations);
  };
  result.round_median_ns = round_median(starts, ends);
  if (kind == sim::RankKind::Fibers) result.round_cpu_ns = round_median(cpu_starts, cpu_ends);
  std::tie(result.memcpy_ns, result.memcpy_cpu_ns) = round_memcpy_ns(ranks);
  return result;
}

// ---------------------------------------------------------------------------
// Sections

struct Report {
  bool failed = false;
  Results fake;
  std::map<Key, double> memcpy_ns;
};

void section_fake(const Config& config, Report& report) {
  progress("[1/3] fake all_gather / reduce_scatter (thread ranks) vs memcpy ...");
  const int64_t started = steady_now_ns();
  std::map<int, std::string> errors;
  for (int n : config.worlds) {
    std::string error = run_world(sim::CommBackend::Fake, n, config, report.fake, &report.memcpy_ns);
    if (!error.empty()) {
      errors[n] = error;
      report.failed = true;
    }
  }
  std::cout << "\n== 1. fake backend (thread ranks) vs memcpy, same run (" << std::thread::hardware_concurrency()
            << " cores) ==\n"
            << "  S = total size (all_gather output = reduce_scatter input); each rank contributes S/n.\n"
            << "  time = median over iterations of (last rank's end - first rank's start).\n"
            << "  algbw = S/t (the per-rank rate: each rank receives S), busbw = algbw*(n-1)/n.\n"
            << "  copy = n*S/t: the fake moves n*S bytes in all (all_gather: n ranks each write S;\n"
            << "         reduce_scatter: n ranks' S-byte inputs are read and summed).\n"
            << "  memcpy = S/t_memcpy: ONE thread copying one rank's S bytes (std::memcpy, prefaulted),\n"
            << "         measured right before that size's collectives.\n"
            << "  ratio = copy / memcpy (aggregate fake throughput vs single-thread memcpy; the fake's\n"
            << "         n thread ranks share the cores). Per-rank view: algbw / memcpy = ratio / n.\n";
  for (Op op : kOps) {
    std::cout << "\n  " << op_name(op) << "\n"
              << fmt::format("  {:>5} {:>8} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>7}\n", "world", "size", "iters",
                             "time(ms)", "algbw", "busbw", "copy", "memcpy", "ratio")
              << fmt::format("  {:>5} {:>8} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>7}\n", "", "", "", "", "GB/s",
                             "GB/s", "GB/s", "GB/s", "");
    for (int n : config.worlds) {
      if (errors.count(n)) {
        std::cout << fmt::format("  {:5}  FAILED: {}\n", n, errors[n]);
        continue;
      }
      for (int64_t bytes : config.sizes) {
        const Measurement& m = report.fake[{op, n, bytes}];
        const double memcpy_gbps = gbps(bytes, report.memcpy_ns[{Op::AllGather, n, bytes}]);
        const double algbw = gbps(bytes, m.median_ns);
        const double copy = algbw * n;
        std::cout << fmt::format("  {:5} {:>8} {:6} {:10.3f} {:10.2f} {:10.2f} {:10.2f} {:10.2f} {:7.2f}\n", n,
                                 size_label(bytes), m.iters, ns_to_ms(m.median_ns), algbw, algbw * bus_factor(n), copy,
                                 memcpy_gbps, memcpy_gbps > 0 ? copy / memcpy_gbps : 0.0);
      }
    }
  }
  const Key target{Op::AllGather, kTargetWorld, kTargetBytes};
  std::string target_line =
      fmt::format("target: fake all_gather copy >= {:.1f} x memcpy at {} ranks, {}: ", kTargetRatio, kTargetWorld,
                  size_label(kTargetBytes));
  auto found = report.fake.find(target);
  if (found != report.fake.end() && found->second.ok()) {
    const double ratio =
        gbps(kTargetBytes, found->second.median_ns) * kTargetWorld / gbps(kTargetBytes, report.memcpy_ns[target]);
    target_line += fmt::format("{} (ratio {:.2f})", ratio >= kTargetRatio ? "PASS" : "MISS", ratio);
  } else {
    // Not measured in this run; quote the largest measured case instead.
    const Key nearest{Op::AllGather, config.worlds.back(), config.sizes.back()};
    auto near = report.fake.find(nearest);
    const double ratio = near != report.fake.end() && near->second.ok()
                             ? gbps(config.sizes.back(), near->second.median_ns) * config.worlds.back() /
                                   gbps(config.sizes.back(), report.memcpy_ns[nearest])
                             : 0.0;
    target_line += fmt::format("NOT MEASURED{} (world {}, {}: ratio {:.2f})", config.quick ? " in --quick" : "",
                               config.worlds.back(), size_label(config.sizes.back()), ratio);
  }
  std::cout << "\n"
            << target_line << "\n"
            << fmt::format("(section 1 took {:.2f} s)\n", seconds_since(started)) << std::endl;
}

// Section 2's measurements: Gloo thread ranks and processes, with the
// worlds whose run failed.
struct GlooResults {
  Results threads, processes;
  std::map<int, std::string> thread_errors, process_errors;
  std::vector<std::string> notes;
};

void print_gloo_tables(const Config& config, const Report& report, GlooResults& g) {
  std::cout << "\n== 2. Gloo (loopback TCP) vs fake, same sizes and timing ==\n"
            << "  time in ms, busbw in GB/s; x-fake = Gloo time / fake time (how many times slower).\n"
            << "  fake: thread ranks, the numbers of section 1. gloo-thr: Gloo with thread ranks in this\n"
            << "  process. gloo-proc: one process per rank via launch_processes (this binary as workers).\n";
  for (const auto& note : g.notes) std::cout << "  note: " << note << "\n";
  auto cell = [](const Results& results, const Key& key, double fake_ns, const std::string& error) -> std::string {
    if (!error.empty()) return fmt::format(" {:>9} {:>7} {:>7}", "failed", "-", "-");
    auto found = results.find(key);
    if (found == results.end() || !found->second.ok()) return fmt::format(" {:>9} {:>7} {:>7}", "-", "-", "-");
    const int n = std::get<1>(key);
    const double ns = found->second.median_ns;
    return fmt::format(" {:9.3f} {:7.3f} {:7.1f}", ns_to_ms(ns), gbps(std::get<2>(key), ns) * bus_factor(n),
                       fake_ns > 0 ? ns / fake_ns : 0.0);
  };
  for (Op op : kOps) {
    std::cout << "\n  " << op_name(op) << "\n"
              << fmt::format("  {:>5} {:>8} | {:>9} {:>7} | {:>9} {:>7} {:>7} | {:>9} {:>7} {:>7}\n", "world", "size",
                             "fake", "", "gloo-thr", "", "", "gloo-proc", "", "")
              << fmt::format("  {:>5} {:>8} | {:>9} {:>7} | {:>9} {:>7} {:>7} | {:>9} {:>7} {:>7}\n", "", "", "time",
                             "busbw", "time", "busbw", "x-fake", "time", "busbw", "x-fake");
    for (int n : config.worlds) {
      for (int64_t bytes : config.sizes) {
        const Key key{op, n, bytes};
        auto fake = report.fake.find(key);
        const double fake_ns = fake != report.fake.end() ? fake->second.median_ns : 0;
        std::string fake_cell =
            fake_ns > 0 ? fmt::format(" {:9.3f} {:7.3f}", ns_to_ms(fake_ns), gbps(bytes, fake_ns) * bus_factor(n))
                        : fmt::format(" {:>9} {:>7}", "-", "-");
        std::string proc_cell = config.processes ? cell(g.processes, key, fake_ns, g.process_errors[n])
                                                 : fmt::format(" {:>9} {:>7} {:>7}", "skipped", "-", "-");
        std::cout << fmt::format("  {:5} {:>8} |", n, size_label(bytes)) << fake_cell << " |"
                  << cell(g.threads, key, fake_ns, g.thread_errors[n]) << " |" << proc_cell << "\n";
      }
    }
  }
}

// One line per op for the benchmark report: the largest world at 16 MiB (or the largest size).
void print_gloo_ratios(const Config& config, const Report& report, const GlooResults& g) {
  const int n = config.worlds.back();
  int64_t bytes = config.sizes.back();
  for (int64_t size : config.sizes) {
    if (size == 16 * kMiB) bytes = size;
  }
  for (Op op : kOps) {
    const Key key{op, n, bytes};
    auto fake = report.fake.find(key);
    auto ratio = [&](const Results& results) -> std::string {
      auto found = results.find(key);
      if (fake == report.fake.end() || found == results.end() || !found->second.ok()) return "n/a";
      return fmt::format("{:.2f}", found->second.median_ns / fake->second.median_ns);
    };
    std::cout << fmt::format("ratio gloo/fake {} at {} ranks, {}: threads {}, processes {}\n", op_name(op), n,
                             size_label(bytes), ratio(g.threads), config.processes ? ratio(g.processes) : "skipped");
  }
}

void section_gloo(const Config& config, Report& report) {
  if (!config.gloo) {
    progress("[2/3] Gloo vs fake: skipped (--no-gloo)\n");
    return;
  }
  progress("[2/3] Gloo thread ranks" + std::string(config.processes ? " and Gloo processes" : "") + " vs fake ...");
  const int64_t started = steady_now_ns();
  GlooResults g;
  for (int n : config.worlds) {
    std::string error = run_world(sim::CommBackend::Gloo, n, config, g.threads, nullptr);
    if (!error.empty()) {
      g.thread_errors[n] = error;
      report.failed = true;
    }
  }
  // Every process loads LibTorch and holds its own buffers; the sizes are not
  // capped today (the whole full run stays within a few minutes on 2 cores),
  // but the launch has a deadline and a missing result is reported as such.
  if (config.processes) {
    for (int n : config.worlds) {
      std::string error;
      try {
        error = run_processes(n, config.sizes, config, g.processes);
      } catch (const std::exception& e) {
        error = first_line(e.what());
      }
      if (!error.empty()) {
        g.process_errors[n] = error;
        report.failed = true;
      }
    }
  } else {
    g.notes.push_back("Gloo processes skipped (--no-processes)");
  }

  print_gloo_tables(config, report, g);
  print_gloo_ratios(config, report, g);
  for (const auto& [n, error] : g.thread_errors) {
    if (!error.empty()) std::cout << "  gloo-thr world " << n << " failed: " << error << "\n";
  }
  for (const auto& [n, error] : g.process_errors) {
    if (!error.empty()) std::cout << "  gloo-proc world " << n << " failed: " << error << "\n";
  }
  std::cout << fmt::format("(section 2 took {:.2f} s)\n", seconds_since(started)) << std::endl;
}

/// Runs one scale measurement in a worker process (kind "bench-scale") so
/// that a run that takes too long can be stopped: a World cannot be
/// cancelled from outside while its ranks make progress.
ScaleResult run_scale_child(sim::RankKind kind, int ranks, int rounds, std::chrono::seconds deadline, bool& timed_out) {
  LaunchOptions options;
  options.nproc = 1;
  std::ostringstream output;
  options.output = &output;
  options.prefix_output = false;
  options.timeout = 5s;
  options.deadline = deadline;
  const tools::WorkerRun run = tools::launch_workers(
      {{"kind", "bench-scale"}, {"rank_kind", sim::to_string(kind)}, {"ranks", ranks}, {"rounds", rounds}}, options);
  timed_out = run.launched.deadline_exceeded;
  ScaleResult result;
  result.rounds = rounds;
  if (timed_out) {
    result.error = fmt::format("did not finish within {} s (stopped)", deadline.count());
  } else if (!run.results[0]) {
    result.error = run.launched.ok() ? "no result" : first_line(run.launched.report());
  } else {
    result.error = run.results[0]->at("error").get<std::string>();
    result.round_median_ns = run.results[0]->at("round_median_ns").get<double>();
    result.run_s = run.results[0]->at("run_s").get<double>();
    result.memcpy_ns = run.results[0]->at("memcpy_ns").get<double>();
    result.round_cpu_ns = run.results[0]->at("round_cpu_ns").get<double>();
    result.memcpy_cpu_ns = run.results[0]->at("memcpy_cpu_ns").get<double>();
  }
  return result;
}

// The round against the memory traffic of its data (2 x n^2 floats), both
// measured in the fiber run's process.
void print_round_vs_memcpy(const std::vector<int>& ladder,
                           const std::vector<std::pair<ScaleResult, ScaleResult>>& rows) {
  for (size_t i = 0; i < ladder.size(); ++i) {
    const ScaleResult& fibers = rows[i].first;
    if (!fibers.error.empty() || fibers.memcpy_ns <= 0) continue;
    std::cout << fmt::format(
        "fiber round vs memcpy at {} ranks: round {:.3f} ms, memcpy of its {} {:.3f} ms, ratio {:.1f}\n", ladder[i],
        ns_to_ms(fibers.round_median_ns), tools::human_bytes(2.0 * ladder[i] * ladder[i] * sizeof(float)),
        ns_to_ms(fibers.memcpy_ns), fibers.round_median_ns / fibers.memcpy_ns);
    if (fibers.round_cpu_ns > 0 && fibers.memcpy_cpu_ns > 0) {
      std::cout << fmt::format(
          "  CPU time (not inflated by other load): round {:.3f} ms, memcpy {:.3f} ms, ratio {:.1f}\n",
          ns_to_ms(fibers.round_cpu_ns), ns_to_ms(fibers.memcpy_cpu_ns), fibers.round_cpu_ns / fibers.memcpy_cpu_ns);
    }
  }
}

void section_scale(const Config& config) {
  const int target = config.scale_ranks;
  const int rounds = config.quick ? 1 : 3;
  const auto deadline = std::chrono::seconds(60);
  std::vector<int> ladder;
  if (!config.quick && !config.scale_only) {
    for (int ranks : {256, 512}) {
      if (ranks < target) ladder.push_back(ranks);
    }
  }
  ladder.push_back(target);
  progress(
      fmt::format("[3/3] {}-rank round (barrier + all_gather of 1 float per rank + reduce_scatter): fibers vs "
                  "threads ...",
                  target));
  const int64_t started = steady_now_ns();
  std::vector<std::pair<ScaleResult, ScaleResult>> rows;
  int threads_stopped_at = 0;
  for (int ranks : ladder) {
    bool timed_out = false;
    ScaleResult fibers = run_scale_child(sim::RankKind::Fibers, ranks, rounds, deadline, timed_out);
    ScaleResult threads;
    if (config.scale_only) {
      threads.error = "not run (--scale-only)";
    } else if (threads_stopped_at) {
      threads.error =
          fmt::format("not run ({} thread ranks already took over {} s)", threads_stopped_at, deadline.count());
    } else {
      threads = run_scale_child(sim::RankKind::Threads, ranks, rounds, deadline, timed_out);
      if (timed_out) threads_stopped_at = ranks;
    }
    rows.emplace_back(fibers, threads);
  }

  std::cout << "\n== 3. " << target << " ranks: fiber ranks vs thread ranks (fake backend) ==\n"
            << "  round = barrier + all_gather (1 float per rank) + reduce_scatter; its time is the last rank's end\n"
            << "  minus the first rank's start, median over " << rounds << " round(s) after a warm-up barrier.\n"
            << "  run = the whole World::run (start the ranks, warm-up barrier, rounds, join). Each kind runs\n"
            << "  in a child process stopped after " << deadline.count() << " s; fibers: one OS thread, 512 KiB"
            << " stacks; threads: 256 KiB stacks.\n"
            << fmt::format("  {:>6} | {:>10} {:>8} | {:>10} {:>8} | {:>9} {:>8}\n", "", "fibers", "", "threads", "",
                           "threads/", "")
            << fmt::format("  {:>6} | {:>10} {:>8} | {:>10} {:>8} | {:>9} {:>8}\n", "ranks", "round(ms)", "run(s)",
                           "round(ms)", "run(s)", "fib round", "run");
  std::string ratio_line;
  for (size_t i = 0; i < ladder.size(); ++i) {
    const auto& [fibers, threads] = rows[i];
    std::string line = fmt::format("  {:6} |", ladder[i]);
    line += fibers.error.empty() ? fmt::format(" {:10.3f} {:8.3f} |", ns_to_ms(fibers.round_median_ns), fibers.run_s)
                                 : fmt::format(" {:>19} |", "failed");
    line += threads.error.empty() ? fmt::format(" {:10.3f} {:8.3f} |", ns_to_ms(threads.round_median_ns), threads.run_s)
                                  : fmt::format(" {:>19} |", "see below");
    if (fibers.error.empty() && threads.error.empty() && fibers.round_median_ns > 0 && fibers.run_s > 0) {
      const double round_ratio = threads.round_median_ns / fibers.round_median_ns;
      const double run_ratio = threads.run_s / fibers.run_s;
      line += fmt::format(" {:9.1f} {:8.1f}", round_ratio, run_ratio);
      ratio_line =
          fmt::format("ratio threads/fibers at {} ranks: round {:.2f}, run {:.2f}", ladder[i], round_ratio, run_ratio);
      if (ladder[i] != target) ratio_line += fmt::format(" ({} ranks: see below)", target);
    } else if (fibers.error.empty() && threads_stopped_at == ladder[i] && fibers.run_s > 0) {
      line += fmt::format(" {:>9} {:>8}", "-",
                          fmt::format(">{:.0f}", static_cast<double>(deadline.count()) / fibers.run_s));
      ratio_line = fmt::format("ratio threads/fibers at {} ranks: run > {:.0f} (threads did not finish within {} s)",
                               ladder[i], static_cast<double>(deadline.count()) / fibers.run_s, deadline.count());
    } else {
      line += fmt::format(" {:>9} {:>8}", "-", "-");
    }
    std::cout << line << "\n";
  }
  for (size_t i = 0; i < ladder.size(); ++i) {
    if (!rows[i].first.error.empty())
      std::cout << fmt::format("  fibers, {} ranks: {}\n", ladder[i], rows[i].first.error);
    if (!rows[i].second.error.empty()) {
      std::cout << fmt::format("  threads, {} ranks: {}\n", ladder[i], rows[i].second.error);
    }
  }
  std::cout << (ratio_line.empty() ? "ratio threads/fibers: n/a (no size ran on both kinds)" : ratio_line) << "\n";
  print_round_vs_memcpy(ladder, rows);
  std::cout << fmt::format("(section 3 took {:.2f} s)\n", seconds_since(started)) << std::endl;
}

int bench_comm_main(const Config& config) {
  return run_benchmark(kProgram, config.quick, "ATen intra-op threads 1, float32", [&config] {
    Report report;
    if (!config.scale_only) {
      section_fake(config, report);
      section_gloo(config, report);
    }
    section_scale(config);
    return !report.failed;
  });
}

}  // namespace

namespace fsdpsim::tools {

void add_bench_comm_command(CLI::App& bench, Command& command) {
  CLI::App* comm = bench.add_subcommand(
      "comm",
      "measure, in one run: the fake all-gather / reduce-scatter (thread ranks) against a memcpy of the same "
      "bytes; Gloo thread ranks and Gloo processes against the fake; a 4096-rank round on fiber ranks against "
      "thread ranks");
  auto config = std::make_shared<Config>();
  auto scale_ranks = std::make_shared<std::optional<int>>();
  comm->add_flag("--quick", config->quick,
                 "tiny run: 1 MiB, world 2, 1 iteration, 2 Gloo processes, 256-rank scale test");
  comm->add_flag_callback(
      "--no-processes", [config] { config->processes = false; }, "skip the Gloo process measurements");
  comm->add_flag_callback(
      "--no-gloo", [config] { config->gloo = false; }, "skip every Gloo measurement (threads and processes)");
  comm->add_flag("--scale-only", config->scale_only,
                 "run only section 3 at --scale-ranks ranks, fiber ranks only (to profile the round)");
  add_value(*comm, "--scale-ranks", "N", "ranks of the fiber/thread scale test (default 4096; 256 with --quick)",
            [scale_ranks](const std::string& v) {
              *scale_ranks = static_cast<int>(parse_integer<UsageError>("--scale-ranks", v, 2, 16384));
            });
  comm->callback([config, scale_ranks, &command] {
    command.action = [config, scale_ranks] {
      complete(*config, *scale_ranks);
      return bench_comm_main(*config);
    };
  });
}

int bench_comm_worker(const WorkerContext& context) {
  using namespace std::chrono_literals;
  ProcessGroupPtr pg = make_gloo_process_group_from_env(120s, /*check_collectives=*/false);
  const bool quick = context.job().at("quick").get<bool>();
  nlohmann::json measurements = nlohmann::json::array();
  for (int64_t bytes : context.job().at("sizes").get<std::vector<int64_t>>()) {
    const Iterations iterations = iterations_for(bytes, /*gloo=*/true, quick);
    for (Op op : kOps) {
      const Measurement m = measure(*pg, op, bytes, iterations);
      measurements.push_back({{"op", op_name(op)}, {"bytes", bytes}, {"median_ns", m.median_ns}, {"iters", m.iters}});
    }
  }
  pg->barrier()->wait();
  if (pg->rank() == 0) context.write_result({{"measurements", measurements}});
  return 0;
}

int bench_scale_worker(const WorkerContext& context) {
  const nlohmann::json& job = context.job();
  const sim::RankKind kind = job.at("rank_kind").get<std::string>() == sim::to_string(sim::RankKind::Fibers)
                                 ? sim::RankKind::Fibers
                                 : sim::RankKind::Threads;
  const ScaleResult result = run_scale(kind, job.at("ranks").get<int>(), job.at("rounds").get<int>());
  context.write_result({{"error", result.error},
                        {"round_median_ns", result.round_median_ns},
                        {"run_s", result.run_s},
                        {"memcpy_ns", result.memcpy_ns},
                        {"round_cpu_ns", result.round_cpu_ns},
                        {"memcpy_cpu_ns", result.memcpy_cpu_ns}});
  return 0;
}

}  // namespace fsdpsim::tools
