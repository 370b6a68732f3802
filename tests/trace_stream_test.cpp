// TraceRecorder's streaming mode (stream_to): the streamed JSONL of a
// deterministic fiber run reads back as the in-memory recorder's records, its
// Chrome trace is byte-equal to the in-memory one, the records held stay
// bounded while the file grows, and write failures name the stream.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "backends/errors.h"
#include "backends/observe/chrome_trace.h"
#include "backends/observe/jsonl.h"
#include "backends/observe/trace_recorder.h"
#include "scenarios/engine_trace.h"
#include "scenarios/trainer.h"
#include "sim/world.h"
#include "tools/replay_lib.h"

namespace fsdpsim::sim {
namespace {

using observe::Record;
using observe::RecordStatus;
using observe::TraceRecorder;
using ::testing::HasSubstr;

// One traced training run: the recorder after it, and what it streamed.
struct TracedRun {
  std::shared_ptr<TraceRecorder> recorder;
  std::string streamed;  // empty when not streaming
};

// mlp_stack (3 units + root) at a small width, every engine event traced.
TracedRun run_traced(RankKind kind, int world_size, int steps, bool stream) {
  TracedRun run;
  run.recorder = std::make_shared<TraceRecorder>(world_size);
  std::ostringstream out;
  if (stream) run.recorder->stream_to(out, "test stream");
  WorldOptions options;
  options.world_size = world_size;
  options.rank_kind = kind;
  options.trace = run.recorder;
  if (kind == RankKind::Fibers) {
    // Simulated time without measured compute: the run is deterministic, times included.
    options.simulated_time = true;
    options.compute_time = ComputeTime::Zero;
    options.cost_model = cost_model_preset("ib-ndr400");
  }
  scenarios::TrainConfig config;
  config.scenario.name = "mlp_stack";
  config.scenario.mlp_dim = 16;
  config.steps = steps;
  World world(options);
  auto result = world.run([&](RankContext& ctx) {
    auto hooks = std::make_shared<scenarios::TraceEngineHooks>(run.recorder, ctx.rank(), ctx.clock());
    scenarios::Trainer trainer(config, ctx.rank(), ctx.world_group(), {hooks});
    for (int step = 0; step < steps; ++step) trainer.step(step);
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
  if (stream) {
    run.recorder->finish_stream();
    run.streamed = out.str();
  }
  return run;
}

std::vector<Record> read_streamed(const std::string& text) {
  std::istringstream in(text);
  std::vector<Record> records = observe::read_jsonl(in);
  observe::sort_by_rank(records);
  return records;
}

// The ranks of the records in file order.
std::vector<int> file_ranks(const std::string& text) {
  std::istringstream in(text);
  std::vector<int> ranks;
  for (const Record& e : observe::read_jsonl(in)) ranks.push_back(e.rank);
  return ranks;
}

TEST(TraceStream, FiberRunStreamReadsBackAsTheInMemoryRecordsAndChromeTrace) {
  constexpr int kWorld = 5;
  const TracedRun memory = run_traced(RankKind::Fibers, kWorld, 2, false);
  const TracedRun streamed = run_traced(RankKind::Fibers, kWorld, 2, true);
  const std::vector<Record> expected = memory.recorder->events();
  ASSERT_GT(expected.size(), size_t{kWorld} * 20);
  // Same ids, clocks, times, statuses and order (rank by rank).
  const std::vector<Record> read = read_streamed(streamed.streamed);
  ASSERT_EQ(read.size(), expected.size());
  for (size_t i = 0; i < read.size(); ++i) ASSERT_EQ(read[i], expected[i]) << "record " << i;
  // It was streamed: ranks interleave in the file, and nothing is left in memory.
  const std::vector<int> ranks = file_ranks(streamed.streamed);
  EXPECT_FALSE(std::is_sorted(ranks.begin(), ranks.end()));
  EXPECT_EQ(streamed.recorder->size(), 0u);
  EXPECT_EQ(streamed.recorder->recorded(), expected.size());
  EXPECT_EQ(memory.recorder->peak_size(), expected.size());
  // The Chrome trace from the stream is the one from memory, byte for byte.
  std::ostringstream from_memory, from_stream;
  memory.recorder->write_chrome_trace(from_memory);
  std::istringstream in(streamed.streamed);
  observe::write_chrome_trace_from_jsonl(in, from_stream);
  EXPECT_TRUE(from_stream.str() == from_memory.str()) << "Chrome traces differ";
  // The replay tool reads both files as the same collectives in the same order.
  std::ostringstream memory_jsonl;
  memory.recorder->write_jsonl(memory_jsonl);
  std::istringstream memory_in(memory_jsonl.str()), stream_in(streamed.streamed);
  const tools::ReplayTrace from_memory_file = tools::parse_replay_trace(memory_in);
  const tools::ReplayTrace from_stream_file = tools::parse_replay_trace(stream_in);
  EXPECT_EQ(from_stream_file.collectives, from_memory_file.collectives);
  EXPECT_EQ(tools::check_trace(from_stream_file).text(), tools::check_trace(from_memory_file).text());
  // Every (group, seq) completed on every member: no Lamport bookkeeping left.
  EXPECT_EQ(streamed.recorder->open_collectives(), 0u);
  EXPECT_EQ(memory.recorder->open_collectives(), 0u);
}

// Threads have real times, so no second run to compare with: the stream's
// records keep the recorder's invariants and the replay checker finds nothing.
TEST(TraceStream, ThreadRunStreamKeepsTheLamportRuleAndChecksClean) {
  constexpr int kWorld = 3;
  const TracedRun run = run_traced(RankKind::Threads, kWorld, 2, true);
  const std::vector<Record> read = read_streamed(run.streamed);
  std::map<std::pair<std::string, uint64_t>, uint64_t> latest_issue;
  for (const Record& e : read) {
    if (e.is_collective()) {
      uint64_t& latest = latest_issue[{e.group, e.seq}];
      latest = std::max(latest, e.logical_clock_issue);
    }
  }
  ASSERT_FALSE(latest_issue.empty());
  for (size_t i = 0; i < read.size(); ++i) {
    const Record& e = read[i];
    EXPECT_EQ(e.status, RecordStatus::Completed) << "record " << e.id;
    if (e.is_collective()) {
      EXPECT_GT(e.logical_clock_end, (latest_issue[{e.group, e.seq}])) << "record " << e.id;
    }
    // Each rank's records in recording order: ids and issue clocks increase.
    if (i > 0 && read[i - 1].rank == e.rank) {
      EXPECT_GT(e.id, read[i - 1].id);
      EXPECT_GT(e.logical_clock_issue, read[i - 1].logical_clock_issue);
    }
  }
  std::istringstream in(run.streamed);
  const tools::CheckReport report = tools::check_trace(tools::parse_replay_trace(in));
  EXPECT_TRUE(report.clean()) << report.text();
  EXPECT_EQ(report.records, static_cast<size_t>(std::count_if(read.begin(), read.end(),
                                                              [](const Record& e) { return e.is_collective(); })));
}

TEST(TraceStream, RecordsInMemoryStayBoundedWhileTheFileGrows) {
  constexpr int kWorld = 4;
  const TracedRun two = run_traced(RankKind::Fibers, kWorld, 2, true);
  const TracedRun six = run_traced(RankKind::Fibers, kWorld, 6, true);
  EXPECT_GT(six.recorder->recorded(), 2 * two.recorder->recorded());
  EXPECT_GT(six.streamed.size(), 2 * two.streamed.size());
  // The peak is one step's in-flight window, whatever the number of steps.
  EXPECT_EQ(six.recorder->peak_size(), two.recorder->peak_size());
  EXPECT_LT(six.recorder->peak_size() * 20, six.recorder->recorded());
}

TEST(TraceStream, FailedCollectiveIsStreamedWithItsErrorAndInFlightOnesAtTheEnd) {
  TraceRecorder recorder(3);
  std::ostringstream out;
  recorder.stream_to(out, "test stream");
  CollectiveDesc desc;
  desc.group = "world";
  desc.group_size = 3;
  desc.seq = 1;
  desc.op = CollectiveOp::AllReduce;
  desc.input_shape = desc.output_shape = {4};
  const size_t a = recorder.record_issue(0, desc, {0, 1, 2}, 10);
  const size_t b = recorder.record_issue(1, desc, {0, 1, 2}, 11);
  recorder.record_engine_event(1, "post_backward", "layers.0", "BACKWARD_POST", 12, 13);  // waits behind b
  EXPECT_EQ(recorder.size(), 3u);
  recorder.record_completion(a, WorkTimes{0, 20, 30}, std::make_exception_ptr(CommError("peer 2 never joined")));
  EXPECT_EQ(recorder.size(), 2u);  // a went to the stream
  EXPECT_EQ(recorder.open_collectives(), 1u);
  recorder.finish_stream();
  EXPECT_EQ(recorder.size(), 0u);
  EXPECT_THROW(recorder.record_issue(2, desc, {0, 1, 2}, 40), std::logic_error);
  recorder.record_completion(b, WorkTimes{0, 20, 30}, nullptr);  // after the end: ignored

  std::istringstream in(out.str());
  const std::vector<Record> read = observe::read_jsonl(in);
  ASSERT_EQ(read.size(), 3u);
  EXPECT_EQ(read[0].id, a);
  EXPECT_EQ(read[0].status, RecordStatus::Failed);
  EXPECT_THAT(read[0].error, HasSubstr("peer 2 never joined"));
  EXPECT_EQ(read[0].logical_clock_end, 2u);  // max(rank 0's clock 1, the issue clocks 1 and 1) + 1
  EXPECT_EQ(read[1].id, b);
  EXPECT_EQ(read[1].status, RecordStatus::InFlight);
  EXPECT_EQ(read[2].kind, "post_backward");
}

TEST(TraceStream, WriteFailureNamesTheStream) {
  TraceRecorder recorder(2);
  std::ofstream full("/dev/full");
  ASSERT_TRUE(full.good());
  recorder.stream_to(full, "/dev/full");
  for (int i = 0; i < 2000; ++i) recorder.record_engine_event(i % 2, "unshard", "layers.0", "FORWARD", i, i + 1);
  try {
    recorder.finish_stream();
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_THAT(e.what(), HasSubstr("/dev/full"));
    EXPECT_THAT(e.what(), HasSubstr("No space left on device"));
  }
  TraceRecorder late(2);
  late.record_engine_event(0, "unshard", "", "", 1, 2);
  std::ostringstream out;
  EXPECT_THROW(late.stream_to(out, "late"), std::logic_error);
}

}  // namespace
}  // namespace fsdpsim::sim
