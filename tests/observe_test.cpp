// The observability layer as a whole: byte counts from each record's dtype,
// the JSONL round trip of a 1-byte dtype, and one ObservedProcessGroup
// fanning every collective out to several sinks on live fake worlds.

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <sstream>
#include <vector>

#include "backends/observe/flight_recorder.h"
#include "backends/observe/jsonl.h"
#include "backends/observe/observed_process_group.h"
#include "backends/observe/trace_recorder.h"
#include "sim/world.h"

namespace fsdpsim::observe {
namespace {

CollectiveDesc desc_of(CollectiveOp op, at::ScalarType dtype, int64_t in, int64_t out, uint64_t seq) {
  CollectiveDesc d;
  d.group = "world";
  d.group_size = 4;
  d.seq = seq;
  d.op = op;
  d.dtype = dtype;
  d.input_shape = {in};
  d.output_shape = {out};
  return d;
}

// The runner's "gathered / reduced per rank" comes from comm_volume: a
// 1-byte dtype counts 1 byte per element (it used to be guessed as 4).
TEST(Record, ByteCountsUseTheDtypesElementSize) {
  TraceRecorder recorder(4);
  const std::vector<int> world = {0, 1, 2, 3};
  recorder.record_issue(0, desc_of(CollectiveOp::AllGather, at::kByte, 4, 16, 1), world, 10);
  recorder.record_issue(0, desc_of(CollectiveOp::ReduceScatter, at::kChar, 32, 8, 2), world, 20);
  recorder.record_issue(0, desc_of(CollectiveOp::AllReduce, at::kBool, 5, 5, 3), world, 30);
  recorder.record_issue(0, desc_of(CollectiveOp::AllGather, at::kBFloat16, 2, 8, 4), world, 40);
  recorder.record_issue(1, desc_of(CollectiveOp::AllGather, at::kDouble, 4, 16, 1), world, 10);

  const auto events = recorder.events();
  EXPECT_EQ(events[0].element_size(), 1);
  EXPECT_EQ(events[0].out_bytes(), 16);
  EXPECT_EQ(events[3].in_bytes(), 4);

  const CommVolume rank0 = comm_volume(events, 0);
  EXPECT_EQ(rank0.gathered_bytes, 16 + 8 * 2);
  EXPECT_EQ(rank0.reduced_bytes, 32 + 5);
  EXPECT_EQ(rank0.op_counts.at("all_gather"), 2);
  EXPECT_EQ(rank0.op_counts.at("reduce_scatter"), 1);
  EXPECT_EQ(rank0.op_counts.at("all_reduce"), 1);
  EXPECT_EQ(comm_volume(events, 1).gathered_bytes, 16 * 8);
}

TEST(Record, JsonlKeepsEveryDtypeExactly) {
  TraceRecorder recorder(2);
  const std::vector<at::ScalarType> dtypes = {at::kByte, at::kBool, at::kChar, at::kHalf, at::kLong};
  for (size_t i = 0; i < dtypes.size(); ++i) {
    recorder.record_issue(0, desc_of(CollectiveOp::AllReduce, dtypes[i], 3, 3, i + 1), {0, 1}, 100);
  }
  std::stringstream jsonl;
  recorder.write_jsonl(jsonl);
  EXPECT_THAT(jsonl.str(), ::testing::HasSubstr("\"dtype\":\"Byte\""));
  const auto read = read_jsonl(jsonl);
  ASSERT_EQ(read.size(), dtypes.size());
  for (size_t i = 0; i < dtypes.size(); ++i) EXPECT_EQ(read[i].dtype, dtypes[i]);
  EXPECT_EQ(read, recorder.events());
}

// Counts what it sees, and checks each end comes back with its own token.
class CountingSink final : public CollectiveSink {
 public:
  explicit CountingSink(int world_size) : world_size_(world_size) {}
  int world_size() const override { return world_size_; }
  uint64_t on_issue(const Record& issued) override {
    std::lock_guard<std::mutex> lock(mutex_);
    issued_.push_back(issued);
    return issued_.size() - 1;
  }
  void on_end(const Record& issued, uint64_t token, const WorkTimes& times, std::exception_ptr error) override {
    std::lock_guard<std::mutex> lock(mutex_);
    ASSERT_LT(token, issued_.size());
    EXPECT_EQ(issued_[token], issued);
    EXPECT_GE(times.end_ns, issued.issue_ns);
    EXPECT_FALSE(error);
    ++ended_;
  }
  size_t issued() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return issued_.size();
  }
  size_t ended() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return ended_;
  }

 private:
  const int world_size_;
  mutable std::mutex mutex_;
  std::vector<Record> issued_;
  size_t ended_ = 0;
};

TEST(ObservedProcessGroup, FansEveryCollectiveOutToEverySink) {
  for (auto kind : {sim::RankKind::Threads, sim::RankKind::Fibers}) {
    constexpr int kRanks = 3;
    auto trace = std::make_shared<TraceRecorder>(kRanks);
    auto flight = std::make_shared<FlightRecorder>(kRanks, 8);
    auto counting = std::make_shared<CountingSink>(kRanks);
    sim::WorldOptions options;
    options.world_size = kRanks;
    options.rank_kind = kind;
    options.flight_recorder_entries = 0;
    sim::World world(options);
    world
        .run([&](sim::RankContext& ctx) {
          ObservedProcessGroup pg(ctx.world_group(), {trace, flight, counting}, ctx.rank());
          pg.all_gather_into_tensor(at::empty({6}, at::kByte), at::ones({2}, at::kByte))->wait();
          pg.all_reduce(at::ones({4}), {})->wait();
          pg.split({{0, 1}, {2}})->barrier()->wait();
        })
        .throw_if_failed();

    EXPECT_EQ(counting->issued(), 9u);
    EXPECT_EQ(counting->ended(), 9u);
    const auto events = trace->events();
    ASSERT_EQ(events.size(), 9u);
    for (const Record& e : events) EXPECT_EQ(e.status, RecordStatus::Completed) << e.error;
    EXPECT_EQ(events[0].dtype, at::kByte);
    EXPECT_EQ(events[0].out_bytes(), 6);
    for (int r = 0; r < kRanks; ++r) {
      const auto entries = flight->entries(r);
      ASSERT_EQ(entries.size(), 3u);
      EXPECT_EQ(entries[0].record.dtype, at::kByte);
      EXPECT_EQ(entries[2].state, FlightState::Completed);
      EXPECT_EQ(entries[2].record.op, CollectiveOp::Barrier);
    }
  }
}

}  // namespace
}  // namespace fsdpsim::observe
