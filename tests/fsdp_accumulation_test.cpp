// Gradient accumulation (FSDP2's set_requires_gradient_sync,
// set_reshard_after_backward, set_requires_all_reduce): k micro-batches
// without gradient sync, then one with it, against an unsharded reference
// that runs the same k + 1 micro-batches per rank (grads accumulating on its
// params) and then takes the DDP mean; the communication of every
// micro-batch through GoogleMock hooks (as PyTorch's test_gradient_accumulation
// counts them); gathered-param memory against what reshard_after_backward
// implies.
//
// Exact (bitwise) comparison where the arithmetic is the reference's: the
// full-size grads accumulate on the full params in the reference's order and
// the fake backend's reduce-scatter sums in rank order and divides once.
// HybridShard averages in two stages (over the shard group, then over the
// replicas), not the reference's one rank-order mean: atol 1e-5, rtol 1e-5.

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>
#include <memory>
#include <ostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "backends/comm_hooks.h"
#include "fsdp/fully_shard.h"
#include "scenarios/models.h"
#include "sim/fiber_autograd.h"
#include "sim/testing/collective_matchers.h"
#include "sim/testing/mock_hooks.h"
#include "sim/world.h"

namespace fsdpsim::scenarios {
namespace {

using fsdp::ShardingStrategy;
using fsdpsim::testing::LabelIs;
using fsdpsim::testing::MockCommHooks;
using fsdpsim::testing::MockEngineHooks;
using fsdpsim::testing::OpIs;
using sim::RankKind;
using ::testing::_;
using ::testing::AllOf;
using ::testing::AnyNumber;
using ::testing::HasSubstr;
using ::testing::NiceMock;
using ::testing::Truly;

constexpr int kUnsynced = 2;                      // k micro-batches without sync ...
constexpr int kMicro = kUnsynced + 1;             // ... then one with it
constexpr const char* kModel = "nested_wrapped";  // 3 units + the root; inputs differ per micro-batch

struct AccumCase {
  ShardingStrategy strategy;
  int world_size;
  int replicate;  // HybridShard: replicas (rows of the mesh)
  RankKind rank_kind;
  bool reshard_after_backward;  // while accumulating
};

void PrintTo(const AccumCase& c, std::ostream* out) {
  *out << fsdp::to_string(c.strategy) << " world " << c.world_size << " replicate " << c.replicate << " "
       << sim::to_string(c.rank_kind) << " reshard_after_backward " << c.reshard_after_backward;
}

std::string case_name(const ::testing::TestParamInfo<AccumCase>& info) {
  const AccumCase& c = info.param;
  std::string name = fsdp::to_string(c.strategy);
  name += "_w" + std::to_string(c.world_size);
  if (c.strategy == ShardingStrategy::HybridShard) name += "r" + std::to_string(c.replicate);
  name += c.rank_kind == RankKind::Threads ? "_threads" : "_fibers";
  name += c.reshard_after_backward ? "_rab" : "_keep";
  return name;
}

ScenarioConfig model_config() {
  ScenarioConfig config;
  config.name = kModel;
  return config;
}

// Each rank's unsharded replica runs micro-batches [first, first + count) of
// that rank, grads accumulating on its params; then the DDP mean over ranks,
// summed in rank order and divided once (the fake backend's Avg).
std::map<std::string, at::Tensor> reference_grads(int world, int first, int count) {
  at::set_num_threads(1);  // as each rank runs
  std::map<std::string, at::Tensor> sum;
  for (int r = 0; r < world; ++r) {
    auto replica = make_scenario(model_config(), r);
    for (int m = first; m < first + count; ++m) replica->forward_loss(replica->input(r, m)).backward();
    for (const auto& [fqn, param] : unique_named_parameters(*replica->module())) {
      at::Tensor grad = param.grad().defined() ? param.grad().detach() : at::zeros_like(param);
      auto it = sum.find(fqn);
      if (it == sum.end()) {
        sum.emplace(fqn, grad.clone());
      } else {
        it->second.add_(grad);
      }
    }
  }
  for (auto& [fqn, grad] : sum) grad.div_(static_cast<int64_t>(world));
  return sum;
}

int64_t full_param_bytes() {
  int64_t bytes = 0;
  for (const auto& item : unique_named_parameters(*make_scenario(model_config(), 0)->module())) {
    bytes += item.second.nbytes();
  }
  return bytes;
}

// This rank's rows of the reference's full grad (dim-0 sharding over the
// shard group, ceil(dim0 / size) rows per rank).
at::Tensor my_rows(const at::Tensor& full, const ProcessGroup& shard_group) {
  const int64_t dim0 = full.size(0);
  const int64_t per_rank = (dim0 + shard_group.size() - 1) / shard_group.size();
  const int64_t begin = std::min(dim0, per_rank * shard_group.rank());
  return full.narrow(0, begin, std::min(per_rank, dim0 - begin));
}

::testing::AssertionResult grads_match(const torch::nn::Module& module, const std::map<std::string, at::Tensor>& ref,
                                       const ProcessGroup& shard_group, bool exact) {
  for (const auto& [fqn, param] : unique_named_parameters(module)) {
    const at::Tensor expected = my_rows(ref.at(fqn), shard_group);
    const at::Tensor& grad = param.grad();
    if (!grad.defined()) return ::testing::AssertionFailure() << fqn << ": no grad";
    if (grad.sizes() != expected.sizes()) {
      return ::testing::AssertionFailure()
             << fqn << ": grad shape " << grad.sizes() << ", expected " << expected.sizes();
    }
    const bool same = exact ? torch::equal(grad, expected) : torch::allclose(grad, expected, 1e-5, 1e-5);
    if (!same) {
      return ::testing::AssertionFailure() << fqn << ": max abs diff " << (grad - expected).abs().max().item<double>()
                                           << (exact ? " (bitwise expected)" : " (tolerance 1e-5)");
    }
  }
  return ::testing::AssertionSuccess();
}

class Accumulation : public ::testing::TestWithParam<AccumCase> {
 protected:
  sim::WorldOptions world_options() const {
    sim::WorldOptions options;
    options.world_size = GetParam().world_size;
    options.rank_kind = GetParam().rank_kind;
    options.collective_timeout = std::chrono::seconds(30);
    return options;
  }
  int shard_size() const {
    const AccumCase& c = GetParam();
    return c.strategy == ShardingStrategy::HybridShard ? c.world_size / c.replicate : c.world_size;
  }
};

// k micro-batches without sync, one with: the sharded grads are the DDP mean
// of each rank's summed micro-batch grads; the gathered bytes after each
// backward are what reshard_after_backward says.
TEST_P(Accumulation, GradsEqualTheReferenceSumOfMicroBatches) {
  const AccumCase& c = GetParam();
  const auto reference = reference_grads(c.world_size, 0, kMicro);
  const int64_t gathered_all = shard_size() > 1 ? full_param_bytes() : 0;  // a size-1 group gathers nothing
  const bool exact = c.strategy != ShardingStrategy::HybridShard;
  sim::World world(world_options());
  auto result = world.run([&](sim::RankContext& ctx) {
    ShardingSetup setup = make_sharding_setup(ctx.world_group(), c.strategy, c.replicate);
    auto scenario = make_scenario(model_config(), ctx.rank());
    fsdp::EngineOptions engine_options;
    engine_options.queue_backward_callback = sim::queue_backward_callback;
    fsdp::Engine engine(engine_options);
    scenario->shard(engine, setup);
    for (int m = 0; m < kMicro; ++m) {
      const bool sync = m == kMicro - 1;
      engine.set_requires_gradient_sync(sync);
      engine.set_reshard_after_backward(c.reshard_after_backward);
      sim::backward(scenario->forward_loss(scenario->input(ctx.rank(), m)));
      // Kept gathered: every unit's full params; resharded: none.
      if (engine.unsharded_bytes() != (c.reshard_after_backward ? 0 : gathered_all)) {
        throw std::runtime_error("micro-batch " + std::to_string(m) + ": " + std::to_string(engine.unsharded_bytes()) +
                                 " bytes gathered after backward");
      }
    }
    // FullShard frees each child after its forward and backward: never all
    // gathered at once (the root and module.1 with module.1.0 at most).
    const bool all_at_once = !c.reshard_after_backward || c.strategy == ShardingStrategy::ShardGradOp;
    if (all_at_once ? engine.peak_unsharded_bytes() != gathered_all
                    : engine.peak_unsharded_bytes() >= gathered_all && gathered_all > 0) {
      throw std::runtime_error("peak gathered bytes " + std::to_string(engine.peak_unsharded_bytes()) +
                               ", all params " + std::to_string(gathered_all));
    }
    engine.reshard_all();  // as FSDP2 asks before the optimiser: sharded params, sharded grads
    EXPECT_EQ(engine.unsharded_bytes(), 0);
    EXPECT_TRUE(grads_match(*scenario->module(), reference, *setup.shard_group, exact)) << "rank " << ctx.rank();
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
}

// Per micro-batch, with B units besides the root (GoogleMock on every
// collective and on the engine events): forward all-gathers B + 1 unless the
// previous backward kept everything gathered (then 0); backward re-gathers
// the B children that forward freed (FullShard, HybridShard; ShardGradOp
// keeps them); reduce-scatters (B + 1, shard group > 1) and all-reduces
// (B + 1, HybridShard) only when syncing; backward frees B + 1 units only
// with reshard_after_backward. Two optimiser steps of k + 1 micro-batches.
TEST_P(Accumulation, CommunicationPerMicroBatch) {
  const AccumCase& c = GetParam();
  constexpr int kSteps = 2;
  const int blocks = make_scenario(model_config(), 0)->sharded_blocks();
  ASSERT_EQ(blocks, 3);
  const int units = blocks + 1;
  const bool gathers = shard_size() > 1;
  const bool children_freed_after_forward = c.strategy != ShardingStrategy::ShardGradOp;
  const bool replicated = c.strategy == ShardingStrategy::HybridShard && c.replicate > 1;
  // Phase of each rank: (step * kMicro + micro) * 2 + {0 forward, 1 backward}; -1 elsewhere.
  std::vector<int> where(static_cast<size_t>(c.world_size), -1);
  std::vector<std::shared_ptr<NiceMock<MockCommHooks>>> comm;
  std::vector<std::shared_ptr<NiceMock<MockEngineHooks>>> events;
  for (int rank = 0; rank < c.world_size; ++rank) {
    auto mock = std::make_shared<NiceMock<MockCommHooks>>();
    auto hooks = std::make_shared<NiceMock<MockEngineHooks>>();
    int* at = &where[static_cast<size_t>(rank)];
    auto in = [at](int phase) { return Truly([at, phase](const CollectiveDesc&) { return *at == phase; }); };
    auto in_phase = [at](int phase) { return Truly([at, phase](const std::string&) { return *at == phase; }); };
    EXPECT_CALL(*mock, before(_)).Times(AnyNumber());  // setup (sub-group splits)
    // Events not counted below: backward's re-gathers, forward's frees.
    EXPECT_CALL(*hooks, on_unshard(_, _)).Times(AnyNumber());
    EXPECT_CALL(*hooks, on_reshard(_, _)).Times(AnyNumber());
    for (int step = 0; step < kSteps; ++step) {
      for (int m = 0; m < kMicro; ++m) {
        const int forward = (step * kMicro + m) * 2;
        const int backward = forward + 1;
        const bool sync = m == kMicro - 1;
        const bool kept = m > 0 && !c.reshard_after_backward;  // gathered since the last backward
        const int forward_gathers = gathers && !kept ? units : 0;
        const int backward_gathers = gathers && children_freed_after_forward ? blocks : 0;
        EXPECT_CALL(*mock, before(AllOf(OpIs(CollectiveOp::AllGather), in(forward)))).Times(forward_gathers);
        EXPECT_CALL(*mock, before(AllOf(OpIs(CollectiveOp::AllGather), in(backward)))).Times(backward_gathers);
        EXPECT_CALL(*mock, before(AllOf(OpIs(CollectiveOp::ReduceScatter), in(backward))))
            .Times(sync && gathers ? units : 0);
        EXPECT_CALL(*mock, before(AllOf(OpIs(CollectiveOp::AllReduce), in(backward))))
            .Times(sync && replicated ? units : 0);
        EXPECT_CALL(*mock, before(AllOf(OpIs(CollectiveOp::ReduceScatter), in(forward)))).Times(0);
        EXPECT_CALL(*mock, before(AllOf(OpIs(CollectiveOp::AllReduce), in(forward)))).Times(0);
        EXPECT_CALL(*hooks, on_unshard(in_phase(forward), _)).Times(forward_gathers);
        EXPECT_CALL(*hooks, on_post_backward(in_phase(backward), _)).Times(units);
        EXPECT_CALL(*hooks, on_reshard(in_phase(backward), _))
            .Times(gathers && (sync || c.reshard_after_backward) ? units : 0);
      }
    }
    comm.push_back(std::move(mock));
    events.push_back(std::move(hooks));
  }

  sim::World world(world_options());
  auto result = world.run([&](sim::RankContext& ctx) {
    const size_t rank = static_cast<size_t>(ctx.rank());
    ProcessGroupPtr group = std::make_shared<HookedProcessGroup>(ctx.world_group(), comm[rank]);
    ShardingSetup setup = make_sharding_setup(group, c.strategy, c.replicate);
    auto scenario = make_scenario(model_config(), ctx.rank());
    fsdp::EngineOptions engine_options;
    engine_options.queue_backward_callback = sim::queue_backward_callback;
    engine_options.hooks = {events[rank]};
    fsdp::Engine engine(engine_options);
    scenario->shard(engine, setup);
    torch::optim::SGD optimizer(unique_parameters(*scenario->module()), torch::optim::SGDOptions(1e-2));
    for (int step = 0; step < kSteps; ++step) {
      optimizer.zero_grad();
      for (int m = 0; m < kMicro; ++m) {
        const bool sync = m == kMicro - 1;
        engine.set_requires_gradient_sync(sync);
        // PyTorch's test: keep params gathered while accumulating, free them
        // after the last micro-batch's backward (before the step).
        engine.set_reshard_after_backward(sync || c.reshard_after_backward);
        where[rank] = (step * kMicro + m) * 2;
        auto loss = scenario->forward_loss(scenario->input(ctx.rank(), step * kMicro + m));
        where[rank] = (step * kMicro + m) * 2 + 1;
        sim::backward(loss);
      }
      where[rank] = -1;
      optimizer.step();
    }
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
  for (auto& mock : comm) ::testing::Mock::VerifyAndClearExpectations(mock.get());
  for (auto& hooks : events) ::testing::Mock::VerifyAndClearExpectations(hooks.get());
}

INSTANTIATE_TEST_SUITE_P(All, Accumulation,
                         ::testing::Values(AccumCase{ShardingStrategy::FullShard, 2, 1, RankKind::Threads, true},
                                           AccumCase{ShardingStrategy::FullShard, 2, 1, RankKind::Threads, false},
                                           AccumCase{ShardingStrategy::FullShard, 3, 1, RankKind::Fibers, true},
                                           AccumCase{ShardingStrategy::FullShard, 3, 1, RankKind::Fibers, false},
                                           AccumCase{ShardingStrategy::FullShard, 3, 1, RankKind::Threads, false},
                                           AccumCase{ShardingStrategy::ShardGradOp, 2, 1, RankKind::Fibers, true},
                                           AccumCase{ShardingStrategy::ShardGradOp, 2, 1, RankKind::Threads, false},
                                           AccumCase{ShardingStrategy::ShardGradOp, 3, 1, RankKind::Threads, true},
                                           AccumCase{ShardingStrategy::ShardGradOp, 3, 1, RankKind::Fibers, false},
                                           AccumCase{ShardingStrategy::HybridShard, 2, 2, RankKind::Threads, true},
                                           AccumCase{ShardingStrategy::HybridShard, 3, 3, RankKind::Fibers, false},
                                           AccumCase{ShardingStrategy::HybridShard, 4, 2, RankKind::Threads, false},
                                           AccumCase{ShardingStrategy::HybridShard, 4, 2, RankKind::Fibers, true}),
                         case_name);

// Synced backwards without zero_grad in between keep adding into the sharded
// grad (FSDP2's sharded-grad accumulation): one unsynced micro-batch, then
// two synced ones, equal the reference's three micro-batches (the second
// synced reduction adds to the first: a sum of means, so within 1e-6).
TEST(AccumulationSynced, ShardedGradsKeepAccumulatingAcrossSyncedBackwards) {
  for (RankKind kind : {RankKind::Threads, RankKind::Fibers}) {
    constexpr int kWorld = 3;
    const auto reference = reference_grads(kWorld, 0, 3);
    sim::WorldOptions options;
    options.world_size = kWorld;
    options.rank_kind = kind;
    sim::World world(options);
    auto result = world.run([&](sim::RankContext& ctx) {
      ShardingSetup setup = make_sharding_setup(ctx.world_group(), ShardingStrategy::FullShard);
      auto scenario = make_scenario(model_config(), ctx.rank());
      fsdp::EngineOptions engine_options;
      engine_options.queue_backward_callback = sim::queue_backward_callback;
      fsdp::Engine engine(engine_options);
      scenario->shard(engine, setup);
      for (int m = 0; m < 3; ++m) {
        engine.set_requires_gradient_sync(m > 0);
        sim::backward(scenario->forward_loss(scenario->input(ctx.rank(), m)));
      }
      // mean(g0 + g1) + mean(g2) is not bitwise mean(g0 + g1 + g2).
      for (const auto& [fqn, param] : unique_named_parameters(*scenario->module())) {
        const at::Tensor expected = my_rows(reference.at(fqn), *setup.shard_group);
        EXPECT_TRUE(torch::allclose(param.grad(), expected, 1e-6, 1e-6)) << fqn;
      }
    });
    EXPECT_TRUE(result.ok()) << result.error_report();
  }
}

// HSDP with set_requires_all_reduce(false) while accumulating: every
// micro-batch reduce-scatters over the shard group, only the last
// all-reduces across replicas, and the grads are the reference's mean.
TEST(AccumulationHsdp, ReduceScatterEveryMicroBatchAllReduceOnlyTheLast) {
  constexpr int kWorld = 4;
  constexpr int kReplicas = 2;
  const auto reference = reference_grads(kWorld, 0, kMicro);
  const int units = make_scenario(model_config(), 0)->sharded_blocks() + 1;
  std::vector<int> where(kWorld, -1);
  std::vector<std::shared_ptr<NiceMock<MockCommHooks>>> comm;
  for (int rank = 0; rank < kWorld; ++rank) {
    auto mock = std::make_shared<NiceMock<MockCommHooks>>();
    int* at = &where[static_cast<size_t>(rank)];
    auto in = [at](int m) { return Truly([at, m](const CollectiveDesc&) { return *at == m; }); };
    EXPECT_CALL(*mock, before(_)).Times(AnyNumber());
    for (int m = 0; m < kMicro; ++m) {
      EXPECT_CALL(*mock, before(AllOf(OpIs(CollectiveOp::ReduceScatter), in(m)))).Times(units);
      EXPECT_CALL(*mock, before(AllOf(OpIs(CollectiveOp::AllReduce), in(m)))).Times(m == kMicro - 1 ? units : 0);
    }
    comm.push_back(std::move(mock));
  }
  sim::WorldOptions options;
  options.world_size = kWorld;
  options.rank_kind = RankKind::Fibers;
  sim::World world(options);
  auto result = world.run([&](sim::RankContext& ctx) {
    const size_t rank = static_cast<size_t>(ctx.rank());
    ProcessGroupPtr group = std::make_shared<HookedProcessGroup>(ctx.world_group(), comm[rank]);
    ShardingSetup setup = make_sharding_setup(group, ShardingStrategy::HybridShard, kReplicas);
    auto scenario = make_scenario(model_config(), ctx.rank());
    fsdp::EngineOptions engine_options;
    engine_options.queue_backward_callback = sim::queue_backward_callback;
    fsdp::Engine engine(engine_options);
    scenario->shard(engine, setup);
    for (int m = 0; m < kMicro; ++m) {
      engine.set_requires_all_reduce(m == kMicro - 1);
      where[rank] = m;
      sim::backward(scenario->forward_loss(scenario->input(ctx.rank(), m)));
      where[rank] = -1;
    }
    // Two-stage mean (shard group, then replicas) against the one-stage reference.
    EXPECT_TRUE(grads_match(*scenario->module(), reference, *setup.shard_group, /*exact=*/false));
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
  for (auto& mock : comm) ::testing::Mock::VerifyAndClearExpectations(mock.get());
}

// Per unit: only module.2 (recurse = false) skips its reduce-scatter; the
// other units still reduce every micro-batch. Setting it on the root with
// recurse reaches every unit.
TEST(AccumulationPerUnit, OnlyTheChosenUnitSkipsItsReduceScatter) {
  constexpr int kWorld = 2;
  std::vector<std::shared_ptr<NiceMock<MockCommHooks>>> comm;
  for (int rank = 0; rank < kWorld; ++rank) {
    auto mock = std::make_shared<NiceMock<MockCommHooks>>();
    EXPECT_CALL(*mock, before(_)).Times(AnyNumber());
    // Two micro-batches: the three other units reduce in both, module.2 in the second only.
    EXPECT_CALL(*mock, before(AllOf(OpIs(CollectiveOp::ReduceScatter), LabelIs(HasSubstr("'module.2'"))))).Times(1);
    EXPECT_CALL(*mock,
                before(AllOf(OpIs(CollectiveOp::ReduceScatter), LabelIs(::testing::Not(HasSubstr("'module.2'"))))))
        .Times(6);
    comm.push_back(std::move(mock));
  }
  const auto reference = reference_grads(kWorld, 0, 2);
  sim::WorldOptions options;
  options.world_size = kWorld;
  sim::World world(options);
  auto result = world.run([&](sim::RankContext& ctx) {
    ProcessGroupPtr group = std::make_shared<HookedProcessGroup>(ctx.world_group(), comm[ctx.rank()]);
    ShardingSetup setup = make_sharding_setup(group, ShardingStrategy::FullShard);
    auto scenario = make_scenario(model_config(), ctx.rank());
    fsdp::Engine engine;
    scenario->shard(engine, setup);
    std::shared_ptr<torch::nn::Module> third;
    for (const auto& item : scenario->module()->named_modules()) {
      if (item.key() == "module.2") third = item.value();
    }
    ASSERT_TRUE(third);
    engine.set_requires_gradient_sync(third, false, /*recurse=*/false);
    scenario->forward_loss(scenario->input(ctx.rank(), 0)).backward();
    for (const fsdp::Unit* unit : engine.units()) {  // FQNs are known once the root ran
      EXPECT_EQ(unit->requires_gradient_sync(), unit->fqn() != "module.2") << unit->fqn();
    }
    engine.set_requires_gradient_sync(scenario->module(), true);  // recurse: every unit
    scenario->forward_loss(scenario->input(ctx.rank(), 1)).backward();
    // module.2 reduced the sum once, the others each micro-batch: close, not bitwise.
    EXPECT_TRUE(grads_match(*scenario->module(), reference, *setup.shard_group, /*exact=*/false));
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
  for (auto& mock : comm) ::testing::Mock::VerifyAndClearExpectations(mock.get());
}

TEST(AccumulationPerUnit, ModuleThatIsNotAUnitIsRefused) {
  fsdp::Engine engine;
  auto stray = std::make_shared<torch::nn::LinearImpl>(2, 2);
  EXPECT_THAT([&] { engine.set_requires_gradient_sync(stray, false); },
              ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("set_requires_gradient_sync")));
  EXPECT_THAT([&] { engine.set_reshard_after_backward(stray, false); },
              ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("not a unit of this engine")));
}

}  // namespace
}  // namespace fsdpsim::scenarios
