// FSDP parity with Gloo ranks as separate processes: each process is one
// rank (rendezvous through MASTER_ADDR/PORT, RANK, WORLD_SIZE), computes the
// whole unsharded reference itself and compares its shards every step.
// Gloo's all-gather moves bits and its reduce-scatter here is an all-to-all
// plus a rank-order sum (the reference's arithmetic), so full_shard and
// shard_grad_op compare exactly.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <ATen/Parallel.h>
#include <unistd.h>

#include <cstdlib>
#include <iostream>

#include "backends/gloo/gloo_process_group.h"
#include "scenarios/parity.h"
#include "tests/worker_registry.h"
#include "tools/process_launcher.h"

namespace fsdpsim::scenarios {
namespace {

FSDPSIM_REGISTER_WORKER(gloo_parity) {
  at::set_num_threads(1);
  const LaunchEnv env = LaunchEnv::from_env();
  ParityConfig config;
  config.scenario.name = context.job().at("scenario").get<std::string>();
  config.strategy = context.job().at("strategy").get<std::string>() == "shard_grad_op"
                        ? fsdp::ShardingStrategy::ShardGradOp
                        : fsdp::ShardingStrategy::FullShard;
  config.world.world_size = env.world_size;
  config.steps = 3;
  ProcessGroupPtr world = make_gloo_process_group_from_env(std::chrono::seconds(60));
  ParityReport report = run_parity_rank(config, env.rank, world);
  if (!report.ok()) {
    std::cerr << "rank " << env.rank << ": " << report.summary() << std::endl;
    return 1;
  }
  std::cout << "rank " << env.rank << " parity ok" << std::endl;
  return 0;
}

using GlooProcessParityParam = std::tuple<std::string, std::string, int>;
class GlooProcessParity : public ::testing::TestWithParam<GlooProcessParityParam> {};

TEST_P(GlooProcessParity, EveryRankMatchesTheReferenceExactly) {
  const auto& [scenario, strategy, world_size] = GetParam();
  LaunchOptions options;
  options.nproc = world_size;
  testing::set_test_worker(options, "gloo_parity", {{"scenario", scenario}, {"strategy", strategy}});
  options.output = nullptr;
  options.timeout = std::chrono::seconds(30);
  options.deadline = std::chrono::seconds(240);
  LaunchResult result = launch_processes(options);
  ASSERT_TRUE(result.ok()) << result.report();
  for (const auto& rank : result.ranks) {
    EXPECT_THAT(rank.output_tail, ::testing::HasSubstr("parity ok"));
  }
}

INSTANTIATE_TEST_SUITE_P(Processes, GlooProcessParity,
                         ::testing::Values(GlooProcessParityParam{"mlp_stack", "full_shard", 2},
                                           GlooProcessParityParam{"nested_wrapped", "full_shard", 4},
                                           GlooProcessParityParam{"transformer", "shard_grad_op", 2},
                                           GlooProcessParityParam{"mixture_of_experts", "full_shard", 3}),
                         [](const auto& info) {
                           return std::get<0>(info.param) + "_" + std::get<1>(info.param) + "_w" +
                                  std::to_string(std::get<2>(info.param));
                         });

}  // namespace
}  // namespace fsdpsim::scenarios
