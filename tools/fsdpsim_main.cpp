// fsdpsim: runs a named scenario with the FSDP engine on a simulated or real
// world and prints a progress line per step and a summary.
//
//   fsdpsim run [options]     (fsdpsim run --help)
//   fsdpsim list              scenarios

#include <ATen/Parallel.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "scenarios/models.h"
#include "tools/format_util.h"
#include "tools/runner.h"

namespace {

constexpr const char* kUsage =
    "usage: fsdpsim run [options] | fsdpsim list | fsdpsim --help\n";

// Usage errors: one line, exit 2.
int usage_error(const std::string& message) {
  std::cerr << "fsdpsim: error: " << message << " (see 'fsdpsim run --help')" << std::endl;
  return 2;
}

// Dies of `signal` as if it had not been caught (the temporary files are gone).
[[noreturn]] void reraise(int signal) {
  std::signal(signal, SIG_DFL);
  std::raise(signal);
  std::_Exit(128 + signal);
}

int run_command(std::vector<std::string> args) {
  if (args.empty()) {
    std::cerr << kUsage;
    return 2;
  }
  if (args[0] == "--help" || args[0] == "-h") {
    std::cout << kUsage << fsdpsim::tools::run_usage();
    return 0;
  }
  if (args[0] == "list") {
    for (const auto& name : fsdpsim::scenarios::scenario_names()) std::cout << name << "\n";
    return 0;
  }
  at::set_num_threads(1);  // ranks already fill the cores
  const bool worker = args[0] == "run-worker";
  if (args[0] != "run" && !worker) return usage_error("unknown command '" + args[0] + "'");
  std::vector<std::string> run_args(args.begin() + 1, args.end());
  if (std::find(run_args.begin(), run_args.end(), "--help") != run_args.end()) {
    std::cout << fsdpsim::tools::run_usage();
    return 0;
  }
  std::string stats_path;
  if (worker) {  // a Gloo process rank started by `fsdpsim run --ranks processes`
    auto stats = std::find(run_args.begin(), run_args.end(), "--stats");
    if (stats == run_args.end() || stats + 1 == run_args.end()) return usage_error("run-worker needs --stats PATH");
    stats_path = *(stats + 1);
    run_args.erase(stats, stats + 2);
  }
  fsdpsim::tools::RunOptions options;
  try {
    options = fsdpsim::tools::parse_run_options(run_args);
    if (!worker) fsdpsim::tools::check_trace_writable(options.trace_path);
  } catch (const std::invalid_argument& e) {
    return usage_error(e.what());
  }
  if (worker) return fsdpsim::tools::run_process_worker(options, stats_path, std::cerr);
  try {
    return fsdpsim::tools::run_scenario(options, std::cout, std::cerr);
  } catch (const fsdpsim::tools::RunInterruptedError& e) {
    std::cerr << "fsdpsim: error: " << e.what() << std::endl;
    reraise(e.signal());
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  return fsdpsim::tools::guarded_main("fsdpsim", [&] { return run_command(args); });
}
