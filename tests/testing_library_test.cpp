// The public testing library (sim/testing/): the World fixture runs its body
// on every rank of the parameter's world, RanksSucceeded reports failed ranks,
// the collective matchers match and describe fields by name, the mocks'
// defaults let collectives through.

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "backends/comm_hooks.h"
#include "sim/testing/collective_matchers.h"
#include "sim/testing/mock_hooks.h"
#include "sim/testing/world_fixture.h"

namespace fsdpsim::testing {
namespace {

using sim::RankKind;
using ::testing::_;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::NiceMock;
using ::testing::Not;

class WorldFixture : public WorldTest {};

TEST_P(WorldFixture, RunsTheBodyOncePerRankOnTheParametersWorld) {
  EXPECT_EQ(options().world_size, world_size());
  EXPECT_EQ(options().rank_kind, rank_kind());
  std::mutex mutex;
  std::multiset<int> ranks;
  std::set<std::thread::id> threads;
  auto result = run_ranks([&](sim::RankContext& ctx) {
    if (ctx.world_size() != world_size()) throw std::runtime_error("wrong world size");
    auto t = at::ones({2});
    ctx.world_group()->all_reduce(t, AllReduceOptions{})->wait();
    if (!at::all(t == world_size()).item<bool>()) throw std::runtime_error("bad all_reduce");
    std::lock_guard<std::mutex> lock(mutex);
    ranks.insert(ctx.rank());
    threads.insert(std::this_thread::get_id());
  });
  ASSERT_TRUE(RanksSucceeded(result));
  EXPECT_EQ(ranks.size(), static_cast<size_t>(world_size()));
  for (int r = 0; r < world_size(); ++r) EXPECT_EQ(ranks.count(r), 1u) << "rank " << r;
  // Thread ranks each on their own OS thread; fiber ranks share one.
  EXPECT_EQ(threads.size(), rank_kind() == RankKind::Threads ? static_cast<size_t>(world_size()) : 1u);
}

TEST_P(WorldFixture, PerRankGivesDistinctObjects) {
  auto mocks = per_rank<NiceMock<MockCommHooks>>();
  ASSERT_EQ(mocks.size(), static_cast<size_t>(world_size()));
  EXPECT_EQ(std::set<MockCommHooks*>({mocks.front().get(), mocks.back().get()}).size(), world_size() > 1 ? 2u : 1u);
}

TEST_P(WorldFixture, RanksSucceededNamesTheFailedRank) {
  auto result = run_ranks([](sim::RankContext& ctx) {
    if (ctx.rank() == 1) throw std::runtime_error("boom on purpose");
  });
  auto verdict = RanksSucceeded(result);
  EXPECT_FALSE(verdict);
  EXPECT_THAT(verdict.message(), HasSubstr("rank 1: "));
  EXPECT_THAT(verdict.message(), HasSubstr("boom on purpose"));
}

INSTANTIATE_TEST_SUITE_P(Library, WorldFixture, WorldParams({RankKind::Threads, RankKind::Fibers}, {2, 3}),
                         WorldParamName);

TEST(WorldParams, EveryKindTimesEverySizeNamedByBoth) {
  std::vector<std::string> names;
  int index = 0;
  for (const WorldParam& p :
       std::vector<WorldParam>{WorldParam{RankKind::Threads, 2}, WorldParam{RankKind::Fibers, 8}}) {
    names.push_back(WorldParamName(::testing::TestParamInfo<WorldParam>(p, index++)));
  }
  EXPECT_THAT(names, ElementsAre("threads2", "fibers8"));
  std::vector<std::pair<RankKind, int>> got;
  auto generator = WorldParams({RankKind::Threads, RankKind::Fibers}, {1, 4});
  for (const WorldParam& p : generator) got.emplace_back(p.rank_kind, p.world_size);
  EXPECT_THAT(got, ElementsAre(std::pair{RankKind::Threads, 1}, std::pair{RankKind::Threads, 4},
                               std::pair{RankKind::Fibers, 1}, std::pair{RankKind::Fibers, 4}));
}

CollectiveDesc labelled_all_gather() {
  CollectiveDesc d;
  d.group = "world";
  d.group_rank = 1;
  d.group_size = 4;
  d.seq = 3;
  d.op = CollectiveOp::AllGather;
  d.dtype = at::kBFloat16;
  d.input_shape = {6};
  d.output_shape = {24};
  d.label = "fsdp all-gather of unit 'block0'";
  return d;
}

TEST(CollectiveMatchers, MatchEachField) {
  const CollectiveDesc d = labelled_all_gather();
  EXPECT_THAT(d, AllOf(IsAllGather(), GroupIs("world"), GroupRankIs(1), GroupSizeIs(4), SeqIs(3),
                       DtypeIs(at::kBFloat16), InputShapeIs(ElementsAre(6)), OutputShapeIs(std::vector<int64_t>{24}),
                       LabelIs(HasSubstr("unit 'block0'"))));
  EXPECT_THAT(d, Not(IsReduceScatter()));
  EXPECT_THAT(d, Not(SeqIs(::testing::Gt(3u))));
  EXPECT_THAT(d, Not(OutputShapeIs(ElementsAre(6))));
  EXPECT_THAT(d, Not(LabelIs("")));
  CollectiveDesc rs = d;
  rs.op = CollectiveOp::ReduceScatter;
  rs.reduce_op = ReduceOp::Avg;
  EXPECT_THAT(rs, AllOf(IsReduceScatter(), ReduceOpIs(ReduceOp::Avg), Not(ReduceOpIs(ReduceOp::Sum))));
  CollectiveDesc b = d;
  b.op = CollectiveOp::Broadcast;
  b.root = 2;
  EXPECT_THAT(b, AllOf(IsBroadcast(), RootIs(2), Not(IsBarrier()), Not(IsAllReduce())));
}

TEST(CollectiveMatchers, DescribeTheFieldByName) {
  EXPECT_THAT(::testing::DescribeMatcher<CollectiveDesc>(SeqIs(3u)), HasSubstr("seq"));
  EXPECT_THAT(::testing::DescribeMatcher<CollectiveDesc>(LabelIs("x")), HasSubstr("label"));
  ::testing::StringMatchResultListener listener;
  EXPECT_FALSE(::testing::ExplainMatchResult(InputShapeIs(ElementsAre(7)), labelled_all_gather(), &listener));
  EXPECT_THAT(listener.str(), HasSubstr("input_shape"));
}

TEST(MockHooks, CommHooksDefaultsIssueTheCollective) {
  NiceMock<MockCommHooks> hooks;
  const CollectiveDesc d = labelled_all_gather();
  int issued = 0;
  WorkPtr work = hooks.run(d, [&issued]() -> WorkPtr {
    ++issued;
    return nullptr;
  });
  EXPECT_EQ(issued, 1);
  EXPECT_EQ(work, nullptr);
  hooks.before(d);
  hooks.after(d, work);
}

TEST(MockHooks, EngineHooksAreMockable) {
  ::testing::StrictMock<MockEngineHooks> hooks;
  EXPECT_CALL(hooks, on_prefetch("", "block2", fsdp::TrainingState::PreBackward));
  fsdp::EngineHooks& as_engine_sees_it = hooks;
  as_engine_sees_it.on_prefetch("", "block2", fsdp::TrainingState::PreBackward);
}

}  // namespace
}  // namespace fsdpsim::testing
