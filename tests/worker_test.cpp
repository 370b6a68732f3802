// The tools' one worker protocol (tools/worker.h): a job in, each rank's
// result file out, and one-line refusals for a job that is missing, unreadable
// or of an unknown kind.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>

#include "tests/worker_registry.h"
#include "tools/worker.h"

// Echoes its job's "value" with its rank; rank "fail_rank" writes nothing and fails.
FSDPSIM_REGISTER_WORKER(worker_protocol_echo) {
  if (context.job().value("fail_rank", -1) == context.rank()) return 7;
  context.write_result({{"rank", context.rank()}, {"value", context.job().at("value")}});
  return 0;
}

namespace fsdpsim::tools {
namespace {

using ::testing::HasSubstr;

LaunchOptions quiet(int nproc) {
  LaunchOptions options;
  options.nproc = nproc;
  options.output = nullptr;
  options.timeout = std::chrono::seconds(5);
  options.deadline = std::chrono::seconds(60);
  return options;
}

TEST(WorkerProtocol, EachRankReturnsItsResult) {
  const WorkerRun run = launch_workers({{"kind", "worker_protocol_echo"}, {"value", "x\n\"y\""}}, quiet(3));
  ASSERT_TRUE(run.launched.ok()) << run.launched.report();
  ASSERT_EQ(run.results.size(), 3u);
  for (int r = 0; r < 3; ++r) {
    ASSERT_TRUE(run.results[r].has_value()) << r;
    EXPECT_EQ(run.results[r]->at("rank").get<int>(), r);
    EXPECT_EQ(run.results[r]->at("value").get<std::string>(), "x\n\"y\"");
  }
}

TEST(WorkerProtocol, ARankThatFailsHasNoResultAndItsExitCode) {
  const WorkerRun run = launch_workers({{"kind", "worker_protocol_echo"}, {"value", 1}, {"fail_rank", 1}}, quiet(2));
  EXPECT_FALSE(run.launched.ok());
  EXPECT_EQ(run.launched.ranks.at(1).exit_code, 7);
  EXPECT_TRUE(run.results[0].has_value());
  EXPECT_FALSE(run.results[1].has_value());
}

TEST(WorkerProtocol, UnknownKindAndMissingJobAreRefusedWithOneLine) {
  WorkerRun run = launch_workers({{"kind", "no_such_worker"}}, quiet(1));
  EXPECT_EQ(run.launched.ranks.at(0).exit_code, 2);
  EXPECT_EQ(run.launched.ranks.at(0).output_tail, "fsdpsim worker: error: no worker kind 'no_such_worker'\n");

  LaunchOptions bare = quiet(1);
  bare.command = worker_command();  // the flag without a job
  const LaunchResult launched = launch_processes(bare);
  EXPECT_EQ(launched.ranks.at(0).exit_code, 2);
  EXPECT_THAT(launched.ranks.at(0).output_tail, HasSubstr("FSDPSIM_WORKER_JOB is not set"));

  bare.extra_env[kWorkerJobEnv] = "{not json";
  EXPECT_EQ(launch_processes(bare).ranks.at(0).exit_code, 2);
}

}  // namespace
}  // namespace fsdpsim::tools
