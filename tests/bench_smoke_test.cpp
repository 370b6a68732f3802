// Smoke tests of `fsdpsim bench comm` and `fsdpsim bench engine`: the --quick
// run ends with exit code 0 and prints every table and target/ratio line;
// bad flags exit 2 with one error line. Timings themselves are not checked
// (the machine may be busy).

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cstdio>
#include <string>

namespace fsdpsim {
namespace {

using ::testing::ContainsRegex;
using ::testing::HasSubstr;
using ::testing::Not;

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

CommandResult run_command(const std::string& command) {
  CommandResult result;
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  size_t n = 0;
  while ((n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0) result.output.append(buffer, n);
  const int status = ::pclose(pipe);
  if (status != -1 && WIFEXITED(status)) result.exit_code = WEXITSTATUS(status);
  return result;
}

const std::string kBench = std::string(FSDPSIM_TOOLS_DIR) + "/fsdpsim bench comm";

TEST(BenchCommSmoke, QuickRunPrintsEveryTableAndRatio) {
  CommandResult run = run_command(kBench + " --quick");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const std::string& out = run.output;
  EXPECT_THAT(out, HasSubstr("[1/3]"));
  EXPECT_THAT(out, HasSubstr("[2/3]"));
  EXPECT_THAT(out, HasSubstr("[3/3]"));
  EXPECT_THAT(out, HasSubstr("== 1. fake backend (thread ranks) vs memcpy"));
  EXPECT_THAT(out, HasSubstr("world     size  iters   time(ms)      algbw      busbw       copy     memcpy   ratio"));
  EXPECT_THAT(out, HasSubstr("== 2. Gloo (loopback TCP) vs fake"));
  EXPECT_THAT(out, HasSubstr("gloo-thr"));
  EXPECT_THAT(out, HasSubstr("gloo-proc"));
  EXPECT_THAT(out, HasSubstr("== 3. 256 ranks: fiber ranks vs thread ranks"));
  EXPECT_THAT(out, HasSubstr("\ntarget: fake all_gather copy >= 0.5 x memcpy at 8 ranks, 16 MiB: "));
  EXPECT_THAT(out, HasSubstr("(world 2, 1 MiB: ratio "));
  EXPECT_THAT(out, HasSubstr("\nratio threads/fibers"));
  EXPECT_THAT(out, HasSubstr("\nfiber round vs memcpy at 256 ranks: round "));
  // The one-row tables of the quick run: world 2, 1 MiB, numbers in every
  // Gloo column (thread ranks and the two worker processes).
  EXPECT_THAT(out, HasSubstr("\n      2    1 MiB      1 "));
  EXPECT_THAT(out, ContainsRegex("\n +2 +1 MiB \\| +[0-9.]+ +[0-9.]+ \\| +[0-9.]+ +[0-9.]+ +[0-9.]+ \\| "
                                 "+[0-9.]+ +[0-9.]+ +[0-9.]+\n"));
  EXPECT_THAT(out, Not(HasSubstr("failed")));
  EXPECT_THAT(out, HasSubstr("\ntotal "));
}

TEST(BenchCommSmoke, BadFlagIsOneErrorLineAndExitCode2) {
  CommandResult run = run_command(kBench + " --bogus");
  EXPECT_EQ(run.exit_code, 2);
  EXPECT_EQ(run.output, "fsdpsim: error: unknown option '--bogus' (see 'fsdpsim bench comm --help')\n");
}

TEST(BenchCommSmoke, HelpExitsZero) {
  CommandResult run = run_command(kBench + " --help");
  EXPECT_EQ(run.exit_code, 0);
  EXPECT_THAT(run.output, HasSubstr("Usage: fsdpsim bench comm"));
  EXPECT_THAT(run.output, HasSubstr("--no-processes"));
}

const std::string kBenchEngine = std::string(FSDPSIM_TOOLS_DIR) + "/fsdpsim bench engine";

double number_after(const std::string& out, const std::string& prefix) {
  const size_t at = out.find(prefix);
  if (at == std::string::npos) return -1;
  return std::stod(out.substr(at + prefix.size()));
}

// Section 6 of the quick run: an 8 MiB checkpoint at world 2, every row a
// throughput and a time, the ratios positive and finite, and every load
// bitwise the saved values. No timing is expected (the machine may be busy).
void expect_checkpoint_section(const std::string& out) {
  EXPECT_THAT(out, HasSubstr("== 6. distributed checkpoint (fsdp::dcp) vs the file system: 8.0 MiB of fp32 =="));
  for (const char* row : {"dcp::save \\(world 2\\)", "one fwrite \\+ fsync \\(one file\\)",
                          "dcp::load \\(world 2, saved layout\\)", "resharding dcp::load \\(world 3\\)"}) {
    EXPECT_THAT(out, ContainsRegex(std::string("\n  ") + row + " +[0-9]+\\.[0-9] MiB/s +[0-9]+\\.[0-9]{3} s"));
  }
  // The checkpoint holds at least the payload (each chunk a torch.save zip, plus .metadata).
  EXPECT_THAT(out, ContainsRegex("\\(on disk [89]\\.[0-9] MiB: data, .metadata, checksums\\)"));
  const double save_ratio = number_after(out, "\nratio dcp save/fwrite+fsync throughput: ");
  const double load_ratio = number_after(out, "\nratio resharding/plain load time: ");
  EXPECT_GT(save_ratio, 0.0);
  EXPECT_LT(save_ratio, 1e3);
  EXPECT_GT(load_ratio, 0.0);
  EXPECT_LT(load_ratio, 1e3);
  EXPECT_THAT(out, HasSubstr("(world 2, 8.0 MiB)\n"));
  EXPECT_THAT(out, HasSubstr("(world 2 -> 3)\n"));
  EXPECT_THAT(out, HasSubstr("\n  every load gave back the saved values bitwise\n"));
}

TEST(BenchEngineSmoke, QuickRunPrintsTheTables) {
  CommandResult run = run_command(kBenchEngine + " --quick");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const std::string& out = run.output;
  EXPECT_THAT(out, HasSubstr("ATen intra-op threads 1"));
  for (const char* progress : {"[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"}) {
    EXPECT_THAT(out, HasSubstr(progress));
  }
  // Section 5: accumulation rows (peak equal to its theory) and the clip rows.
  EXPECT_THAT(out, HasSubstr("== 5a. gradient accumulation"));
  EXPECT_THAT(out, ContainsRegex("\n  no sync, keep gathered +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +1\\.000 "));
  EXPECT_THAT(out, HasSubstr("== 5b. clip_grad_norm_"));
  EXPECT_THAT(out, ContainsRegex("fsdp::clip_grad_norm_ \\(world 1\\) +[0-9.]+ ms  x plain [0-9.]+  rel diff"));
  EXPECT_THAT(out, ::testing::Not(HasSubstr("NORMS DISAGREE")));
  EXPECT_THAT(out, HasSubstr("== 1. world size 1: engine step vs plain step"));
  EXPECT_THAT(out, HasSubstr("model             plain(ms) engine(ms)  overhead same loss   steps"));
  EXPECT_THAT(out, HasSubstr("\ntarget: world-size-1 overhead < 15%: "));
  EXPECT_THAT(out, HasSubstr("== 2. world size N: step time on fake ranks vs the plain model"));
  EXPECT_THAT(out, HasSubstr("world strategy     ranks      step(ms)   x plain  x N*plain"));
  EXPECT_THAT(out, HasSubstr("== 3. peak unsharded (gathered) param bytes per rank over a step vs theory"));
  EXPECT_THAT(out, HasSubstr("world strategy        shards      peak    theory  ratio     total    theory    issued"));
  // The quick run's rows: both models at world 1, world 2 on both rank kinds.
  EXPECT_THAT(out, ContainsRegex("\n  mlp_stack d32 +[0-9.]+ +[0-9.]+ +[-+][0-9.]+% +yes +1\\+1\n"));
  EXPECT_THAT(out, ContainsRegex("\n  transformer +[0-9.]+ +[0-9.]+ +[-+][0-9.]+% +yes +1\\+1\n"));
  EXPECT_THAT(out, ContainsRegex("\n +2 FullShard +threads +[0-9.]+ "));
  EXPECT_THAT(out, ContainsRegex("\n +2 ShardGradOp +fibers +[0-9.]+ "));
  // Mixed precision: bf16 gathers half the fp32 bytes; reduces half only with reduce_dtype bf16.
  EXPECT_THAT(out, HasSubstr("== 4. mixed precision (mp_policy) vs fp32: world 2"));
  EXPECT_THAT(out, ContainsRegex("\n  bf16/fp32 +[0-9.]+ +[0-9.]+ +[0-9.]+ +0\\.500 +[0-9.]+ +1\\.000\n"));
  EXPECT_THAT(out, ContainsRegex("\n  bf16/bf16 +[0-9.]+ +[0-9.]+ +[0-9.]+ +0\\.500 +[0-9.]+ +0\\.500\n"));
  EXPECT_THAT(out, Not(HasSubstr("FAILED")));
  EXPECT_THAT(out, Not(HasSubstr("not measured")));
  EXPECT_THAT(out, HasSubstr("\ntotal "));
  expect_checkpoint_section(out);
}

TEST(BenchEngineSmoke, BadFlagIsOneErrorLineAndExitCode2) {
  CommandResult run = run_command(kBenchEngine + " --bogus");
  EXPECT_EQ(run.exit_code, 2);
  EXPECT_EQ(run.output, "fsdpsim: error: unknown option '--bogus' (see 'fsdpsim bench engine --help')\n");
}

}  // namespace
}  // namespace fsdpsim
