// `fsdpsim replay`: running a plan on ranks (in-process worlds or Gloo
// processes), verifying data, and calibrating the cost model.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>

#include "backends/gloo/gloo_process_group.h"
#include "sim/world.h"
#include "tools/format_util.h"
#include "tools/process_launcher.h"
#include "tools/replay_lib.h"
#include "tools/worker.h"

namespace fsdpsim::tools {

namespace {

using Json = nlohmann::json;

/// What one rank measured and found.
struct RankRecord {
  std::vector<int64_t> start;  // by iteration * ops + k
  std::vector<int64_t> end;
  size_t checked = 0;
  std::string data_error;
};

// ---------------------------------------------------------------------------
// Crafted data (tests/collective_suite.h's formula):
// value(rank, i) = ((rank * 7 + i * 3) % 11) - 5, for i in [start, start + count).

at::Tensor crafted(int rank, int64_t start, int64_t count, at::ScalarType dtype) {
  at::Tensor i = at::arange(start, start + count, at::kLong);
  return (i.mul(3).add(int64_t{rank} * 7)).remainder(11).sub(5).to(dtype);
}

// All-gather output: chunk j holds rank j's crafted values.
at::Tensor crafted_gathered(int ranks, int64_t count, at::ScalarType dtype) {
  if (count == 0) return at::empty({0}, dtype);
  at::Tensor idx = at::arange(int64_t{ranks} * count, at::kLong);
  at::Tensor j = idx.div(count, "floor");
  at::Tensor k = idx.remainder(count);
  return (j.mul(7).add(k.mul(3))).remainder(11).sub(5).to(dtype);
}

// Rank-order reduction in the dtype, as the fake backend computes it (half
// and bf16 through float, rounded after each step).
at::Tensor reduced(ReduceOp op, int ranks, int64_t start, int64_t count, at::ScalarType dtype) {
  at::Tensor acc = crafted(0, start, count, dtype);
  for (int j = 1; j < ranks; ++j) {
    at::Tensor x = crafted(j, start, count, dtype);
    switch (op) {
      case ReduceOp::Sum:
      case ReduceOp::Avg: acc = at::add(acc, x); break;
      case ReduceOp::Min: acc = at::minimum(acc, x); break;
      case ReduceOp::Max: acc = at::maximum(acc, x); break;
    }
  }
  if (op == ReduceOp::Avg) acc.div_(ranks);
  return acc;
}

constexpr int kUntouched = 7;  // outside the crafted range [-5, 5]

// A rank's buffer pool holds up to this many times its largest collective.
constexpr int64_t kPoolBuffers = 2;

std::string op_text(const PlannedOp& op, const std::string& group) {
  std::ostringstream out;
  out << "group " << group << " seq " << op.seq << " " << to_string(op.op);
  if (op.op != CollectiveOp::Barrier) {
    out << " " << c10::toString(op.dtype) << " in [" << op.in_numel << "] out [" << op.out_numel << "]";
  }
  out << " (trace line " << op.line << ")";
  return out.str();
}

// ---------------------------------------------------------------------------
// One rank's replay

// Groups of the plan as this rank sees them (nullptr where it is no member).
// Groups over the whole world in rank order are the world group itself; the
// others come from splits of it, disjoint groups batched into one split.
std::vector<ProcessGroupPtr> build_groups(const ReplayPlan& plan, const ProcessGroupPtr& world) {
  std::vector<ProcessGroupPtr> groups(plan.groups.size());
  std::vector<std::vector<size_t>> batches;
  std::set<int> used;
  for (size_t gi = 0; gi < plan.groups.size(); ++gi) {
    const auto& ranks = plan.groups[gi].ranks;
    bool identity = static_cast<int>(ranks.size()) == plan.world_size;
    for (size_t i = 0; identity && i < ranks.size(); ++i) identity = ranks[i] == static_cast<int>(i);
    if (identity) {
      groups[gi] = world;
      continue;
    }
    const bool disjoint = std::none_of(ranks.begin(), ranks.end(), [&](int r) { return used.count(r) > 0; });
    if (batches.empty() || !disjoint) {
      batches.emplace_back();
      used.clear();
    }
    batches.back().push_back(gi);
    used.insert(ranks.begin(), ranks.end());
  }
  for (const auto& batch : batches) {
    std::vector<std::vector<int>> partition;
    for (size_t gi : batch) partition.push_back(plan.groups[gi].ranks);
    ProcessGroupPtr sub = world->split(partition);
    if (!sub) continue;
    for (size_t gi : batch) {
      const auto& ranks = plan.groups[gi].ranks;
      if (std::find(ranks.begin(), ranks.end(), world->rank()) != ranks.end()) groups[gi] = sub;
    }
  }
  return groups;
}

// Timing runs reuse zero-filled buffers across collectives, so that no
// allocation or page fault (on this rank or, through the shared cores, on the
// others) lands inside a measured collective. Zeros stay zeros under every
// collective and reduce op, so the buffers never need refilling. When the
// pool would exceed its budget it starts over.
class BufferPool {
 public:
  explicit BufferPool(int64_t budget_bytes) : budget_(budget_bytes) {}
  at::Tensor get(at::ScalarType dtype, int64_t numel, int slot) {
    const auto key = std::make_tuple(static_cast<int>(dtype), numel, slot);
    auto it = tensors_.find(key);
    if (it != tensors_.end()) return it->second;
    at::Tensor t = at::zeros({numel}, dtype);
    const int64_t bytes = static_cast<int64_t>(t.nbytes());
    if (bytes_ + bytes > budget_) {
      tensors_.clear();
      bytes_ = 0;
    }
    bytes_ += bytes;
    tensors_.emplace(key, t);
    return t;
  }

 private:
  int64_t budget_;
  int64_t bytes_ = 0;
  std::map<std::tuple<int, int64_t, int>, at::Tensor> tensors_;
};

// Inputs crafted so the exact output is known, outputs pre-filled with a
// value no collective writes.
std::pair<at::Tensor, at::Tensor> crafted_buffers(const PlannedOp& op, int gr) {
  switch (op.op) {
    case CollectiveOp::AllGather:
    case CollectiveOp::ReduceScatter:
      return {crafted(gr, 0, op.in_numel, op.dtype), at::full({op.out_numel}, kUntouched, op.dtype)};
    case CollectiveOp::AllReduce: {
      at::Tensor t = crafted(gr, 0, op.in_numel, op.dtype);
      return {t, t};
    }
    case CollectiveOp::Broadcast: {
      at::Tensor t =
          gr == op.root ? crafted(gr, 0, op.in_numel, op.dtype) : at::full({op.in_numel}, kUntouched, op.dtype);
      return {t, t};
    }
    case CollectiveOp::Barrier: break;
  }
  return {};
}

// Data-free: shapes and dtypes only; in-place ops share one.
std::pair<at::Tensor, at::Tensor> meta_buffers(const PlannedOp& op) {
  if (op.op == CollectiveOp::Barrier) return {};
  const auto meta = at::TensorOptions().dtype(op.dtype).device(at::kMeta);
  at::Tensor input = at::empty({op.in_numel}, meta);
  const bool in_place = op.op == CollectiveOp::AllReduce || op.op == CollectiveOp::Broadcast;
  return {input, in_place ? input : at::empty({op.out_numel}, meta)};
}

// Reused uninitialised buffers (timing only); in-place ops share one.
std::pair<at::Tensor, at::Tensor> pooled_buffers(const PlannedOp& op, BufferPool& pool) {
  if (op.op == CollectiveOp::Barrier) return {};
  at::Tensor input = pool.get(op.dtype, op.in_numel, 0);
  const bool in_place = op.op == CollectiveOp::AllReduce || op.op == CollectiveOp::Broadcast;
  return {input, in_place ? input : pool.get(op.dtype, op.out_numel, 1)};
}

WorkPtr issue(ProcessGroup& group, const PlannedOp& op, const at::Tensor& input, const at::Tensor& output) {
  switch (op.op) {
    case CollectiveOp::AllGather: return group.all_gather_into_tensor(output, input);
    case CollectiveOp::ReduceScatter: {
      ReduceScatterOptions o;
      o.reduce_op = op.reduce_op;
      return group.reduce_scatter_tensor(output, input, o);
    }
    case CollectiveOp::AllReduce: {
      AllReduceOptions o;
      o.reduce_op = op.reduce_op;
      return group.all_reduce(input, o);
    }
    case CollectiveOp::Broadcast: {
      BroadcastOptions o;
      o.root = op.root;
      return group.broadcast(input, o);
    }
    case CollectiveOp::Barrier: break;
  }
  return group.barrier();
}

// What group rank `gr` of `n` must hold after the crafted op.
at::Tensor expected_output(const PlannedOp& op, int n, int gr) {
  switch (op.op) {
    case CollectiveOp::AllGather: return crafted_gathered(n, op.in_numel, op.dtype);
    case CollectiveOp::ReduceScatter:
      return reduced(op.reduce_op, n, int64_t{gr} * op.out_numel, op.out_numel, op.dtype);
    case CollectiveOp::AllReduce: return reduced(op.reduce_op, n, 0, op.in_numel, op.dtype);
    case CollectiveOp::Broadcast: return crafted(op.root, 0, op.in_numel, op.dtype);
    case CollectiveOp::Barrier: break;
  }
  return {};
}

void replay_rank(const ReplayPlan& plan, int rank, const ProcessGroupPtr& world, const ReplayOptions& options,
                 RankRecord& record) {
  const std::vector<ProcessGroupPtr> groups = build_groups(plan, world);
  BufferPool pool(kPoolBuffers * plan.max_buffer_bytes);
  const auto& program = plan.per_rank.at(static_cast<size_t>(rank));
  record.start.assign(program.size() * static_cast<size_t>(options.iterations), 0);
  record.end.assign(record.start.size(), 0);
  world->barrier()->wait();
  for (int it = 0; it < options.iterations; ++it) {
    for (size_t k = 0; k < program.size(); ++k) {
      const PlannedOp& op = program[k];
      if (options.use_timestamps && op.gap_ns > 0) sim::sleep_for(std::chrono::nanoseconds(op.gap_ns));
      const ProcessGroupPtr& group = groups[op.group_index];
      if (!group) {
        throw std::logic_error("replay: rank " + std::to_string(rank) + " has no handle on group " +
                               plan.groups[op.group_index].name);
      }
      const int gr = group->rank();
      const int n = group->size();
      const bool check = options.check_data;
      auto [input, output] =
          options.data_free ? meta_buffers(op) : (check ? crafted_buffers(op, gr) : pooled_buffers(op, pool));

      // Data-free: the simulated clock (sim::current_rank() is set: fiber ranks of a World).
      auto now = [&] { return options.data_free ? sim::current_rank()->clock().now_ns() : steady_now_ns(); };
      const int64_t start = now();
      issue(*group, op, input, output)->wait();
      const int64_t end = now();
      const size_t slot = static_cast<size_t>(it) * program.size() + k;
      record.start[slot] = start;
      record.end[slot] = end;

      if (!check || op.op == CollectiveOp::Barrier) continue;
      const at::Tensor expected = expected_output(op, n, gr);
      ++record.checked;
      if (record.data_error.empty() && !at::equal(output, expected)) {
        at::Tensor wrong = output.ne(expected).nonzero();
        const int64_t i = wrong.numel() > 0 ? wrong[0][0].item<int64_t>() : 0;
        std::ostringstream msg;
        msg << "data check failed on rank " << rank << ": " << op_text(op, plan.groups[op.group_index].name)
            << ", iteration " << it + 1 << ": element " << i << " is " << output[i].item<double>() << ", expected "
            << expected[i].item<double>();
        record.data_error = msg.str();
      }
    }
  }
  world->barrier()->wait();
}

// ---------------------------------------------------------------------------
// Collecting the ranks' records

ReplayResult collect(const ReplayPlan& plan, const ReplayOptions& options, const std::vector<RankRecord>& records,
                     double wall_s) {
  struct Acc {
    const PlannedOp* op = nullptr;
    int64_t last_start = 0, last_end = 0, first_start = std::numeric_limits<int64_t>::max();
  };
  std::map<std::tuple<int, size_t, uint64_t>, Acc> by_collective;  // (iteration, group, seq)
  for (int r = 0; r < plan.world_size; ++r) {
    const auto& program = plan.per_rank[static_cast<size_t>(r)];
    const auto& rec = records[static_cast<size_t>(r)];
    if (rec.start.size() != program.size() * static_cast<size_t>(options.iterations)) {
      throw ReplayRunError("replay: rank " + std::to_string(r) + " reported " + std::to_string(rec.start.size()) +
                           " timings, expected " + std::to_string(program.size() * options.iterations));
    }
    for (int it = 0; it < options.iterations; ++it) {
      for (size_t k = 0; k < program.size(); ++k) {
        const size_t slot = static_cast<size_t>(it) * program.size() + k;
        Acc& acc = by_collective[{it, program[k].group_index, program[k].seq}];
        acc.op = &program[k];
        acc.last_start = std::max(acc.last_start, rec.start[slot]);
        acc.last_end = std::max(acc.last_end, rec.end[slot]);
        acc.first_start = std::min(acc.first_start, rec.start[slot]);
      }
    }
  }
  ReplayResult result;
  result.wall_s = wall_s;
  std::vector<std::pair<std::pair<int, int64_t>, CollectiveTiming>> ordered;
  for (const auto& [key, acc] : by_collective) {
    CollectiveTiming t;
    t.iteration = std::get<0>(key);
    t.group_index = std::get<1>(key);
    t.seq = std::get<2>(key);
    t.op = acc.op->op;
    t.group_size = static_cast<int>(plan.groups[t.group_index].ranks.size());
    t.total_bytes = acc.op->total_bytes;
    t.per_rank_bytes = acc.op->in_numel * static_cast<int64_t>(c10::elementSize(acc.op->dtype));
    t.latency_ns = std::max<int64_t>(0, acc.last_end - acc.last_start);
    ordered.push_back({{t.iteration, acc.first_start}, t});
  }
  std::sort(ordered.begin(), ordered.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (auto& [key, t] : ordered) result.collectives.push_back(t);
  int wrong_ranks = 0;
  for (const auto& rec : records) {
    result.checked_outputs += rec.checked;
    if (rec.data_error.empty()) continue;
    if (result.data_error.empty()) result.data_error = rec.data_error;
    ++wrong_ranks;
  }
  if (wrong_ranks > 1) {
    result.data_error +=
        " (and wrong data on " + std::to_string(wrong_ranks - 1) + " more rank" + (wrong_ranks > 2 ? "s" : "") + ")";
  }
  return result;
}

void check_limits(const ReplayPlan& plan, const ReplayOptions& options, int in_process_ranks) {
  if (options.iterations < 1) throw ReplayPlanError("iterations must be >= 1");
  // Per rank: the buffer pool (timing) or the buffers plus the expected
  // tensors (data check), every in-process rank at once.
  const long double per_rank =
      static_cast<long double>(plan.max_buffer_bytes) * (options.check_data ? 2 : kPoolBuffers);
  const long double memory = per_rank * in_process_ranks;
  if (memory > static_cast<long double>(options.limits.max_memory_bytes)) {
    std::ostringstream msg;
    msg << "the replay needs about " << static_cast<double>(memory) << " bytes at once (" << in_process_ranks
        << " ranks x " << static_cast<double>(per_rank) << "), over the limit of " << options.limits.max_memory_bytes
        << " bytes (--max-memory)";
    throw ReplayPlanError(msg.str());
  }
  if (options.use_timestamps) {
    for (int r = 0; r < plan.world_size; ++r) {
      long double sleep_ns = 0;
      for (const auto& op : plan.per_rank[static_cast<size_t>(r)]) sleep_ns += op.gap_ns;
      const double sleep = ns_to_s(sleep_ns * options.iterations);
      if (sleep > options.limits.max_sleep_s) {
        std::ostringstream msg;
        msg << "--use-timestamps: rank " << r << "'s recorded gaps add up to " << static_cast<double>(sleep)
            << " s, over the limit of " << options.limits.max_sleep_s << " s (--max-sleep-s)";
        throw ReplayPlanError(msg.str());
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Gloo processes: the plan and options travel as JSON files.

Json plan_to_json(const ReplayPlan& plan) {
  Json j;
  j["world_size"] = plan.world_size;
  j["trace_world_size"] = plan.trace_world_size;
  j["padded"] = plan.padded;
  j["max_buffer_bytes"] = plan.max_buffer_bytes;
  j["collectives"] = plan.collectives;
  j["groups"] = Json::array();
  for (const auto& g : plan.groups) j["groups"].push_back({{"name", g.name}, {"ranks", g.ranks}});
  j["per_rank"] = Json::array();
  for (const auto& program : plan.per_rank) {
    Json ops = Json::array();
    for (const auto& op : program) {
      ops.push_back({op.line, op.group_index, op.seq, static_cast<int>(op.op), static_cast<int>(op.dtype), op.in_numel,
                     op.out_numel, static_cast<int>(op.reduce_op), op.root, op.gap_ns, op.buffer_bytes,
                     op.total_bytes});
    }
    j["per_rank"].push_back(std::move(ops));
  }
  return j;
}

ReplayPlan plan_from_json(const Json& j) {
  ReplayPlan plan;
  plan.world_size = j.at("world_size").get<int>();
  plan.trace_world_size = j.at("trace_world_size").get<int>();
  plan.padded = j.at("padded").get<bool>();
  plan.max_buffer_bytes = j.at("max_buffer_bytes").get<int64_t>();
  plan.collectives = j.at("collectives").get<size_t>();
  for (const auto& g : j.at("groups")) {
    plan.groups.push_back(PlannedGroup{g.at("name").get<std::string>(), g.at("ranks").get<std::vector<int>>()});
  }
  for (const auto& ops : j.at("per_rank")) {
    std::vector<PlannedOp> program;
    for (const auto& o : ops) {
      PlannedOp op;
      op.line = o.at(0).get<size_t>();
      op.group_index = o.at(1).get<size_t>();
      op.seq = o.at(2).get<uint64_t>();
      op.op = static_cast<CollectiveOp>(o.at(3).get<int>());
      op.dtype = static_cast<at::ScalarType>(o.at(4).get<int>());
      op.in_numel = o.at(5).get<int64_t>();
      op.out_numel = o.at(6).get<int64_t>();
      op.reduce_op = static_cast<ReduceOp>(o.at(7).get<int>());
      op.root = o.at(8).get<int>();
      op.gap_ns = o.at(9).get<int64_t>();
      op.buffer_bytes = o.at(10).get<int64_t>();
      op.total_bytes = o.at(11).get<int64_t>();
      program.push_back(op);
    }
    plan.per_rank.push_back(std::move(program));
  }
  return plan;
}

class TempDir {
 public:
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "fsdpsim-replay-XXXXXX").string();
    if (mkdtemp(pattern.data()) == nullptr) throw ReplayRunError("cannot create a temporary directory");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  if (!out) throw ReplayRunError("cannot write " + path);
}

Json read_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ReplayRunError("cannot read " + path);
  return Json::parse(in);
}

ReplayResult run_processes(const ReplayPlan& plan, const ReplayOptions& options) {
  if (options.worker_command.empty()) {
    throw ReplayPlanError("gloo-processes needs the command of a replay worker (ReplayOptions::worker_command)");
  }
  TempDir dir;  // the plan: too large for the job in the environment
  const std::string plan_path = dir.path() + "/plan.json";
  write_file(plan_path, plan_to_json(plan).dump());
  Json job;
  job["kind"] = kReplayWorker;
  job["plan"] = plan_path;
  job["iterations"] = options.iterations;
  job["use_timestamps"] = options.use_timestamps;
  job["check_data"] = options.check_data;
  job["timeout_ms"] = options.timeout.count();

  LaunchOptions launch;
  launch.nproc = plan.world_size;
  launch.command = options.worker_command;
  std::ostringstream output;
  launch.output = &output;
  launch.timeout = std::chrono::milliseconds(10000);
  launch.deadline = std::chrono::minutes(30);
  const int64_t started = steady_now_ns();
  const WorkerRun run = launch_workers(job, launch);
  const double wall_s = ns_to_s(steady_now_ns() - started);
  if (!run.launched.ok()) throw ReplayRunError("the replay failed (gloo-processes):\n" + run.launched.report());
  std::vector<RankRecord> records(static_cast<size_t>(plan.world_size));
  for (int r = 0; r < plan.world_size; ++r) {
    if (!run.results[r]) throw ReplayRunError("rank " + std::to_string(r) + " of gloo-processes wrote no result");
    const Json& j = *run.results[r];
    auto& rec = records[static_cast<size_t>(r)];
    rec.start = j.at("start").get<std::vector<int64_t>>();
    rec.end = j.at("end").get<std::vector<int64_t>>();
    rec.checked = j.at("checked").get<size_t>();
    rec.data_error = j.at("data_error").get<std::string>();
  }
  return collect(plan, options, records, wall_s);
}

}  // namespace

const char* to_string(ReplayBackend backend) {
  switch (backend) {
    case ReplayBackend::FakeThreads: return "fake-threads";
    case ReplayBackend::FakeFibers: return "fake-fibers";
    case ReplayBackend::GlooThreads: return "gloo-threads";
    case ReplayBackend::GlooProcesses: return "gloo-processes";
  }
  return "unknown";
}

ReplayBackend replay_backend_from_string(const std::string& name) {
  for (auto b : {ReplayBackend::FakeThreads, ReplayBackend::FakeFibers, ReplayBackend::GlooThreads,
                 ReplayBackend::GlooProcesses}) {
    if (name == to_string(b)) return b;
  }
  throw std::invalid_argument("--backend must be fake-threads, fake-fibers, gloo-threads or gloo-processes, got '" +
                              name + "'");
}

namespace {

// Runs every rank's program of `plan` in one in-process world; `what` names
// the world in errors. The simulated end is the world's simulated clock when
// it keeps one.
ReplayResult run_in_world(const ReplayPlan& plan, const ReplayOptions& options, const sim::WorldOptions& world_options,
                          const std::string& what) {
  try {
    world_options.validate();
  } catch (const std::invalid_argument& e) {
    throw ReplayPlanError(what + " replay: " + e.what());
  }
  sim::World world(world_options);
  std::vector<RankRecord> records(static_cast<size_t>(plan.world_size));
  const int64_t started = steady_now_ns();
  sim::WorldResult outcome = world.run([&](sim::RankContext& ctx) {
    ProcessGroupPtr group = ctx.world_group();
    if (options.wrap_group) group = options.wrap_group(group, ctx.rank());
    replay_rank(plan, ctx.rank(), group, options, records[static_cast<size_t>(ctx.rank())]);
  });
  const double wall_s = ns_to_s(steady_now_ns() - started);
  if (!outcome.ok()) throw ReplayRunError("the " + what + " replay failed:\n" + outcome.error_report());
  ReplayResult result = collect(plan, options, records, wall_s);
  if (world_options.simulated_time) result.simulated_end_ns = world.sim_clock()->now_ns();
  return result;
}

// Fiber ranks on meta buffers and a simulated clock: no memory, no real waits.
ReplayResult run_data_free(const ReplayPlan& plan, const ReplayOptions& options) {
  if (options.backend != ReplayBackend::FakeFibers || options.check_data) {
    throw ReplayPlanError("a data-free replay runs on fake-fibers and checks no data (it has none)");
  }
  if (options.iterations < 1) throw ReplayPlanError("iterations must be >= 1");
  sim::WorldOptions world_options;
  world_options.world_size = plan.world_size;
  world_options.rank_kind = sim::RankKind::Fibers;
  world_options.collective_timeout = options.timeout;
  world_options.simulated_time = true;
  world_options.compute_time = sim::ComputeTime::Zero;  // the recorded gaps are the compute
  world_options.cost_model = options.cost_model;
  // Any world size (guarded stacks stop at ~32000 fibers); a replayed rank runs no autograd: 128 KiB is ample.
  world_options.fiber_stacks = sim::FiberStacks::Pooled;
  world_options.fiber_stack_bytes = 128 * 1024;
  return run_in_world(plan, options, world_options, "data-free");
}

}  // namespace

ReplayResult run_replay(const ReplayPlan& plan, const ReplayOptions& options) {
  if (plan.per_rank.size() != static_cast<size_t>(plan.world_size)) {
    throw ReplayPlanError("replay plan: " + std::to_string(plan.per_rank.size()) + " programs for a world of " +
                          std::to_string(plan.world_size));
  }
  const bool processes = options.backend == ReplayBackend::GlooProcesses;
  if (options.data_free) return run_data_free(plan, options);
  check_limits(plan, options, processes ? 1 : plan.world_size);
  if (processes) {
    if (plan.world_size > 64) {
      throw ReplayPlanError("gloo-processes starts one process per rank; world size " +
                            std::to_string(plan.world_size) + " is over the limit of 64");
    }
    return run_processes(plan, options);
  }

  if (plan.world_size > kMaxInProcessRanks) {
    throw ReplayPlanError(std::string(to_string(options.backend)) + " runs every rank in this process; world size " +
                          std::to_string(plan.world_size) + " is over the limit of " +
                          std::to_string(kMaxInProcessRanks));
  }
  sim::WorldOptions world_options;
  world_options.world_size = plan.world_size;
  world_options.rank_kind =
      options.backend == ReplayBackend::FakeFibers ? sim::RankKind::Fibers : sim::RankKind::Threads;
  world_options.backend =
      options.backend == ReplayBackend::GlooThreads ? sim::CommBackend::Gloo : sim::CommBackend::Fake;
  world_options.collective_timeout = options.timeout;
  return run_in_world(plan, options, world_options, to_string(options.backend));
}

int replay_worker_main(const WorkerContext& context) {
  const Json& job = context.job();
  const ReplayPlan plan = plan_from_json(read_json_file(job.at("plan").get<std::string>()));
  ReplayOptions options;
  options.backend = ReplayBackend::GlooProcesses;
  options.iterations = job.at("iterations").get<int>();
  options.use_timestamps = job.at("use_timestamps").get<bool>();
  options.check_data = job.at("check_data").get<bool>();
  options.timeout = std::chrono::milliseconds(job.at("timeout_ms").get<int64_t>());
  const LaunchEnv env = LaunchEnv::from_env();
  if (env.world_size != plan.world_size) {
    throw std::runtime_error("WORLD_SIZE " + std::to_string(env.world_size) + " differs from the plan's world of " +
                             std::to_string(plan.world_size));
  }
  at::set_num_threads(1);
  ProcessGroupPtr world = make_gloo_process_group_from_env(options.timeout);
  RankRecord record;
  replay_rank(plan, env.rank, world, options, record);
  Json out;
  out["start"] = record.start;
  out["end"] = record.end;
  out["checked"] = record.checked;
  out["data_error"] = record.data_error;
  context.write_result(out);
  return 0;
}

namespace {

// The range of S of each op in the plan.
std::map<CollectiveOp, std::pair<int64_t, int64_t>> size_ranges(const ReplayPlan& plan) {
  std::map<CollectiveOp, std::pair<int64_t, int64_t>> range;
  for (const auto& program : plan.per_rank) {
    for (const auto& op : program) {
      if (op.op == CollectiveOp::Barrier) continue;
      auto [it, inserted] = range.try_emplace(op.op, op.total_bytes, op.total_bytes);
      it->second.first = std::min(it->second.first, op.total_bytes);
      it->second.second = std::max(it->second.second, op.total_bytes);
    }
  }
  return range;
}

// Median per (op, S) after the untimed first repetition.
std::vector<sim::CostSample> median_samples(const ReplayResult& result, int world_size) {
  std::map<std::pair<CollectiveOp, int64_t>, std::vector<int64_t>> times;
  std::set<std::pair<CollectiveOp, int64_t>> warmed;
  for (const auto& t : result.collectives) {
    const auto key = std::make_pair(t.op, t.total_bytes);
    if (warmed.insert(key).second) continue;
    times[key].push_back(t.latency_ns);
  }
  std::vector<sim::CostSample> samples;
  for (auto& [key, v] : times) {
    std::sort(v.begin(), v.end());
    sim::CostSample s;
    s.op = key.first;
    s.bytes = key.second;
    s.world_size = world_size;
    s.time_ns = std::max<int64_t>(1, v[v.size() / 2]);
    samples.push_back(s);
  }
  return samples;
}

std::vector<sim::CostSample> calibrate_one(const ReplayPlan& plan, int world_size, const ReplayOptions& options,
                                           const CalibrationOptions& calibration) {
  if (world_size < 2) throw ReplayPlanError("calibration needs worlds of at least 2 ranks");
  if (calibration.sizes < 2 || calibration.reps < 1 || calibration.min_bytes < 4 ||
      calibration.max_bytes < calibration.min_bytes) {
    throw ReplayPlanError("calibration: needs sizes >= 2, reps >= 1 and 4 <= min_bytes <= max_bytes");
  }
  const auto range = size_ranges(plan);
  ReplayPlan cal;
  cal.world_size = cal.trace_world_size = world_size;
  PlannedGroup group;
  group.name = "calibration";
  for (int r = 0; r < world_size; ++r) group.ranks.push_back(r);
  cal.groups.push_back(group);
  std::vector<PlannedOp> program;
  const int64_t element = static_cast<int64_t>(c10::elementSize(at::kFloat));
  const int64_t unit = element * world_size;  // S must split into float chunks
  auto add = [&](CollectiveOp kind, int64_t bytes) {
    const int64_t chunk = std::max<int64_t>(1, (bytes + unit - 1) / unit);
    PlannedOp op;
    op.group_index = 0;
    op.op = kind;
    op.dtype = at::kFloat;
    switch (kind) {
      case CollectiveOp::AllGather: op.in_numel = chunk, op.out_numel = chunk * world_size; break;
      case CollectiveOp::ReduceScatter: op.in_numel = chunk * world_size, op.out_numel = chunk; break;
      case CollectiveOp::AllReduce:
      case CollectiveOp::Broadcast: op.in_numel = op.out_numel = chunk * world_size; break;
      case CollectiveOp::Barrier: break;
    }
    op.total_bytes = sim::total_bytes(kind, op.in_numel, op.out_numel, element);
    const bool in_place = kind == CollectiveOp::AllReduce || kind == CollectiveOp::Broadcast;
    op.buffer_bytes = (in_place ? op.in_numel : op.in_numel + op.out_numel) * element;
    cal.max_buffer_bytes = std::max(cal.max_buffer_bytes, op.buffer_bytes);
    for (int rep = 0; rep <= calibration.reps; ++rep) {
      op.seq = program.size() + 1;
      program.push_back(op);
    }
  };
  add(CollectiveOp::Barrier, 0);
  for (const auto& [kind, span] : range) {
    // Around the sizes the trace uses: a quarter of the smallest to four
    // times the largest, at least a factor 16 wide.
    const double lo =
        std::clamp<double>(static_cast<double>(span.first) / 4, static_cast<double>(calibration.min_bytes),
                           static_cast<double>(calibration.max_bytes) / 16);
    const double hi =
        std::clamp<double>(static_cast<double>(span.second) * 4, lo * 16, static_cast<double>(calibration.max_bytes));
    for (int i = 0; i < calibration.sizes; ++i) {
      const double s = lo * std::pow(hi / lo, static_cast<double>(i) / (calibration.sizes - 1));
      add(kind, static_cast<int64_t>(std::llround(s)));
    }
  }
  cal.per_rank.assign(static_cast<size_t>(world_size), program);
  cal.collectives = program.size();

  ReplayOptions run = options;
  run.iterations = 1;
  run.use_timestamps = false;
  run.check_data = false;
  return median_samples(run_replay(cal, run), world_size);
}

}  // namespace

std::vector<sim::CostSample> calibrate(const ReplayPlan& plan, const std::vector<int>& world_sizes,
                                       const ReplayOptions& options, const CalibrationOptions& calibration) {
  if (world_sizes.empty()) throw ReplayPlanError("calibration needs at least one world size");
  std::vector<sim::CostSample> samples;
  for (int w : world_sizes) {
    auto more = calibrate_one(plan, w, options, calibration);
    samples.insert(samples.end(), more.begin(), more.end());
  }
  return samples;
}

}  // namespace fsdpsim::tools
