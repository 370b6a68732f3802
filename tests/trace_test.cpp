// TraceRecorder (Lamport clock, statuses, Chrome trace, JSONL and its
// validation) and ObservedProcessGroup feeding it (the TracedProcessGroup
// suites), first against a scripted one-process
// stub group, then in real worlds of fake-backend ranks.

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <tuple>

#include "backends/collective_checks.h"
#include "backends/errors.h"
#include "backends/observe/chrome_trace.h"
#include "backends/observe/jsonl.h"
#include "backends/observe/observed_process_group.h"
#include "backends/observe/trace_recorder.h"
#include "backends/work_completion.h"
#include "sim/world.h"

namespace fsdpsim::sim {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::json;
using observe::JsonlTrace;
using observe::ObservedProcessGroup;
using observe::Record;
using observe::RecordStatus;
using observe::TraceRecorder;

// ---------------------------------------------------------------------------
// Test doubles

class ManualClock final : public Clock {
 public:
  int64_t now_ns() const override { return now_.load(); }
  void set(int64_t ns) { now_.store(ns); }

 private:
  std::atomic<int64_t> now_{1000};
};

// Completion of one stub collective, kept by the group (as a real backend
// keeps its pending collectives) so it can complete after the caller dropped
// the Work.
struct StubState {
  WorkCompletion completion;
  int64_t issue_ns = 0;
  void finish(int64_t start_ns, int64_t end_ns, std::exception_ptr failure = nullptr) {
    completion.set_issued(issue_ns, start_ns);
    completion.complete(end_ns, std::move(failure), [] { return std::string("stub collective"); });
  }
};

// One rank's view of a group whose collectives move no data: each call
// returns a Work that completes at once (auto_complete) or when the test
// finishes it. `fail_issue` makes the next call throw like a broken backend.
class StubGroup final : public ProcessGroup {
 public:
  StubGroup(std::string name, int rank, std::vector<int> global_ranks, const ManualClock& clock)
      : name_(std::move(name)), rank_(rank), global_ranks_(std::move(global_ranks)), clock_(clock) {}

  bool auto_complete = true;
  bool fail_issue = false;
  std::vector<std::shared_ptr<StubState>> states;  // one per collective issued
  std::vector<std::weak_ptr<Work>> works;

  int rank() const override { return rank_; }
  int size() const override { return static_cast<int>(global_ranks_.size()); }
  const std::string& name() const override { return name_; }
  const std::vector<int>& global_ranks() const override { return global_ranks_; }
  uint64_t sequence_number() const override { return seq_; }

  WorkPtr all_gather_into_tensor(const at::Tensor& output, const at::Tensor& input) override {
    return issue(check_all_gather(*this, output, input));
  }
  WorkPtr reduce_scatter_tensor(const at::Tensor& output, const at::Tensor& input,
                                const ReduceScatterOptions& options) override {
    return issue(check_reduce_scatter(*this, output, input, options));
  }
  WorkPtr all_reduce(const at::Tensor& tensor, const AllReduceOptions& options) override {
    return issue(check_all_reduce(*this, tensor, options));
  }
  WorkPtr broadcast(const at::Tensor& tensor, const BroadcastOptions& options) override {
    return issue(check_broadcast(*this, tensor, options));
  }
  WorkPtr barrier() override { return issue(describe_barrier(*this)); }
  ProcessGroupPtr split(const std::vector<std::vector<int>>& partition) override {
    check_partition(*this, partition);
    for (size_t i = 0; i < partition.size(); ++i) {
      for (size_t k = 0; k < partition[i].size(); ++k) {
        if (partition[i][k] != rank_) continue;
        std::vector<int> ranks;
        for (int r : partition[i]) ranks.push_back(global_ranks_[static_cast<size_t>(r)]);
        return std::make_shared<StubGroup>(name_ + "/split" + std::to_string(i), static_cast<int>(k), ranks, clock_);
      }
    }
    return nullptr;
  }

 private:
  WorkPtr issue(const CollectiveDesc& desc) {
    if (fail_issue) throw CommError("stub backend refused " + desc.to_string());
    ++seq_;
    auto state = std::make_shared<StubState>();
    state->issue_ns = clock_.now_ns();
    auto work = std::make_shared<CompletionWork>(desc, std::shared_ptr<WorkCompletion>(state, &state->completion));
    states.push_back(state);
    works.push_back(work);
    if (auto_complete) state->finish(clock_.now_ns(), clock_.now_ns());
    return work;
  }

  std::string name_;
  int rank_;
  std::vector<int> global_ranks_;
  const ManualClock& clock_;
  uint64_t seq_ = 0;
};

CollectiveDesc make_desc(const std::string& group, uint64_t seq, CollectiveOp op = CollectiveOp::AllReduce) {
  CollectiveDesc desc;
  desc.group = group;
  desc.group_size = 2;
  desc.seq = seq;
  desc.op = op;
  desc.input_shape = {4};
  desc.output_shape = op == CollectiveOp::AllGather ? std::vector<int64_t>{8} : std::vector<int64_t>{4};
  return desc;
}

std::exception_ptr make_error(const std::string& what) { return std::make_exception_ptr(CommError(what)); }

const Record& find_event(const std::vector<Record>& events, uint64_t id) {
  for (const auto& e : events) {
    if (e.id == id) return e;
  }
  throw std::runtime_error("no event with id " + std::to_string(id));
}

// ---------------------------------------------------------------------------
// Chrome trace structure, shared by the hand-made and the World traces.

// Rank tracks are tids chrome_tid(0), chrome_tid(0) + 1, ...
static_assert(observe::chrome_tid(3) == observe::chrome_tid(0) + 3);
int rank_of(const Json& e) { return e.at("tid").get<int>() - observe::chrome_tid(0); }

void expect_valid_chrome_trace(const std::string& text, int world_size, size_t collectives) {
  SCOPED_TRACE("chrome trace");
  Json trace;
  ASSERT_NO_THROW(trace = Json::parse(text));
  ASSERT_TRUE(trace.is_object());
  EXPECT_EQ(trace.value("displayTimeUnit", ""), "ms");
  ASSERT_TRUE(trace.contains("traceEvents"));
  const Json& events = trace["traceEvents"];
  ASSERT_TRUE(events.is_array());

  std::map<int, std::string> thread_names;
  bool process_named = false;
  std::map<std::string, int> open_async;  // cat/id -> count of b minus e
  std::map<std::string, double> async_begin_ts;
  struct FlowPoint {
    std::string ph;
    int tid;
    double ts;
    bool bp_e;
    std::string name;
  };
  std::map<uint64_t, std::vector<FlowPoint>> flows;
  std::map<int, std::vector<std::pair<double, double>>> slices;  // tid -> X [ts, ts+dur]
  std::map<int, double> last_ts;
  size_t collective_slices = 0;

  for (const Json& e : events) {
    ASSERT_TRUE(e.contains("ph")) << e.dump();
    const std::string ph = e["ph"];
    EXPECT_EQ(e.value("pid", -1), observe::kChromePid) << e.dump();
    if (ph == "M") {
      if (e["name"] == "process_name") process_named = true;
      if (e["name"] == "thread_name") thread_names[rank_of(e)] = e["args"]["name"];
      continue;
    }
    ASSERT_TRUE(e.contains("ts") && e["ts"].is_number()) << e.dump();
    ASSERT_TRUE(e.contains("tid")) << e.dump();
    const int tid = rank_of(e);
    const double ts = e["ts"];
    EXPECT_GE(tid, 0);
    EXPECT_LT(tid, world_size);
    if (last_ts.count(tid)) {
      EXPECT_GE(ts, last_ts[tid]) << "ts not monotone on tid " << tid << ": " << e.dump();
    }
    last_ts[tid] = ts;

    if (ph == "X") {
      ASSERT_TRUE(e.contains("dur")) << e.dump();
      const double dur = e["dur"];
      EXPECT_GE(dur, 0.0);
      slices[tid].emplace_back(ts, ts + dur);
      if (e["cat"] == "collective") {
        ++collective_slices;
        EXPECT_GE(dur, 1.0) << e.dump();
        for (const char* key :
             {"Collective name", "In msg nelems", "Out msg nelems", "Group size", "Process Group Name",
              "Process Group Ranks", "dtype", "Seq", "logical_clock", "status"}) {
          EXPECT_TRUE(e["args"].contains(key)) << "missing arg " << key << " in " << e.dump();
        }
      }
    } else if (ph == "b" || ph == "e") {
      ASSERT_TRUE(e.contains("id")) << e.dump();
      const std::string key = e["cat"].get<std::string>() + "/" + e["id"].dump();
      if (ph == "b") {
        EXPECT_EQ(open_async[key], 0) << "async id reused: " << key;
        ++open_async[key];
        async_begin_ts[key] = ts;
      } else {
        EXPECT_EQ(open_async[key], 1) << "e without b: " << key;
        --open_async[key];
        EXPECT_GE(ts, async_begin_ts[key]) << key;
      }
    } else if (ph == "s" || ph == "t" || ph == "f") {
      EXPECT_EQ(e["cat"], "collective_flow");
      flows[e["id"].get<uint64_t>()].push_back(FlowPoint{ph, tid, ts, e.value("bp", "") == "e", e.value("name", "")});
    } else {
      ADD_FAILURE() << "unexpected phase " << e.dump();
    }
  }

  EXPECT_TRUE(process_named);
  for (int r = 0; r < world_size; ++r) EXPECT_EQ(thread_names[r], "rank " + std::to_string(r));
  for (const auto& [key, open] : open_async) EXPECT_EQ(open, 0) << "b without e: " << key;
  EXPECT_EQ(collective_slices, collectives);

  // Thread slices nest (no two cross).
  for (auto& [tid, list] : slices) {
    std::sort(list.begin(), list.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first < b.first : a.second > b.second;
    });
    std::vector<double> stack;
    for (const auto& [begin, end] : list) {
      while (!stack.empty() && stack.back() <= begin) stack.pop_back();
      if (!stack.empty()) {
        EXPECT_LE(end, stack.back()) << "slices cross on tid " << tid << " at " << begin;
      }
      stack.push_back(end);
    }
  }

  // Flows: one s, t's, one f (bound to its slice), in time order, each
  // inside an X slice of its thread.
  for (const auto& [id, points] : flows) {
    SCOPED_TRACE("flow " + std::to_string(id));
    ASSERT_GE(points.size(), 2u);
    std::vector<FlowPoint> sorted = points;
    std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.ts < b.ts; });
    EXPECT_EQ(sorted.front().ph, "s");
    EXPECT_EQ(sorted.back().ph, "f");
    EXPECT_TRUE(sorted.back().bp_e);
    for (size_t k = 1; k + 1 < sorted.size(); ++k) EXPECT_EQ(sorted[k].ph, "t");
    for (size_t k = 1; k < sorted.size(); ++k) {
      EXPECT_LT(sorted[k - 1].ts, sorted[k].ts);
      EXPECT_EQ(sorted[k].name, sorted[0].name) << "viewers chain flows by (id, cat, name)";
    }
    for (const auto& p : points) {
      bool inside = false;
      for (const auto& [begin, end] : slices[p.tid]) inside = inside || (begin < p.ts && p.ts < end);
      EXPECT_TRUE(inside) << "flow point at " << p.ts << " on tid " << p.tid << " is in no slice";
    }
  }
}

// ---------------------------------------------------------------------------
// Recorder unit tests

TEST(TraceRecorder, RejectsBadWorldAndRanks) {
  EXPECT_THROW(TraceRecorder(0), std::invalid_argument);
  EXPECT_THROW(TraceRecorder(-3), std::invalid_argument);
  TraceRecorder recorder(2);
  EXPECT_THROW(recorder.record_issue(2, make_desc("world", 1), {0, 1}, 10), std::invalid_argument);
  EXPECT_THROW(recorder.record_issue(-1, make_desc("world", 1), {0, 1}, 10), std::invalid_argument);
  EXPECT_THROW(recorder.record_engine_event(0, "collective", "x", "", 1, 2), std::invalid_argument);
  EXPECT_THROW(recorder.record_engine_event(0, "Not An Id", "x", "", 1, 2), std::invalid_argument);
  EXPECT_THROW(recorder.record_engine_event(0, "unshard", "x", "", 5, 2), std::invalid_argument);
  EXPECT_THROW(recorder.record_completion(7, WorkTimes{}, nullptr), std::out_of_range);
  EXPECT_EQ(recorder.size(), 0u);
}

TEST(TraceRecorder, LamportClockCompletionFollowsEveryIssue) {
  TraceRecorder recorder(3);
  // rank 2 is busy first: its clock runs ahead.
  recorder.record_engine_event(2, "unshard", "layers.0", "FORWARD", 1, 2);
  recorder.record_engine_event(2, "reshard", "layers.0", "FORWARD", 3, 4);
  const size_t a0 = recorder.record_issue(0, make_desc("world", 1), {0, 1, 2}, 10);  // clock0 = 1
  const size_t a1 = recorder.record_issue(1, make_desc("world", 1), {0, 1, 2}, 11);  // clock1 = 1
  const size_t a2 = recorder.record_issue(2, make_desc("world", 1), {0, 1, 2}, 12);  // clock2 = 3
  recorder.record_completion(a0, WorkTimes{0, 20, 30}, nullptr);                     // max(1, 1,1,3)+1 = 4
  recorder.record_completion(a2, WorkTimes{0, 20, 31}, nullptr);                     // max(3, 3)+1 = 4
  const size_t b0 = recorder.record_issue(0, make_desc("world", 2), {0, 1, 2}, 40);  // clock0 = 5
  recorder.record_completion(a1, WorkTimes{0, 20, 32}, nullptr);                     // max(1, 3)+1 = 4

  const auto events = recorder.events();
  ASSERT_EQ(events.size(), 6u);
  EXPECT_EQ(find_event(events, a0).logical_clock_issue, 1u);
  EXPECT_EQ(find_event(events, a1).logical_clock_issue, 1u);
  EXPECT_EQ(find_event(events, a2).logical_clock_issue, 3u);
  EXPECT_EQ(find_event(events, a0).logical_clock_end, 4u);
  EXPECT_EQ(find_event(events, a2).logical_clock_end, 4u);
  EXPECT_EQ(find_event(events, a1).logical_clock_end, 4u);
  EXPECT_EQ(find_event(events, b0).logical_clock_issue, 5u);
  EXPECT_EQ(find_event(events, b0).logical_clock_end, 0u);
  for (size_t id : {a0, a1, a2}) {
    const auto& e = find_event(events, id);
    for (size_t peer : {a0, a1, a2}) EXPECT_GT(e.logical_clock_end, find_event(events, peer).logical_clock_issue);
  }
  // Engine events tick once, issue == end.
  EXPECT_EQ(events[3].kind, "unshard");
  EXPECT_EQ(events[3].logical_clock_issue, 1u);
  EXPECT_EQ(events[3].logical_clock_end, 1u);
}

TEST(TraceRecorder, CompletionOnlySeesIssuesRecordedSoFar) {
  TraceRecorder recorder(2);
  recorder.record_engine_event(1, "pre_backward", "m", "", 1, 1);
  recorder.record_engine_event(1, "pre_backward", "m", "", 2, 2);
  const size_t a0 = recorder.record_issue(0, make_desc("g", 1), {0, 1}, 5);
  recorder.record_completion(a0, WorkTimes{0, 6, 7}, nullptr);  // rank 1 not issued yet
  for (int i = 0; i < 5; ++i) recorder.record_engine_event(1, "pre_backward", "m", "", 3, 3);
  const size_t a1 = recorder.record_issue(1, make_desc("g", 1), {0, 1}, 8);
  const auto events = recorder.events();
  EXPECT_EQ(find_event(events, a0).logical_clock_end, 2u);
  EXPECT_EQ(find_event(events, a1).logical_clock_issue, 8u);
  // Groups are matched by name: the same seq in another group is unrelated.
  const size_t other = recorder.record_issue(0, make_desc("other", 1), {0}, 9);
  recorder.record_completion(other, WorkTimes{0, 9, 9}, nullptr);
  EXPECT_EQ(find_event(recorder.events(), other).logical_clock_end, 4u);  // 3 + 1, not g's 8 + 1
}

TEST(TraceRecorder, EventsAreGroupedByRankInIssueOrder) {
  TraceRecorder recorder(3);
  std::vector<std::pair<int, uint64_t>> script = {{2, 1}, {0, 1}, {2, 2}, {1, 1}, {0, 2}, {2, 3}, {1, 2}};
  for (auto [rank, seq] : script) recorder.record_issue(rank, make_desc("world", seq), {0, 1, 2}, 100 + seq);
  recorder.record_engine_event(1, "final_callback", "", "BACKWARD", 200, 210);
  const auto events = recorder.events();
  ASSERT_EQ(events.size(), 8u);
  std::vector<std::tuple<int, std::string, uint64_t>> got;
  for (const auto& e : events) got.emplace_back(e.rank, e.kind, e.seq);
  std::vector<std::tuple<int, std::string, uint64_t>> want = {
      {0, "collective", 1},     {0, "collective", 2}, {1, "collective", 1}, {1, "collective", 2},
      {1, "final_callback", 0}, {2, "collective", 1}, {2, "collective", 2}, {2, "collective", 3}};
  EXPECT_EQ(got, want);
  std::set<uint64_t> ids;
  for (const auto& e : events) ids.insert(e.id);
  EXPECT_EQ(ids.size(), events.size());
}

TEST(TraceRecorder, StatusInFlightCompletedFailed) {
  TraceRecorder recorder(2);
  CollectiveDesc desc = make_desc("world", 1, CollectiveOp::AllGather);
  desc.dtype = at::kBFloat16;
  const size_t ok = recorder.record_issue(0, desc, {0, 1}, 100);
  const size_t bad = recorder.record_issue(1, desc, {0, 1}, 101);
  const size_t pending = recorder.record_issue(0, make_desc("world", 2), {0, 1}, 102);
  recorder.record_completion(ok, WorkTimes{999, 110, 120}, nullptr);
  recorder.record_completion(bad, WorkTimes{0, 0, 130}, make_error("rank 0 disagreed"));
  recorder.record_completion(bad, WorkTimes{0, 0, 140}, nullptr);  // ignored: already failed

  const auto events = recorder.events();
  const auto& e_ok = find_event(events, ok);
  EXPECT_EQ(e_ok.status, RecordStatus::Completed);
  EXPECT_EQ(e_ok.error, "");
  EXPECT_EQ(e_ok.issue_ns, 100);  // the recorded issue time stays
  EXPECT_EQ(e_ok.start_ns, 110);
  EXPECT_EQ(e_ok.end_ns, 120);
  EXPECT_EQ(e_ok.name, "all_gather");
  EXPECT_EQ(e_ok.op, CollectiveOp::AllGather);
  EXPECT_EQ(e_ok.dtype, at::kBFloat16);
  EXPECT_EQ(e_ok.in_numel, 4);
  EXPECT_EQ(e_ok.out_numel, 8);
  EXPECT_EQ(e_ok.group_ranks, (std::vector<int>{0, 1}));
  const auto& e_bad = find_event(events, bad);
  EXPECT_EQ(e_bad.status, RecordStatus::Failed);
  EXPECT_EQ(e_bad.error, "rank 0 disagreed");
  EXPECT_EQ(e_bad.end_ns, 130);
  const auto& e_pending = find_event(events, pending);
  EXPECT_EQ(e_pending.status, RecordStatus::InFlight);
  EXPECT_EQ(e_pending.end_ns, 0);
  EXPECT_EQ(e_pending.logical_clock_end, 0u);

  // In-flight and failed collectives still render and round-trip.
  std::ostringstream chrome;
  recorder.write_chrome_trace(chrome);
  expect_valid_chrome_trace(chrome.str(), 2, 3);
  std::stringstream jsonl;
  recorder.write_jsonl(jsonl);
  EXPECT_EQ(observe::read_jsonl(jsonl), events);
}

TEST(TraceRecorder, ConcurrentRecordingKeepsEveryEvent) {
  constexpr int kRanks = 4;
  constexpr int kPerRank = 200;
  TraceRecorder recorder(kRanks);
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r) {
    threads.emplace_back([&recorder, r] {
      for (int i = 1; i <= kPerRank; ++i) {
        size_t id = recorder.record_issue(r, make_desc("world", static_cast<uint64_t>(i)), {0, 1, 2, 3}, i);
        recorder.record_completion(id, WorkTimes{0, i, i + 1}, nullptr);
      }
    });
  }
  for (auto& t : threads) t.join();
  const auto events = recorder.events();
  ASSERT_EQ(events.size(), size_t{kRanks * kPerRank});
  for (int r = 0; r < kRanks; ++r) {
    uint64_t last_clock = 0;
    for (int i = 0; i < kPerRank; ++i) {
      const auto& e = events[static_cast<size_t>(r * kPerRank + i)];
      EXPECT_EQ(e.rank, r);
      EXPECT_EQ(e.seq, static_cast<uint64_t>(i + 1));
      EXPECT_GT(e.logical_clock_issue, last_clock);
      EXPECT_GT(e.logical_clock_end, e.logical_clock_issue);
      last_clock = e.logical_clock_end;
    }
  }
}

// ---------------------------------------------------------------------------
// Chrome trace from a hand-made recorder

TEST(TraceChrome, TracksSpansFlowsAndKinetoArgs) {
  TraceRecorder recorder(3);
  // (group world, seq 1): rank 1 issues first, rank 0 last -> s on rank 1.
  const int64_t t0 = 1'000'000;
  size_t w1 = recorder.record_issue(1, make_desc("world", 1, CollectiveOp::AllGather), {0, 1, 2}, t0);
  size_t w2 = recorder.record_issue(2, make_desc("world", 1, CollectiveOp::AllGather), {0, 1, 2}, t0 + 5'000);
  size_t w0 = recorder.record_issue(0, make_desc("world", 1, CollectiveOp::AllGather), {0, 1, 2}, t0 + 9'000);
  // Two collectives on rank 0 issued 100 ns apart: anchors must not overlap.
  size_t x0 = recorder.record_issue(0, make_desc("world", 2), {0, 1, 2}, t0 + 9'100);
  // A collective all ranks issue at the same instant (simulated clocks): the flow still runs forward.
  size_t s0 = recorder.record_issue(0, make_desc("pair", 1), {0, 2}, t0 + 50'000);
  size_t s2 = recorder.record_issue(2, make_desc("pair", 1), {0, 2}, t0 + 50'000);
  for (size_t id : {w1, w2, w0}) recorder.record_completion(id, WorkTimes{0, t0 + 9'500, t0 + 20'000}, nullptr);
  recorder.record_completion(s0, WorkTimes{0, t0 + 50'000, t0 + 51'000}, nullptr);
  recorder.record_completion(s2, WorkTimes{0, t0 + 50'000, t0 + 51'000}, make_error("boom"));
  (void)x0;  // stays in flight
  // Engine events on rank 0: one enclosing the issue anchors, one nested, one crossing.
  recorder.record_engine_event(0, "unshard", "layers.0", "FORWARD", t0 + 8'000, t0 + 30'000);
  recorder.record_engine_event(0, "prefetch", "layers.1", "FORWARD", t0 + 25'000, t0 + 28'000);
  recorder.record_engine_event(0, "post_backward", "layers.1", "BACKWARD", t0 + 29'000, t0 + 40'000);
  // Inside rank 1's anchor [t0, t0 + 1 us]: async, so the anchor keeps its flow.
  recorder.record_engine_event(1, "reshard", "layers.0", "FORWARD", t0 + 200, t0 + 300);

  std::ostringstream out;
  recorder.write_chrome_trace(out);
  expect_valid_chrome_trace(out.str(), 3, 6);

  const Json trace = Json::parse(out.str());
  std::map<std::string, std::vector<Json>> by_ph;
  for (const Json& e : trace["traceEvents"]) by_ph[e["ph"].get<std::string>()].push_back(e);

  // ts relative to the earliest event, in microseconds.
  double min_ts = 1e300;
  for (const Json& e : trace["traceEvents"]) {
    if (e["ph"] != "M") min_ts = std::min(min_ts, e["ts"].get<double>());
  }
  EXPECT_DOUBLE_EQ(min_ts, 0.0);

  // Kineto args of the all_gather on rank 2.
  bool found = false;
  for (const Json& x : by_ph["X"]) {
    if (x["cat"] != "collective" || rank_of(x) != 2 || x["args"]["Process Group Name"] != "world") continue;
    found = true;
    EXPECT_EQ(x["name"], "all_gather");
    EXPECT_EQ(x["args"]["Collective name"], "all_gather");
    EXPECT_EQ(x["args"]["In msg nelems"], 4);
    EXPECT_EQ(x["args"]["Out msg nelems"], 8);
    EXPECT_EQ(x["args"]["Group size"], 3);
    EXPECT_EQ(x["args"]["Process Group Ranks"], "[0, 1, 2]");
    EXPECT_EQ(x["args"]["dtype"], "Float");
    EXPECT_EQ(x["args"]["Seq"], 1);
    EXPECT_EQ(x["args"]["status"], "completed");
    EXPECT_DOUBLE_EQ(x["ts"].get<double>(), 5.0);
  }
  EXPECT_TRUE(found);

  // The world/1 flow starts on rank 1 (first to issue) and ends on rank 0.
  std::map<uint64_t, std::map<std::string, std::vector<int>>> flows;
  for (const char* ph : {"s", "t", "f"}) {
    for (const Json& e : by_ph[ph]) flows[e["id"].get<uint64_t>()][ph].push_back(rank_of(e));
  }
  ASSERT_EQ(flows.size(), 2u);
  bool world_flow = false;
  for (auto& [id, phases] : flows) {
    if (phases["t"].size() == 1) {
      world_flow = true;
      EXPECT_EQ(phases["s"], std::vector<int>{1});
      EXPECT_EQ(phases["t"], std::vector<int>{2});
      EXPECT_EQ(phases["f"], std::vector<int>{0});
    } else {
      EXPECT_EQ(phases["s"], std::vector<int>{0});  // tie: lower rank first
      EXPECT_EQ(phases["f"], std::vector<int>{2});
    }
  }
  EXPECT_TRUE(world_flow);

  // In-flight collective: its span ends at the trace's end; status in args.
  // Crossing engine event: async; the others: X slices.
  std::set<std::string> engine_x, engine_async;
  for (const Json& x : by_ph["X"]) {
    if (x["cat"] == "engine") engine_x.insert(x["name"].get<std::string>());
  }
  for (const Json& b : by_ph["b"]) {
    if (b["cat"] == "engine") {
      engine_async.insert(b["name"].get<std::string>());
      if (b["name"] == "post_backward layers.1") {
        EXPECT_EQ(b["args"]["state"], "BACKWARD");
      }
    }
    if (b["cat"] == "collective" && b["args"]["Seq"] == 2) {
      EXPECT_EQ(b["args"]["status"], "in_flight");
    }
    if (b["cat"] == "collective" && rank_of(b) == 2 && b["args"]["Process Group Name"] == "pair") {
      EXPECT_EQ(b["args"]["status"], "failed");
      EXPECT_EQ(b["args"]["error"], "boom");
    }
  }
  EXPECT_EQ(engine_x, (std::set<std::string>{"unshard layers.0", "prefetch layers.1"}));
  EXPECT_EQ(engine_async, (std::set<std::string>{"post_backward layers.1", "reshard layers.0"}));
}

TEST(TraceChrome, EmptyRecorderStillNamesEveryRank) {
  TraceRecorder recorder(4);
  std::ostringstream out;
  recorder.write_chrome_trace(out);
  expect_valid_chrome_trace(out.str(), 4, 0);
}

// ---------------------------------------------------------------------------
// JSONL

// Version 2 names a group's ranks once, not on each of its records; a name
// that comes back with other ranks keeps them on that record.
TEST(TraceJsonl, LargeGroupRanksAreWrittenOnceAndReadBack) {
  constexpr int kWorld = 1024;
  TraceRecorder recorder(kWorld);
  std::vector<int> everyone(kWorld);
  for (int r = 0; r < kWorld; ++r) everyone[r] = r;
  std::vector<int> reversed(everyone.rbegin(), everyone.rend());
  for (int r = 0; r < kWorld; ++r) {
    CollectiveDesc ag = make_desc("world", 1, CollectiveOp::AllGather);
    recorder.record_completion(recorder.record_issue(r, ag, everyone, 10), WorkTimes{0, 20, 30}, nullptr);
  }
  CollectiveDesc again = make_desc("world", 2, CollectiveOp::Barrier);
  recorder.record_completion(recorder.record_issue(5, again, reversed, 40), WorkTimes{0, 50, 60}, nullptr);
  std::stringstream jsonl;
  recorder.write_jsonl(jsonl);
  const std::string text = jsonl.str();
  // 1025 records and one group line; a rank list ("1023]") once for the
  // group and once for the record whose ranks differ.
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 1 + 1 + kWorld + 1);
  size_t lists = 0;
  for (size_t at = text.find("\"group_ranks\""); at != std::string::npos; at = text.find("\"group_ranks\"", at + 1))
    ++lists;
  EXPECT_EQ(lists, 2u);
  EXPECT_LT(text.size(), size_t{kWorld} * 600 + 2 * 6000) << "a rank list per record is back";
  const JsonlTrace read = observe::read_jsonl_trace(jsonl);
  ASSERT_EQ(read.events.size(), static_cast<size_t>(kWorld + 1));
  for (const Record& e : read.events) {
    EXPECT_EQ(e.group_ranks, e.op == CollectiveOp::Barrier ? reversed : everyone) << "record " << e.id;
  }
  EXPECT_EQ(read.events, recorder.events());
}

TEST(TraceJsonl, RoundTripKeepsEveryField) {
  TraceRecorder recorder(3);
  CollectiveDesc rs = make_desc("world/split1.0", 7, CollectiveOp::ReduceScatter);
  rs.reduce_op = ReduceOp::Avg;
  rs.dtype = at::kHalf;
  rs.input_shape = {2, 6};
  rs.output_shape = {4};
  size_t a = recorder.record_issue(2, rs, {2, 0, 1}, 1'234'567'890'123);
  CollectiveDesc bc = make_desc("world", 3, CollectiveOp::Broadcast);
  bc.root = 1;
  size_t b = recorder.record_issue(0, bc, {0, 1, 2}, 5);
  CollectiveDesc barrier = make_desc("world", 4, CollectiveOp::Barrier);
  size_t c = recorder.record_issue(0, barrier, {0, 1, 2}, 6);
  recorder.record_completion(a, WorkTimes{0, 1'234'567'890'200, 1'234'567'890'300}, nullptr);
  recorder.record_completion(b, WorkTimes{0, 7, 9}, make_error("line one\nline \"two\" \xe2\x9c\x93"));
  (void)c;
  recorder.record_engine_event(1, "post_backward", "layers.3.mlp", "BACKWARD_POST", 10, 50);
  recorder.record_engine_event(1, "prefetch", "", "", 60, 60);

  std::stringstream jsonl;
  recorder.write_jsonl(jsonl);
  const std::string text = jsonl.str();
  EXPECT_EQ(text.substr(0, text.find('\n')), R"({"schema":"fsdpsim.trace","version":2,"world_size":3})");
  // Header, a line per group ("world/split1.0", "world"), five records.
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 8);
  EXPECT_NE(text.find(R"({"kind":"group","group":"world","group_ranks":[0,1,2]})"), std::string::npos) << text;

  JsonlTrace read = observe::read_jsonl_trace(jsonl);
  EXPECT_EQ(read.version, 2);
  EXPECT_EQ(read.world_size, 3);
  const auto original = recorder.events();
  ASSERT_EQ(read.events.size(), original.size());
  for (size_t i = 0; i < original.size(); ++i) EXPECT_EQ(read.events[i], original[i]) << "event " << i;
  const auto& e = find_event(read.events, a);
  EXPECT_EQ(e.reduce_op, ReduceOp::Avg);
  EXPECT_EQ(e.dtype, at::kHalf);
  EXPECT_EQ(e.in_numel, 12);
  EXPECT_EQ(e.group_ranks, (std::vector<int>{2, 0, 1}));
  EXPECT_EQ(find_event(read.events, b).root, 1);
  EXPECT_EQ(find_event(read.events, c).status, RecordStatus::InFlight);

  // CRLF line ends and no final newline are accepted.
  std::string crlf;
  for (char ch : text) {
    if (ch == '\n')
      crlf += "\r\n";
    else
      crlf += ch;
  }
  crlf.resize(crlf.size() - 2);
  std::istringstream crlf_in(crlf);
  EXPECT_EQ(observe::read_jsonl(crlf_in), original);
}

// A valid three-line file (header, a collective, an engine event) and
// mutations of it; each must fail naming its line and field.
struct HostileCase {
  std::string label;
  std::function<std::string()> input;
  size_t line;
  std::string message;  // a substring the error must contain (usually the field)
};

Json valid_header() { return Json{{"schema", "fsdpsim.trace"}, {"version", 1}, {"world_size", 2}}; }

Json valid_collective() {
  return Json{{"id", 0},
              {"rank", 1},
              {"kind", "collective"},
              {"name", "all_gather"},
              {"detail", "all_gather Float in [4] out [8]"},
              {"group", "world"},
              {"group_ranks", {0, 1}},
              {"seq", 1},
              {"op", "all_gather"},
              {"dtype", "Float"},
              {"in_numel", 4},
              {"out_numel", 8},
              {"reduce_op", "sum"},
              {"root", 0},
              {"issue_ns", 10},
              {"start_ns", 12},
              {"end_ns", 20},
              {"logical_clock_issue", 1},
              {"logical_clock_end", 2},
              {"status", "completed"},
              {"error", ""}};
}

Json valid_engine() {
  return Json{{"id", 1},
              {"rank", 0},
              {"kind", "unshard"},
              {"name", "layers.0"},
              {"detail", "FORWARD"},
              {"issue_ns", 30},
              {"start_ns", 30},
              {"end_ns", 40},
              {"logical_clock_issue", 1},
              {"logical_clock_end", 1},
              {"status", "completed"},
              {"error", ""}};
}

std::string lines(const std::vector<std::string>& ls) {
  std::string out;
  for (const auto& l : ls) out += l + "\n";
  return out;
}

// Header + valid collective + `event` on line 3.
std::function<std::string()> with_event(std::function<void(Json&)> mutate, bool engine = false) {
  return [mutate, engine] {
    Json e = engine ? valid_engine() : valid_collective();
    if (!engine) e["id"] = 5;
    mutate(e);
    return lines({valid_header().dump(), valid_collective().dump(), e.dump()});
  };
}

std::function<std::string()> with_header(std::function<void(Json&)> mutate) {
  return [mutate] {
    Json h = valid_header();
    mutate(h);
    return lines({h.dump(), valid_collective().dump()});
  };
}

std::function<std::string()> raw(std::string text) {
  return [text] { return text; };
}

std::function<std::string()> raw_event(std::string line) {
  return [line] { return lines({valid_header().dump(), valid_collective().dump(), line}); };
}

TEST(TraceJsonl, ValidBaseParses) {
  std::istringstream in(lines({valid_header().dump(), valid_collective().dump(), valid_engine().dump()}));
  const auto events = observe::read_jsonl(in);
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].op, CollectiveOp::AllGather);
  EXPECT_EQ(events[1].kind, "unshard");
}

TEST(TraceJsonl, HostileInputFailsNamingLineAndField) {
  const std::vector<HostileCase> cases = {
      {"empty input", raw(""), 1, "missing header"},
      {"header not json", raw("hello\n"), 1, "not valid JSON"},
      {"header is an array", raw("[1,2]\n"), 1, "expected a JSON object"},
      {"header wrong schema", with_header([](Json& h) { h["schema"] = "kineto"; }), 1, "'schema'"},
      {"header future version", with_header([](Json& h) { h["version"] = 3; }), 1, "'version'"},
      {"header version string", with_header([](Json& h) { h["version"] = "1"; }), 1, "'version'"},
      {"header world_size 0", with_header([](Json& h) { h["world_size"] = 0; }), 1, "'world_size'"},
      {"header world_size huge", with_header([](Json& h) { h["world_size"] = 4000000000LL; }), 1, "'world_size'"},
      {"header world_size negative", with_header([](Json& h) { h["world_size"] = -2; }), 1, "'world_size'"},
      {"header world_size missing", with_header([](Json& h) { h.erase("world_size"); }), 1, "'world_size': missing"},
      {"header unknown field", with_header([](Json& h) { h["extra"] = 1; }), 1, "'extra'"},
      {"event not json", raw_event("{\"id\": 1,"), 3, "not valid JSON"},
      {"event trailing garbage", raw_event(valid_engine().dump() + " x"), 3, "not valid JSON"},
      {"event is a number", raw_event("42"), 3, "expected a JSON object"},
      {"empty line", raw_event(""), 3, "empty line"},
      {"invalid utf-8", raw_event("{\"kind\": \"\xff\xfe\"}"), 3, "not valid JSON"},
      {"nul byte", raw_event(std::string("{\"kind\": \"a") + '\0' + "b\"}"), 3, "not valid JSON"},
      {"deep nesting", raw_event(std::string(100000, '[') + std::string(100000, ']')), 3, "nested deeper"},
      {"line too long", raw_event("{\"name\": \"" + std::string(observe::kMaxJsonlLineBytes + 10, 'a') + "\"}"), 3,
       "longer than"},
      {"rank is a string", with_event([](Json& e) { e["rank"] = "1"; }), 3, "'rank': expected an integer"},
      {"rank negative", with_event([](Json& e) { e["rank"] = -1; }), 3, "'rank'"},
      {"rank outside world", with_event([](Json& e) { e["rank"] = 2; }), 3, "'rank'"},
      {"rank fraction", with_event([](Json& e) { e["rank"] = 0.5; }), 3, "'rank'"},
      {"kind missing", with_event([](Json& e) { e.erase("kind"); }), 3, "'kind': missing"},
      {"kind unknown shape", with_event([](Json& e) { e["kind"] = "Un Shard"; }), 3, "'kind'"},
      {"id negative", with_event([](Json& e) { e["id"] = -5; }), 3, "'id'"},
      {"id duplicate", with_event([](Json& e) { e["id"] = 0; }), 3, "'id'"},
      {"seq missing", with_event([](Json& e) { e.erase("seq"); }), 3, "'seq': missing"},
      {"seq zero", with_event([](Json& e) { e["seq"] = 0; }), 3, "'seq'"},
      {"seq negative", with_event([](Json& e) { e["seq"] = -3; }), 3, "'seq'"},
      {"seq null", with_event([](Json& e) { e["seq"] = nullptr; }), 3, "'seq'"},
      {"op unknown", with_event([](Json& e) { e["op"] = "all_to_all"; }), 3, "'op'"},
      {"op number", with_event([](Json& e) { e["op"] = 3; }), 3, "'op'"},
      {"dtype unknown", with_event([](Json& e) { e["dtype"] = "float128"; }), 3, "'dtype'"},
      {"reduce_op unknown", with_event([](Json& e) { e["reduce_op"] = "product"; }), 3, "'reduce_op'"},
      {"in_numel negative", with_event([](Json& e) { e["in_numel"] = -4; }), 3, "'in_numel'"},
      {"out_numel fraction", with_event([](Json& e) { e["out_numel"] = 8.5; }), 3, "'out_numel'"},
      {"in_numel beyond int64", with_event([](Json& e) { e["in_numel"] = 18446744073709551615ULL; }), 3, "'in_numel'"},
      {"issue_ns 1e30", raw_event([] {
         std::string s = valid_collective().dump();
         s.replace(s.find("\"issue_ns\":10"), 13, "\"issue_ns\":1e30");
         return s;
       }()),
       3, "'issue_ns'"},
      {"end before start", with_event([](Json& e) { e["end_ns"] = 11; }), 3, "'end_ns'"},
      {"group empty", with_event([](Json& e) { e["group"] = ""; }), 3, "'group'"},
      {"group_ranks not array", with_event([](Json& e) { e["group_ranks"] = "0,1"; }), 3, "'group_ranks'"},
      {"group_ranks empty", with_event([](Json& e) { e["group_ranks"] = Json::array(); }), 3, "'group_ranks'"},
      {"group_ranks too long", with_event([](Json& e) { e["group_ranks"] = std::vector<int>(1000, 0); }), 3,
       "'group_ranks'"},
      {"group_ranks duplicate", with_event([](Json& e) {
         e["group_ranks"] = {1, 1};
       }),
       3, "'group_ranks'"},
      {"group_ranks out of range", with_event([](Json& e) {
         e["group_ranks"] = {1, 7};
       }),
       3, "'group_ranks'"},
      {"group_ranks without rank", with_event([](Json& e) { e["group_ranks"] = {0}; }), 3, "'group_ranks'"},
      {"group_ranks nested", with_event([](Json& e) {
         e["group_ranks"] = {Json::array({0}), 1};
       }),
       3, "'group_ranks'"},
      {"root outside group", with_event([](Json& e) { e["root"] = 2; }), 3, "'root'"},
      {"status unknown", with_event([](Json& e) { e["status"] = "done"; }), 3, "'status'"},
      {"error on success", with_event([](Json& e) { e["error"] = "oops"; }), 3, "'error'"},
      {"clock end not after issue", with_event([](Json& e) { e["logical_clock_end"] = 1; }), 3, "'logical_clock_end'"},
      {"clock issue zero", with_event([](Json& e) { e["logical_clock_issue"] = 0; }), 3, "'logical_clock_issue'"},
      {"in flight with end", with_event([](Json& e) { e["status"] = "in_flight"; }), 3, "'logical_clock_end'"},
      {"unknown field", with_event([](Json& e) { e["bogus"] = true; }), 3, "'bogus'"},
      {"name is object", with_event([](Json& e) { e["name"] = Json::object(); }), 3, "'name'"},
      {"engine with collective field", with_event([](Json& e) { e["group"] = "world"; }, true), 3, "'group'"},
      {"engine failed", with_event([](Json& e) { e["status"] = "failed"; }, true), 3, "'status'"},
      {"engine issue != start", with_event([](Json& e) { e["issue_ns"] = 29; }, true), 3, "'issue_ns'"},
      {"engine clocks differ", with_event([](Json& e) { e["logical_clock_end"] = 2; }, true), 3, "'logical_clock_end'"},
      {"error on a later line",
       [] {
         Json bad = valid_engine();
         bad["id"] = 9;
         bad["rank"] = true;
         return lines({valid_header().dump(), valid_collective().dump(), valid_engine().dump(), bad.dump()});
       },
       4, "'rank'"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.label);
    std::istringstream in(c.input());
    try {
      observe::read_jsonl(in);
      ADD_FAILURE() << "accepted: " << c.label;
    } catch (const std::runtime_error& e) {
      const std::string what = e.what();
      EXPECT_THAT(what, HasSubstr("trace line " + std::to_string(c.line) + ":"));
      EXPECT_THAT(what, HasSubstr(c.message));
      EXPECT_LT(what.size(), 2000u) << "error echoes the input";
    }
  }
}

// ---------------------------------------------------------------------------
// ObservedProcessGroup with a trace sink over the stub backend

TEST(TracedProcessGroup, RecordsIssueAndDeferredCompletion) {
  ManualClock clock;
  auto recorder = std::make_shared<TraceRecorder>(4);
  auto stub = std::make_shared<StubGroup>("world", 1, std::vector<int>{0, 3, 1, 2}, clock);
  stub->auto_complete = false;
  ObservedProcessGroup traced(stub, {recorder}, 3, clock);
  EXPECT_EQ(traced.name(), "world");
  EXPECT_EQ(traced.size(), 4);

  clock.set(5000);
  auto in = at::ones({2});
  auto out = at::empty({8});
  WorkPtr work = traced.all_gather_into_tensor(out, in);
  ASSERT_EQ(stub->works.size(), 1u);
  EXPECT_EQ(work, stub->works[0].lock());  // the backend's Work, not a wrapper
  EXPECT_EQ(traced.sequence_number(), 1u);

  auto events = recorder->events();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].rank, 3);
  EXPECT_EQ(events[0].status, RecordStatus::InFlight);
  EXPECT_EQ(events[0].issue_ns, 5000);
  EXPECT_EQ(events[0].group, "world");
  EXPECT_EQ(events[0].group_ranks, (std::vector<int>{0, 3, 1, 2}));
  EXPECT_EQ(events[0].seq, 1u);
  EXPECT_EQ(events[0].in_numel, 2);
  EXPECT_EQ(events[0].out_numel, 8);

  // Completion arrives on another thread (as from another rank).
  std::thread([&] { stub->states[0]->finish(6000, 7000); }).join();
  events = recorder->events();
  EXPECT_EQ(events[0].status, RecordStatus::Completed);
  EXPECT_EQ(events[0].start_ns, 6000);
  EXPECT_EQ(events[0].end_ns, 7000);
  EXPECT_EQ(events[0].logical_clock_end, 2u);

  // A failed Work is recorded as failed with its error; a missing end time
  // is taken from the clock.
  auto t = at::ones({3});
  (void)traced.all_reduce(t, AllReduceOptions{});  // the recorder owns it until it ends
  clock.set(9000);
  stub->states[1]->finish(8000, 0, make_error("peer vanished"));
  events = recorder->events();
  EXPECT_EQ(events[1].status, RecordStatus::Failed);
  EXPECT_EQ(events[1].error, "peer vanished");
  EXPECT_EQ(events[1].end_ns, 9000);
}

TEST(TracedProcessGroup, CompletionAfterTheCallerDroppedItsWork) {
  // As when a failed wait() unwinds before the backend runs the callbacks.
  ManualClock clock;
  auto recorder = std::make_shared<TraceRecorder>(2);
  auto stub = std::make_shared<StubGroup>("world", 0, std::vector<int>{0, 1}, clock);
  stub->auto_complete = false;
  ObservedProcessGroup traced(stub, {recorder}, 0, clock);
  auto t = at::ones({2});
  traced.all_reduce(t, AllReduceOptions{}).reset();
  std::thread([&] { stub->states[0]->finish(20, 30, make_error("rank 1 sent 5 elements")); }).join();
  const auto events = recorder->events();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].status, RecordStatus::Failed);
  EXPECT_EQ(events[0].error, "rank 1 sent 5 elements");
  EXPECT_EQ(events[0].start_ns, 20);
  EXPECT_EQ(events[0].end_ns, 30);
  EXPECT_TRUE(stub->works[0].expired());  // the callback let go of the Work once it ran
}

TEST(TracedProcessGroup, EveryOpIsRecordedWithItsDesc) {
  ManualClock clock;
  auto recorder = std::make_shared<TraceRecorder>(2);
  auto stub = std::make_shared<StubGroup>("world", 0, std::vector<int>{0, 1}, clock);
  ObservedProcessGroup traced(stub, {recorder}, 0, clock);
  auto big = at::ones({6});
  auto small = at::ones({3});
  traced.all_gather_into_tensor(big, small)->wait();
  traced.reduce_scatter_tensor(small, big, ReduceScatterOptions{ReduceOp::Max, 1.0, 1.0})->wait();
  traced.all_reduce(small, AllReduceOptions{ReduceOp::Min})->wait();
  traced.broadcast(small, BroadcastOptions{1})->wait();
  traced.barrier()->wait();
  const auto events = recorder->events();
  ASSERT_EQ(events.size(), 5u);
  const std::vector<CollectiveOp> ops = {CollectiveOp::AllGather, CollectiveOp::ReduceScatter, CollectiveOp::AllReduce,
                                         CollectiveOp::Broadcast, CollectiveOp::Barrier};
  for (size_t i = 0; i < ops.size(); ++i) {
    EXPECT_EQ(events[i].op, ops[i]);
    EXPECT_EQ(events[i].seq, i + 1);
    EXPECT_EQ(events[i].status, RecordStatus::Completed);
  }
  EXPECT_EQ(events[1].reduce_op, ReduceOp::Max);
  EXPECT_EQ(events[1].in_numel, 6);
  EXPECT_EQ(events[1].out_numel, 3);
  EXPECT_EQ(events[2].reduce_op, ReduceOp::Min);
  EXPECT_EQ(events[3].root, 1);
  EXPECT_EQ(events[4].in_numel, 0);
}

TEST(TracedProcessGroup, BackendFailureIsRecordedAndRethrown) {
  ManualClock clock;
  auto recorder = std::make_shared<TraceRecorder>(2);
  auto stub = std::make_shared<StubGroup>("world", 0, std::vector<int>{0, 1}, clock);
  ObservedProcessGroup traced(stub, {recorder}, 0, clock);
  auto t = at::ones({3});

  // Local argument errors never issue: nothing recorded.
  auto wrong = at::ones({5});
  EXPECT_THROW((void)traced.all_gather_into_tensor(wrong, t), CommError);
  EXPECT_EQ(recorder->size(), 0u);

  stub->fail_issue = true;
  try {
    (void)traced.all_reduce(t, AllReduceOptions{});
    ADD_FAILURE() << "no throw";
  } catch (const CommError& e) {
    EXPECT_THAT(e.what(), HasSubstr("stub backend refused"));
  }
  const auto events = recorder->events();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].status, RecordStatus::Failed);
  EXPECT_THAT(events[0].error, HasSubstr("stub backend refused"));
  EXPECT_GT(events[0].logical_clock_end, events[0].logical_clock_issue);
}

TEST(TracedProcessGroup, SplitSubgroupIsTracedIntoTheSameRecorder) {
  ManualClock clock;
  auto recorder = std::make_shared<TraceRecorder>(4);
  auto stub = std::make_shared<StubGroup>("world", 2, std::vector<int>{0, 1, 2, 3}, clock);
  ObservedProcessGroup traced(stub, {recorder}, 2, clock);
  ProcessGroupPtr sub = traced.split({{0, 1}, {3, 2}});
  ASSERT_NE(sub, nullptr);
  EXPECT_NE(std::dynamic_pointer_cast<ObservedProcessGroup>(sub), nullptr);
  EXPECT_EQ(sub->global_ranks(), (std::vector<int>{3, 2}));
  auto t = at::ones({2});
  sub->all_reduce(t, AllReduceOptions{})->wait();
  const auto events = recorder->events();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].rank, 2);
  EXPECT_EQ(events[0].group, "world/split1");
  EXPECT_EQ(events[0].group_ranks, (std::vector<int>{3, 2}));
}

TEST(TracedProcessGroup, RejectsInconsistentConstruction) {
  ManualClock clock;
  auto recorder = std::make_shared<TraceRecorder>(2);
  auto stub = std::make_shared<StubGroup>("world", 1, std::vector<int>{0, 1}, clock);
  EXPECT_THROW(ObservedProcessGroup(nullptr, {recorder}, 1, clock), CommError);
  EXPECT_THROW(ObservedProcessGroup(stub, {nullptr}, 1, clock), CommError);
  EXPECT_THROW(ObservedProcessGroup(stub, {}, 1, clock), CommError);          // no sink
  EXPECT_THROW(ObservedProcessGroup(stub, {recorder}, 0, clock), CommError);  // group rank 1 is global 1
  auto far = std::make_shared<StubGroup>("world", 0, std::vector<int>{5}, clock);
  EXPECT_THROW(ObservedProcessGroup(far, {recorder}, 5, clock), CommError);  // outside the recorder's world
}

// ---------------------------------------------------------------------------
// Real worlds: fake backend, thread and fiber ranks.

class TraceWorldTest : public ::testing::TestWithParam<std::tuple<RankKind, int>> {
 protected:
  RankKind kind() const { return std::get<0>(GetParam()); }
  int world_size() const { return std::get<1>(GetParam()); }
  WorldOptions options(std::shared_ptr<TraceRecorder> recorder) const {
    WorldOptions o;
    o.world_size = world_size();
    o.rank_kind = kind();
    o.collective_timeout = std::chrono::milliseconds(20000);
    o.trace = std::move(recorder);
    return o;
  }
};

TEST_P(TraceWorldTest, EveryRankRecordsMatchingCollectives) {
  const int n = world_size();
  auto recorder = std::make_shared<TraceRecorder>(n);
  World world(options(recorder));
  WorldResult result = world.run([n, &recorder](RankContext& ctx) {
    // Higher ranks did more before: their logical clocks run ahead, so the
    // Lamport rule (not just each rank's own tick) orders the completions.
    for (int i = 0; i < 3 * ctx.rank(); ++i) {
      recorder->record_engine_event(ctx.rank(), "pre_forward", "unit" + std::to_string(i), "IDLE", 1, 1);
    }
    const ProcessGroupPtr& pg = ctx.world_group();
    auto in = at::full({4}, static_cast<float>(ctx.rank() + 1));
    auto gathered = at::empty({4 * n});
    pg->all_gather_into_tensor(gathered, in)->wait();
    for (int r = 0; r < n; ++r) {
      if (gathered[r * 4].item<float>() != static_cast<float>(r + 1)) throw std::runtime_error("bad all_gather");
    }
    auto scattered = at::empty({4});
    pg->reduce_scatter_tensor(scattered, gathered, ReduceScatterOptions{})->wait();
    // Each chunk k of `gathered` is (k+1) on every rank: the sum is n*(rank+1).
    if (scattered[0].item<float>() != static_cast<float>(n * (ctx.rank() + 1))) {
      throw std::runtime_error("bad reduce_scatter");
    }
    auto ones = at::ones({3});
    pg->all_reduce(ones, AllReduceOptions{})->wait();
    if (ones[2].item<float>() != static_cast<float>(n)) throw std::runtime_error("bad all_reduce");
  });
  ASSERT_TRUE(result.ok()) << result.error_report();

  const auto all_events = recorder->events();
  ASSERT_EQ(all_events.size(), static_cast<size_t>(3 * n + 3 * n * (n - 1) / 2));
  std::vector<Record> events;
  for (const auto& e : all_events) {
    if (e.is_collective()) events.push_back(e);
  }
  ASSERT_EQ(events.size(), static_cast<size_t>(3 * n));
  const std::vector<CollectiveOp> ops = {CollectiveOp::AllGather, CollectiveOp::ReduceScatter, CollectiveOp::AllReduce};
  std::map<uint64_t, uint64_t> max_issue_clock;  // seq -> max over ranks
  for (const auto& e : events) max_issue_clock[e.seq] = std::max(max_issue_clock[e.seq], e.logical_clock_issue);
  std::vector<int> all_ranks(static_cast<size_t>(n));
  for (int r = 0; r < n; ++r) all_ranks[static_cast<size_t>(r)] = r;
  for (int r = 0; r < n; ++r) {
    for (int i = 0; i < 3; ++i) {
      const Record& e = events[static_cast<size_t>(r * 3 + i)];
      SCOPED_TRACE("rank " + std::to_string(r) + " event " + std::to_string(i));
      EXPECT_EQ(e.rank, r);
      EXPECT_EQ(e.kind, "collective");
      EXPECT_EQ(e.group, events[0].group);
      EXPECT_EQ(e.group_ranks, all_ranks);
      EXPECT_EQ(e.seq, static_cast<uint64_t>(i + 1));
      EXPECT_EQ(e.op, ops[static_cast<size_t>(i)]);
      EXPECT_EQ(e.dtype, at::kFloat);
      EXPECT_EQ(e.status, RecordStatus::Completed) << e.error;
      EXPECT_GT(e.logical_clock_end, max_issue_clock[e.seq]);
      EXPECT_GT(e.issue_ns, 0);
      EXPECT_GE(e.end_ns, e.start_ns);
      EXPECT_GE(e.end_ns, e.issue_ns);
    }
  }

  std::ostringstream chrome;
  recorder->write_chrome_trace(chrome);
  expect_valid_chrome_trace(chrome.str(), n, static_cast<size_t>(3 * n));
  const Json trace = Json::parse(chrome.str());
  size_t flow_ends = 0;
  for (const Json& e : trace["traceEvents"]) flow_ends += e["ph"] == "f";
  EXPECT_EQ(flow_ends, 3u);  // one flow per (group, seq)

  std::stringstream jsonl;
  recorder->write_jsonl(jsonl);
  EXPECT_EQ(observe::read_jsonl(jsonl), all_events);
}

TEST_P(TraceWorldTest, SplitSubgroupsAreTracedWithGlobalRanks) {
  const int n = world_size();
  const int half = n / 2;
  auto recorder = std::make_shared<TraceRecorder>(n);
  World world(options(recorder));
  std::vector<std::vector<int>> partition(2);
  for (int r = 0; r < n; ++r) partition[r < half ? 0 : 1].push_back(n - 1 - r);  // reversed order
  std::vector<std::string> sub_names(static_cast<size_t>(n));
  WorldResult result = world.run([&](RankContext& ctx) {
    ProcessGroupPtr sub = ctx.world_group()->split(partition);
    if (!sub) throw std::runtime_error("rank outside every subgroup");
    sub_names[static_cast<size_t>(ctx.rank())] = sub->name();
    auto t = at::ones({2});
    sub->all_reduce(t, AllReduceOptions{})->wait();
    if (t[0].item<float>() != static_cast<float>(sub->size())) throw std::runtime_error("bad subgroup all_reduce");
  });
  ASSERT_TRUE(result.ok()) << result.error_report();

  const auto events = recorder->events();
  std::vector<const Record*> reduces;
  for (const auto& e : events) {
    if (e.op == CollectiveOp::AllReduce) reduces.push_back(&e);
  }
  ASSERT_EQ(reduces.size(), static_cast<size_t>(n));
  for (const Record* e : reduces) {
    SCOPED_TRACE("rank " + std::to_string(e->rank));
    // partition lists group ranks of the world group = global ranks here.
    const auto& members = partition[e->rank >= n - half ? 0 : 1];
    EXPECT_EQ(e->group, sub_names[static_cast<size_t>(e->rank)]);
    EXPECT_EQ(e->group_ranks, members);
    EXPECT_EQ(e->seq, 1u);
    EXPECT_EQ(e->status, RecordStatus::Completed);
  }
  std::ostringstream chrome;
  recorder->write_chrome_trace(chrome);
  size_t collectives = 0;
  for (const auto& e : events) collectives += e.is_collective();
  expect_valid_chrome_trace(chrome.str(), n, collectives);
}

TEST_P(TraceWorldTest, MismatchedCollectiveIsRecordedAsFailed) {
  const int n = world_size();
  auto recorder = std::make_shared<TraceRecorder>(n);
  World world(options(recorder));
  WorldResult result = world.run([](RankContext& ctx) {
    auto t = at::ones({ctx.rank() == 0 ? 5 : 4});
    ctx.world_group()->all_reduce(t, AllReduceOptions{})->wait();
  });
  ASSERT_FALSE(result.ok());
  const auto events = recorder->events();
  ASSERT_EQ(events.size(), static_cast<size_t>(n));
  for (const auto& e : events) {
    SCOPED_TRACE("rank " + std::to_string(e.rank));
    EXPECT_EQ(e.seq, 1u);
    EXPECT_EQ(e.status, RecordStatus::Failed);
    EXPECT_FALSE(e.error.empty());
  }
  std::stringstream jsonl;
  recorder->write_jsonl(jsonl);
  EXPECT_EQ(observe::read_jsonl(jsonl), events);
}

std::string world_param_name(const ::testing::TestParamInfo<std::tuple<RankKind, int>>& info) {
  return std::string(to_string(std::get<0>(info.param))) + std::to_string(std::get<1>(info.param));
}

INSTANTIATE_TEST_SUITE_P(TraceWorld, TraceWorldTest,
                         ::testing::Combine(::testing::Values(RankKind::Threads, RankKind::Fibers),
                                            ::testing::Values(2, 3, 4)),
                         world_param_name);

}  // namespace
}  // namespace fsdpsim::sim
