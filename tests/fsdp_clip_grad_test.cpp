// fsdp::clip_grad_norm_ against LibTorch's torch::nn::utils::clip_grad_norm_
// on the unsharded DDP reference (tests/small_net.h), for norm types 2, 1 and
// inf, every strategy, thread and fiber ranks, world 2, 3 (uneven shards and
// an empty one) and 4 (hybrid 2 x 2).
//
// Tolerance: the reference takes each param's norm in fp32 and the norm of
// those norms; we sum |g|^p over each rank's shard rows in double and
// all-reduce the sums, so the totals differ by fp32 rounding: relative 1e-5
// (ample for the ~150 elements here). The clip coefficient is computed from
// that total in fp32 as LibTorch does, so the clipped grads differ by at most
// the coefficient's rounding: relative 1e-5 too, plus 1e-5 of the tensor's
// largest element absolute, since hybrid sharding's grads are a mean of means
// (see README) whose rounding shows most where the ranks' grads cancel.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "backends/observe/trace_recorder.h"
#include "fsdp/clip_grad.h"
#include "small_net.h"

namespace fsdpsim::fsdp {
namespace {

using testnet::SmallNet;

constexpr double kRelTol = 1e-5;

struct ClipCase {
  double norm_type;
  ShardingStrategy strategy;
  sim::RankKind kind;
  int world;
  int replicate = 1;  // HybridShard
};

std::string norm_name(double p) { return std::isinf(p) ? "inf" : std::to_string(static_cast<int>(p)); }

class ClipGradNorm : public ::testing::TestWithParam<ClipCase> {};

// The reference grads after backward (extra unused: None, skipped), and
// LibTorch's total norm and clipped grads for `max_norm`.
struct Expected {
  double total = 0.0;
  std::map<std::string, torch::Tensor> grads;
};

Expected reference_clip(const ClipCase& c, double max_norm) {
  at::set_num_threads(1);
  auto reference = testnet::make_small_net();
  reference->use_extra = false;
  testnet::reference_backward(*reference, c.world, /*step=*/0);
  Expected expected;
  expected.total = torch::nn::utils::clip_grad_norm_(reference->parameters(), max_norm, c.norm_type);
  for (const auto& [name, p] : testnet::named_params(*reference)) {
    expected.grads[name] = p.grad().defined() ? p.grad().clone() : torch::Tensor();
  }
  return expected;
}

int double_all_reduces(const observe::TraceRecorder& trace, int rank) {
  int count = 0;
  for (const auto& record : trace.events()) {
    if (record.rank == rank && record.is_collective() && record.op == CollectiveOp::AllReduce &&
        record.dtype == at::kDouble) {
      ++count;
    }
  }
  return count;
}

TEST_P(ClipGradNorm, MatchesLibTorchOnTheUnshardedModel) {
  const ClipCase c = GetParam();
  // Below the total (asserted), so the grads really are scaled.
  const double max_norm = 0.05;
  const Expected expected = reference_clip(c, max_norm);
  ASSERT_GT(expected.total, 2 * max_norm);
  auto trace = std::make_shared<observe::TraceRecorder>(c.world);
  sim::WorldOptions options;
  options.world_size = c.world;
  options.rank_kind = c.kind;
  options.trace = trace;
  sim::World world(options);
  std::vector<double> totals(static_cast<size_t>(c.world));
  auto result = world.run([&](sim::RankContext& ctx) {
    at::set_num_threads(1);
    auto model = testnet::make_small_net();
    model->use_extra = false;
    Engine engine(testnet::fiber_safe_engine_options());
    testnet::shard_small_net(engine, *model, ctx.world_group(), c.strategy, c.replicate);
    sim::backward(fsdp::call(model, testnet::small_input(ctx.rank(), 0)).sum());
    const double total = clip_grad_norm_(engine, max_norm, c.norm_type);
    totals[static_cast<size_t>(ctx.rank())] = total;
    EXPECT_NEAR(total, expected.total, kRelTol * expected.total) << "rank " << ctx.rank();
    const auto place = testnet::shard_place(ctx.rank(), c.world, c.strategy, c.replicate);
    for (const auto& [name, p] : testnet::named_params(*model)) {
      const torch::Tensor& full = expected.grads.at(name);
      ASSERT_EQ(p.grad().defined(), full.defined()) << name << " rank " << ctx.rank();
      if (!full.defined()) continue;
      const torch::Tensor rows = testnet::shard_rows(full, place.rank, place.size);
      ASSERT_EQ(p.grad().sizes(), rows.sizes()) << name;
      // atol against the tensor's scale: hybrid's mean of means cancels differently near 0.
      const double atol = kRelTol * full.abs().max().item<double>();
      EXPECT_TRUE(torch::allclose(p.grad(), rows, kRelTol, atol))
          << name << " rank " << ctx.rank() << " max diff " << (p.grad() - rows).abs().max().item<double>();
    }
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
  // Every rank the same total, bitwise (replicas hold equal grads), so every
  // rank scales by the same coefficient and replicas stay in step.
  for (double total : totals) EXPECT_EQ(total, totals[0]);
  // One all-reduce of the shard group's sum per call, none for a shard group
  // of one rank (NoShard): visible in the trace like the engine's own.
  const int shard_size = testnet::shard_place(0, c.world, c.strategy, c.replicate).size;
  for (int rank = 0; rank < c.world; ++rank) {
    EXPECT_EQ(double_all_reduces(*trace, rank), shard_size > 1 ? 1 : 0) << "rank " << rank;
  }
}

std::vector<ClipCase> clip_cases() {
  std::vector<ClipCase> cases;
  const double inf = std::numeric_limits<double>::infinity();
  for (double p : {2.0, 1.0, inf}) {
    for (auto strategy : {ShardingStrategy::FullShard, ShardingStrategy::ShardGradOp, ShardingStrategy::NoShard}) {
      cases.push_back({p, strategy, sim::RankKind::Threads, 3});
    }
    cases.push_back({p, ShardingStrategy::FullShard, sim::RankKind::Threads, 2});
    cases.push_back({p, ShardingStrategy::FullShard, sim::RankKind::Fibers, 3});
    cases.push_back({p, ShardingStrategy::HybridShard, sim::RankKind::Threads, 4, 2});
    cases.push_back({p, ShardingStrategy::HybridShard, sim::RankKind::Fibers, 4, 2});
  }
  cases.push_back({2.0, ShardingStrategy::NoShard, sim::RankKind::Fibers, 2});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(All, ClipGradNorm, ::testing::ValuesIn(clip_cases()),
                         [](const ::testing::TestParamInfo<ClipCase>& info) {
                           const ClipCase& c = info.param;
                           return "p" + norm_name(c.norm_type) + "_" + to_string(c.strategy) + "_" +
                                  sim::to_string(c.kind) + "_w" + std::to_string(c.world);
                         });

// A max_norm above the total leaves every grad bitwise as it was (the
// coefficient clamps to 1), and the params overload clips only those params.
TEST(ClipGradNormBehaviour, NoClipAboveTheNormAndParamsSubset) {
  sim::WorldOptions options;
  options.world_size = 3;
  sim::World world(options);
  auto result = world.run([&](sim::RankContext& ctx) {
    at::set_num_threads(1);
    auto model = testnet::make_small_net();
    Engine engine(testnet::fiber_safe_engine_options());
    testnet::shard_small_net(engine, *model, ctx.world_group(), ShardingStrategy::FullShard);
    sim::backward(fsdp::call(model, testnet::small_input(ctx.rank(), 0)).sum());
    std::map<std::string, torch::Tensor> before;
    for (const auto& [name, p] : testnet::named_params(*model)) before[name] = p.grad().clone();
    const double total = clip_grad_norm_(engine, 1e6);
    EXPECT_GT(total, 0.0);
    for (const auto& [name, p] : testnet::named_params(*model)) EXPECT_TRUE(torch::equal(p.grad(), before[name]));

    // Only a's params: their norm, the others untouched.
    const double a_total = clip_grad_norm_(engine, model->a->parameters(), 1e-3);
    EXPECT_LT(a_total, total);
    EXPECT_TRUE(torch::equal(model->b->weight.grad(), before["b.weight"]));
    EXPECT_FALSE(torch::equal(model->a->weight.grad(), before["a.weight"]));

    torch::Tensor stranger = torch::ones({2}, torch::requires_grad());
    EXPECT_THROW(clip_grad_norm_(engine, {stranger}, 1.0), std::invalid_argument);
    EXPECT_THROW(clip_grad_norm_(engine, 1.0, 0.0), std::invalid_argument);
    EXPECT_THROW(clip_grad_norm_(engine, 1.0, -2.0), std::invalid_argument);
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
}

// A NaN grad on one rank: every rank sees a NaN total; with
// error_if_nonfinite every rank throws alike (no rank left in a collective).
TEST(ClipGradNormBehaviour, NonFiniteTotalThrowsOnEveryRankWhenAsked) {
  sim::WorldOptions options;
  options.world_size = 2;
  sim::World world(options);
  auto result = world.run([&](sim::RankContext& ctx) {
    auto model = testnet::make_small_net();
    Engine engine(testnet::fiber_safe_engine_options());
    testnet::shard_small_net(engine, *model, ctx.world_group(), ShardingStrategy::FullShard);
    sim::backward(fsdp::call(model, testnet::small_input(ctx.rank(), 0)).sum());
    if (ctx.rank() == 1) model->b->weight.grad()[0][0] = std::numeric_limits<float>::quiet_NaN();
    EXPECT_THROW(clip_grad_norm_(engine, 1.0, 2.0, /*error_if_nonfinite=*/true), std::runtime_error);
    EXPECT_TRUE(std::isnan(clip_grad_norm_(engine, 1.0, 2.0)));
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
}

}  // namespace
}  // namespace fsdpsim::fsdp
