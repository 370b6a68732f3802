#pragma once
// Starts N copies of a command as the ranks of one multi-process world, the
// way torchrun does on one host: each child gets MASTER_ADDR, MASTER_PORT,
// RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE (see LaunchEnv in
// backends/gloo/gloo_process_group.h), its stdout and stderr are merged, streamed
// line by line with a "[rank r] " prefix, and the last lines are kept for the
// report.
//
// Failure contract: when a rank exits non-zero or dies of a signal, the others
// get `timeout` to end on their own (a peer's failure usually makes their
// collectives fail quickly), then SIGTERM, then SIGKILL 2 s later. A rank
// whose process is stopped (SIGSTOP, state T) once another failed cannot end
// on its own: it is the rank that stopped making progress, and it gets
// SIGKILL at once instead of the grace. A whole-launch `deadline`, or
// `stop_signal` becoming non-zero, applies the escalation to everybody, so
// launch_processes() always returns.
//
// Thread-safety: launch_processes() is reentrant apart from writing to
// options.output; it does not install signal handlers (a caller's handler
// may set *stop_signal). Children inherit the
// caller's environment plus the variables above and options.extra_env.

#include <chrono>
#include <csignal>
#include <iostream>
#include <map>
#include <string>
#include <vector>

namespace fsdpsim {

struct LaunchOptions {
  /// Number of ranks (>= 1).
  int nproc = 1;
  /// Program and arguments; the program is looked up in PATH.
  std::vector<std::string> command;
  std::string master_addr = "127.0.0.1";
  /// 0 picks a free port (bind port 0 on 127.0.0.1 and read it back).
  int master_port = 0;
  /// Grace the surviving ranks get after the first failure.
  std::chrono::milliseconds timeout{60000};
  /// Whole-launch limit, after which every rank still running is stopped.
  std::chrono::milliseconds deadline{std::chrono::hours(1)};
  /// Prefix each forwarded line with "[rank r] ".
  bool prefix_output = true;
  /// Where the children's lines go; nullptr drops them (the tails are kept).
  std::ostream* output = &std::cout;
  /// Extra variables for every child (they override inherited ones).
  std::map<std::string, std::string> extra_env;
  /// When set and non-zero (a signal number, set by the caller's signal
  /// handler), every rank is stopped and the launch returns.
  const volatile std::sig_atomic_t* stop_signal = nullptr;
};

struct ProcessOutcome {
  int rank = 0;
  /// Exit status as a shell reports it: the exit code, or 128 + signal when
  /// a signal ended the process, or 127 when it could not be started.
  int exit_code = 0;
  /// The signal that ended the process, 0 if it exited.
  int signal = 0;
  /// The launcher sent the signal that ended it (after another rank failed
  /// or the deadline passed).
  bool stopped_by_launcher = false;
  /// Its process was stopped (state T) when the launcher ended it.
  bool process_was_stopped = false;
  /// Its last lines of output (at most ~50), newline-separated.
  std::string output_tail;

  bool ok() const { return exit_code == 0 && signal == 0; }
};

struct LaunchResult {
  /// By rank.
  std::vector<ProcessOutcome> ranks;
  /// The rank whose failure was noticed first, -1 if none failed.
  int first_failed_rank = -1;
  bool deadline_exceeded = false;
  /// The grace after the first failure ran out with ranks still running.
  bool grace_expired = false;
  /// The grace the launch ran with (LaunchOptions::timeout).
  std::chrono::milliseconds grace{0};
  /// The stop_signal that ended the launch, 0 if none.
  int interrupted_by = 0;
  std::chrono::milliseconds elapsed{0};
  /// The master port the ranks were given.
  int master_port = 0;

  /// Every rank exited with code 0.
  bool ok() const;
  /// The ranks that stopped making progress: their process was stopped, or
  /// it was still running when the grace after a failure ran out.
  std::vector<int> stalled_ranks() const;
  /// One line per rank (exit code or signal, who failed first, who stopped
  /// making progress), then the last lines of output of the ranks that failed
  /// on their own.
  std::string report() const;
  /// The report's first line after "launch: FAILED after X s": "; rank 2
  /// stopped making progress (...); rank 0 failed first (...)", or "".
  std::string headline() const;
};

/// Runs the ranks to completion. Throws std::invalid_argument for bad options
/// and std::runtime_error if the launcher itself cannot work (no pipes, no
/// free port); a command that cannot be started is a failed rank (exit 127).
LaunchResult launch_processes(const LaunchOptions& options);

/// A port that was free on 127.0.0.1 a moment ago (bound to port 0 and read
/// back). Throws std::runtime_error.
int pick_free_port();

}  // namespace fsdpsim
