// The scenario runner behind `fsdpsim run`: options, progress and summary,
// traces, parity check, Gloo processes, and one-line errors.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "backends/observe/jsonl.h"
#include "backends/observe/trace_recorder.h"
#include "scenarios/models.h"
#include "tools/format_util.h"
#include "tools/replay_lib.h"
#include "tools/runner.h"

namespace fsdpsim::tools {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::string temp_trace(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("fsdpsim-runner-" + name + ".json")).string();
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// `fsdpsim ARGS` through the shell (stdout and stderr together).
struct CliRun {
  int status = 0;  // as waitpid reports it
  std::string output;
};

CliRun run_cli(const std::string& args, const std::string& shell_prefix = "") {
  const std::string command = shell_prefix + std::string(FSDPSIM_TOOLS_DIR) + "/fsdpsim " + args + " 2>&1";
  CliRun run;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return run;
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof(buffer), pipe)) run.output.append(buffer, n);
  run.status = pclose(pipe);
  return run;
}

std::string last_line(const std::string& text) {
  const size_t end = text.find_last_not_of('\n');
  if (end == std::string::npos) return "";
  const size_t begin = text.rfind('\n', end);
  return text.substr(begin == std::string::npos ? 0 : begin + 1,
                     end - (begin == std::string::npos ? 0 : begin + 1) + 1);
}

// `fsdpsim ARGS` in the background, its stdout and stderr on one pipe, so a
// test can act on a running run (signal it or one of its rank processes).
class BackgroundRun {
 public:
  BackgroundRun(const std::vector<std::string>& args, const std::map<std::string, std::string>& env = {}) {
    std::vector<std::string> argv_text = {std::string(FSDPSIM_TOOLS_DIR) + "/fsdpsim"};
    argv_text.insert(argv_text.end(), args.begin(), args.end());
    std::vector<std::string> env_text;
    for (char** entry = environ; *entry != nullptr; ++entry) {
      const std::string text(*entry);
      if (env.count(text.substr(0, text.find('='))) == 0) env_text.push_back(text);
    }
    for (const auto& [key, value] : env) env_text.push_back(key + "=" + value);
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return;
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], 1);
    posix_spawn_file_actions_adddup2(&actions, fds[1], 2);
    std::vector<char*> argv = pointers(argv_text);
    std::vector<char*> envp = pointers(env_text);
    if (posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), envp.data()) != 0) pid_ = -1;
    posix_spawn_file_actions_destroy(&actions);
    close(fds[1]);
    fd_ = fds[0];
  }
  ~BackgroundRun() {
    if (pid_ > 0 && !reaped_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (fd_ >= 0) close(fd_);
  }
  BackgroundRun(const BackgroundRun&) = delete;
  BackgroundRun& operator=(const BackgroundRun&) = delete;

  pid_t pid() const { return pid_; }
  const std::string& output() const { return output_; }

  /// Reads until `text` appeared (true) or the output ended (false).
  bool read_until(const std::string& text) {
    char buffer[4096];
    while (output_.find(text) == std::string::npos) {
      const ssize_t n = read(fd_, buffer, sizeof buffer);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return false;
      output_.append(buffer, static_cast<size_t>(n));
    }
    return true;
  }

  /// Reads the rest of the output; the status as waitpid reports it.
  int wait() {
    read_until(std::string(1, '\0'));
    int status = 0;
    waitpid(pid_, &status, 0);
    reaped_ = true;
    return status;
  }

 private:
  static std::vector<char*> pointers(std::vector<std::string>& texts) {
    std::vector<char*> out;
    for (auto& text : texts) out.push_back(text.data());
    out.push_back(nullptr);
    return out;
  }

  pid_t pid_ = -1;
  int fd_ = -1;
  bool reaped_ = false;
  std::string output_;
};

// The child of `parent` whose environment holds RANK=`rank` (a rank process
// of the runner's launcher), or -1.
pid_t rank_process(pid_t parent, int rank) {
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const std::string name = entry.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    const std::string stat = read_file("/proc/" + name + "/stat");
    const size_t paren = stat.rfind(')');
    if (paren == std::string::npos) continue;
    std::istringstream fields(stat.substr(paren + 2));
    char state = 0;
    pid_t ppid = 0;
    fields >> state >> ppid;
    if (ppid != parent) continue;
    std::string environment = read_file("/proc/" + name + "/environ");
    std::replace(environment.begin(), environment.end(), '\0', '\n');
    if (("\n" + environment).find("\nRANK=" + std::to_string(rank) + "\n") != std::string::npos) {
      return static_cast<pid_t>(std::stol(name));
    }
  }
  return -1;
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
  // A rank's model state: its padded shard (ceil(dim0 / 2) rows) of every
  // param, and a grad of the same size, from the unsharded model's shapes.
  auto plain = scenarios::make_scenario(options.scenario, 0);
  int64_t model_bytes = 0;
  for (const auto& param : plain->module()->parameters()) {
    const int64_t rows = (param.size(0) + 1) / 2;
    model_bytes += 2 * rows * (param.numel() / param.size(0)) * static_cast<int64_t>(param.element_size());
  }
  EXPECT_THAT(out.str(), HasSubstr("memory: peak RSS "));
  EXPECT_THAT(out.str(), HasSubstr("sharded params + grads " + human_bytes(static_cast<double>(model_bytes)) + ","));
  EXPECT_THAT(out.str(), HasSubstr("thread stack reserved 4.0 MiB"));
  std::ifstream jsonl(options.trace_path + ".jsonl");
  auto events = observe::read_jsonl(jsonl);
  EXPECT_FALSE(events.empty());
  std::ifstream chrome(options.trace_path);
  EXPECT_TRUE(chrome.good());
}

// A step longer than --heartbeat prints where each rank is while it runs:
// both ranks sleep 300 ms before their first optimiser step.
TEST(Runner, LongStepPrintsHeartbeatLinesSayingWhereEachRankIs) {
  RunOptions options = parse_run_options(
      {"--world-size", "2", "--steps", "2", "--heartbeat", "0.05", "--delay-before-step", "300", "--no-trace"});
  std::ostringstream out, err;
  ASSERT_EQ(run_scenario(options, out, err), 0) << err.str();
  EXPECT_THAT(out.str(),
              HasSubstr(" s, step 1/2 of rank 0 running; where each rank is: ranks {0-1}: running, last issued "));
  EXPECT_THAT(out.str(), HasSubstr(" s, step 2/2 of rank 0 running; where each rank is: "));
  // --heartbeat 0: none.
  options.heartbeat_s = 0;
  std::ostringstream quiet;
  ASSERT_EQ(run_scenario(options, quiet, err), 0) << err.str();
  EXPECT_THAT(quiet.str(), Not(HasSubstr("where each rank is")));
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

// The runner streams the JSONL trace: replay check reads it as clean, and
// the summary shows the peak of records held, far below the records written.
TEST(Runner, StreamedTraceOfAFiberRunChecksCleanWithFewRecordsInMemory) {
  RunOptions options = parse_run_options({"--ranks", "fibers", "--simulated-time", "--world-size", "5", "--steps", "2",
                                          "--trace", temp_trace("streamed")});
  std::ostringstream out, err;
  ASSERT_EQ(run_scenario(options, out, err), 0) << err.str();
  const tools::ReplayTrace trace = tools::load_replay_trace(options.trace_path + ".jsonl");
  const tools::CheckReport report = tools::check_trace(trace);
  EXPECT_TRUE(report.clean()) << report.text();
  // mlp_stack: 3 units + root, (B+1) + B all-gathers and B+1 reduce-scatters per step, 5 ranks.
  EXPECT_EQ(trace.collectives.size(), size_t{5 * 2 * 11});
  std::smatch peak;
  const std::string text = out.str();
  ASSERT_TRUE(std::regex_search(text, peak, std::regex("trace records in memory: peak ([0-9]+)"))) << text;
  EXPECT_LT(std::stoul(peak[1].str()) * 4, trace.collectives.size() + trace.engine_events) << text;
  const auto chrome = nlohmann::json::parse(read_file(options.trace_path));
  EXPECT_GT(chrome.at("traceEvents").size(), trace.collectives.size());
}

// The predicted step-time lines of a run's output (one per step).
std::vector<std::string> predicted_steps(const std::string& output) {
  std::vector<std::string> lines;
  const std::regex step(R"(predicted [0-9.]+ ms, exposed comm [0-9.]+%)");
  for (auto it = std::sregex_iterator(output.begin(), output.end(), step); it != std::sregex_iterator(); ++it) {
    lines.push_back(it->str());
  }
  return lines;
}

// fsdpsim run --record-op-costs on a data run, then --op-costs on a data run
// and on a --data-free run: the same predicted step times, to the printed
// digit; the data-free run reads no loss and leaves no trace with --no-trace.
TEST(Runner, DataFreeRunPredictsTheDataRunsStepTimesFromRecordedOpCosts) {
  const std::string costs = temp_trace("op-costs");
  const std::vector<std::string> common = {
      "--ranks", "fibers", "--simulated-time", "--world-size", "3", "--steps", "2", "--mlp-dim", "24"};
  auto run = [&](std::vector<std::string> extra) {
    std::vector<std::string> args = common;
    args.insert(args.end(), extra.begin(), extra.end());
    std::ostringstream out, err;
    EXPECT_EQ(run_scenario(parse_run_options(args), out, err), 0) << err.str();
    return out.str();
  };
  const std::string recorded = run({"--record-op-costs", costs, "--trace", temp_trace("record")});
  EXPECT_THAT(recorded, HasSubstr("ops (name and input shapes) recorded to " + costs));
  const std::string data = run({"--op-costs", costs, "--trace", temp_trace("data")});
  const std::string data_free = run({"--op-costs", costs, "--data-free", "--no-trace"});
  EXPECT_EQ(predicted_steps(data).size(), 2u) << data;
  EXPECT_EQ(predicted_steps(data_free), predicted_steps(data)) << data_free;
  EXPECT_THAT(data_free, HasSubstr("loss(rank 0) n/a (data-free)"));
  EXPECT_THAT(data_free, HasSubstr(" 0 by name only"));
  EXPECT_THAT(data_free, HasSubstr(" 0 unknown"));
  EXPECT_THAT(data_free, ::testing::Not(HasSubstr("trace:")));
  std::filesystem::remove(costs);
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

TEST(Runner, AllocationFailureIsOneErrorLineNotATerminate) {
  // 3 GB of address space: LibTorch loads, the model of --mlp-dim 65536 cannot.
  const CliRun run = run_cli("run --mlp-dim 65536 --steps 1 --trace " + temp_trace("alloc"), "ulimit -v 3000000; ");
  ASSERT_TRUE(WIFEXITED(run.status)) << "ended by signal " << WTERMSIG(run.status) << "\n" << run.output;
  EXPECT_EQ(WEXITSTATUS(run.status), 1) << run.output;
  EXPECT_THAT(run.output, ::testing::Not(HasSubstr("terminate called")));
  EXPECT_THAT(last_line(run.output), ::testing::StartsWith("fsdpsim: error: the run failed on ranks {0-3}; rank 0: "));
  EXPECT_THAT(last_line(run.output), HasSubstr("can't allocate memory"));
}

// A failure at many ranks is a screenful: ranks grouped by what went wrong,
// the head of the flight recorder; each rank's error in <trace>.failure.txt.
TEST(Runner, FailureAtManyRanksIsAScreenfulWithTheFullDumpInAFile) {
  const std::string trace = temp_trace("many_fail");
  // Rank 3 sleeps 2 s before its first collective; the others time out after 1 s.
  const CliRun run =
      run_cli("run --ranks fibers --world-size 64 --steps 1 --timeout 1 --straggler 3:2000 --trace " + trace);
  ASSERT_TRUE(WIFEXITED(run.status)) << run.output;
  EXPECT_EQ(WEXITSTATUS(run.status), 1) << run.output;
  const auto lines = std::count(run.output.begin(), run.output.end(), '\n');
  EXPECT_LT(lines, 60) << run.output;
  EXPECT_THAT(run.output,
              HasSubstr("ranks {0-2,4-63} (63 ranks), e.g. rank 0: group world seq 1 all_gather: timed out"));
  EXPECT_THAT(run.output, HasSubstr("more lines"));
  EXPECT_THAT(run.output, HasSubstr(trace + ".failure.txt"));
  const std::string dump = read_file(trace + ".failure.txt");
  for (int rank : {0, 3, 63}) {
    EXPECT_THAT(dump, HasSubstr("\nrank " + std::to_string(rank) + " (1 recorded):")) << rank;
    EXPECT_THAT(dump, HasSubstr("rank " + std::to_string(rank) + ": group world seq 1")) << rank;
  }
}

// The mean losses of the summary line, as printed.
std::vector<std::string> summary_losses(const std::string& out) {
  const std::string marker = "loss per step (mean over ranks):";
  const size_t at = out.find(marker);
  std::istringstream line(out.substr(at + marker.size(), out.find('\n', at) - at - marker.size()));
  std::vector<std::string> losses;
  for (std::string loss; line >> loss;) losses.push_back(loss);
  return losses;
}

// --save after 3 steps, --resume for 3 more: the losses of steps 4-6 are
// those of one 6-step run (bitwise parity of the params is
// tests/state_dict_test.cpp's DcpResume); another world size resumes too.
TEST(Runner, SaveThenResumeGoesOnWhereTheRunStopped) {
  const std::string dir = temp_trace("ckpt") + ".d";
  std::filesystem::remove_all(dir);
  auto run = [&](std::vector<std::string> args) {
    args.insert(args.end(), {"--optimizer", "adam", "--trace", temp_trace("ckpt_run")});
    std::ostringstream out, err;
    EXPECT_EQ(run_scenario(parse_run_options(args), out, err), 0) << err.str();
    return out.str();
  };
  const std::string straight = run({"--world-size", "3", "--steps", "6"});
  const std::string first = run({"--world-size", "3", "--steps", "3", "--save", dir});
  EXPECT_THAT(first, HasSubstr("checkpoint saved to " + dir + " at step 3"));
  const std::string resumed = run({"--world-size", "3", "--steps", "3", "--resume", dir});
  EXPECT_THAT(resumed, HasSubstr("resumed from " + dir + " at step 3"));
  const auto all = summary_losses(straight);
  ASSERT_EQ(all.size(), 6u) << straight;
  EXPECT_EQ(summary_losses(resumed), std::vector<std::string>(all.begin() + 3, all.end())) << resumed;
  const std::string elsewhere = run({"--world-size", "2", "--ranks", "fibers", "--steps", "1", "--resume", dir});
  EXPECT_THAT(elsewhere, HasSubstr("resumed from " + dir + " at step 3"));
  std::filesystem::remove_all(dir);
  EXPECT_THAT(
      [] {
        parse_run_options({"--resume", "/x", "--check-parity"}).validate();
      },
      ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("--resume")));
}

TEST(Runner, UnwritableTraceIsAUsageErrorBeforeTheRun) {
  for (const std::string path : {"/proc/fsdpsim-x.json", "/nonexistent-fsdpsim-dir/x.json"}) {
    const CliRun run = run_cli("run --steps 1 --trace " + path);
    ASSERT_TRUE(WIFEXITED(run.status)) << run.output;
    EXPECT_EQ(WEXITSTATUS(run.status), 2) << run.output;
    EXPECT_EQ(run.output, "fsdpsim: error: --trace: cannot write '" + path +
                              "': No such file or directory (see 'fsdpsim run --help')\n");
  }
}

// What a seeded simulated fiber run prints and writes, minus real time.
struct SimulatedRun {
  std::string predictions;  // every "predicted ..." figure
  std::string chrome;
  std::string jsonl;
};

SimulatedRun run_simulated(const std::string& compute_time, const std::string& name) {
  RunOptions options = parse_run_options({"--ranks", "fibers", "--world-size", "4", "--steps", "3", "--simulated-time",
                                          "--cost-model", "ib-ndr400", "--compute-time", compute_time, "--schedule",
                                          "seeded-random", "--seed", "7", "--trace", temp_trace(name)});
  std::ostringstream out, err;
  EXPECT_EQ(run_scenario(options, out, err), 0) << err.str();
  SimulatedRun run;
  const std::regex predicted("predicted[^\n]*? ([0-9.]+) ms");
  const std::string text = out.str();
  for (auto it = std::sregex_iterator(text.begin(), text.end(), predicted); it != std::sregex_iterator(); ++it) {
    run.predictions += (*it)[1].str() + " ";
  }
  run.chrome = read_file(options.trace_path);
  run.jsonl = read_file(options.trace_path + ".jsonl");
  return run;
}

TEST(Runner, SeededSimulatedRunsWithoutMeasuredComputeAreBitwiseReproducible) {
  for (const std::string compute : {"zero", "fixed:250"}) {
    SCOPED_TRACE(compute);
    const SimulatedRun first = run_simulated(compute, "repro-a");
    const SimulatedRun second = run_simulated(compute, "repro-b");
    // 3 progress lines + the summary's median.
    EXPECT_EQ(std::count(first.predictions.begin(), first.predictions.end(), ' '), 4) << first.predictions;
    EXPECT_EQ(first.predictions, second.predictions);
    EXPECT_FALSE(first.jsonl.empty());
    EXPECT_TRUE(first.chrome == second.chrome) << "Chrome traces differ";
    EXPECT_TRUE(first.jsonl == second.jsonl) << "JSONL traces differ";
  }
  // A fixed compute cost is charged: the step takes longer than with none.
  EXPECT_NE(run_simulated("zero", "repro-c").predictions, run_simulated("fixed:250", "repro-d").predictions);
}

TEST(Runner, StoppedProcessRankIsNamedWithTheTimeoutThatFired) {
  // 8 s: short next to the default 60 s, long enough for the ranks' start-up
  // skew on a loaded machine (the timeout covers the first collective too).
  BackgroundRun run({"run", "--backend", "gloo", "--ranks", "processes", "--world-size", "3", "--timeout", "8",
                     "--steps", "1000000", "--trace", temp_trace("stopped")});
  ASSERT_TRUE(run.read_until("[rank 0]   step 2/")) << run.output();
  const pid_t rank1 = rank_process(run.pid(), 1);
  ASSERT_GT(rank1, 0) << "no rank 1 process under the runner";
  ASSERT_EQ(kill(rank1, SIGSTOP), 0);
  const int status = run.wait();
  const std::string& output = run.output();
  ASSERT_TRUE(WIFEXITED(status)) << output;
  EXPECT_EQ(WEXITSTATUS(status), 1) << output;
  const std::string summary = last_line(output);
  EXPECT_THAT(summary, ::testing::StartsWith("fsdpsim: error: rank processes failed; rank 1 stopped making progress "
                                             "(process stopped, state T; killed by the launcher); rank "));
  EXPECT_THAT(summary, HasSubstr("; the collective timeout (8.0 s, --timeout) fired on rank")) << output;
  EXPECT_THAT(output, HasSubstr("rank 1: killed by signal 9 (Killed), sent by the launcher; its process was stopped "
                                "(state T)  <- stopped making progress"));
}

TEST(Runner, InterruptedProcessRunStopsItsRanksAndRemovesItsTemporaryFiles) {
  const std::filesystem::path tmp =
      std::filesystem::temp_directory_path() / ("fsdpsim-runner-tmp-" + std::to_string(getpid()));
  std::filesystem::remove_all(tmp);
  std::filesystem::create_directories(tmp);
  {
    BackgroundRun run({"run", "--backend", "gloo", "--ranks", "processes", "--world-size", "2", "--steps", "1000000",
                       "--trace", temp_trace("interrupted")},
                      {{"TMPDIR", tmp.string()}});
    ASSERT_TRUE(run.read_until("[rank 0]   step 1/")) << run.output();
    ASSERT_EQ(std::distance(std::filesystem::directory_iterator(tmp), {}), 1) << "the run's directory is not in TMPDIR";
    ASSERT_EQ(kill(run.pid(), SIGTERM), 0);
    const int status = run.wait();
    ASSERT_TRUE(WIFSIGNALED(status)) << run.output();
    EXPECT_EQ(WTERMSIG(status), SIGTERM);
    EXPECT_EQ(last_line(run.output()), "fsdpsim: error: interrupted by signal 15; the rank processes were stopped");
  }
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(tmp), {}), 0) << "a temporary file was left behind";
  std::filesystem::remove_all(tmp);
}

TEST(Runner, BadOptionsAreOneLineErrors) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--strategy", "hybrid_shard", "--mesh", "2x4", "--world-size", "6"},
       "--mesh 2x4 has 8 ranks but --world-size is 6"},
      {{"--strategy", "hybrid_shard", "--world-size", "6", "--mesh", "2x4"},
       "--mesh 2x4 has 8 ranks but --world-size is 6"},
      {{"--world-size", "+4"}, "--world-size needs an integer, got '+4'"},
      {{"--world-size", "0x10"}, "--world-size needs an integer, got '0x10'"},
      {{"--delay-reduce-scatter", "0x10"}, "--delay-reduce-scatter needs milliseconds in [0, 3600000], got '0x10'"},
      {{"--delay-reduce-scatter", "+1"}, "--delay-reduce-scatter needs milliseconds"},
      {{"--delay-all-gather", "inf"}, "--delay-all-gather needs milliseconds"},
      {{"--cost-model", "nope"}, "--cost-model needs --simulated-time"},
      {{"--compute-time", "zero"}, "--compute-time needs --simulated-time"},
      {{"--ranks", "fibers", "--simulated-time", "--compute-time", "sometimes"}, "--compute-time must be one of"},
      {{"--ranks", "fibers", "--simulated-time", "--compute-time", "fixed:-1"}, "--compute-time fixed:US needs"},
      {{"--schedule", "seeded-random"}, "--schedule needs --ranks fibers"},
      {{"--delay-rank", "1"}, "--delay-rank needs a delay it restricts"},
      {{"--timeout", "0"}, "--timeout needs seconds in [0.001, 86400], got '0'"},
      {{"--heartbeat", "-1"}, "--heartbeat needs seconds in [0, 86400], got '-1'"},
      {{"--world-size", "0"}, "--world-size must be in [1, 1048576], got 0"},
      {{"--scenario", "nope"}, "unknown scenario 'nope'"},
      {{"--ranks", "processes"}, "--ranks processes needs --backend gloo"},
      {{"--strategy", "hybrid_shard"}, "hybrid_shard needs --mesh RxS"},
      {{"--mesh", "3x2", "--world-size", "4"}, "--mesh 3x2 has 6 ranks but --world-size is 4"},
      {{"--ranks", "fibers", "--backend", "gloo"}, "not fibers"},
      {{"--simulated-time"}, "simulated_time needs fiber ranks"},
      {{"--ranks", "fibers", "--simulated-time", "--cost-model", "warp-drive"}, "warp-drive"},
      {{"--straggler", "9:5"}, "outside the world"},
      {{"--delay-after-loss", "-3"}, "--delay-after-loss needs milliseconds"},
      {{"--steps"}, "--steps needs a value"},
      {{"--bogus"}, "unknown option '--bogus'"},
      {{"--data-free"}, "--data-free predicts the step time on the simulated clock: it needs --ranks fibers"},
      {{"--data-free", "--ranks", "fibers"}, "it needs --ranks fibers --simulated-time"},
      {{"--data-free", "--ranks", "fibers", "--simulated-time"}, "measured compute would predict nothing"},
      {{"--data-free", "--ranks", "fibers", "--simulated-time", "--compute-time", "zero", "--check-parity"},
       "--data-free has no values to compare"},
      {{"--data-free", "--ranks", "fibers", "--simulated-time", "--record-op-costs", "x.json"},
       "drop --data-free to record"},
      {{"--ranks", "fibers", "--simulated-time", "--compute-time", "zero", "--record-op-costs", "x.json"},
       "--record-op-costs measures compute on the simulated clock"},
      {{"--op-costs", "x.json"}, "--op-costs needs --simulated-time"},
      {{"--ranks", "fibers", "--simulated-time", "--op-costs", "/nonexistent/costs.json"},
       "--op-costs: cannot read the op cost table '/nonexistent/costs.json'"},
      {{"--ranks", "fibers", "--simulated-time", "--op-costs", "x.json", "--compute-time", "zero"},
       "--op-costs sets what compute costs: not with --compute-time"},
      {{"--world-size", "9000"}, "thread ranks are limited to 8192"},
      {{"--ranks", "fibers", "--world-size", "70000", "--fiber-stacks", "pooled"},
       "over the trace's 65536 ranks: add --no-trace"},
      {{"--ranks", "fibers", "--world-size", "40000"}, "add --fiber-stacks pooled"},
      {{"--fiber-stacks", "pooled"}, "--fiber-stacks needs --ranks fibers"},
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
