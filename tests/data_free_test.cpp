// Data-free mode: the same engine, trainer and fake backend on meta tensors
// (shapes and dtypes, no storage). A data-free run must issue exactly the
// data run's collectives (op, group, sequence number, dtype, sizes) on every
// rank, and under the same compute costs (ComputeTime::Fixed per slice, or
// ComputeTime::OpCosts from a table a data run recorded) give the same
// simulated collective times and step times, to the nanosecond.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "backends/errors.h"
#include "backends/observe/trace_recorder.h"
#include "fsdp/deferred_init.h"
#include "scenarios/trainer.h"
#include "sim/fiber_autograd.h"
#include "sim/fiber_stacks.h"
#include "sim/op_costs.h"
#include "sim/world.h"
#include "tools/replay_lib.h"

namespace fsdpsim::sim {
namespace {

using ::testing::HasSubstr;

struct RunOutcome {
  std::vector<std::vector<std::string>> collectives;  // per rank: op, group, seq, dtype, sizes, times
  std::vector<std::vector<int64_t>> step_ns;          // per rank, per step (simulated clock)
  std::vector<int64_t> compute_ns;                    // per rank, over the steps (simulated clock)
  OpCostUsage usage;                                  // over the steps, every rank
  int64_t stack_deepest = 0;
  int64_t stack_resident = 0;
};

// One line per collective: what it was and, when `times`, when it ran
// relative to `t0` (collectives before t0, the setup's, without times).
std::string describe(const observe::Record& r, bool times, int64_t t0) {
  std::string line = r.group + " seq " + std::to_string(r.seq) + " " + r.name + " " + observe::dtype_name(r.dtype) +
                     " in " + std::to_string(r.in_numel) + " out " + std::to_string(r.out_numel);
  if (times && r.issue_ns >= t0) {
    line += " issue " + std::to_string(r.issue_ns - t0) + " start " + std::to_string(r.start_ns - t0) + " end " +
            std::to_string(r.end_ns - t0);
  }
  return line;
}

RunOutcome train(scenarios::TrainConfig config, WorldOptions world_options, bool data_free) {
  config.data_free = data_free;
  const int n = world_options.world_size;
  auto recorder = std::make_shared<observe::TraceRecorder>(n);
  world_options.trace = recorder;
  World world(world_options);
  RunOutcome outcome;
  outcome.step_ns.resize(n);
  outcome.compute_ns.resize(n);
  std::vector<int64_t> t0(n);
  auto result = world.run([&](RankContext& ctx) {
    scenarios::Trainer trainer(config, ctx.rank(), ctx.world_group());
    // The setup differs (a data-free model is moved to meta, its shards not
    // copied): times count from a barrier after it, where every rank's clock is
    // the barrier's end.
    ctx.world_group()->barrier()->wait();
    t0[ctx.rank()] = ctx.clock().now_ns();
    const int64_t compute0 = ctx.sim_clock() ? ctx.sim_clock()->compute_ns(ctx.rank()) : 0;
    const OpCostUsage usage0 = ctx.sim_clock() ? ctx.sim_clock()->op_cost_usage(ctx.rank()) : OpCostUsage{};
    for (int step = 0; step < config.steps; ++step) {
      const int64_t start = ctx.clock().now_ns();
      const at::Tensor loss = trainer.step(step);
      EXPECT_EQ(loss.is_meta(), data_free);
      outcome.step_ns[ctx.rank()].push_back(ctx.clock().now_ns() - start);
    }
    if (SimClock* clock = ctx.sim_clock()) {
      outcome.compute_ns[ctx.rank()] = clock->compute_ns(ctx.rank()) - compute0;
      const OpCostUsage& used = clock->op_cost_usage(ctx.rank());
      outcome.usage.exact += used.exact - usage0.exact;
      outcome.usage.by_name += used.by_name - usage0.by_name;
      outcome.usage.unknown += used.unknown - usage0.unknown;
    }
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
  outcome.stack_deepest = result.fiber_stack_deepest_bytes;
  outcome.stack_resident = result.fiber_stack_resident_bytes;
  const bool times = world_options.simulated_time;
  outcome.collectives.resize(n);
  for (const auto& record : recorder->events()) {
    if (record.is_collective()) {
      outcome.collectives[record.rank].push_back(describe(record, times, t0[record.rank]));
    }
  }
  return outcome;
}

WorldOptions fibers(int world_size) {
  WorldOptions options;
  options.world_size = world_size;
  options.rank_kind = RankKind::Fibers;
  return options;
}

WorldOptions simulated_fibers(int world_size) {
  WorldOptions options = fibers(world_size);
  options.simulated_time = true;
  options.cost_model = cost_model_preset("ib-ndr400");
  return options;
}

scenarios::TrainConfig config_of(const std::string& scenario, fsdp::ShardingStrategy strategy) {
  scenarios::TrainConfig config;
  config.scenario.name = scenario;
  config.scenario.mlp_dim = 24;
  config.strategy = strategy;
  config.steps = 2;
  return config;
}

struct DataFreeCase {
  std::string scenario;
  fsdp::ShardingStrategy strategy;
  int world;
};

class DataFreeParity : public ::testing::TestWithParam<DataFreeCase> {};

// Fixed compute per slice: equal times mean the same slices of rank code
// (the same switches and comm calls) in the same order.
TEST_P(DataFreeParity, FixedComputeGivesTheDataRunsCollectivesAndStepTimes) {
  const auto& c = GetParam();
  WorldOptions options = simulated_fibers(c.world);
  options.compute_time = ComputeTime::Fixed;
  options.fixed_compute_ns = 7000;
  const auto config = config_of(c.scenario, c.strategy);
  const RunOutcome data = train(config, options, false);
  const RunOutcome meta = train(config, options, true);
  ASSERT_FALSE(data.collectives[0].empty());
  EXPECT_EQ(meta.collectives, data.collectives);
  EXPECT_EQ(meta.step_ns, data.step_ns);
  EXPECT_GT(data.step_ns[0][0], 0);
}

// Op costs recorded by a measured data run, then charged to a data run and
// a data-free run alike: every op of the data-free run is found by name and
// shapes, and every collective time and step time is the data run's.
TEST_P(DataFreeParity, RecordedOpCostsGiveTheDataRunsCollectivesAndStepTimes) {
  const auto& c = GetParam();
  const auto config = config_of(c.scenario, c.strategy);
  WorldOptions calibrate = simulated_fibers(c.world);
  calibrate.record_op_costs = std::make_shared<OpCostTable>();
  train(config, calibrate, false);
  ASSERT_FALSE(calibrate.record_op_costs->empty());

  WorldOptions options = simulated_fibers(c.world);
  options.compute_time = ComputeTime::OpCosts;
  options.op_costs = calibrate.record_op_costs;
  const RunOutcome data = train(config, options, false);
  const RunOutcome meta = train(config, options, true);
  EXPECT_EQ(meta.collectives, data.collectives);
  EXPECT_EQ(meta.step_ns, data.step_ns);
  EXPECT_EQ(meta.compute_ns, data.compute_ns);
  EXPECT_GT(meta.compute_ns[0], 0);
  EXPECT_EQ(meta.usage.by_name, 0);
  EXPECT_EQ(meta.usage.unknown, 0);
}

INSTANTIATE_TEST_SUITE_P(Scenarios, DataFreeParity,
                         ::testing::Values(DataFreeCase{"mlp_stack", fsdp::ShardingStrategy::FullShard, 4},
                                           DataFreeCase{"nested_wrapped", fsdp::ShardingStrategy::ShardGradOp, 3},
                                           DataFreeCase{"transformer", fsdp::ShardingStrategy::FullShard, 5}),
                         [](const ::testing::TestParamInfo<DataFreeCase>& info) {
                           return info.param.scenario + "_" + fsdp::to_string(info.param.strategy) + "_w" +
                                  std::to_string(info.param.world);
                         });

// Thread ranks (no simulated time): the same collectives, nothing moved.
TEST(DataFree, ThreadRanksIssueTheDataRunsCollectives) {
  WorldOptions options;
  options.world_size = 3;
  const auto config = config_of("mlp_stack", fsdp::ShardingStrategy::FullShard);
  const RunOutcome data = train(config, options, false);
  const RunOutcome meta = train(config, options, true);
  ASSERT_FALSE(data.collectives[0].empty());
  EXPECT_EQ(meta.collectives, data.collectives);
}

// A larger world than the table was recorded at: shard-shaped ops were never
// seen and fall back to their name's mean; nothing is unknown.
TEST(DataFree, OpsOfAnotherWorldSizeFallBackToTheirNamesMean) {
  const auto config = config_of("mlp_stack", fsdp::ShardingStrategy::FullShard);
  WorldOptions calibrate = simulated_fibers(2);
  calibrate.record_op_costs = std::make_shared<OpCostTable>();
  train(config, calibrate, false);
  WorldOptions options = simulated_fibers(16);
  options.compute_time = ComputeTime::OpCosts;
  options.op_costs = calibrate.record_op_costs;
  const RunOutcome meta = train(config, options, true);
  EXPECT_GT(meta.usage.exact, 0);
  EXPECT_GT(meta.usage.by_name, 0);
  EXPECT_EQ(meta.usage.unknown, 0);
  for (int r = 1; r < 16; ++r) EXPECT_EQ(meta.step_ns[r].size(), 2u);
}

// Pooled fiber stacks (any world size) run the same world as guarded ones and
// report how deep the stacks went: what the smallest safe stack is.
TEST(DataFree, PooledStacksRunTheSameWorldAndReportTheirDepth) {
  const auto config = config_of("mlp_stack", fsdp::ShardingStrategy::FullShard);
  WorldOptions options = simulated_fibers(33);
  options.compute_time = ComputeTime::Fixed;
  options.fixed_compute_ns = 3000;
  options.fiber_stack_bytes = 256 * 1024;
  const RunOutcome guarded = train(config, options, true);
  options.fiber_stacks = FiberStacks::Pooled;
  const RunOutcome pooled = train(config, options, true);
  EXPECT_EQ(pooled.collectives, guarded.collectives);
  EXPECT_EQ(pooled.step_ns, guarded.step_ns);
  EXPECT_EQ(guarded.stack_deepest, 0);
  EXPECT_GT(pooled.stack_deepest, 4096);
  EXPECT_LT(pooled.stack_deepest, 256 * 1024);
  EXPECT_GT(pooled.stack_resident, pooled.stack_deepest);
  EXPECT_LE(pooled.stack_resident, 33 * (pooled.stack_deepest + 4096));
}

TEST(FiberStackPool, CanaryCatchesAWriteAtTheBottomAndDepthCountsTouchedPages) {
  FiberStackPool pool(3, 64 * 1024);
  FiberStackPool::Allocator allocator(pool, 1);
  boost::context::stack_context stack = allocator.allocate();
  ASSERT_EQ(stack.size, 64u * 1024);
  char* top = static_cast<char*>(stack.sp);
  std::memset(top - 20 * 1024, 1, 20 * 1024);  // a fiber 20 KiB deep
  EXPECT_GE(pool.deepest_stack_bytes(), 20u * 1024);
  EXPECT_LE(pool.deepest_stack_bytes(), 24u * 1024);
  EXPECT_TRUE(pool.canary_intact(1));
  std::memset(top - 64 * 1024, 0, 16);  // an overflow reaching the bottom
  EXPECT_FALSE(pool.canary_intact(1));
}

TEST(DataFree, MetaAndDataRanksInOneCollectiveFailEveryRank) {
  const WorldOptions options = fibers(3);
  World world(options);
  auto result = world.run([](RankContext& ctx) {
    const auto device = ctx.rank() == 1 ? at::kMeta : at::kCPU;
    auto in = at::zeros({4}, at::TensorOptions().device(device));
    auto out = at::empty({12}, at::TensorOptions().device(device));
    ctx.world_group()->all_gather_into_tensor(out, in)->wait();
  });
  ASSERT_FALSE(result.ok());
  for (const auto& rank : result.ranks) {
    EXPECT_FALSE(rank.ok);
    EXPECT_THAT(rank.error, HasSubstr("collective mismatch in group world seq 1"));
  }
  EXPECT_THAT(result.ranks[1].error, HasSubstr("rank 1 passed meta tensors, rank 0 CPU ones"));
}

TEST(DataFree, MetaCollectivesStillCheckShapesAcrossRanks) {
  const WorldOptions options = fibers(2);
  World world(options);
  auto result = world.run([](RankContext& ctx) {
    auto meta = at::TensorOptions().device(at::kMeta);
    auto in = at::empty({4 + ctx.rank()}, meta);
    auto out = at::empty({8 + 2 * ctx.rank()}, meta);
    ctx.world_group()->all_gather_into_tensor(out, in)->wait();
  });
  ASSERT_FALSE(result.ok());
  EXPECT_THAT(result.ranks[0].error, HasSubstr("collective mismatch in group world seq 1"));
  // A rank-local check still runs on meta: output not world x input.
  World world2(options);
  auto local = world2.run([](RankContext& ctx) {
    auto meta = at::TensorOptions().device(at::kMeta);
    ctx.world_group()->all_gather_into_tensor(at::empty({7}, meta), at::empty({4}, meta))->wait();
  });
  ASSERT_FALSE(local.ok());
  EXPECT_THAT(local.ranks[0].error, HasSubstr("all_gather"));
}

TEST(DataFree, ReadingAValueFailsClearly) {
  auto config = config_of("mlp_stack", fsdp::ShardingStrategy::FullShard);
  config.data_free = true;
  const WorldOptions options = fibers(2);
  World world(options);
  std::vector<std::string> train_errors(2), item_errors(2);
  auto result = world.run([&](RankContext& ctx) {
    scenarios::Trainer trainer(config, ctx.rank(), ctx.world_group());
    try {
      trainer.train();
    } catch (const std::logic_error& e) {
      train_errors[ctx.rank()] = e.what();
    }
    const at::Tensor loss = trainer.step(0);
    try {
      (void)loss.item<double>();
    } catch (const std::exception& e) {
      item_errors[ctx.rank()] = e.what();
    }
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
  for (int r = 0; r < 2; ++r) {
    EXPECT_THAT(train_errors[r], HasSubstr("data-free run (TrainConfig::data_free) has no loss values"));
    EXPECT_THAT(item_errors[r], HasSubstr("meta"));
  }
}

TEST(DataFree, OpCostOptionsAreChecked) {
  WorldOptions options = simulated_fibers(2);
  options.compute_time = ComputeTime::OpCosts;
  EXPECT_THAT([&] { options.validate(); },
              ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("needs simulated_time and an op cost table")));
  options = simulated_fibers(2);
  options.compute_time = ComputeTime::Zero;
  options.record_op_costs = std::make_shared<OpCostTable>();
  EXPECT_THAT([&] { options.validate(); }, ::testing::ThrowsMessage<std::invalid_argument>(
                                               HasSubstr("needs simulated_time with ComputeTime::Measured")));
}

// replay predict --data-free: a recorded run's collectives rescaled to a
// larger world, on meta buffers and the simulated clock. Each collective then
// lasts exactly the cost model's time, so their sum is predict_plan_ns's.
TEST(DataFree, ReplayAtALargerWorldGivesTheCostModelsTimes) {
  const auto config = config_of("mlp_stack", fsdp::ShardingStrategy::FullShard);
  WorldOptions options = simulated_fibers(4);
  options.compute_time = ComputeTime::Fixed;
  options.fixed_compute_ns = 5000;
  auto recorder = std::make_shared<observe::TraceRecorder>(4);
  options.trace = recorder;
  World world(options);
  world
      .run([&](RankContext& ctx) {
        scenarios::Trainer trainer(config, ctx.rank(), ctx.world_group());
        for (int step = 0; step < config.steps; ++step) trainer.step(step);
      })
      .throw_if_failed();
  std::stringstream jsonl;
  recorder->write_jsonl(jsonl);
  const tools::ReplayTrace trace = tools::parse_replay_trace(jsonl);
  const tools::ReplayPlan plan = tools::make_replay_plan(trace, 64, {});
  tools::ReplayOptions replay;
  replay.backend = tools::ReplayBackend::FakeFibers;
  replay.data_free = true;
  replay.use_timestamps = true;
  replay.cost_model = cost_model_preset("ib-ndr400");
  const tools::ReplayResult result = tools::run_replay(plan, replay);
  ASSERT_EQ(result.collectives.size(), plan.collectives);
  // The model's time of each distinct collective at its replayed (padded) per-rank sizes.
  int64_t modelled = 0;
  std::set<std::pair<size_t, uint64_t>> seen;
  for (const auto& program : plan.per_rank) {
    for (const auto& op : program) {
      if (!seen.insert({op.group_index, op.seq}).second) continue;
      const int64_t bytes = total_bytes(op.op, op.in_numel, op.out_numel, c10::elementSize(op.dtype));
      modelled +=
          predict_ns(op.op, bytes, static_cast<int>(plan.groups[op.group_index].ranks.size()), replay.cost_model);
    }
  }
  EXPECT_GT(modelled, 0);
  EXPECT_EQ(result.total_latency_ns(), modelled);
  // The makespan holds every collective of rank 0 (they run one after another) and its recorded gaps.
  int64_t gaps = 0;
  for (const auto& op : plan.per_rank[0]) gaps += op.gap_ns;
  EXPECT_GE(result.simulated_end_ns, result.total_latency_ns() + gaps);

  replay.backend = tools::ReplayBackend::FakeThreads;
  EXPECT_THAT([&] { tools::run_replay(plan, replay); },
              ::testing::ThrowsMessage<tools::ReplayPlanError>(HasSubstr("a data-free replay runs on fake-fibers")));
}

TEST(OpCostTable, MeansByKeyThenByNameAndRoundTripsThroughJson) {
  OpCostTable table;
  table.add("aten::mm f32[2,3] f32[3,4]", "aten::mm", 100);
  table.add("aten::mm f32[2,3] f32[3,4]", "aten::mm", 300);
  table.add("aten::mm f32[8,3] f32[3,4]", "aten::mm", 800);
  EXPECT_EQ(table.cost("aten::mm f32[2,3] f32[3,4]", "aten::mm").ns, 200);
  EXPECT_EQ(table.cost("aten::mm f32[2,3] f32[3,4]", "aten::mm").source, OpCostTable::Source::Exact);
  const auto fallback = table.cost("aten::mm f32[1,3] f32[3,4]", "aten::mm");
  EXPECT_EQ(fallback.ns, 400);  // (100 + 300 + 800) / 3
  EXPECT_EQ(fallback.source, OpCostTable::Source::ByName);
  EXPECT_EQ(table.cost("aten::relu f32[2]", "aten::relu").source, OpCostTable::Source::Unknown);

  const auto path = std::filesystem::temp_directory_path() / ("op_costs_" + std::to_string(::getpid()) + ".json");
  table.save(path.string());
  const OpCostTable loaded = OpCostTable::load(path.string());
  std::filesystem::remove(path);
  EXPECT_EQ(loaded.to_json(), table.to_json());
  EXPECT_EQ(loaded.cost("aten::mm f32[1,3] f32[3,4]", "aten::mm").ns, 400);

  EXPECT_THAT([] { OpCostTable::from_json(nlohmann::json::parse(R"({"version": 2, "ops": []})")); },
              ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("expected {\"version\": 1")));
  EXPECT_THAT(
      [] {
        OpCostTable::from_json(nlohmann::json::parse(R"({"version": 1, "ops": [{"key": "k", "name": "n", "count": 0,
                                                     "total_ns": 5}]})"));
      },
      ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("count must be >= 1")));
  EXPECT_THAT([] { OpCostTable::load("/nonexistent/costs.json"); },
              ::testing::ThrowsMessage<std::runtime_error>(HasSubstr("cannot read the op cost table")));
}

}  // namespace
}  // namespace fsdpsim::sim
