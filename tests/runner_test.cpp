// The scenario runner behind `fsdpsim run`: options, progress and summary,
// traces, parity check, Gloo processes, and one-line errors.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "sim/trace.h"
#include "tools/runner.h"

namespace fsdpsim::tools {
namespace {

using ::testing::HasSubstr;

std::string temp_trace(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("fsdpsim-runner-" + name + ".json")).string();
}

TEST(Runner, ThreadRunPrintsProgressSummaryAndWritesReadableTraces) {
  RunOptions options = parse_run_options({"--world-size", "2", "--steps", "3", "--trace", temp_trace("threads")});
  std::ostringstream out, err;
  ASSERT_EQ(run_scenario(options, out, err), 0) << err.str();
  EXPECT_THAT(out.str(), HasSubstr("step 3/3"));
  EXPECT_THAT(out.str(), HasSubstr("loss per step (mean over ranks)"));
  EXPECT_THAT(out.str(), HasSubstr("peak unsharded params"));
  // mlp_stack, B = 3 units + root: (B+1) + B all-gathers and B+1 reduce-scatters per step.
  EXPECT_THAT(out.str(), HasSubstr("all_gather x21 reduce_scatter x12"));
  std::ifstream jsonl(options.trace_path + ".jsonl");
  auto events = sim::TraceRecorder::read_jsonl(jsonl);
  EXPECT_FALSE(events.empty());
  std::ifstream chrome(options.trace_path);
  EXPECT_TRUE(chrome.good());
}

TEST(Runner, SimulatedFiberRunPredictsStepTimeAndExposedCommunication) {
  RunOptions options = parse_run_options({"--ranks", "fibers", "--simulated-time", "--cost-model", "ib-ndr400",
                                          "--world-size", "4", "--steps", "2", "--trace", temp_trace("fibers")});
  std::ostringstream out, err;
  ASSERT_EQ(run_scenario(options, out, err), 0) << err.str();
  EXPECT_THAT(out.str(), HasSubstr("step time predicted (simulated clock, ib-ndr400)"));
  EXPECT_THAT(out.str(), HasSubstr("exposed communication: "));
  EXPECT_THAT(out.str(), HasSubstr("% of the simulated step time"));
}

TEST(Runner, CheckParityComparesWithTheReference) {
  RunOptions options = parse_run_options({"--scenario", "nested_wrapped", "--world-size", "3", "--steps", "2",
                                          "--check-parity", "--trace", temp_trace("parity")});
  std::ostringstream out, err;
  ASSERT_EQ(run_scenario(options, out, err), 0) << err.str() << out.str();
  EXPECT_THAT(out.str(), HasSubstr("parity with the unsharded reference: OK (bitwise)"));
}

TEST(Runner, GlooProcessRanksThroughTheCli) {
  const std::string command = std::string(FSDPSIM_TOOLS_DIR) +
                              "/fsdpsim run --backend gloo --ranks processes --world-size 2 --steps 2 --trace " +
                              temp_trace("processes") + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof(buffer), pipe)) output.append(buffer, n);
  const int status = pclose(pipe);
  EXPECT_EQ(WEXITSTATUS(status), 0) << output;
  EXPECT_THAT(output, HasSubstr("2 ranks as processes on gloo"));
  EXPECT_THAT(output, HasSubstr("[rank 0]   step 2/2"));
  EXPECT_THAT(output, HasSubstr("all_gather x14 reduce_scatter x8"));
}

TEST(Runner, BadOptionsAreOneLineErrors) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--world-size", "0"}, "--world-size must be in [1, 8192], got 0"},
      {{"--scenario", "nope"}, "unknown scenario 'nope'"},
      {{"--ranks", "processes"}, "--ranks processes needs --backend gloo"},
      {{"--strategy", "hybrid_shard"}, "hybrid_shard needs --mesh RxS"},
      {{"--mesh", "3x2", "--world-size", "4"}, "does not split into 3 replicas"},
      {{"--ranks", "fibers", "--backend", "gloo"}, "not fibers"},
      {{"--simulated-time"}, "simulated_time needs fiber ranks"},
      {{"--ranks", "fibers", "--simulated-time", "--cost-model", "warp-drive"}, "warp-drive"},
      {{"--straggler", "9:5"}, "outside the world"},
      {{"--delay-after-loss", "-3"}, "--delay-after-loss needs milliseconds"},
      {{"--steps"}, "--steps needs a value"},
      {{"--bogus"}, "unknown option '--bogus'"},
  };
  for (const auto& [args, expected] : cases) {
    try {
      parse_run_options(args);
      ADD_FAILURE() << "accepted: " << ::testing::PrintToString(args);
    } catch (const std::invalid_argument& e) {
      EXPECT_THAT(e.what(), HasSubstr(expected));
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace fsdpsim::tools
