// Engine::summon_full_params (FSDP1's summon_full_params, FSDP2's unshard as
// a scope) on tests/small_net.h: full params inside, edits written back into
// each rank's shard (or dropped), grads gathered, rank 0 only, the errors.
// Expected values come from the unsharded reference: bitwise, since gathering
// and writing back copy values and the forward's arithmetic is the reference's.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

#include "small_net.h"

namespace fsdpsim::fsdp {
namespace {

using ::testing::HasSubstr;
using testnet::SmallNet;

using Case = testnet::WorldCase;
using testnet::world_of;

std::map<std::string, torch::Tensor> clones(const std::map<std::string, torch::Tensor>& tensors, bool grads) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& [name, t] : tensors) {
    const torch::Tensor value = grads ? t.grad() : t.detach();
    out[name] = value.defined() ? value.clone() : torch::Tensor();
  }
  return out;
}

// The edit every rank makes inside: in place on weights, a same-shaped
// set_data on head.bias.
void edit(SmallNet& model) {
  torch::NoGradGuard no_grad;
  for (auto* lin : {&model.a, &model.b, &model.head, &model.extra}) (*lin)->weight.add_(0.5);
  model.head->bias.set_data(torch::full({2}, 3.0));
}

void expect_shards(SmallNet& model, const std::map<std::string, torch::Tensor>& full, testnet::ShardPlace place,
                   bool grads, const std::string& where) {
  for (const auto& [name, p] : testnet::named_params(model)) {
    const torch::Tensor actual = grads ? p.grad() : p.detach();
    const torch::Tensor& expected = full.at(name);
    ASSERT_EQ(actual.defined(), expected.defined()) << where << " " << name;
    if (!expected.defined()) continue;
    EXPECT_TRUE(torch::equal(actual, testnet::shard_rows(expected, place.rank, place.size))) << where << " " << name;
  }
}

class SummonFullParams : public ::testing::TestWithParam<Case> {};

TEST_P(SummonFullParams, WritebackReachesEveryShardAndTheNextForwardWithoutItEditsDrop) {
  const Case c = GetParam();
  at::set_num_threads(1);
  auto reference = testnet::make_small_net();
  const auto original = clones(testnet::named_params(*reference), false);
  const torch::Tensor x = testnet::small_input(0, 0);
  const torch::Tensor original_out = reference->forward(x).detach();
  edit(*reference);
  const auto edited = clones(testnet::named_params(*reference), false);
  const torch::Tensor edited_out = reference->forward(x).detach();

  testnet::run_world_case(c, [&](sim::RankContext& ctx) {
    at::set_num_threads(1);
    testnet::ShardedSmallNet net(ctx, c);
    auto& [model, engine, place] = net;
    const auto identities = testnet::named_params(*model);
    {
      auto full = engine.summon_full_params({.writeback = false});
      for (const Unit* unit : engine.units()) EXPECT_TRUE(unit->is_unsharded());
      for (const auto& [name, p] : testnet::named_params(*model)) {
        EXPECT_TRUE(p.is_same(identities.at(name))) << name << ": identity kept";
        EXPECT_TRUE(torch::equal(p, original.at(name))) << name << ": the full param inside";
      }
      edit(*model);
    }
    for (const Unit* unit : engine.units()) EXPECT_FALSE(unit->is_unsharded());
    expect_shards(*model, original, place, false, "without writeback");
    {
      torch::NoGradGuard no_grad;
      EXPECT_TRUE(torch::equal(fsdp::call(model, x), original_out));
    }
    {
      auto full = engine.summon_full_params();  // writeback by default
      edit(*model);
    }
    expect_shards(*model, edited, place, false, "with writeback");
    {
      torch::NoGradGuard no_grad;
      EXPECT_TRUE(torch::equal(fsdp::call(model, x), edited_out));
    }
  });
}

TEST_P(SummonFullParams, WithGradsGathersGradsAndWritesThemBack) {
  const Case c = GetParam();
  at::set_num_threads(1);
  auto reference = testnet::make_small_net();
  reference->use_extra = false;  // extra's grads stay None
  testnet::reference_backward(*reference, c.world, 0);
  const auto grads = clones(testnet::named_params(*reference), true);
  auto doubled = grads;
  for (auto& [name, g] : doubled) {
    if (g.defined()) g = g * 2;
  }
  doubled["a.bias"] = torch::Tensor();  // set to None inside

  sim::World world(world_of(c));
  auto result = world.run([&](sim::RankContext& ctx) {
    at::set_num_threads(1);
    auto model = testnet::make_small_net();
    model->use_extra = false;
    Engine engine(testnet::fiber_safe_engine_options());
    testnet::shard_small_net(engine, *model, ctx.world_group(), c.strategy, c.replicate);
    const auto place = testnet::shard_place(ctx.rank(), c.world, c.strategy, c.replicate);
    sim::backward(fsdp::call(model, testnet::small_input(ctx.rank(), 0)).sum());
    // HybridShard's grads are a mean of means, not the reference's mean: its
    // gathered grads are compared with the shards it holds, not the reference.
    const bool exact = c.strategy != ShardingStrategy::HybridShard;
    {
      auto full = engine.summon_full_params({.writeback = false, .with_grads = true});
      for (const auto& [name, p] : testnet::named_params(*model)) {
        ASSERT_EQ(p.grad().defined(), grads.at(name).defined()) << name;
        if (!p.grad().defined()) continue;
        EXPECT_EQ(p.grad().sizes(), p.sizes()) << name;
        if (exact) {
          EXPECT_TRUE(torch::equal(p.grad(), grads.at(name))) << name;
        }
        p.grad().mul_(10);  // dropped
      }
    }
    if (exact) expect_shards(*model, grads, place, true, "grads without writeback");
    const auto before = clones(testnet::named_params(*model), true);
    {
      auto full = engine.summon_full_params({.with_grads = true});
      for (const auto& [name, p] : testnet::named_params(*model)) {
        if (p.grad().defined()) p.grad().mul_(2);
      }
      model->a->bias.mutable_grad() = torch::Tensor();
    }
    for (const auto& [name, p] : testnet::named_params(*model)) {
      const torch::Tensor& old = before.at(name);
      if (name == "a.bias" || !old.defined()) {
        EXPECT_FALSE(p.grad().defined()) << name;
        continue;
      }
      ASSERT_TRUE(p.grad().defined()) << name;
      EXPECT_TRUE(torch::equal(p.grad(), old * 2)) << name << ": each rank's rows of the edited full grad";
    }
    if (exact) expect_shards(*model, doubled, place, true, "grads with writeback");
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
}

TEST_P(SummonFullParams, Rank0OnlyShowsFullParamsOnRankZeroAlone) {
  const Case c = GetParam();
  auto reference = testnet::make_small_net();
  const auto original = clones(testnet::named_params(*reference), false);
  testnet::run_world_case(c, [&](sim::RankContext& ctx) {
    testnet::ShardedSmallNet net(ctx, c);
    auto& [model, engine, place] = net;
    EXPECT_THROW((void)engine.summon_full_params({.writeback = true, .rank0_only = true}), std::invalid_argument);
    {
      auto full = engine.summon_full_params({.writeback = false, .rank0_only = true});
      if (ctx.rank() == 0 || place.size == 1) {  // NoShard: every rank's params are full
        for (const auto& [name, p] : testnet::named_params(*model)) EXPECT_TRUE(torch::equal(p, original.at(name)));
      } else {
        expect_shards(*model, original, place, false, "rank0_only, rank " + std::to_string(ctx.rank()));
      }
      // Rank 0's edits of its full copy are dropped (no writeback); another
      // rank would edit its own shard, as with no scope at all.
      if (ctx.rank() == 0) edit(*model);
    }
    expect_shards(*model, original, place, false, "after rank0_only");
  });
}

INSTANTIATE_TEST_SUITE_P(All, SummonFullParams,
                         ::testing::Values(Case{sim::RankKind::Threads, 2}, Case{sim::RankKind::Threads, 3},
                                           Case{sim::RankKind::Fibers, 3},
                                           Case{sim::RankKind::Threads, 3, ShardingStrategy::ShardGradOp},
                                           Case{sim::RankKind::Fibers, 2, ShardingStrategy::NoShard},
                                           Case{sim::RankKind::Threads, 4, ShardingStrategy::HybridShard, 2}),
                         testnet::world_case_name);

class SummonFullParamsErrors : public ::testing::TestWithParam<Case> {};

// A param whose shape changed inside: a clear error on close, naming it and
// both shapes; the other params are written back and every unit resharded.
TEST_P(SummonFullParamsErrors, ShapeChangeInsideFailsOnCloseAndLeavesTheEngineUsable) {
  const Case c = GetParam();
  auto reference = testnet::make_small_net();
  {
    torch::NoGradGuard no_grad;
    reference->a->weight.add_(1.0);
  }
  const auto expected = clones(testnet::named_params(*reference), false);
  sim::World world(world_of(c));
  auto result = world.run([&](sim::RankContext& ctx) {
    auto model = testnet::make_small_net();
    Engine engine(testnet::fiber_safe_engine_options());
    testnet::shard_small_net(engine, *model, ctx.world_group(), c.strategy);
    const auto place = testnet::shard_place(ctx.rank(), c.world, c.strategy);
    {
      torch::NoGradGuard no_grad;  // a first forward names the params from the root
      (void)fsdp::call(model, testnet::small_input(0, 0));
    }
    auto full = engine.summon_full_params();
    {
      torch::NoGradGuard no_grad;
      model->a->weight.add_(1.0);
      model->b->weight.set_data(torch::zeros({3, 3}));
    }
    try {
      full.close();
      ADD_FAILURE() << "close() did not throw";
    } catch (const std::runtime_error& error) {
      EXPECT_THAT(error.what(), HasSubstr("param 'b.weight' of unit 'b' now has shape [3, 3]"));
      EXPECT_THAT(error.what(), HasSubstr("its full shape is [7, 7]"));
    }
    for (const Unit* unit : engine.units()) EXPECT_FALSE(unit->is_unsharded());
    expect_shards(*model, expected, place, false, "after the failed close");
    sim::backward(fsdp::call(model, testnet::small_input(0, 1)).sum());  // still trains
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
}

TEST_P(SummonFullParamsErrors, RefusedInsideForwardBackwardOrAnotherScope) {
  const Case c = GetParam();
  sim::World world(world_of(c));
  auto result = world.run([&](sim::RankContext& ctx) {
    auto model = testnet::make_small_net();
    Engine engine(testnet::fiber_safe_engine_options());
    testnet::shard_small_net(engine, *model, ctx.world_group(), c.strategy);
    const torch::Tensor x = testnet::small_input(ctx.rank(), 0);
    auto expect_refused = [&engine](const char* what) {
      try {
        (void)engine.summon_full_params();
        ADD_FAILURE() << "not refused " << what;
      } catch (const std::runtime_error& error) {
        EXPECT_THAT(error.what(), HasSubstr(what));
      }
    };
    model->on_forward = [&] { expect_refused("inside a forward"); };
    torch::Tensor out = fsdp::call(model, x);
    model->on_forward = nullptr;
    out.register_hook([&](const torch::Tensor& grad) {
      expect_refused("inside a backward");
      return grad;
    });
    sim::backward(out.sum());
    {
      auto full = engine.summon_full_params();
      expect_refused("another FullParams of this engine is open");
      try {
        (void)fsdp::call(model, x);
        ADD_FAILURE() << "forward inside summon_full_params not refused";
      } catch (const std::runtime_error& error) {
        EXPECT_THAT(error.what(), HasSubstr("inside summon_full_params"));
      }
    }
    sim::backward(fsdp::call(model, x).sum());  // fine again
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
}

// A forward left units gathered (the root until backward): summoning reshards
// them first and the backward gathers again, with the reference's grads.
TEST_P(SummonFullParamsErrors, BetweenForwardAndBackwardTheBackwardStillMatches) {
  const Case c = GetParam();
  at::set_num_threads(1);
  auto reference = testnet::make_small_net();
  testnet::reference_backward(*reference, c.world, 0);
  const auto grads = clones(testnet::named_params(*reference), true);
  sim::World world(world_of(c));
  auto result = world.run([&](sim::RankContext& ctx) {
    at::set_num_threads(1);
    auto model = testnet::make_small_net();
    Engine engine(testnet::fiber_safe_engine_options());
    testnet::shard_small_net(engine, *model, ctx.world_group(), c.strategy);
    torch::Tensor loss = fsdp::call(model, testnet::small_input(ctx.rank(), 0)).sum();
    {
      auto full = engine.summon_full_params({.writeback = false});
      EXPECT_EQ(model->head->weight.sizes(), (std::vector<int64_t>{2, 7}));
    }
    sim::backward(loss);
    expect_shards(*model, grads, testnet::shard_place(ctx.rank(), c.world, c.strategy), true, "grads");
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
}

INSTANTIATE_TEST_SUITE_P(All, SummonFullParamsErrors,
                         ::testing::Values(Case{sim::RankKind::Threads, 2}, Case{sim::RankKind::Fibers, 3},
                                           Case{sim::RankKind::Threads, 3, ShardingStrategy::ShardGradOp}),
                         testnet::world_case_name);

// One module's units only.
TEST(SummonFullParamsOfModule, GathersOnlyTheUnitsInsideIt) {
  sim::WorldOptions options;
  options.world_size = 3;
  options.rank_kind = sim::RankKind::Fibers;
  sim::World world(options);
  auto result = world.run([&](sim::RankContext& ctx) {
    auto model = testnet::make_small_net();
    Engine engine(testnet::fiber_safe_engine_options());
    testnet::shard_small_net(engine, *model, ctx.world_group(), ShardingStrategy::FullShard);
    {
      auto full = engine.summon_full_params(model->b.ptr());
      EXPECT_EQ(model->b->weight.sizes(), (std::vector<int64_t>{7, 7}));
      const int64_t a_rows = ctx.rank() < 2 ? 3 : 1;  // 7 rows over 3 ranks: 3, 3, 1
      EXPECT_EQ(model->a->weight.sizes(), (std::vector<int64_t>{a_rows, 6}));
      EXPECT_EQ(model->head->weight.sizes()[0], ctx.rank() < 2 ? 1 : 0);  // rank 2's shard of 2 rows is empty
    }
    EXPECT_EQ(model->b->weight.sizes()[0], ctx.rank() < 2 ? 3 : 1);
    auto holder = std::make_shared<torch::nn::Module>();
    EXPECT_THROW((void)engine.summon_full_params(holder), std::invalid_argument);
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
}

}  // namespace
}  // namespace fsdpsim::fsdp
