// A user's own model, fully sharded by the engine over fake-backend ranks,
// tested with fsdpsim's testing library: how many all-gathers a training step
// issues, the order backward prefetches the blocks in, and that the sharded
// model trains exactly like the unsharded one.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

#include "backends/comm_hooks.h"
#include "fsdp/fully_shard.h"
#include "sim/fiber_autograd.h"
#include "sim/testing/collective_matchers.h"
#include "sim/testing/mock_hooks.h"
#include "sim/testing/world_fixture.h"
#include "sim/world.h"

namespace {

namespace fsdp = fsdpsim::fsdp;
namespace sim = fsdpsim::sim;
using fsdpsim::testing::IsAllGather;
using fsdpsim::testing::IsReduceScatter;
using fsdpsim::testing::MockCommHooks;
using fsdpsim::testing::MockEngineHooks;
using fsdpsim::testing::RanksSucceeded;
using ::testing::_;
using ::testing::AnyNumber;
using ::testing::NiceMock;

constexpr int kBlocks = 3;
constexpr double kLearningRate = 0.05;

// The model under test: blocks of Linear + tanh and a linear head; each
// block is a unit of its own, the root owns the head.
struct RegressorImpl : torch::nn::Module {
  RegressorImpl() {
    for (int i = 0; i < kBlocks; ++i) {
      blocks.push_back(register_module("block" + std::to_string(i), torch::nn::Linear(8, 8)));
    }
    head = register_module("head", torch::nn::Linear(8, 1));
  }
  torch::Tensor forward(torch::Tensor x) {
    for (auto& block : blocks) x = torch::tanh(fsdp::call(block.ptr(), x));
    return head(x);
  }
  std::vector<torch::nn::Linear> blocks;
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(Regressor);

torch::Tensor inputs() { return torch::linspace(-1, 1, 16 * 8).reshape({16, 8}); }
torch::Tensor targets() { return torch::sin(3 * torch::linspace(-1, 1, 16)).reshape({16, 1}); }

void copy_params(torch::nn::Module& module, const std::vector<torch::Tensor>& values) {
  torch::NoGradGuard no_grad;
  auto params = module.parameters();
  for (size_t i = 0; i < params.size(); ++i) params[i].copy_(values[i]);
}

// One rank's engine and sharded model, its params copied from `init`.
struct ShardedRegressor {
  fsdp::Engine engine;
  Regressor model;

  ShardedRegressor(sim::RankContext& ctx, const std::vector<torch::Tensor>& init, fsdp::EngineOptions options,
                   fsdpsim::ProcessGroupPtr group)
      : engine(with_fiber_backward(std::move(options))) {
    copy_params(*model, init);
    fsdp::FullyShardOptions shard;
    shard.shard_group = group ? group : ctx.world_group();
    for (auto& block : model->blocks) engine.fully_shard(block.ptr(), shard);
    engine.fully_shard(model.ptr(), shard);
  }

  static fsdp::EngineOptions with_fiber_backward(fsdp::EngineOptions options) {
    options.queue_backward_callback = sim::queue_backward_callback;  // fiber ranks too
    return options;
  }

  // One SGD step on the full batch (every rank the same data); the loss.
  float train_step(torch::optim::SGD& optimizer) {
    optimizer.zero_grad();
    auto loss = torch::mse_loss(fsdp::call(model.ptr(), inputs()), targets());
    sim::backward(loss);
    optimizer.step();
    return loss.item<float>();
  }
};

std::vector<torch::Tensor> initial_params() {
  torch::manual_seed(7);
  Regressor reference;
  std::vector<torch::Tensor> init;
  for (auto& p : reference->parameters()) init.push_back(p.detach().clone());
  return init;
}

class RegressorTest : public fsdpsim::testing::WorldTest {};

TEST_P(RegressorTest, EachStepGathersEveryUnitInForwardAndTheBlocksAgainInBackward) {
  const auto init = initial_params();
  auto hooks = per_rank<NiceMock<MockCommHooks>>();
  for (auto& h : hooks) {
    // Per step: forward gathers the root and each block; backward re-gathers
    // the blocks (resharded after forward) and reduce-scatters every unit.
    EXPECT_CALL(*h, before(_)).Times(AnyNumber());
    EXPECT_CALL(*h, before(IsAllGather())).Times(2 * (2 * kBlocks + 1));
    EXPECT_CALL(*h, before(IsReduceScatter())).Times(2 * (kBlocks + 1));
  }
  auto result = run_ranks([&](sim::RankContext& ctx) {
    auto group = std::make_shared<fsdpsim::HookedProcessGroup>(ctx.world_group(), hooks[ctx.rank()]);
    ShardedRegressor rank(ctx, init, {}, group);
    torch::optim::SGD optimizer(rank.model->parameters(), kLearningRate);
    for (int step = 0; step < 2; ++step) rank.train_step(optimizer);
  });
  EXPECT_TRUE(RanksSucceeded(result));
}

TEST_P(RegressorTest, BackwardPrefetchesTheBlocksLastToFirst) {
  const auto init = initial_params();
  auto hooks = per_rank<NiceMock<MockEngineHooks>>();
  for (auto& h : hooks) {
    // A Sequence, not InSequence: fiber ranks share one OS thread.
    ::testing::Sequence order;
    EXPECT_CALL(*h, on_prefetch("", "block2", _)).InSequence(order);
    EXPECT_CALL(*h, on_prefetch("block2", "block1", _)).InSequence(order);
    EXPECT_CALL(*h, on_prefetch("block1", "block0", _)).InSequence(order);
    EXPECT_CALL(*h, on_prefetch("block0", "", _)).InSequence(order);
  }
  auto result = run_ranks([&](sim::RankContext& ctx) {
    fsdp::EngineOptions options;
    options.hooks = {hooks[ctx.rank()]};
    ShardedRegressor rank(ctx, init, options, nullptr);
    torch::optim::SGD optimizer(rank.model->parameters(), kLearningRate);
    rank.train_step(optimizer);
  });
  EXPECT_TRUE(RanksSucceeded(result));
}

TEST_P(RegressorTest, TrainsLikeTheUnshardedModel) {
  constexpr int kSteps = 5;
  const auto init = initial_params();
  std::vector<float> expected;
  Regressor reference;
  copy_params(*reference, init);
  torch::optim::SGD reference_optimizer(reference->parameters(), kLearningRate);
  for (int step = 0; step < kSteps; ++step) {
    reference_optimizer.zero_grad();
    auto loss = torch::mse_loss(reference(inputs()), targets());
    loss.backward();
    reference_optimizer.step();
    expected.push_back(loss.item<float>());
  }
  ASSERT_LT(expected.back(), expected.front()) << "the reference does not learn";

  std::vector<std::vector<float>> losses(static_cast<size_t>(world_size()));
  auto result = run_ranks([&](sim::RankContext& ctx) {
    ShardedRegressor rank(ctx, init, {}, nullptr);
    torch::optim::SGD optimizer(rank.model->parameters(), kLearningRate);
    for (int step = 0; step < kSteps; ++step) losses[ctx.rank()].push_back(rank.train_step(optimizer));
  });
  ASSERT_TRUE(RanksSucceeded(result));
  for (int r = 0; r < world_size(); ++r) {
    ASSERT_EQ(losses[r].size(), expected.size());
    for (size_t step = 0; step < expected.size(); ++step) {
      EXPECT_NEAR(losses[r][step], expected[step], 1e-5) << "rank " << r << " step " << step;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Worlds, RegressorTest,
                         fsdpsim::testing::WorldParams({sim::RankKind::Threads, sim::RankKind::Fibers}, {2, 4}),
                         fsdpsim::testing::WorldParamName);

}  // namespace
