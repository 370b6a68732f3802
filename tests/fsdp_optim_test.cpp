// Optimisers and param groups over the sharded params, against the same
// optimiser on the unsharded DDP reference (tests/small_net.h), and params
// whose grad is None in a step: None on every rank, skipped by the optimiser
// as unsharded (FSDP2: only params with a grad are reduce-scattered).
//
// Every comparison is bitwise: the reference averages the ranks' grads in
// rank order and divides once, as the fake backend's reduce-scatter does, and
// the optimisers' updates are elementwise, so a shard's rows are computed
// exactly as the reference's.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "small_net.h"

namespace fsdpsim::fsdp {
namespace {

using testnet::SmallNet;

enum class Optim { Adam, AdamW, SgdMomentum, RMSprop, TwoGroups };

const char* name_of(Optim optim) {
  switch (optim) {
    case Optim::Adam: return "Adam";
    case Optim::AdamW: return "AdamW";
    case Optim::SgdMomentum: return "SgdMomentum";
    case Optim::RMSprop: return "RMSprop";
    case Optim::TwoGroups: return "TwoGroups";
  }
  return "?";
}

// The same optimiser over `model`'s params, sharded or not. TwoGroups: the
// units a and b at lr 1e-2 without weight decay, the root's head and extra at
// lr 3e-2 with weight decay 0.1 (AdamW).
std::unique_ptr<torch::optim::Optimizer> make_optimizer(Optim optim, SmallNet& model) {
  switch (optim) {
    case Optim::Adam: return std::make_unique<torch::optim::Adam>(model.parameters(), 1e-2);
    case Optim::AdamW:
      return std::make_unique<torch::optim::AdamW>(model.parameters(),
                                                   torch::optim::AdamWOptions(1e-2).weight_decay(0.05));
    case Optim::SgdMomentum:
      return std::make_unique<torch::optim::SGD>(model.parameters(),
                                                 torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(1e-3));
    case Optim::RMSprop:
      return std::make_unique<torch::optim::RMSprop>(model.parameters(),
                                                     torch::optim::RMSpropOptions(1e-2).momentum(0.5));
    case Optim::TwoGroups: {
      std::vector<torch::Tensor> units, root;
      for (const auto& item : model.named_parameters()) {
        (item.key().rfind("a.", 0) == 0 || item.key().rfind("b.", 0) == 0 ? units : root).push_back(item.value());
      }
      std::vector<torch::optim::OptimizerParamGroup> groups;
      groups.emplace_back(
          units, std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(1e-2).weight_decay(0.0)));
      groups.emplace_back(
          root, std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(3e-2).weight_decay(0.1)));
      return std::make_unique<torch::optim::AdamW>(std::move(groups), torch::optim::AdamWOptions(1e-3));
    }
  }
  return nullptr;
}

constexpr int kSteps = 5;
// `extra` is unused in steps 1 and 3: its grad is None there (zero_grad sets
// None), and Adam's momentum would move it if it got a zero grad instead.
bool uses_extra(int step) { return step % 2 == 0; }

struct Snapshot {
  std::map<std::string, torch::Tensor> params, grads;  // grads: undefined = None
};

Snapshot snapshot(SmallNet& model) {
  Snapshot s;
  for (const auto& [name, p] : testnet::named_params(model)) {
    s.params[name] = p.detach().clone();
    s.grads[name] = p.grad().defined() ? p.grad().clone() : torch::Tensor();
  }
  return s;
}

// The reference's params and grads after each step's backward and step.
std::vector<std::pair<Snapshot, Snapshot>> reference_run(Optim optim, int world) {
  at::set_num_threads(1);  // as every rank: the thread count changes matmul sums
  auto reference = testnet::make_small_net();
  auto optimizer = make_optimizer(optim, *reference);
  std::vector<std::pair<Snapshot, Snapshot>> steps;
  for (int step = 0; step < kSteps; ++step) {
    optimizer->zero_grad();  // set to None
    reference->use_extra = uses_extra(step);
    testnet::reference_backward(*reference, world, step);
    Snapshot after_backward = snapshot(*reference);
    optimizer->step();
    steps.emplace_back(std::move(after_backward), snapshot(*reference));
  }
  return steps;
}

void expect_rows_of(const std::map<std::string, torch::Tensor>& full, SmallNet& model, bool grads, int rank, int world,
                    const std::string& where) {
  for (const auto& [name, p] : testnet::named_params(model)) {
    const torch::Tensor& expected = full.at(name);
    const torch::Tensor actual = grads ? p.grad() : p.detach();
    ASSERT_EQ(actual.defined(), expected.defined()) << where << " " << name << " rank " << rank;
    if (!expected.defined()) continue;
    const torch::Tensor rows = testnet::shard_rows(expected, rank, world);
    ASSERT_EQ(actual.sizes(), rows.sizes()) << where << " " << name << " rank " << rank;
    EXPECT_TRUE(torch::equal(actual, rows))
        << where << " " << name << " rank " << rank << " max diff " << (actual - rows).abs().max().item<double>();
  }
}

struct OptimCase {
  Optim optim;
  sim::RankKind kind;
  int world;
  ShardingStrategy strategy;
};

class OptimizerParity : public ::testing::TestWithParam<OptimCase> {};

TEST_P(OptimizerParity, ShardedStepsMatchTheUnshardedReferenceBitwise) {
  const OptimCase c = GetParam();
  const auto expected = reference_run(c.optim, c.world);
  sim::WorldOptions options;
  options.world_size = c.world;
  options.rank_kind = c.kind;
  sim::World world(options);
  auto result = world.run([&](sim::RankContext& ctx) {
    at::set_num_threads(1);
    auto model = testnet::make_small_net();
    Engine engine(testnet::fiber_safe_engine_options());
    testnet::shard_small_net(engine, *model, ctx.world_group(), c.strategy);
    auto optimizer = make_optimizer(c.optim, *model);
    const int rank = ctx.rank();
    const int shard_world = c.strategy == ShardingStrategy::NoShard ? 1 : c.world;
    const int shard_rank = shard_world == 1 ? 0 : rank;
    for (int step = 0; step < kSteps; ++step) {
      const std::string where = "step " + std::to_string(step);
      optimizer->zero_grad();
      model->use_extra = uses_extra(step);
      sim::backward(fsdp::call(model, testnet::small_input(rank, step)).sum());
      if (!uses_extra(step)) {
        EXPECT_FALSE(model->extra->weight.grad().defined()) << where << ": unused, so None on rank " << rank;
        EXPECT_FALSE(model->extra->bias.grad().defined()) << where << ": unused, so None on rank " << rank;
      }
      expect_rows_of(expected[step].first.grads, *model, true, shard_rank, shard_world, where + " grads");
      optimizer->step();
      expect_rows_of(expected[step].second.params, *model, false, shard_rank, shard_world, where + " params");
    }
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
}

std::vector<OptimCase> optim_cases() {
  std::vector<OptimCase> cases;
  for (Optim optim : {Optim::Adam, Optim::AdamW, Optim::SgdMomentum, Optim::RMSprop, Optim::TwoGroups}) {
    cases.push_back({optim, sim::RankKind::Threads, 2, ShardingStrategy::FullShard});
    cases.push_back({optim, sim::RankKind::Threads, 3, ShardingStrategy::FullShard});
    cases.push_back({optim, sim::RankKind::Fibers, 3, ShardingStrategy::FullShard});
  }
  cases.push_back({Optim::Adam, sim::RankKind::Threads, 3, ShardingStrategy::ShardGradOp});
  cases.push_back({Optim::TwoGroups, sim::RankKind::Fibers, 2, ShardingStrategy::NoShard});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(All, OptimizerParity, ::testing::ValuesIn(optim_cases()),
                         [](const ::testing::TestParamInfo<OptimCase>& info) {
                           return std::string(name_of(info.param.optim)) + "_" + sim::to_string(info.param.kind) +
                                  "_w" + std::to_string(info.param.world) + "_" + to_string(info.param.strategy);
                         });

// FSDP2's set_reduce_scatter_unused_params: the unused params take part as
// zeros, so they get a zero grad (not None) and the ranks' reduce-scatters
// stay alike even when only some ranks use a param.
TEST(UnusedParams, ReduceScatterUnusedParamsGivesZerosInsteadOfNone) {
  for (auto kind : {sim::RankKind::Threads, sim::RankKind::Fibers}) {
    sim::WorldOptions options;
    options.world_size = 3;
    options.rank_kind = kind;
    sim::World world(options);
    auto result = world.run([&](sim::RankContext& ctx) {
      auto model = testnet::make_small_net();
      Engine engine(testnet::fiber_safe_engine_options());
      FullyShardOptions shard;
      shard.shard_group = ctx.world_group();
      shard.reduce_scatter_unused_params = true;
      engine.fully_shard(model->a.ptr(), shard);
      engine.fully_shard(model->b.ptr(), shard);
      engine.fully_shard(model, shard);
      model->use_extra = false;
      sim::backward(fsdp::call(model, testnet::small_input(ctx.rank(), 0)).sum());
      ASSERT_TRUE(model->extra->weight.grad().defined());
      EXPECT_TRUE(torch::equal(model->extra->weight.grad(), torch::zeros_like(model->extra->weight)));
    });
    ASSERT_TRUE(result.ok()) << result.error_report();
  }
}

// Without it, ranks that use different params of a unit issue different
// reduce-scatters (FSDP2 would hang): refused with a report naming the unit,
// on the fake backend (which always checks) and on real Gloo thread ranks
// (through the checked group's cross-rank comparison).
class RankDivergentUse : public ::testing::TestWithParam<sim::CommBackend> {};

TEST_P(RankDivergentUse, WithoutTheOptionFailsNamingTheUnit) {
  sim::WorldOptions options;
  options.world_size = 2;
  options.backend = GetParam();
  options.collective_timeout = std::chrono::seconds(20);
  sim::World world(options);
  auto result = world.run([&](sim::RankContext& ctx) {
    auto model = testnet::make_small_net();
    Engine engine(testnet::fiber_safe_engine_options());
    testnet::shard_small_net(engine, *model, ctx.world_group(), ShardingStrategy::FullShard);
    model->use_extra = ctx.rank() == 0;
    sim::backward(fsdp::call(model, testnet::small_input(ctx.rank(), 0)).sum());
  });
  ASSERT_FALSE(result.ok());
  EXPECT_THAT(result.error_report(), ::testing::HasSubstr("mismatch"));
  EXPECT_THAT(result.error_report(), ::testing::HasSubstr("reduce-scatter of unit ''"));
}

INSTANTIATE_TEST_SUITE_P(UnusedParams, RankDivergentUse,
                         ::testing::Values(sim::CommBackend::Fake, sim::CommBackend::Gloo),
                         [](const ::testing::TestParamInfo<sim::CommBackend>& info) {
                           return std::string(sim::to_string(info.param));
                         });

}  // namespace
}  // namespace fsdpsim::fsdp
