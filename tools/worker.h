#pragma once
// The one protocol by which fsdpsim (and the test binary) re-executes itself
// as worker processes, one per rank, under launch_processes():
//
//   in:   argv = worker_command() = {self_exe(), "--fsdpsim-worker"}, and the
//         environment variable FSDPSIM_WORKER_JOB holding the job, one JSON
//         object {"kind": NAME, "result_dir": DIR, ...the kind's fields}
//         (inputs too large for the environment travel as files named in
//         it), plus the launcher's RANK / WORLD_SIZE / MASTER_ADDR / ...;
//   out:  the exit code (0 = success) and, for workers that report one, a
//         JSON object in DIR/rank-<RANK>.json (written whole, then renamed
//         into place, so a reader never sees half of it);
//   text: stdout and stderr are for people (the launcher prefixes and
//         forwards them); nothing parses them.
//
// A worker kind is a function registered under its name: the tools register
// theirs in register_tool_workers() (tools/cli.h), the tests theirs with
// FSDPSIM_REGISTER_WORKER (tests/worker_registry.h); both binaries' main()
// starts with run_worker_if_requested().
//
// Thread-safety: register_worker() runs during static initialisation or from
// main() before any other thread starts; the rest is reentrant.

#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "tools/process_launcher.h"

namespace fsdpsim::tools {

inline constexpr const char* kWorkerFlag = "--fsdpsim-worker";
inline constexpr const char* kWorkerJobEnv = "FSDPSIM_WORKER_JOB";

/// This executable's path (/proc/self/exe); throws std::runtime_error.
std::string self_exe();

/// The command that runs a worker of this binary: {self_exe(), kWorkerFlag}.
std::vector<std::string> worker_command();

/// What a worker gets: its job and where its result goes.
class WorkerContext {
 public:
  WorkerContext(nlohmann::json job, int rank) : job_(std::move(job)), rank_(rank) {}
  const nlohmann::json& job() const { return job_; }
  /// RANK from the launcher (0 when unset).
  int rank() const { return rank_; }
  /// Writes this rank's result file; throws std::runtime_error when the job
  /// has no result_dir or the file cannot be written.
  void write_result(const nlohmann::json& result) const;

 private:
  nlohmann::json job_;
  int rank_;
};

/// Returns the process's exit code.
using WorkerFn = std::function<int(const WorkerContext&)>;

/// Registers `kind`; a second registration of one kind aborts (a build error).
void register_worker(const std::string& kind, WorkerFn worker);

/// With argv[1] == kWorkerFlag: runs the job's worker and returns its exit
/// code (2 with one line on stderr for a missing or unreadable job or an
/// unknown kind, 1 when the worker throws). Otherwise nullopt.
std::optional<int> run_worker_if_requested(int argc, char** argv);

/// Makes `options` start workers of `job`: sets the job variable, and the
/// command to worker_command() unless one is given (a test binary's).
void set_worker_job(LaunchOptions& options, const nlohmann::json& job);

struct WorkerRun {
  LaunchResult launched;
  /// By rank: the rank's result, or nullopt if it wrote none.
  std::vector<std::optional<nlohmann::json>> results;
};

/// Runs options.nproc workers of `job` (job["kind"] names the worker) with a
/// fresh result directory under TMPDIR, collects their results and removes
/// the directory, whichever way the launch ends.
WorkerRun launch_workers(nlohmann::json job, LaunchOptions options);

}  // namespace fsdpsim::tools
