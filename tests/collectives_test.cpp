// The collective matrix (every collective x dtype x world size on fake
// thread ranks, fake fiber ranks and Gloo thread ranks), sub-groups, and the
// fake backend's validation, abort and timeout paths.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <atomic>
#include <future>
#include <mutex>
#include <thread>

#include "backends/collective_label.h"
#include "backends/errors.h"
#include "backends/mesh.h"
#include "sim/fake_process_group.h"
#include "sim/world.h"
#include "tests/collective_suite.h"

namespace fsdpsim::sim {
namespace {

using ::testing::AllOf;
using ::testing::Contains;
using ::testing::HasSubstr;

struct WorldKind {
  const char* name;
  RankKind rank_kind;
  CommBackend backend;
};

const WorldKind kWorldKinds[] = {
    {"FakeThreads", RankKind::Threads, CommBackend::Fake},
    {"FakeFibers", RankKind::Fibers, CommBackend::Fake},
    {"GlooThreads", RankKind::Threads, CommBackend::Gloo},
};

WorldOptions options_for(const WorldKind& kind, int world_size) {
  WorldOptions options;
  options.world_size = world_size;
  options.rank_kind = kind.rank_kind;
  options.backend = kind.backend;
  options.collective_timeout = std::chrono::seconds(60);
  return options;
}

using MatrixParam = std::tuple<WorldKind, int, at::ScalarType>;

class CollectiveMatrix : public ::testing::TestWithParam<MatrixParam> {};

TEST_P(CollectiveMatrix, EveryCollectiveIsExact) {
  const auto& [kind, world_size, dtype] = GetParam();
  World world(options_for(kind, world_size));
  auto result = world.run([dtype = dtype](RankContext& ctx) {
    for (int64_t count : testing::kSuiteCounts) testing::check_all_collectives(*ctx.world_group(), dtype, count);
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
}

std::string matrix_name(const ::testing::TestParamInfo<MatrixParam>& info) {
  return std::string(std::get<0>(info.param).name) + "_world" + std::to_string(std::get<1>(info.param)) + "_" +
         c10::toString(std::get<2>(info.param));
}

INSTANTIATE_TEST_SUITE_P(All, CollectiveMatrix,
                         ::testing::Combine(::testing::ValuesIn(kWorldKinds), ::testing::Values(1, 2, 3, 5, 8),
                                            ::testing::Values(at::kFloat, at::kDouble, at::kBFloat16, at::kHalf,
                                                              at::kLong)),
                         matrix_name);

class SubGroups : public ::testing::TestWithParam<WorldKind> {};

TEST_P(SubGroups, MeshAxesAndSelfGroupsMoveTheRightData) {
  World world(options_for(GetParam(), 6));
  auto result = world.run([](RankContext& ctx) {
    auto& group = *ctx.world_group();
    Mesh2D mesh = make_mesh_2d(group, /*replicate=*/2, /*shard=*/3);
    ASSERT_EQ(mesh.shard_group->size(), 3);
    ASSERT_EQ(mesh.replicate_group->size(), 2);
    EXPECT_EQ(mesh.shard_group->rank(), ctx.rank() % 3);
    EXPECT_EQ(mesh.replicate_group->rank(), ctx.rank() / 3);
    EXPECT_EQ(mesh.shard_group->global_ranks(),
              (std::vector<int>{ctx.rank() / 3 * 3, ctx.rank() / 3 * 3 + 1, ctx.rank() / 3 * 3 + 2}));
    // Each axis gathers the global ranks of its members.
    auto mine = at::full({1}, static_cast<double>(ctx.rank()), at::kDouble);
    auto row = at::empty({3}, at::kDouble);
    mesh.shard_group->all_gather_into_tensor(row, mine)->wait();
    auto column = at::empty({2}, at::kDouble);
    mesh.replicate_group->all_gather_into_tensor(column, mine)->wait();
    for (int j = 0; j < 3; ++j) EXPECT_EQ(row[j].item<double>(), mesh.shard_group->global_ranks()[j]);
    for (int i = 0; i < 2; ++i) EXPECT_EQ(column[i].item<double>(), mesh.replicate_group->global_ranks()[i]);
    testing::check_all_collectives(*mesh.shard_group, at::kFloat, 7);
    testing::check_all_collectives(*mesh.replicate_group, at::kFloat, 7);

    auto self = make_self_group(group);
    ASSERT_EQ(self->size(), 1);
    EXPECT_EQ(self->global_ranks(), std::vector<int>{ctx.rank()});
    testing::check_all_collectives(*self, at::kFloat, 7);
    // Sequence numbers are per group: the world group saw no collective.
    EXPECT_EQ(group.sequence_number(), 0u);
    EXPECT_GT(mesh.shard_group->sequence_number(), 0u);

    // Ranks outside every list get no group.
    auto partial = group.split({{0, 1}});
    EXPECT_EQ(partial != nullptr, ctx.rank() < 2);
    if (partial) testing::check_all_collectives(*partial, at::kFloat, 3);
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
}

INSTANTIATE_TEST_SUITE_P(All, SubGroups, ::testing::ValuesIn(kWorldKinds),
                         [](const auto& info) { return std::string(info.param.name); });

// ---------------------------------------------------------------------------
// Validation and failure paths of the fake backend, on threads and fibers.

class FakeFailures : public ::testing::TestWithParam<RankKind> {
 protected:
  WorldOptions options(int world_size, std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
    WorldOptions options;
    options.world_size = world_size;
    options.rank_kind = GetParam();
    options.collective_timeout = timeout;
    return options;
  }
};

TEST_P(FakeFailures, OpMismatchFailsEveryRankNamingGroupSeqOpsAndShapes) {
  World world(options(4));
  auto result = world.run([](RankContext& ctx) {
    auto& group = *ctx.world_group();
    group.barrier()->wait();
    if (ctx.rank() == 2) {
      auto in = at::zeros({8}, at::kFloat);
      auto out = at::zeros({2}, at::kFloat);
      group.reduce_scatter_tensor(out, in, ReduceScatterOptions{})->wait();
    } else {
      auto in = at::zeros({2}, at::kFloat);
      auto out = at::zeros({8}, at::kFloat);
      group.all_gather_into_tensor(out, in)->wait();
    }
  });
  ASSERT_FALSE(result.ok());
  for (const auto& rank : result.ranks) {
    ASSERT_FALSE(rank.ok) << "rank " << rank.rank << " should have failed";
    // Whatever rank reached the mismatch first, every rank reports it whole.
    EXPECT_THAT(rank.error, HasSubstr("collective mismatch in group world seq 2"));
    EXPECT_THAT(rank.error, HasSubstr("rank 2 called reduce_scatter Float in [8] out [2] op sum"));
    EXPECT_THAT(rank.error, HasSubstr("called all_gather Float in [2] out [8]"));
  }
}

TEST_P(FakeFailures, DtypeShapeReduceOpAndRootMismatchesAreCaught) {
  struct Case {
    const char* what;
    std::function<void(ProcessGroup&, int)> call;
    const char* expect;
  };
  const std::vector<Case> cases = {
      {"dtype",
       [](ProcessGroup& g, int r) {
         g.all_reduce(at::zeros({3}, r == 1 ? at::kDouble : at::kFloat), AllReduceOptions{})->wait();
       },
       "rank 1 called all_reduce Double in [3]"},
      {"shape", [](ProcessGroup& g, int r) { g.all_reduce(at::zeros({r == 1 ? 4 : 3}), AllReduceOptions{})->wait(); },
       "rank 1 called all_reduce Float in [4]"},
      {"reduce op",
       [](ProcessGroup& g, int r) {
         AllReduceOptions options;
         options.reduce_op = r == 1 ? ReduceOp::Max : ReduceOp::Sum;
         g.all_reduce(at::zeros({3}), options)->wait();
       },
       "op max"},
      {"root",
       [](ProcessGroup& g, int r) {
         BroadcastOptions options;
         options.root = r == 1 ? 1 : 0;
         g.broadcast(at::zeros({3}), options)->wait();
       },
       "root 1"},
  };
  for (const auto& c : cases) {
    World world(options(3));
    auto result = world.run([&](RankContext& ctx) { c.call(*ctx.world_group(), ctx.rank()); });
    ASSERT_FALSE(result.ok()) << c.what;
    for (const auto& rank : result.ranks) {
      EXPECT_THAT(rank.error, HasSubstr("collective mismatch in group world seq 1")) << c.what;
      EXPECT_THAT(rank.error, HasSubstr(c.expect)) << c.what;
    }
  }
}

TEST_P(FakeFailures, ThrowingRankAbortsTheWorldAndWakesBlockedRanks) {
  // A long timeout: the blocked ranks must wake because of the abort, not time out.
  World world(options(3, std::chrono::seconds(120)));
  auto result = world.run([](RankContext& ctx) {
    if (ctx.rank() == 1) throw std::runtime_error("boom in rank 1");
    auto t = at::ones({4});
    ctx.world_group()->all_reduce(t, AllReduceOptions{})->wait();
  });
  ASSERT_EQ(result.ranks.size(), 3u);
  EXPECT_THAT(result.ranks[1].error, HasSubstr("boom in rank 1"));
  for (int r : {0, 2}) {
    EXPECT_FALSE(result.ranks[r].ok);
    EXPECT_THAT(result.ranks[r].error, HasSubstr("group world seq 1"));
    EXPECT_THAT(result.ranks[r].error, HasSubstr("all_reduce"));
    EXPECT_THAT(result.ranks[r].error, HasSubstr("rank 1 failed: boom in rank 1"));
    EXPECT_THAT(result.ranks[r].error, ::testing::Not(HasSubstr("timed out")));
  }
  EXPECT_THAT(result.error_report(), HasSubstr("rank 1: boom in rank 1"));
}

TEST_P(FakeFailures, RankThatExitsWithoutCallingFailsTheCollectiveAtOnce) {
  World world(options(3, std::chrono::seconds(120)));
  auto result = world.run([](RankContext& ctx) {
    auto t = at::ones({4});
    ctx.world_group()->all_reduce(t, AllReduceOptions{})->wait();
    if (ctx.rank() == 2) return;  // skips the second collective
    ctx.world_group()->all_reduce(t, AllReduceOptions{})->wait();
  });
  EXPECT_TRUE(result.ranks[2].ok);
  // The World's flight recorder says where each rank stopped.
  EXPECT_THAT(result.flight_recorder, HasSubstr("rank 2 at seq 1 all_reduce (completed)"));
  EXPECT_THAT(result.flight_recorder, HasSubstr("ranks {0-1} at seq 2 all_reduce (failed)"));
  for (int r : {0, 1}) {
    EXPECT_THAT(result.ranks[r].error, HasSubstr("group world seq 2 all_reduce: can never complete: rank 2 "
                                                 "exited normally without calling this collective"));
  }
}

TEST_P(FakeFailures, TimeoutNamesMissingRanksAndWhereEachRankIs) {
  World world(options(3, std::chrono::milliseconds(1000)));
  auto result = world.run([](RankContext& ctx) {
    auto& group = *ctx.world_group();
    auto t = at::ones({4});
    group.barrier()->wait();
    if (ctx.rank() == 2) {
      sleep_for(std::chrono::seconds(3));  // alive, but late
    }
    group.all_reduce(t, AllReduceOptions{})->wait();
  });
  for (int r : {0, 1}) {
    const auto& error = result.ranks[r].error;
    EXPECT_THAT(error, HasSubstr("group world seq 2 all_reduce: timed out after 1000 ms waiting for ranks {2}"));
    EXPECT_THAT(error, HasSubstr("ranks {0-1}: waiting in all_reduce group world seq 2"));
    EXPECT_THAT(error, HasSubstr("rank 2: running, last issued barrier group world seq 1"));
  }
  // The late rank then finds the world aborted instead of hanging.
  EXPECT_FALSE(result.ranks[2].ok);
  EXPECT_THAT(result.ranks[2].error, HasSubstr("world aborted"));
}

// WorldOptions::heartbeat: while rank 2 is late, reports say where each
// rank is; none come once the run returned.
TEST_P(FakeFailures, HeartbeatReportsWhereEachRankIsWhileTheRunLasts) {
  WorldOptions opts = options(3);
  std::mutex mutex;
  std::vector<std::string> beats;
  opts.heartbeat_interval = std::chrono::milliseconds(40);
  opts.heartbeat = [&](const std::string& where) {
    std::lock_guard<std::mutex> lock(mutex);
    beats.push_back(where);
  };
  World world(opts);
  auto result = world.run([](RankContext& ctx) {
    auto& group = *ctx.world_group();
    group.barrier()->wait();
    if (ctx.rank() == 2) sleep_for(std::chrono::milliseconds(400));
    group.barrier()->wait();
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
  std::lock_guard<std::mutex> lock(mutex);
  EXPECT_THAT(beats, Contains(AllOf(HasSubstr("ranks {0-1}: waiting in barrier group world seq 2"),
                                    HasSubstr("rank 2: running, last issued barrier group world seq 1"))));
  const size_t after_run = beats.size();
  std::this_thread::sleep_for(std::chrono::milliseconds(120));
  EXPECT_EQ(beats.size(), after_run);
}

TEST_P(FakeFailures, LocalArgumentErrorsCarryRankGroupSeqAndShapes) {
  World world(options(2));
  auto result = world.run([](RankContext& ctx) {
    auto& group = *ctx.world_group();
    try {
      (void)group.all_gather_into_tensor(at::zeros({5}), at::zeros({2}));
      ADD_FAILURE() << "wrong output size accepted";
    } catch (const CommError& e) {
      EXPECT_THAT(e.what(), HasSubstr("rank " + std::to_string(ctx.rank()) + " group world seq 1 all_gather"));
      EXPECT_THAT(e.what(), HasSubstr("output has 5 elements, expected 2 ranks x 2"));
    }
    auto base = at::zeros({8});
    EXPECT_THROW((void)group.all_gather_into_tensor(base, base.narrow(0, 1, 4)), CommError);  // misaligned in place
    EXPECT_THROW((void)group.broadcast(at::zeros({2}), BroadcastOptions{5}), CommError);
    EXPECT_THROW((void)group.all_gather_into_tensor(at::zeros({4, 2}).t(), at::zeros({4})), CommError);  // strided
    ReduceScatterOptions bad_factor;
    bad_factor.reduce_op = ReduceOp::Max;
    bad_factor.predivide_factor = 2;
    EXPECT_THROW((void)group.reduce_scatter_tensor(at::zeros({2}), at::zeros({4}), bad_factor), CommError);
    EXPECT_THROW(group.split({{0, 0}}), CommError);
    // Nothing was issued: the sequence did not move.
    EXPECT_EQ(group.sequence_number(), 0u);
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
}

INSTANTIATE_TEST_SUITE_P(All, FakeFailures, ::testing::Values(RankKind::Threads, RankKind::Fibers),
                         [](const auto& info) { return std::string(to_string(info.param)); });

TEST(WorldOptionsTest, BadOptionsAreRejectedWithTheirName) {
  WorldOptions options;
  options.world_size = 0;
  EXPECT_THROW({ World world(options); }, std::invalid_argument);
  options.world_size = 2;
  options.heartbeat = [](const std::string&) {};
  options.heartbeat_interval = std::chrono::milliseconds(0);
  try {
    World world(options);
    FAIL() << "a zero heartbeat interval accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_THAT(e.what(), HasSubstr("heartbeat_interval must be positive, got 0 ms"));
  }
  options.heartbeat = nullptr;
  options.world_size = 2;
  options.backend = CommBackend::Gloo;
  options.rank_kind = RankKind::Fibers;
  try {
    World world(options);
    FAIL() << "gloo fibers accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_THAT(e.what(), HasSubstr("Gloo"));
  }
}

// ---------------------------------------------------------------------------
// Fiber ranks: scale, determinism, per-fiber LibTorch state.

TEST(FiberWorld, FourThousandNinetySixRanksCompleteARound) {
  WorldOptions options;
  options.world_size = 4096;
  options.rank_kind = RankKind::Fibers;
  options.fiber_stack_bytes = 128 * 1024;
  World world(options);
  std::atomic<int> correct{0};
  auto result = world.run([&](RankContext& ctx) {
    auto& group = *ctx.world_group();
    const int n = ctx.world_size();
    group.barrier()->wait();
    auto mine = at::full({1}, static_cast<float>(ctx.rank()), at::kFloat);
    auto all = at::empty({n}, at::kFloat);
    group.all_gather_into_tensor(all, mine)->wait();
    auto grads = at::ones({n}, at::kFloat);
    auto shard = at::empty({1}, at::kFloat);
    group.reduce_scatter_tensor(shard, grads, ReduceScatterOptions{})->wait();
    bool ok = shard.item<float>() == static_cast<float>(n) && at::equal(all, at::arange(n, at::kFloat));
    if (ok) ++correct;
  });
  EXPECT_TRUE(result.ok()) << result.error_report().substr(0, 2000);
  EXPECT_EQ(correct.load(), 4096);
}

// Fiber worlds stage all-gathers: each output is written when its own rank
// waits, so N ranks never hold N written outputs (N x N x shard bytes) at
// once. Counted: when the first wait returns, no other rank's output holds
// data yet. Odd and even worlds, both schedules.
TEST(FiberWorld, AllGatherOutputIsWrittenWhenItsRankWaits) {
  for (int n : {4, 5}) {
    for (SchedulePolicy policy : {SchedulePolicy::RoundRobin, SchedulePolicy::SeededRandom}) {
      SCOPED_TRACE("world " + std::to_string(n) + " " + to_string(policy));
      WorldOptions options;
      options.world_size = n;
      options.rank_kind = RankKind::Fibers;
      options.schedule = policy;
      options.seed = 3;
      std::vector<at::Tensor> outputs(n);  // one OS thread: no lock needed
      int first_returned = -1;
      int others_written_then = -1;
      World world(options);
      auto result = world.run([&](RankContext& ctx) {
        const int r = ctx.rank();
        outputs[r] = at::full({n}, -1.0F);
        auto mine = at::full({1}, static_cast<float>(r));
        auto work = ctx.world_group()->all_gather_into_tensor(outputs[r], mine);
        work->wait();
        EXPECT_TRUE(at::equal(outputs[r], at::arange(n, at::kFloat))) << "rank " << r;
        if (first_returned >= 0) return;
        first_returned = r;
        others_written_then = 0;
        for (int q = 0; q < n; ++q) {
          if (q != r && outputs[q].defined() && outputs[q].min().item<float>() >= 0.0F) ++others_written_then;
        }
      });
      ASSERT_TRUE(result.ok()) << result.error_report();
      EXPECT_GE(first_returned, 0);
      EXPECT_EQ(others_written_then, 0) << "rank " << first_returned << " returned first";
    }
  }
}

// ... and reduce-scatter inputs are folded in (rank order) as their ranks
// arrive: the backend keeps no reference to an input once it is folded, so
// a caller that drops its own frees it before the last rank arrives.
// Counted with the input's reference count; the result against a rank-order
// sum computed here.
TEST(FiberWorld, ReduceScatterLetsGoOfEachInputAsItsRankArrives) {
  const int n = 5;
  WorldOptions options;
  options.world_size = n;
  options.rank_kind = RankKind::Fibers;
  std::vector<long> refs_after_issue(n, -1);
  World world(options);
  auto result = world.run([&](RankContext& ctx) {
    const int r = ctx.rank();
    auto input = at::arange(2 * n, at::kFloat).mul(0.1F * static_cast<float>(r + 1));
    auto output = at::empty({2}, at::kFloat);
    auto work = ctx.world_group()->reduce_scatter_tensor(output, input, ReduceScatterOptions{});
    refs_after_issue[r] = input.use_count();
    work->wait();
    at::Tensor expected = at::arange(2 * n, at::kFloat).mul(0.1F);
    for (int q = 1; q < n; ++q)
      expected = expected + at::arange(2 * n, at::kFloat).mul(0.1F * static_cast<float>(q + 1));
    EXPECT_TRUE(at::equal(output, expected.narrow(0, 2 * r, 2))) << "rank " << r;
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
  for (int r = 0; r < n; ++r) EXPECT_EQ(refs_after_issue[r], 1) << "rank " << r;
}

std::vector<int> interleaving(SchedulePolicy policy, uint64_t seed) {
  WorldOptions options;
  options.world_size = 6;
  options.rank_kind = RankKind::Fibers;
  options.schedule = policy;
  options.seed = seed;
  std::vector<int> order;  // one OS thread runs all fibers: no lock needed
  World world(options);
  auto result = world.run([&](RankContext& ctx) {
    for (int step = 0; step < 5; ++step) {
      order.push_back(ctx.rank());
      yield();
    }
    auto t = at::ones({2});
    ctx.world_group()->all_reduce(t, AllReduceOptions{})->wait();
    order.push_back(100 + ctx.rank());
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
  return order;
}

TEST(FiberWorld, SeededScheduleIsReproducibleAndSeedsDiffer) {
  EXPECT_EQ(interleaving(SchedulePolicy::SeededRandom, 7), interleaving(SchedulePolicy::SeededRandom, 7));
  std::set<std::vector<int>> distinct;
  for (uint64_t seed = 0; seed < 4; ++seed) distinct.insert(interleaving(SchedulePolicy::SeededRandom, seed));
  EXPECT_GT(distinct.size(), 1u) << "the seed does not change the interleaving";
  // Round-robin: rank order at every step.
  auto rr = interleaving(SchedulePolicy::RoundRobin, 0);
  EXPECT_EQ(std::vector<int>(rr.begin(), rr.begin() + 6), (std::vector<int>{0, 1, 2, 3, 4, 5}));
}

TEST(FiberWorld, GradModeDoesNotLeakBetweenFibers) {
  WorldOptions options;
  options.world_size = 4;
  options.rank_kind = RankKind::Fibers;
  World world(options);
  std::vector<int> recorded(4, -1);
  auto result = world.run([&](RankContext& ctx) {
    auto w = at::ones({3}).set_requires_grad(true);
    if (ctx.rank() % 2 == 0) {
      at::NoGradGuard no_grad;
      yield();  // the odd ranks run while this one sits in no_grad
      recorded[ctx.rank()] = (w * 2).requires_grad();
    } else {
      yield();
      recorded[ctx.rank()] = (w * 2).requires_grad();
    }
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
  EXPECT_EQ(recorded, (std::vector<int>{0, 1, 0, 1}));
}

// A rank that blocks inside a ScopedCollectiveLabel (the engine waits on a
// labelled all-reduce) must not lend its label to the fibers that run
// meanwhile: their collectives would carry it, and the cross-rank check
// would report a mismatch between ranks that agree.
TEST(FiberWorld, CollectiveLabelDoesNotLeakBetweenFibers) {
  WorldOptions options;
  options.world_size = 4;
  options.rank_kind = RankKind::Fibers;
  World world(options);
  std::vector<std::string> seen(4, "unset");
  auto result = world.run([&](RankContext& ctx) {
    if (ctx.rank() % 2 == 0) {
      ScopedCollectiveLabel label("rank " + std::to_string(ctx.rank()) + "'s");
      yield();  // the odd ranks run while this one sits in its label
      seen[ctx.rank()] = current_collective_label();
    } else {
      yield();
      seen[ctx.rank()] = current_collective_label();
    }
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
  EXPECT_EQ(seen, (std::vector<std::string>{"rank 0's", "", "rank 2's", ""}));
}

}  // namespace
}  // namespace fsdpsim::sim

namespace fsdpsim::sim {
namespace {

TEST(FakeThreadsAsync, CollectiveCompletesWhileEveryRankComputes) {
  // No rank waits: the progress thread alone must move the data. Polling is
  // bounded so a regression fails instead of hanging.
  WorldOptions options;
  options.world_size = 4;
  World world(options);
  auto result = world.run([](RankContext& ctx) {
    auto in = at::full({1000}, static_cast<float>(ctx.rank()));
    auto out = at::empty({4000});
    auto work = ctx.world_group()->all_gather_into_tensor(out, in);
    int polls = 0;
    while (!work->is_completed() && polls < 10000) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      ++polls;
    }
    ASSERT_TRUE(work->is_completed()) << "the all-gather made no progress without a wait";
    for (int r = 0; r < 4; ++r) EXPECT_EQ(out[r * 1000 + 999].item<float>(), static_cast<float>(r));
    work->wait();
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
}

TEST(FakeThreadsAsync, WorldReleasedByACallbackOnTheProgressThreadShutsDownCleanly) {
  // The progress thread runs completion callbacks; when one of them drops the
  // last reference to the world, the world is destroyed on that thread, which
  // must then stop without touching the freed world (heap corruption seen in
  // CI). Many rounds, so reused memory makes a use-after-free show.
  for (int round = 0; round < 200; ++round) {
    std::promise<void> released;
    std::shared_future<void> go = released.get_future().share();
    std::weak_ptr<FakeWorldState> alive;
    {
      auto state =
          std::make_shared<FakeWorldState>(2, /*fibers=*/false, std::chrono::seconds(20), SteadyClock::instance());
      alive = state;
      auto t0 = at::ones({256});
      auto t1 = at::ones({256});
      WorkPtr w0 = state->world_group(0)->all_reduce(t0, AllReduceOptions{});
      // The callback owns w0, and w0 owns the world: nobody waits, so the
      // progress thread completes the collective and runs the callback.
      w0->on_completion([w0, go] { go.wait(); });
      WorkPtr w1 = state->world_group(1)->all_reduce(t1, AllReduceOptions{});
    }
    released.set_value();
    int polls = 0;
    while (!alive.expired() && polls < 20000) {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
      ++polls;
    }
    ASSERT_TRUE(alive.expired()) << "round " << round << ": the world outlived its last callback";
  }
}

}  // namespace
}  // namespace fsdpsim::sim
