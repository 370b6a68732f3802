// Simulated time on fiber ranks: sleeps cost no real time, collectives last
// the cost model's time from their last arrival, waiting ranks jump to the
// end and count the jump as exposed communication. ComputeTime::Zero makes
// every number exact and reproducible.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include "backends/observe/trace_recorder.h"
#include "sim/cost_model.h"
#include "sim/world.h"

namespace fsdpsim::sim {
namespace {

WorldOptions simulated(int world_size) {
  WorldOptions options;
  options.world_size = world_size;
  options.rank_kind = RankKind::Fibers;
  options.simulated_time = true;
  options.compute_time = ComputeTime::Zero;
  options.cost_model = cost_model_preset("ib-ndr400");
  return options;
}

constexpr int64_t kMs = 1000 * 1000;

TEST(SimulatedTime, CollectiveStartsAtTheLastArrivalAndLastsTheModelledTime) {
  WorldOptions options = simulated(4);
  World world(options);
  std::vector<WorkTimes> times(4);
  auto result = world.run([&](RankContext& ctx) {
    sleep_for(std::chrono::milliseconds(10 * ctx.rank()));  // rank 3 arrives last, at 30 ms
    auto in = at::ones({1024}, at::kFloat);
    auto out = at::empty({4 * 1024}, at::kFloat);
    auto work = ctx.world_group()->all_gather_into_tensor(out, in);
    work->wait();
    times[ctx.rank()] = work->times();
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
  const int64_t cost = predict_ns(CollectiveOp::AllGather, 4 * 1024 * 4, 4, options.cost_model);
  ASSERT_GT(cost, 0);
  auto clock = world.sim_clock();
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(times[r].issue_ns, 10 * kMs * r);
    EXPECT_EQ(times[r].start_ns, 30 * kMs);
    EXPECT_EQ(times[r].end_ns, 30 * kMs + cost);
    EXPECT_EQ(clock->rank_now_ns(r), 30 * kMs + cost);
    // Waiting for the late rank is exposed time too: (30 - 10 r) ms + cost.
    EXPECT_EQ(clock->exposed_comm_ns(r), (30 - 10 * r) * kMs + cost);
  }
}

TEST(SimulatedTime, ComputeOverlapsAnAsyncCollective) {
  WorldOptions options = simulated(2);
  options.cost_model.latency_us = 0;
  options.cost_model.bandwidth_gbps = 1;  // 2 MB gathered: (n-1) * S/(n B) = 1 ms
  World world(options);
  auto result = world.run([&](RankContext& ctx) {
    auto in = at::ones({250000}, at::kFloat);  // 1 MB per rank, S = 2 MB
    auto out = at::empty({500000}, at::kFloat);
    auto work = ctx.world_group()->all_gather_into_tensor(out, in);
    // Rank 0 "computes" longer than the transfer, rank 1 shorter.
    sleep_for(std::chrono::microseconds(ctx.rank() == 0 ? 1500 : 400));
    work->wait();
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
  auto clock = world.sim_clock();
  EXPECT_EQ(clock->rank_now_ns(0), 1500 * 1000);  // hidden behind compute
  EXPECT_EQ(clock->exposed_comm_ns(0), 0);
  EXPECT_EQ(clock->rank_now_ns(1), 1000 * 1000);  // waits for the transfer
  EXPECT_EQ(clock->exposed_comm_ns(1), 600 * 1000);
}

TEST(SimulatedTime, HoursOfSimulatedSleepAndTracesInSimulatedNanoseconds) {
  WorldOptions options = simulated(3);
  options.trace = std::make_shared<observe::TraceRecorder>(3);
  World world(options);
  auto result = world.run([&](RankContext& ctx) {
    sleep_for(std::chrono::hours(2));  // would time the test out in real time
    ctx.world_group()->barrier()->wait();
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
  const int64_t two_hours = int64_t{2} * 3600 * 1000 * kMs;
  for (const auto& event : options.trace->events()) {
    EXPECT_EQ(event.issue_ns, two_hours);
    EXPECT_EQ(event.end_ns, two_hours + predict_ns(CollectiveOp::Barrier, 0, 3, options.cost_model));
  }
}

TEST(SimulatedTime, SameSeedSameTimesAndTrace) {
  auto run_once = [](uint64_t seed) {
    WorldOptions options = simulated(4);
    options.schedule = SchedulePolicy::SeededRandom;
    options.seed = seed;
    options.trace = std::make_shared<observe::TraceRecorder>(4);
    World world(options);
    auto result = world.run([&](RankContext& ctx) {
      for (int step = 0; step < 3; ++step) {
        sleep_for(std::chrono::microseconds(100 * ((ctx.rank() + step) % 3)));
        auto t = at::ones({64});
        ctx.world_group()->all_reduce(t, AllReduceOptions{})->wait();
      }
    });
    EXPECT_TRUE(result.ok()) << result.error_report();
    std::ostringstream jsonl;
    options.trace->write_jsonl(jsonl);
    return jsonl.str();
  };
  EXPECT_EQ(run_once(11), run_once(11));
}

TEST(SimulatedTime, RejectedOutsideFiberFakeWorlds) {
  WorldOptions options = simulated(2);
  options.rank_kind = RankKind::Threads;
  EXPECT_THROW({ World world(options); }, std::invalid_argument);
}

}  // namespace
}  // namespace fsdpsim::sim
