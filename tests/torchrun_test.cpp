// Our Gloo process ranks started by PyTorch's own launcher, torchrun from the
// pinned wheel, the way a multi-node job starts them: a scheduler (here
// launch_processes, as srun would) starts one torchrun per node with
// --nnodes 2 --node-rank N and the static (env) rendezvous at
// MASTER_ADDR:MASTER_PORT; each torchrun starts 2 workers with RANK,
// WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT set, its agent hosting the
// TCP store (TORCHELASTIC_USE_AGENT_STORE=True). The workers are this test
// binary, running FSDP parity over make_gloo_process_group_from_env().

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <ATen/Parallel.h>
#include <unistd.h>

#include <iostream>
#include <string>

#include "backends/gloo/gloo_process_group.h"
#include "scenarios/parity.h"
#include "tests/worker_registry.h"
#include "tools/process_launcher.h"

namespace fsdpsim::scenarios {
namespace {

FSDPSIM_REGISTER_WORKER(torchrun_parity) {
  at::set_num_threads(1);
  const LaunchEnv env = LaunchEnv::from_env();
  const std::string who = "rank " + std::to_string(env.rank) + " local_rank " + std::to_string(env.local_rank) +
                          " world " + std::to_string(env.world_size) +
                          (env.agent_store ? " agent_store" : " own_store");
  ParityConfig config;
  config.scenario.name = "mlp_stack";
  config.strategy = fsdp::ShardingStrategy::FullShard;
  config.world.world_size = env.world_size;
  config.steps = 2;
  ParityReport report = run_parity_rank(config, env.rank, make_gloo_process_group_from_env(std::chrono::seconds(60)));
  if (!report.ok()) {
    std::cerr << who << ": " << report.summary() << std::endl;
    return 1;
  }
  std::cout << who << " parity ok" << std::endl;
  return 0;
}

TEST(Torchrun, TwoNodesOfTwoGlooRanksRunFsdpParityExactly) {
  ASSERT_EQ(access(FSDPSIM_TORCHRUN, X_OK), 0) << FSDPSIM_TORCHRUN << " is not executable (run .ci/setup.sh)";
  LaunchOptions options;
  options.nproc = 2;  // nodes: each gets RANK = its node rank from the launcher
  options.command = {"/bin/sh",
                     "-c",
                     "exec \"$0\" --nnodes 2 --node-rank \"$RANK\" --nproc-per-node 2 --rdzv-backend static "
                     "--master-addr \"$MASTER_ADDR\" --master-port \"$MASTER_PORT\" --max-restarts 0 "
                     "--no-python \"$1\" \"$2\"",
                     FSDPSIM_TORCHRUN,
                     tools::self_exe(),
                     tools::kWorkerFlag};
  testing::set_test_worker(options, "torchrun_parity");  // the job reaches the workers through torchrun's environment
  options.output = nullptr;
  options.timeout = std::chrono::seconds(30);
  options.deadline = std::chrono::seconds(240);
  LaunchResult result = launch_processes(options);
  ASSERT_TRUE(result.ok()) << result.report();
  // Node n's workers are global ranks 2n and 2n+1 with local ranks 0 and 1.
  for (int node = 0; node < 2; ++node) {
    for (int local = 0; local < 2; ++local) {
      const std::string line = "rank " + std::to_string(2 * node + local) + " local_rank " + std::to_string(local) +
                               " world 4 agent_store parity ok";
      EXPECT_THAT(result.ranks[node].output_tail, ::testing::HasSubstr(line)) << result.report();
    }
  }
}

}  // namespace
}  // namespace fsdpsim::scenarios
