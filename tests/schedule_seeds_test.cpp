// Seeded-random fiber schedules: for every scenario, 50 SchedulePolicy::
// SeededRandom seeds on fiber ranks, each run in exact parity with the
// reference, and each rank's engine events (unshard, reshard, pre/post-
// backward, prefetch decisions, final callback) in the same order whatever
// the interleaving of the ranks (every collective is a scheduling point). A failure names the scenario and the seed:
// replay it with ParityConfig{scenario, rank_kind = Fibers, schedule =
// SeededRandom, schedule_seed = seed} (the message has the whole config).

#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "backends/comm_hooks.h"
#include "backends/observe/trace_recorder.h"
#include "fsdp/fully_shard.h"
#include "scenarios/models.h"
#include "scenarios/parity.h"
#include "sim/world.h"

namespace fsdpsim::scenarios {
namespace {

constexpr int kSeeds = 50;
constexpr int kSteps = 2;

/// One rank's engine events, as "kind unit state" lines.
class EventLog final : public fsdp::EngineHooks {
 public:
  void on_unshard(const std::string& unit, fsdp::TrainingState state) override { add("unshard", unit, state); }
  void on_reshard(const std::string& unit, fsdp::TrainingState state) override { add("reshard", unit, state); }
  void on_pre_backward(const std::string& unit, fsdp::TrainingState state) override {
    add("pre_backward", unit, state);
  }
  void on_post_backward(const std::string& unit, fsdp::TrainingState state) override {
    add("post_backward", unit, state);
  }
  void on_final_callback(const std::string& unit, fsdp::TrainingState state) override {
    add("final_callback", unit, state);
  }
  void on_prefetch(const std::string& unit, const std::string& target, fsdp::TrainingState state) override {
    add("prefetch", unit + " -> " + (target.empty() ? "none" : target), state);
  }
  std::vector<std::string> events;

 private:
  void add(const char* kind, const std::string& unit, fsdp::TrainingState state) {
    events.push_back(std::string(kind) + " " + (unit.empty() ? "<root>" : unit) + " " + fsdp::to_string(state));
  }
};

/// Lets the scheduler pick the next fiber at every collective (before it is
/// issued and after). Fibers otherwise switch only when one blocks, and at
/// world 2 the only random choice left is which rank starts.
class YieldAtCollectives final : public DefaultCommHooks {
 public:
  void before(const CollectiveDesc&) override { sim::yield(); }
  void after(const CollectiveDesc&, const WorkPtr&) override { sim::yield(); }
};

/// The first difference between two event lists, for a readable failure.
std::string first_difference(const std::vector<std::string>& expected, const std::vector<std::string>& actual) {
  for (size_t i = 0; i < expected.size() || i < actual.size(); ++i) {
    const std::string a = i < expected.size() ? expected[i] : "<end>";
    const std::string b = i < actual.size() ? actual[i] : "<end>";
    if (a != b) return "event " + std::to_string(i) + ": expected '" + a + "', got '" + b + "'";
  }
  return "none";
}

/// World sizes 2, 3, 4 across the scenarios.
int world_size_for(const std::string& scenario) {
  const auto names = scenario_names();
  for (size_t i = 0; i < names.size(); ++i) {
    if (names[i] == scenario) return 2 + static_cast<int>(i % 3);
  }
  return 2;
}

class ScheduleSeeds : public ::testing::TestWithParam<std::string> {};

TEST_P(ScheduleSeeds, ParityAndEngineOrderUnderSeededRandomSchedules) {
  const std::string scenario = GetParam();
  const int world_size = world_size_for(scenario);
  std::vector<std::vector<std::string>> first_events;  // [rank], from the first seed
  uint64_t first_seed = 0;
  int failures = 0;
  std::set<std::string> interleavings;  // ranks in the order they issued collectives, per seed
  for (uint64_t seed = 0; seed < kSeeds && failures < 3; ++seed) {
    ParityConfig config;
    config.scenario.name = scenario;
    config.world.world_size = world_size;
    config.world.rank_kind = sim::RankKind::Fibers;
    config.world.schedule = sim::SchedulePolicy::SeededRandom;
    config.world.seed = seed;
    config.steps = kSteps;
    config.world.trace = std::make_shared<observe::TraceRecorder>(world_size);
    config.comm_hooks = [](int) -> std::shared_ptr<CommHooks> { return std::make_shared<YieldAtCollectives>(); };
    std::mutex mutex;
    std::vector<std::shared_ptr<EventLog>> logs(static_cast<size_t>(world_size));
    config.engine_hooks = [&](int rank) -> std::shared_ptr<fsdp::EngineHooks> {
      auto log = std::make_shared<EventLog>();
      std::lock_guard<std::mutex> lock(mutex);
      logs[static_cast<size_t>(rank)] = log;
      return log;
    };
    const ParityReport report = run_parity(config);
    const std::string where = "scenario " + scenario + " seed " + std::to_string(seed);
    EXPECT_TRUE(report.ok()) << where << ": " << report.summary();
    bool same = report.ok();
    for (int rank = 0; rank < world_size; ++rank) {
      ASSERT_TRUE(logs[rank]) << where << ": rank " << rank << " built no engine";
      const auto& events = logs[rank]->events;
      EXPECT_FALSE(events.empty()) << where << ": rank " << rank << " saw no engine events";
      if (first_events.empty() || static_cast<int>(first_events.size()) <= rank) continue;
      const bool equal = events == first_events[rank];
      EXPECT_TRUE(equal) << where << ": rank " << rank << "'s engine events differ from seed " << first_seed
                         << "'s; first difference at " << first_difference(first_events[rank], events);
      same = same && equal;
    }
    auto issued = config.world.trace->events();
    std::sort(issued.begin(), issued.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
    std::string interleaving;
    for (const auto& event : issued) interleaving += static_cast<char>('0' + event.rank);
    interleavings.insert(interleaving);
    if (first_events.empty()) {
      first_seed = seed;
      for (const auto& log : logs) first_events.push_back(log->events);
    }
    if (!same) ++failures;  // a few failing seeds are enough to replay
  }
  // The seeds did change the interleaving of the ranks (else the test proves nothing).
  if (failures == 0) {
    EXPECT_GT(interleavings.size(), static_cast<size_t>(kSeeds / 2)) << "scenario " << scenario;
  }
}

INSTANTIATE_TEST_SUITE_P(Scenarios, ScheduleSeeds, ::testing::ValuesIn(scenario_names()),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

}  // namespace
}  // namespace fsdpsim::scenarios
