// CommHooks through a GoogleMock mock: every collective of a HookedProcessGroup
// passes before/run/after in order with its desc; hooks can delay, replace
// and fail collectives; split() subgroups stay hooked. Ranks run in a World of
// fake-backend ranks (threads and fibers, the testing library's WorldTest).
// Each rank gets its own mock, with
// every expectation set before World::run (gmock expectations must not be set
// concurrently with calls).

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <stdexcept>

#include "backends/comm_hooks.h"
#include "backends/errors.h"
#include "backends/observe/trace_recorder.h"
#include "sim/testing/collective_matchers.h"
#include "sim/testing/mock_hooks.h"
#include "sim/testing/world_fixture.h"
#include "sim/world.h"

namespace fsdpsim {
namespace {

using sim::RankContext;
using sim::RankKind;
using sim::World;
using sim::WorldOptions;
using sim::WorldResult;
using ::testing::_;
using ::testing::AllOf;
using ::testing::AnyNumber;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::InSequence;
using ::testing::Invoke;
using ::testing::NiceMock;
using ::testing::NotNull;
using ::testing::Return;
using ::testing::StrictMock;

using fsdpsim::testing::DtypeIs;
using fsdpsim::testing::GroupRankIs;
using fsdpsim::testing::GroupSizeIs;
using fsdpsim::testing::InputShapeIs;
using fsdpsim::testing::MockCommHooks;
using fsdpsim::testing::OpIs;
using fsdpsim::testing::OutputShapeIs;
using fsdpsim::testing::RanksSucceeded;
using fsdpsim::testing::ReduceOpIs;
using fsdpsim::testing::SeqIs;
using fsdpsim::testing::WorldParamName;
using fsdpsim::testing::WorldParams;

// A Work that did nothing, complete from the start: what a hook returns
// when it replaces a collective by a local no-op.
class LocalNoopWork final : public Work {
 public:
  explicit LocalNoopWork(CollectiveDesc desc) : desc_(std::move(desc)) {}
  void wait() override {}
  bool is_completed() const override { return true; }
  std::exception_ptr exception() const override { return nullptr; }
  const CollectiveDesc& desc() const override { return desc_; }
  WorkTimes times() const override { return WorkTimes{}; }
  void on_completion(std::function<void()> callback) override { callback(); }

 private:
  CollectiveDesc desc_;
};

void expect_value(const at::Tensor& t, float value, const char* what) {
  if (!at::all(t == value).item<bool>()) {
    throw std::runtime_error(std::string(what) + ": expected all " + std::to_string(value));
  }
}

class CommHooksWorldTest : public fsdpsim::testing::WorldTest {
 protected:
  int n() const { return world_size(); }
};

// Each rank: 2 all_gathers, 1 reduce_scatter, 3 all_reduces, 1 broadcast, 1 barrier.
void run_mixed_ops(RankContext& ctx, const std::shared_ptr<CommHooks>& hooks) {
  const int n = ctx.world_size();
  auto pg = std::make_shared<HookedProcessGroup>(ctx.world_group(), hooks);
  auto in = at::full({2}, static_cast<float>(ctx.rank()));
  auto out = at::empty({2 * n});
  for (int i = 0; i < 2; ++i) pg->all_gather_into_tensor(out, in)->wait();
  for (int r = 0; r < n; ++r) expect_value(out.narrow(0, 2 * r, 2), static_cast<float>(r), "all_gather");
  auto rs = at::empty({2});
  pg->reduce_scatter_tensor(rs, at::ones({2 * n}), ReduceScatterOptions{})->wait();
  expect_value(rs, static_cast<float>(n), "reduce_scatter");
  auto t = at::ones({3});
  for (int i = 0; i < 3; ++i) pg->all_reduce(t, AllReduceOptions{})->wait();
  expect_value(t, static_cast<float>(n * n * n), "all_reduce");
  auto b = at::full({1}, static_cast<float>(ctx.rank() + 10));
  pg->broadcast(b, BroadcastOptions{n - 1})->wait();
  expect_value(b, static_cast<float>(n + 9), "broadcast");
  pg->barrier()->wait();
  if (pg->sequence_number() != 8) throw std::runtime_error("expected 8 collectives");
}

TEST_P(CommHooksWorldTest, CallCountsPerOp) {
  auto mocks = per_rank<StrictMock<MockCommHooks>>();
  for (auto& m : mocks) {
    for (auto [op, count] : std::vector<std::pair<CollectiveOp, int>>{{CollectiveOp::AllGather, 2},
                                                                      {CollectiveOp::ReduceScatter, 1},
                                                                      {CollectiveOp::AllReduce, 3},
                                                                      {CollectiveOp::Broadcast, 1},
                                                                      {CollectiveOp::Barrier, 1}}) {
      EXPECT_CALL(*m, before(OpIs(op))).Times(count);
      EXPECT_CALL(*m, run(OpIs(op), _)).Times(count);
      EXPECT_CALL(*m, after(OpIs(op), NotNull())).Times(count);
    }
  }
  WorldResult result = run_ranks([&](RankContext& ctx) { run_mixed_ops(ctx, mocks[ctx.rank()]); });
  EXPECT_TRUE(RanksSucceeded(result));
}

TEST_P(CommHooksWorldTest, OrderSeqNumbersAndShapes) {
  const int size = n();
  auto mocks = per_rank<StrictMock<MockCommHooks>>();
  for (int r = 0; r < size; ++r) {
    auto& m = *mocks[r];
    InSequence in_order;
    auto ag = AllOf(OpIs(CollectiveOp::AllGather), SeqIs(1), GroupRankIs(r), GroupSizeIs(size),
                    InputShapeIs(ElementsAre(3)), OutputShapeIs(ElementsAre(3 * size)), DtypeIs(at::kFloat));
    EXPECT_CALL(m, before(ag));
    EXPECT_CALL(m, run(ag, _));
    EXPECT_CALL(m, after(ag, NotNull()));
    auto rs = AllOf(OpIs(CollectiveOp::ReduceScatter), SeqIs(2), InputShapeIs(ElementsAre(size, 2)),
                    OutputShapeIs(ElementsAre(2)), ReduceOpIs(ReduceOp::Max));
    EXPECT_CALL(m, before(rs));
    EXPECT_CALL(m, run(rs, _));
    EXPECT_CALL(m, after(rs, NotNull()));
    auto ar = AllOf(OpIs(CollectiveOp::AllReduce), SeqIs(3), DtypeIs(at::kDouble), InputShapeIs(ElementsAre(2, 2)));
    EXPECT_CALL(m, before(ar));
    EXPECT_CALL(m, run(ar, _));
    EXPECT_CALL(m, after(ar, NotNull()));
  }
  WorldResult result = run_ranks([&](RankContext& ctx) {
    HookedProcessGroup pg(ctx.world_group(), mocks[ctx.rank()]);
    auto out = at::empty({3 * size});
    pg.all_gather_into_tensor(out, at::ones({3}))->wait();
    auto rs = at::empty({2});
    auto in = at::arange(2 * size, at::kFloat).reshape({size, 2}) + ctx.rank();
    pg.reduce_scatter_tensor(rs, in, ReduceScatterOptions{ReduceOp::Max})->wait();
    // max over ranks of (2 * rank_of_chunk + j + rank) = 2 * me + j + (size - 1)
    auto want = at::arange(2, at::kFloat) + 2 * ctx.rank() + (size - 1);
    if (!at::equal(rs, want)) throw std::runtime_error("bad reduce_scatter max");
    auto d = at::ones({2, 2}, at::kDouble);
    pg.all_reduce(d, AllReduceOptions{})->wait();
    expect_value(d, static_cast<float>(size), "all_reduce double");
  });
  EXPECT_TRUE(RanksSucceeded(result));
}

TEST_P(CommHooksWorldTest, DelayInBeforeKeepsResultsCorrect) {
  auto mocks = per_rank<NiceMock<MockCommHooks>>();
  for (int r = 0; r < n(); ++r) {
    // Rank r arrives r * 15 ms late at every collective; results must not change.
    EXPECT_CALL(*mocks[r], before(_)).Times(8).WillRepeatedly([r](const CollectiveDesc&) {
      sim::sleep_for(std::chrono::milliseconds(15 * r));
    });
  }
  World world(options());
  const auto start = std::chrono::steady_clock::now();
  WorldResult result = world.run([&](RankContext& ctx) { run_mixed_ops(ctx, mocks[ctx.rank()]); });
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_TRUE(RanksSucceeded(result));
  // The slowest rank slept 8 times; the fibers slept without blocking each other.
  EXPECT_GE(elapsed, std::chrono::milliseconds(8 * 15 * (n() - 1)));
}

TEST_P(CommHooksWorldTest, ReplacedAllReduceIsALocalNoop) {
  const int size = n();
  auto mocks = per_rank<NiceMock<MockCommHooks>>();
  std::vector<WorkPtr> replacements(static_cast<size_t>(size));
  for (int r = 0; r < size; ++r) {
    // Every rank replaces its all_reduce (never calling issue); others pass
    // through (catch-alls first: later expectations take precedence).
    EXPECT_CALL(*mocks[r], run(_, _)).Times(AnyNumber());
    EXPECT_CALL(*mocks[r], after(_, _)).Times(AnyNumber());
    EXPECT_CALL(*mocks[r], run(OpIs(CollectiveOp::AllReduce), _))
        .WillOnce([&replacements, r](const CollectiveDesc& d, const std::function<WorkPtr()>&) {
          replacements[static_cast<size_t>(r)] = std::make_shared<LocalNoopWork>(d);
          return replacements[static_cast<size_t>(r)];
        });
    EXPECT_CALL(*mocks[r], after(OpIs(CollectiveOp::AllReduce), _))
        .WillOnce([&replacements, r](const CollectiveDesc&, const WorkPtr& w) {
          if (w != replacements[static_cast<size_t>(r)]) throw std::runtime_error("after() saw another Work");
        });
  }
  auto recorder = std::make_shared<observe::TraceRecorder>(size);
  WorldOptions o = options();
  o.trace = recorder;
  WorldResult result = run_ranks(o, [&](RankContext& ctx) {
    HookedProcessGroup pg(ctx.world_group(), mocks[ctx.rank()]);
    auto t = at::full({4}, static_cast<float>(ctx.rank() + 1));
    WorkPtr work = pg.all_reduce(t, AllReduceOptions{});
    if (work != replacements[static_cast<size_t>(ctx.rank())]) throw std::runtime_error("not the hook's Work");
    work->wait();
    expect_value(t, static_cast<float>(ctx.rank() + 1), "replaced all_reduce must leave the tensor");
    if (pg.sequence_number() != 0) throw std::runtime_error("seq advanced for a replaced collective");
    // The group is still in step: the next collective is seq 1 everywhere.
    auto out = at::empty({size});
    pg.all_gather_into_tensor(out, at::full({1}, static_cast<float>(ctx.rank())))->wait();
    if (!at::equal(out, at::arange(size, at::kFloat))) throw std::runtime_error("bad all_gather after replace");
    if (pg.sequence_number() != 1) throw std::runtime_error("expected seq 1");
  });
  EXPECT_TRUE(RanksSucceeded(result));
  // The backend (and so the trace) never saw the replaced all_reduce.
  const auto events = recorder->events();
  ASSERT_EQ(events.size(), static_cast<size_t>(size));
  for (const auto& e : events) {
    EXPECT_EQ(e.op, CollectiveOp::AllGather);
    EXPECT_EQ(e.seq, 1u);
  }
}

TEST_P(CommHooksWorldTest, InjectedFailureAbortsTheWorld) {
  const int size = n();
  auto mocks = per_rank<NiceMock<MockCommHooks>>();
  // Rank 1 fails before its second collective; the others enter it and wait.
  EXPECT_CALL(*mocks[1], before(_)).Times(AnyNumber());
  EXPECT_CALL(*mocks[1], before(SeqIs(2))).WillOnce([](const CollectiveDesc& d) {
    throw CommError("injected failure before " + d.to_string());
  });
  std::vector<int> saw_abort(static_cast<size_t>(size), 0);
  WorldOptions o = options();
  o.collective_timeout = std::chrono::milliseconds(30000);
  World world(o);
  const auto start = std::chrono::steady_clock::now();
  WorldResult result = world.run([&](RankContext& ctx) {
    HookedProcessGroup pg(ctx.world_group(), mocks[ctx.rank()]);
    auto t = at::ones({2});
    pg.all_reduce(t, AllReduceOptions{})->wait();
    try {
      pg.all_reduce(t, AllReduceOptions{})->wait();
    } catch (const WorldAbortedError&) {
      saw_abort[static_cast<size_t>(ctx.rank())] = 1;
      throw;
    }
  });
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_LT(elapsed, std::chrono::milliseconds(10000)) << "the world waited for the timeout instead of aborting";
  ASSERT_FALSE(result.ok());
  ASSERT_EQ(result.ranks.size(), static_cast<size_t>(size));
  EXPECT_FALSE(result.ranks[1].ok);
  EXPECT_THAT(result.ranks[1].error, HasSubstr("injected failure before group"));
  EXPECT_THAT(result.ranks[1].error, HasSubstr("seq 2"));
  EXPECT_EQ(saw_abort[1], 0);
  for (int r = 0; r < size; ++r) {
    if (r == 1) continue;
    SCOPED_TRACE("rank " + std::to_string(r));
    EXPECT_FALSE(result.ranks[static_cast<size_t>(r)].ok);
    EXPECT_EQ(saw_abort[static_cast<size_t>(r)], 1) << result.ranks[static_cast<size_t>(r)].error;
    EXPECT_FALSE(result.ranks[static_cast<size_t>(r)].error.empty());
  }
  EXPECT_THAT(result.error_report(), HasSubstr("rank 1: "));
}

TEST_P(CommHooksWorldTest, SplitSubgroupsAreHooked) {
  const int size = n();
  const int half = size / 2;
  // Ranks [0, half) and [half, size).
  std::vector<std::vector<int>> partition(2);
  for (int r = 0; r < size; ++r) partition[r < half ? 0 : 1].push_back(r);
  auto mocks = per_rank<StrictMock<MockCommHooks>>();
  for (int r = 0; r < size; ++r) {
    const int sub_size = r < half ? half : size - half;
    const int sub_rank = r < half ? r : r - half;
    auto& m = *mocks[r];
    InSequence in_order;
    // One collective on the world group, then one on the subgroup (seq 1 there).
    auto world_ar = AllOf(OpIs(CollectiveOp::AllReduce), SeqIs(1), GroupSizeIs(size));
    EXPECT_CALL(m, before(world_ar));
    EXPECT_CALL(m, run(world_ar, _));
    EXPECT_CALL(m, after(world_ar, _));
    auto sub_ar = AllOf(OpIs(CollectiveOp::AllReduce), SeqIs(1), GroupSizeIs(sub_size), GroupRankIs(sub_rank));
    EXPECT_CALL(m, before(sub_ar));
    EXPECT_CALL(m, run(sub_ar, _));
    EXPECT_CALL(m, after(sub_ar, _));
  }
  std::vector<std::string> world_names(static_cast<size_t>(size)), sub_names(static_cast<size_t>(size));
  WorldResult result = run_ranks([&](RankContext& ctx) {
    auto pg = std::make_shared<HookedProcessGroup>(ctx.world_group(), mocks[ctx.rank()]);
    ProcessGroupPtr sub = pg->split(partition);
    if (!std::dynamic_pointer_cast<HookedProcessGroup>(sub)) throw std::runtime_error("subgroup is not hooked");
    auto t = at::ones({2});
    pg->all_reduce(t, AllReduceOptions{})->wait();
    sub->all_reduce(t, AllReduceOptions{})->wait();
    expect_value(t, static_cast<float>(size * sub->size()), "subgroup all_reduce");
    world_names[static_cast<size_t>(ctx.rank())] = pg->name();
    sub_names[static_cast<size_t>(ctx.rank())] = sub->name();
  });
  EXPECT_TRUE(RanksSucceeded(result));
  for (int r = 0; r < size; ++r) EXPECT_NE(sub_names[static_cast<size_t>(r)], world_names[static_cast<size_t>(r)]);
}

INSTANTIATE_TEST_SUITE_P(CommHooks, CommHooksWorldTest, WorldParams({RankKind::Threads, RankKind::Fibers}, {2, 3, 4}),
                         WorldParamName);

// Without a World: the decorator's own contract.

TEST(CommHooks, RejectsNullInnerOrHooks) {
  EXPECT_THROW(HookedProcessGroup(nullptr, std::make_shared<DefaultCommHooks>()), CommError);
  WorldOptions o;
  o.world_size = 1;
  World world(o);
  WorldResult result = world.run([](RankContext& ctx) {
    bool threw = false;
    try {
      HookedProcessGroup pg(ctx.world_group(), nullptr);
    } catch (const CommError&) {
      threw = true;
    }
    if (!threw) throw std::runtime_error("null hooks accepted");
  });
  EXPECT_TRUE(RanksSucceeded(result));
}

TEST(CommHooks, RunReturningNoWorkIsAnError) {
  auto hooks = std::make_shared<NiceMock<MockCommHooks>>();
  EXPECT_CALL(*hooks, run(_, _)).WillOnce(Return(nullptr));
  EXPECT_CALL(*hooks, after(_, _)).Times(0);
  WorldOptions o;
  o.world_size = 1;
  World world(o);
  WorldResult result = world.run([&](RankContext& ctx) {
    HookedProcessGroup pg(ctx.world_group(), hooks);
    (void)pg.barrier();  // throws: the hook gave no Work
  });
  ASSERT_FALSE(result.ok());
  EXPECT_THAT(result.ranks[0].error, HasSubstr("returned no Work"));
}

}  // namespace
}  // namespace fsdpsim
