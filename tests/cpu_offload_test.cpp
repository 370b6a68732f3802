// CPU offload (FullyShardOptions::offload_policy, FSDP2's CPUOffloadPolicy):
// sharded params and grads live on the CPU, gathers start from a copy of the
// shard on the compute device, reduced grads are copied back. Here the
// compute device is the CPU too, so the tests check that the copies are real
// (the params computed with never share storage with the shards, even at a
// world of one where nothing is gathered) and that training keeps bitwise
// parity with the unsharded reference (copies change no arithmetic). And
// FSDP2's refusals of a param on the wrong device.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "fsdp/deferred_init.h"
#include "fsdp/fully_shard.h"
#include "scenarios/parity.h"
#include "sim/fiber_autograd.h"
#include "sim/world.h"
#include "tests/parity_case.h"

namespace fsdpsim::fsdp {
namespace {

using sim::RankKind;

using parity_cases::ScenarioCase;

class CpuOffloadParity : public ::testing::TestWithParam<ScenarioCase> {};

TEST_P(CpuOffloadParity, MatchesTheDdpReferenceBitwise) {
  parity_cases::expect_parity(GetParam(), [](scenarios::ParityConfig& config) { config.cpu_offload = true; });
}

INSTANTIATE_TEST_SUITE_P(
    Scenarios, CpuOffloadParity,
    ::testing::Values(ScenarioCase{"mlp_stack", RankKind::Threads, 3, ShardingStrategy::FullShard},
                      ScenarioCase{"mlp_stack", RankKind::Threads, 1, ShardingStrategy::FullShard},
                      ScenarioCase{"transformer", RankKind::Fibers, 5, ShardingStrategy::FullShard},
                      ScenarioCase{"nested_wrapped", RankKind::Fibers, 3, ShardingStrategy::ShardGradOp},
                      ScenarioCase{"mixture_of_experts", RankKind::Threads, 3, ShardingStrategy::FullShard},
                      ScenarioCase{"mlp_stack", RankKind::Threads, 3, ShardingStrategy::NoShard},
                      ScenarioCase{"mlp_stack", RankKind::Fibers, 5, ShardingStrategy::FullShard,
                                   scenarios::OptimizerKind::Adam}),
    [](const ::testing::TestParamInfo<ScenarioCase>& info) { return parity_cases::case_name(info.param); });

// A root with one Linear (its own params): it stays gathered from forward
// to backward, so the params computed with can be looked at.
struct Observed {
  bool param_aliases_shard = false;  // between forward and backward
  bool grad_aliases_shard = false;
  bool grad_defined = false;
  at::Device grad_device = at::kCPU;
};

Observed observe_root(const ProcessGroupPtr& group, bool offload) {
  torch::nn::Linear model(4, 6);
  EngineOptions engine_options;
  engine_options.queue_backward_callback = sim::queue_backward_callback;
  Engine engine(engine_options);
  FullyShardOptions options;
  options.shard_group = group;
  options.offload_policy.cpu_offload = offload;
  engine.fully_shard(model.ptr(), options);
  const at::Tensor shard = model->weight.data();
  auto loss = fsdp::call(model, torch::ones({2, 4})).sum();
  Observed seen;
  seen.param_aliases_shard = model->weight.data().is_alias_of(shard);
  sim::backward(loss);
  seen.grad_defined = model->weight.grad().defined();
  seen.grad_aliases_shard = model->weight.grad().is_alias_of(shard);
  seen.grad_device = model->weight.grad().device();
  EXPECT_TRUE(model->weight.data().is_alias_of(shard));  // resharded: the shard again
  return seen;
}

TEST(CpuOffload, ParamsComputedWithAreCopiesOfTheShards) {
  for (int world_size : {1, 3}) {
    for (RankKind kind : {RankKind::Threads, RankKind::Fibers}) {
      SCOPED_TRACE("world " + std::to_string(world_size) + " " + sim::to_string(kind));
      sim::WorldOptions world;
      world.world_size = world_size;
      world.rank_kind = kind;
      std::vector<Observed> offloaded(world_size), plain(world_size);
      sim::World(world)
          .run([&](sim::RankContext& ctx) {
            offloaded[ctx.rank()] = observe_root(ctx.world_group(), true);
            plain[ctx.rank()] = observe_root(ctx.world_group(), false);
          })
          .throw_if_failed();
      for (int r = 0; r < world_size; ++r) {
        EXPECT_FALSE(offloaded[r].param_aliases_shard);
        EXPECT_TRUE(offloaded[r].grad_defined);
        EXPECT_FALSE(offloaded[r].grad_aliases_shard);
        EXPECT_TRUE(offloaded[r].grad_device.is_cpu());
        // Without offload a world of one computes with the shard itself.
        EXPECT_EQ(plain[r].param_aliases_shard, world_size == 1);
      }
    }
  }
}

TEST(CpuOffload, ParamOnAnotherDeviceIsRefusedAsFsdp2Does) {
  sim::WorldOptions world;
  world.world_size = 2;
  sim::World(world)
      .run([](sim::RankContext& ctx) {
        Engine engine;
        FullyShardOptions options;
        options.shard_group = ctx.world_group();
        options.device = at::Device(at::kCUDA, 0);  // a value only: nothing is allocated there
        torch::nn::Linear on_cpu(3, 4);
        try {
          engine.fully_shard(on_cpu.ptr(), options);
          ADD_FAILURE() << "a CPU param was sharded for cuda:0";
        } catch (const std::invalid_argument& e) {
          EXPECT_NE(
              std::string(e.what()).find("Expects the parameter to already be moved to device cuda:0 but got cpu"),
              std::string::npos)
              << e.what();
          EXPECT_NE(std::string(e.what()).find("'weight'"), std::string::npos) << e.what();
        }
        // Meta params are accepted (materialize places them), but offloaded
        // ones must be materialised on the CPU.
        auto meta = std::make_shared<torch::nn::Module>();
        meta->register_parameter("w", torch::empty({4, 3}, at::kMeta));
        options.offload_policy.cpu_offload = true;
        engine.fully_shard(meta, options);
        MaterializeOptions on_gpu;
        on_gpu.device = at::Device(at::kCUDA, 0);
        on_gpu.init_param = seeded_uniform_rows(1);
        try {
          engine.materialize(meta, on_gpu);
          ADD_FAILURE() << "offloaded params materialised on cuda:0";
        } catch (const std::invalid_argument& e) {
          EXPECT_NE(std::string(e.what()).find("FSDP parameters should be materialized on CPU when enabling CPU "
                                               "offloading"),
                    std::string::npos)
              << e.what();
        }
        EXPECT_TRUE(meta->named_parameters()["w"].is_meta());  // refused before allocating anything
        MaterializeOptions on_cpu_options;
        on_cpu_options.init_param = seeded_uniform_rows(1);
        engine.materialize(meta, on_cpu_options);
        EXPECT_EQ(meta->named_parameters()["w"].sizes(), (std::vector<int64_t>{2, 3}));
      })
      .throw_if_failed();
}

}  // namespace
}  // namespace fsdpsim::fsdp
