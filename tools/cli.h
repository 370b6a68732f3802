#pragma once
// The fsdpsim command line: one binary with the subcommands
//   run, list, replay check|run|predict, launch, bench comm|engine
// parsed with CLI11 (`fsdpsim --help`, `fsdpsim <command> --help`).
//
// Every failure ends with one line "fsdpsim: error: ..." on stderr. Usage
// errors name the option, point at the command's --help and exit 2; runtime
// errors exit 1 (replay: 2 for a trace it cannot read or replay; launch: 2
// when the launcher itself cannot start). Each file that owns a subcommand
// adds it with its add_*_command(); parsing stores what the command runs as
// the Command's action, which runs after the whole line parsed. Runtime code
// never throws UsageError.
//
// Thread-safety: single-threaded (main and the tests' thread).

#include <functional>
#include <iosfwd>
#include <stdexcept>
#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace fsdpsim::tools {

/// A bad command line: one line naming the option (exit code 2).
class UsageError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// What the subcommands share while one command line is parsed and run.
struct Command {
  /// The arguments after the program name.
  std::vector<std::string> args;
  std::ostream& out;
  std::ostream& err;
  /// Set by the parsed subcommand's callback (which throws nothing); runs
  /// after the parse, checks what needs the whole line first (throwing
  /// UsageError, exit 2), then runs the command and returns its exit code.
  std::function<int()> action;
};

/// fsdpsim's main(): a worker (tools/worker.h) or the command line.
int fsdpsim_main(int argc, char** argv);

/// Parses and runs `command.args` on `root` (whose subcommands the add_*
/// functions made); returns the exit code.
int run_command_line(CLI::App& root, Command& command);

/// Parses `args` (without the program name) into `app`; a bad line, or an
/// argument no option takes, throws UsageError with one line. Help requests
/// propagate as CLI11's CallForHelp.
void parse_args(CLI::App& app, const std::vector<std::string>& args);

/// Adds option `name` taking one value, which `parse` stores (throwing
/// UsageError that names the option); the last of repeated ones wins.
void add_value(CLI::App& app, const std::string& name, const std::string& type, const std::string& help,
               std::function<void(const std::string&)> parse);

/// Registers the tools' worker kinds (run, replay, bench-comm, bench-scale).
void register_tool_workers();

void add_run_commands(CLI::App& root, Command& command);  // run, list (tools/run_cli.cpp)
void add_replay_command(CLI::App& root, Command& command,
                        const std::vector<std::string>& worker_command);  // tools/replay_cli.cpp
void add_launch_command(CLI::App& root, Command& command);                // tools/launch_cli.cpp
void add_bench_comm_command(CLI::App& bench, Command& command);           // tools/bench_comm.cpp
void add_bench_engine_command(CLI::App& bench, Command& command);         // tools/bench_engine.cpp

// Worker entry points (tools/worker.h) of the subcommands that re-execute
// this binary.
class WorkerContext;
int bench_comm_worker(const WorkerContext& context);
int bench_scale_worker(const WorkerContext& context);

}  // namespace fsdpsim::tools
