// Activation checkpointing (fsdp::checkpoint) alone and inside units: the
// grads equal the run without checkpointing bit for bit (same ops, same
// order), the recompute runs in backward with the unit's params gathered,
// and checkpointing costs no collective (GoogleMock counts per step), on
// thread and fiber ranks (fiber ranks' backward is sim::backward's walker,
// the recompute's nested pass runs inside it).

#include <ATen/CPUGeneratorImpl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "backends/comm_hooks.h"
#include "fsdp/checkpoint.h"
#include "fsdp/fully_shard.h"
#include "sim/fiber_autograd.h"
#include "sim/testing/collective_matchers.h"
#include "sim/testing/mock_hooks.h"
#include "sim/testing/world_fixture.h"
#include "sim/world.h"

namespace fsdpsim::fsdp {
namespace {

using fsdpsim::testing::MockCommHooks;
using fsdpsim::testing::OpIs;
using ::testing::_;
using ::testing::AnyNumber;
using ::testing::HasSubstr;
using ::testing::NiceMock;

constexpr int64_t kDim = 8;

// x + fc2(relu(fc1(x))) [+ dropout], optionally checkpointed. Counts its
// runs, and the runs that saw sharded params (fc1.weight without its 2 * dim
// rows).
struct Block : torch::nn::Module {
  Block(bool checkpointed, double dropout)
      : fc1(register_module("fc1", torch::nn::Linear(kDim, 2 * kDim))),
        fc2(register_module("fc2", torch::nn::Linear(2 * kDim, kDim))),
        checkpointed(checkpointed),
        dropout(dropout) {}
  at::Tensor inner(const at::Tensor& x) {
    ++runs;
    if (fc1->weight.size(0) != 2 * kDim) ++runs_with_shards;
    at::Tensor h = torch::relu(fc1(x));
    if (dropout > 0) h = torch::dropout(h, dropout, /*train=*/true);
    return x + fc2(h);
  }
  at::Tensor forward(const at::Tensor& x) {
    if (!checkpointed) return inner(x);
    return checkpoint([this](const at::Tensor& in) { return inner(in); }, x);
  }
  torch::nn::Linear fc1, fc2;
  bool checkpointed;
  double dropout;
  int runs = 0;
  int runs_with_shards = 0;
};

// in_proj and head on the root, three block units.
struct Model : torch::nn::Module {
  explicit Model(bool checkpointed, double dropout = 0.0) {
    in_proj = register_module("in_proj", torch::nn::Linear(kDim, kDim));
    for (int i = 0; i < 3; ++i) {
      blocks.push_back(register_module("block" + std::to_string(i), std::make_shared<Block>(checkpointed, dropout)));
    }
    head = register_module("head", torch::nn::Linear(kDim, 3));
    // From a generator of its own: thread ranks build models concurrently.
    auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
    torch::NoGradGuard no_grad;
    for (auto& param : parameters()) param.copy_(at::randn(param.sizes(), gen) * 0.3);
  }
  at::Tensor forward(at::Tensor x) {
    x = in_proj(x);
    for (auto& block : blocks) x = call(block, x);
    return head(x);
  }
  torch::nn::Linear in_proj{nullptr}, head{nullptr};
  std::vector<std::shared_ptr<Block>> blocks;
};

at::Tensor batch(int rank, int step) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + 10 * rank + step);
  return at::randn({4, kDim}, gen);
}

::testing::AssertionResult same_grads(Model& a, Model& b) {
  auto pa = a.named_parameters();
  auto pb = b.named_parameters();
  for (const auto& item : pa) {
    const at::Tensor& ga = item.value().grad();
    const at::Tensor& gb = pb[item.key()].grad();
    if (!ga.defined() || !gb.defined()) return ::testing::AssertionFailure() << item.key() << ": grad missing";
    if (!torch::equal(ga, gb)) {
      return ::testing::AssertionFailure() << item.key() << ": max abs diff " << (ga - gb).abs().max().item<double>();
    }
  }
  return ::testing::AssertionSuccess();
}

// Without FSDP: the checkpointed model keeps no activations of a block (the
// block's output hangs off one CheckpointBackward node whose only edge is the
// block's input), recomputes in backward with the same dropout masks, and
// gets bitwise the plain model's grads.
TEST(Checkpoint, NoActivationsKeptAndGradsBitwiseEqualWithDropout) {
  Model plain(false, 0.25);
  Model checkpointed(true, 0.25);
  const at::Tensor x = batch(0, 0);
  torch::manual_seed(3);
  at::Tensor loss_plain = plain.forward(x).pow(2).sum();
  torch::manual_seed(3);
  const at::Tensor input = checkpointed.in_proj(x);
  const at::Tensor out = checkpointed.blocks[0]->forward(input);
  ASSERT_TRUE(out.grad_fn());
  EXPECT_EQ(out.grad_fn()->name(), "fsdp::CheckpointBackward");
  ASSERT_EQ(out.grad_fn()->next_edges().size(), 1u);
  EXPECT_EQ(out.grad_fn()->next_edges()[0].function.get(), input.grad_fn().get());
  at::Tensor y = out;
  for (size_t i = 1; i < checkpointed.blocks.size(); ++i) y = checkpointed.blocks[i]->forward(y);
  at::Tensor loss_checkpointed = checkpointed.head(y).pow(2).sum();
  EXPECT_TRUE(torch::equal(loss_plain, loss_checkpointed));
  for (auto& block : checkpointed.blocks) EXPECT_EQ(block->runs, 1);
  torch::manual_seed(99);  // the recompute must not depend on the generator's state now
  loss_plain.backward();
  loss_checkpointed.backward();
  for (auto& block : checkpointed.blocks) EXPECT_EQ(block->runs, 2);  // forward + recompute
  EXPECT_TRUE(same_grads(plain, checkpointed));
}

TEST(Checkpoint, RecomputeThatDiffersIsReported) {
  int calls = 0;
  auto weight = torch::ones({3}, torch::requires_grad());
  auto out = checkpoint([&](const at::Tensor& x) { return ++calls == 1 ? x * weight : (x * weight).repeat({2}); },
                        torch::ones({3}));
  EXPECT_THAT([&] { out.sum().backward(); },
              ::testing::ThrowsMessage<std::runtime_error>(HasSubstr("recompute in backward returned outputs [[6]]")));
}

// Inside units, FSDP on fake ranks: losses and sharded grads bitwise equal
// with and without checkpointing for two SGD steps; each checkpointed block
// runs twice a step (forward, recompute), never with shards; the collectives
// per step are the same with and without (units + 1 all-gathers in forward,
// the blocks' re-gathers in backward with FullShard, one reduce-scatter per
// unit).
struct AcCase {
  ShardingStrategy strategy;
  sim::RankKind kind;
  int world;
};

class CheckpointInUnits : public ::testing::TestWithParam<AcCase> {};

TEST_P(CheckpointInUnits, ParityAndCommCounts) {
  const AcCase& c = GetParam();
  constexpr int kSteps = 2;
  constexpr int kUnits = 4;  // three blocks and the root
  const int backward_gathers = c.strategy == ShardingStrategy::FullShard ? 3 : 0;
  // One mock per rank per model; the expectations hold for both.
  std::vector<std::shared_ptr<NiceMock<MockCommHooks>>> mocks;
  for (int i = 0; i < 2 * c.world; ++i) {
    auto mock = std::make_shared<NiceMock<MockCommHooks>>();
    EXPECT_CALL(*mock, before(_)).Times(AnyNumber());
    EXPECT_CALL(*mock, before(OpIs(CollectiveOp::AllGather))).Times(kSteps * (kUnits + backward_gathers));
    EXPECT_CALL(*mock, before(OpIs(CollectiveOp::ReduceScatter))).Times(kSteps * kUnits);
    EXPECT_CALL(*mock, before(OpIs(CollectiveOp::AllReduce))).Times(0);
    mocks.push_back(std::move(mock));
  }
  sim::WorldOptions options;
  options.world_size = c.world;
  options.rank_kind = c.kind;
  sim::World world(options);
  auto result = world.run([&](sim::RankContext& ctx) {
    auto make = [&](bool checkpointed, Engine& engine) {
      auto model = std::make_shared<Model>(checkpointed);
      FullyShardOptions shard;
      shard.shard_group =
          std::make_shared<HookedProcessGroup>(ctx.world_group(), mocks[2 * ctx.rank() + (checkpointed ? 1 : 0)]);
      shard.strategy = c.strategy;
      for (auto& block : model->blocks) engine.fully_shard(block, shard);
      engine.fully_shard(model, shard);
      return model;
    };
    EngineOptions engine_options;
    engine_options.queue_backward_callback = sim::queue_backward_callback;
    Engine plain_engine(engine_options);
    Engine ac_engine(engine_options);
    auto plain = make(false, plain_engine);
    auto ac = make(true, ac_engine);
    torch::optim::SGD plain_opt(plain->parameters(), 0.1);
    torch::optim::SGD ac_opt(ac->parameters(), 0.1);
    for (int step = 0; step < kSteps; ++step) {
      plain_opt.zero_grad();
      ac_opt.zero_grad();
      at::Tensor plain_loss = call(plain, batch(ctx.rank(), step)).pow(2).mean();
      sim::backward(plain_loss);
      at::Tensor ac_loss = call(ac, batch(ctx.rank(), step)).pow(2).mean();
      sim::backward(ac_loss);
      EXPECT_TRUE(torch::equal(plain_loss, ac_loss)) << "step " << step;
      EXPECT_TRUE(same_grads(*plain, *ac)) << "rank " << ctx.rank() << " step " << step;
      plain_opt.step();
      ac_opt.step();
    }
    for (auto& block : ac->blocks) {
      EXPECT_EQ(block->runs, 2 * kSteps);
      EXPECT_EQ(block->runs_with_shards, 0);
    }
    for (auto& block : plain->blocks) EXPECT_EQ(block->runs, kSteps);
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
  for (auto& mock : mocks) ::testing::Mock::VerifyAndClearExpectations(mock.get());
}

INSTANTIATE_TEST_SUITE_P(All, CheckpointInUnits,
                         ::testing::Values(AcCase{ShardingStrategy::FullShard, sim::RankKind::Threads, 2},
                                           AcCase{ShardingStrategy::FullShard, sim::RankKind::Fibers, 3},
                                           AcCase{ShardingStrategy::FullShard, sim::RankKind::Threads, 3},
                                           AcCase{ShardingStrategy::ShardGradOp, sim::RankKind::Fibers, 2},
                                           AcCase{ShardingStrategy::ShardGradOp, sim::RankKind::Threads, 3}),
                         [](const ::testing::TestParamInfo<AcCase>& info) {
                           return std::string(to_string(info.param.strategy)) + "_w" +
                                  std::to_string(info.param.world) +
                                  (info.param.kind == sim::RankKind::Threads ? "_threads" : "_fibers");
                         });

// A unit called inside a checkpointed function is refused with the fix.
TEST(CheckpointInUnits, UnitInsideACheckpointIsRefused) {
  sim::WorldOptions options;
  options.world_size = 2;
  sim::World world(options);
  auto result = world.run([&](sim::RankContext& ctx) {
    Engine engine;
    auto model = std::make_shared<Model>(false);
    FullyShardOptions shard;
    shard.shard_group = ctx.world_group();
    engine.fully_shard(model->blocks[0], shard);
    EXPECT_THAT(
        [&] {
          checkpoint([&](const at::Tensor& x) { return call(model->blocks[0], x); }, batch(0, 0).requires_grad_(true));
        },
        ::testing::ThrowsMessage<std::runtime_error>(HasSubstr("inside an fsdp::checkpoint function")));
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
}

}  // namespace
}  // namespace fsdpsim::fsdp
