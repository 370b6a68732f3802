// `fsdpsim launch`: runs a command as N ranks of one world on this host (see
// tools/process_launcher.h). Exit code 0 iff every rank exited 0, 1 if some
// rank failed, 2 for bad usage or a launcher that cannot start.

#include <CLI/CLI.hpp>
#include <iostream>
#include <memory>

#include "tools/cli.h"
#include "tools/format_util.h"
#include "tools/process_launcher.h"

namespace fsdpsim::tools {

namespace {

int launch_action(const LaunchOptions& options, const CLI::App& app, Command& command) {
  if (app.count("--nproc") == 0) throw UsageError("--nproc is required");
  if (options.command.empty()) throw UsageError("no command given after --");
  try {
    const LaunchResult result = launch_processes(options);
    command.out << std::flush;
    command.err << result.report() << std::flush;
    return result.ok() ? 0 : 1;
  } catch (const std::exception& e) {
    command.err << "fsdpsim: error: " << first_line(e.what()) << std::endl;
    return 2;
  }
}

}  // namespace

void add_launch_command(CLI::App& root, Command& command) {
  CLI::App* launch = root.add_subcommand(
      "launch",
      "run a command as N ranks of one world on this host (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, "
      "LOCAL_RANK set as PyTorch's launchers do)");
  launch->footer("usage: fsdpsim launch --nproc N [OPTIONS] -- command [args...]");
  auto options = std::make_shared<LaunchOptions>();
  options->output = &command.out;
  constexpr int64_t kWeek = 7 * 24 * 3600;
  add_value(*launch, "--nproc", "N", "number of ranks (1 to 4096; required)", [options](const std::string& v) {
    options->nproc = static_cast<int>(parse_integer<UsageError>("--nproc", v, 1, 4096));
  });
  add_value(*launch, "--master-addr", "A", "MASTER_ADDR given to the ranks (default 127.0.0.1)",
            [options](const std::string& v) {
              if (v.empty()) throw UsageError("--master-addr must not be empty");
              options->master_addr = v;
            });
  add_value(*launch, "--master-port", "P", "MASTER_PORT (default 0: pick a free port)",
            [options](const std::string& v) {
              options->master_port = static_cast<int>(parse_integer<UsageError>("--master-port", v, 0, 65535));
            });
  add_value(*launch, "--timeout-s", "S", "after a rank fails, seconds the others get before SIGTERM (default 60)",
            [options](const std::string& v) {
              options->timeout = std::chrono::seconds(parse_integer<UsageError>("--timeout-s", v, 0, kWeek));
            });
  add_value(*launch, "--deadline-s", "S", "limit on the whole launch in seconds (default 3600)",
            [options](const std::string& v) {
              options->deadline = std::chrono::seconds(parse_integer<UsageError>("--deadline-s", v, 1, kWeek));
            });
  launch->add_flag_callback(
      "--no-prefix", [options] { options->prefix_output = false; },
      "forward output lines without the \"[rank r] \" prefix");
  launch->add_option("command", options->command, "the program and its arguments, after --")->type_name("");
  launch->callback([launch, options, &command] {
    command.action = [launch, options, &command] { return launch_action(*options, *launch, command); };
  });
}

}  // namespace fsdpsim::tools
