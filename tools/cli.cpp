#include "tools/cli.h"

#include <ATen/Parallel.h>

#include <CLI/CLI.hpp>
#include <iostream>
#include <regex>

#include "tools/format_util.h"
#include "tools/replay_lib.h"
#include "tools/runner.h"
#include "tools/worker.h"

namespace fsdpsim::tools {

namespace {

// CLI11's "--steps: 1 required N missing" in our words.
std::string usage_message(const CLI::ParseError& error) {
  static const std::regex missing("^(\\S+): [0-9]+ required \\S* ?missing$");
  std::smatch match;
  const std::string text = first_line(error.what());
  if (std::regex_match(text, match, missing)) return match[1].str() + " needs a value";
  return text;
}

// "fsdpsim replay run": the deepest subcommand the line selected.
std::string command_path(const CLI::App& root) {
  std::string path = "fsdpsim";
  const CLI::App* app = &root;
  while (!app->get_subcommands().empty()) {
    app = app->get_subcommands().front();
    path += " " + app->get_name();
  }
  return path;
}

// Unknown arguments stay with the subcommand they follow (instead of ending
// its parse), so the error names the first of them, whatever follows.
void allow_extras_everywhere(CLI::App& app) {
  app.allow_extras();
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) allow_extras_everywhere(*sub);
}

void check_no_extras(const CLI::App& app) {
  for (const std::string& extra : app.remaining(true)) {
    if (extra == "--") continue;  // CLI11 keeps the positional mark among the extras
    if (extra.rfind("-", 0) == 0 && extra.size() > 1) throw UsageError("unknown option '" + extra + "'");
    throw UsageError("unexpected argument '" + extra + "'");
  }
}

}  // namespace

void parse_args(CLI::App& app, const std::vector<std::string>& args) {
  std::vector<std::string> reversed(args.rbegin(), args.rend());  // CLI11 takes them last first
  allow_extras_everywhere(app);
  try {
    app.parse(reversed);
  } catch (const CLI::CallForHelp&) {
    throw;
  } catch (const CLI::CallForAllHelp&) {
    throw;
  } catch (const CLI::ParseError& e) {
    throw UsageError(usage_message(e));
  }
  check_no_extras(app);
}

void add_value(CLI::App& app, const std::string& name, const std::string& type, const std::string& help,
               std::function<void(const std::string&)> parse) {
  app.add_option_function<std::string>(name, parse, help)
      ->type_name(type)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
}

int run_command_line(CLI::App& root, Command& command) {
  try {
    parse_args(root, command.args);
    if (!command.action) {
      command.err << root.help();
      return 2;
    }
    return command.action();  // validates first: its UsageErrors are usage errors too
  } catch (const CLI::CallForHelp&) {
    command.out << root.help();
    return 0;
  } catch (const CLI::CallForAllHelp&) {
    command.out << root.help("", CLI::AppFormatMode::All);
    return 0;
  } catch (const UsageError& e) {
    command.err << "fsdpsim: error: " << first_line(e.what()) << " (see '" << command_path(root) << " --help')"
                << std::endl;
    return 2;
  }
}

void register_tool_workers() {
  static const bool registered = [] {
    register_worker(kRunWorker, run_process_worker);
    register_worker(kReplayWorker, replay_worker_main);
    register_worker("bench-comm", bench_comm_worker);
    register_worker("bench-scale", bench_scale_worker);
    return true;
  }();
  (void)registered;
}

int fsdpsim_main(int argc, char** argv) {
  register_tool_workers();
  if (auto code = run_worker_if_requested(argc, argv)) return *code;
  return guarded_main("fsdpsim", [&] {
    at::set_num_threads(1);  // ranks and worker processes already fill the cores
    Command command{std::vector<std::string>(argv + 1, argv + argc), std::cout, std::cerr, {}};
    CLI::App root("fsdpsim: an FSDP engine on LibTorch, simulated and real process groups", "fsdpsim");
    root.require_subcommand(0, 1);
    add_run_commands(root, command);
    add_replay_command(root, command, worker_command());
    add_launch_command(root, command);
    CLI::App* bench = root.add_subcommand("bench", "benchmarks: bench comm, bench engine");
    bench->require_subcommand(1);
    add_bench_comm_command(*bench, command);
    add_bench_engine_command(*bench, command);
    return run_command_line(root, command);
  });
}

}  // namespace fsdpsim::tools
