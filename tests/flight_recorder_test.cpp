// FlightRecorder: the per-rank ring buffer, state updates, the dump's
// per-rank listing and "where each rank is" summary, rebuilding from a trace,
// and the recording decorator on a live fake world.

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "backends/observe/flight_recorder.h"
#include "backends/observe/observed_process_group.h"
#include "backends/observe/trace_recorder.h"
#include "sim/world.h"

namespace fsdpsim::sim {
namespace {

using observe::FlightHandle;
using observe::FlightRecorder;
using observe::FlightState;
using observe::TraceRecorder;
using ::testing::HasSubstr;

CollectiveDesc desc(uint64_t seq, CollectiveOp op = CollectiveOp::AllGather, const std::string& group = "world") {
  CollectiveDesc d;
  d.group = group;
  d.seq = seq;
  d.op = op;
  d.input_shape = {2};
  d.output_shape = {op == CollectiveOp::AllGather ? 4 : 2};
  d.group_size = 2;
  return d;
}

TEST(FlightRecorder, RingKeepsTheLastEntriesPerRank) {
  FlightRecorder fr(2, 3);
  std::vector<FlightHandle> handles;
  for (uint64_t seq = 1; seq <= 5; ++seq) handles.push_back(fr.record_scheduled(0, desc(seq), {0, 1}, 1000 * seq));
  fr.record_scheduled(1, desc(1), {0, 1}, 1500);
  const auto entries = fr.entries(0);
  ASSERT_EQ(entries.size(), 3u);
  EXPECT_EQ(entries[0].record.seq, 3u);
  EXPECT_EQ(entries[2].record.seq, 5u);
  EXPECT_EQ(fr.recorded(0), 5u);
  EXPECT_EQ(fr.recorded(1), 1u);
  // Updates to entries that fell out are ignored; a completion is final.
  fr.record_completed(handles[0], 1, 2);
  fr.record_completed(handles[4], 5100, 5200);
  fr.record_failed(handles[4], 0, 5300, "late");
  fr.record_started(handles[3], 4100);
  const auto after = fr.entries(0);
  EXPECT_EQ(after[2].state, FlightState::Completed);
  EXPECT_EQ(after[2].record.end_ns, 5200);
  EXPECT_EQ(after[2].record.error, "");
  EXPECT_EQ(after[1].state, FlightState::Started);
  EXPECT_EQ(after[0].state, FlightState::Scheduled);
  EXPECT_THROW(fr.record_scheduled(2, desc(1), {0, 1}, 0), std::invalid_argument);
  EXPECT_THROW(FlightRecorder(0), std::invalid_argument);
  EXPECT_THROW(FlightRecorder(2, 0), std::invalid_argument);
}

TEST(FlightRecorder, DumpListsEachRankAndWhereItIs) {
  FlightRecorder fr(3, 2);
  auto a = fr.record_scheduled(0, desc(1), {0, 1, 2}, 1'000'000);
  fr.record_completed(a, 1'100'000, 1'500'000);
  auto b = fr.record_scheduled(0, desc(2, CollectiveOp::AllReduce), {0, 1, 2}, 2'000'000);
  fr.record_failed(b, 0, 3'000'000, "timed out waiting for ranks {2}\nmore");
  auto c = fr.record_scheduled(1, desc(1), {0, 1, 2}, 1'200'000);
  fr.record_completed(c, 1'100'000, 1'500'000);
  const std::string dump = fr.dump();
  EXPECT_EQ(dump,
            "flight recorder: the last 2 collectives of each rank, oldest first (times in ms since the earliest one "
            "shown)\n"
            "rank 0 (2 recorded):\n"
            "  #0 group world seq 1 all_gather Float in [2] out [4]  completed  scheduled 0.000 started 0.100 "
            "completed 0.500\n"
            "  #1 group world seq 2 all_reduce Float in [2] out [2] op sum  failed  scheduled 1.000 failed 2.000\n"
            "      error: timed out waiting for ranks {2}\n"
            "rank 1 (1 recorded):\n"
            "  #2 group world seq 1 all_gather Float in [2] out [4]  completed  scheduled 0.200 started 0.100 "
            "completed 0.500\n"
            "rank 2: no collective recorded\n"
            "where each rank is (last recorded collective per group):\n"
            "  group world: rank 0 at seq 2 all_reduce (failed); rank 1 at seq 1 all_gather (completed); rank 2: no "
            "record\n");
}

TEST(FlightRecorder, FromTraceMarksStartedWhenEveryRankIssued) {
  TraceRecorder trace(2);
  const auto id0 = trace.record_issue(0, desc(1), {0, 1}, 100);
  trace.record_issue(1, desc(1), {0, 1}, 110);
  trace.record_completion(id0, WorkTimes{100, 120, 130}, nullptr);
  trace.record_issue(0, desc(2), {0, 1}, 200);  // rank 1 never issued seq 2
  const auto fr = FlightRecorder::from_trace(trace.events(), 2, 4);
  const auto r0 = fr->entries(0);
  ASSERT_EQ(r0.size(), 2u);
  EXPECT_EQ(r0[0].state, FlightState::Completed);
  EXPECT_EQ(r0[0].record.start_ns, 120);
  EXPECT_EQ(r0[1].state, FlightState::Scheduled);
  const auto r1 = fr->entries(1);
  ASSERT_EQ(r1.size(), 1u);
  EXPECT_EQ(r1[0].state, FlightState::Started);  // rank 0 issued seq 1 too
  EXPECT_THAT(fr->dump(), HasSubstr("group world: rank 0 at seq 2 all_gather (scheduled); rank 1 at seq 1 all_gather "
                                    "(started)"));
  EXPECT_THROW(FlightRecorder::from_trace(trace.events(), 1, 4), std::invalid_argument);
}

TEST(FlightRecorder, DecoratorRecordsALiveWorld) {
  for (auto kind : {RankKind::Threads, RankKind::Fibers}) {
    auto fr = std::make_shared<FlightRecorder>(3, 4);
    WorldOptions options;
    options.world_size = 3;
    options.rank_kind = kind;
    World world(options);
    world
        .run([&](RankContext& ctx) {
          auto pg = std::make_shared<observe::ObservedProcessGroup>(ctx.world_group(),
                                                                    std::vector<observe::SinkPtr>{fr}, ctx.rank());
          for (int i = 0; i < 5; ++i) pg->all_reduce(at::ones({4}), {})->wait();
          auto sub = pg->split({{0, 1}, {2}});
          sub->barrier()->wait();
        })
        .throw_if_failed();
    for (int r = 0; r < 3; ++r) {
      const auto entries = fr->entries(r);
      ASSERT_EQ(entries.size(), 4u);
      EXPECT_EQ(fr->recorded(r), 6u);
      EXPECT_EQ(entries.back().record.op, CollectiveOp::Barrier);
      EXPECT_EQ(entries.back().record.group, r < 2 ? "world/split0.0" : "world/split0.1");
      for (const auto& e : entries) {
        EXPECT_EQ(e.state, FlightState::Completed);
        EXPECT_GT(e.record.end_ns, 0);
      }
    }
    EXPECT_THAT(fr->dump(), HasSubstr("group world: ranks {0-2} at seq 5 all_reduce (completed)"));
  }
}

}  // namespace
}  // namespace fsdpsim::sim
