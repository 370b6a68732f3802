// fsdpsim_launch: runs a command as N ranks of one world on this host (see
// tools/process_launcher.h). Exit code 0 iff every rank exited 0, 1 if some
// rank failed, 2 for bad usage.

#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <stdexcept>
#include <string>

#include "tools/format_util.h"
#include "tools/process_launcher.h"

namespace {

const char* kUsage =
    "usage: fsdpsim_launch --nproc N [--master-addr A] [--master-port P] [--timeout-s S] [--deadline-s S]\n"
    "                      [--no-prefix] -- command [args...]\n"
    "  --nproc N        number of ranks (>= 1)\n"
    "  --master-addr A  MASTER_ADDR given to the ranks (default 127.0.0.1)\n"
    "  --master-port P  MASTER_PORT (default 0: pick a free port)\n"
    "  --timeout-s S    after a rank fails, seconds the others get before SIGTERM (default 60)\n"
    "  --deadline-s S   limit on the whole launch in seconds (default 3600)\n"
    "  --no-prefix      forward output lines without the \"[rank r] \" prefix\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

long parse_integer(const std::string& flag, const std::string& text, long min, long max) {
  return fsdpsim::tools::parse_integer<UsageError>(flag, text, min, max);
}

fsdpsim::LaunchOptions parse(int argc, char** argv) {
  fsdpsim::LaunchOptions options;
  bool have_nproc = false;
  int i = 1;
  auto value_of = [&](const std::string& flag) -> std::string {
    if (i + 1 >= argc) throw UsageError(flag + " needs a value");
    return argv[++i];
  };
  for (; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--") {
      ++i;
      break;
    }
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      std::exit(0);
    } else if (arg == "--nproc") {
      options.nproc = static_cast<int>(parse_integer(arg, value_of(arg), 1, 4096));
      have_nproc = true;
    } else if (arg == "--master-addr") {
      options.master_addr = value_of(arg);
      if (options.master_addr.empty()) throw UsageError("--master-addr must not be empty");
    } else if (arg == "--master-port") {
      options.master_port = static_cast<int>(parse_integer(arg, value_of(arg), 0, 65535));
    } else if (arg == "--timeout-s") {
      options.timeout = std::chrono::seconds(parse_integer(arg, value_of(arg), 0, 7 * 24 * 3600));
    } else if (arg == "--deadline-s") {
      options.deadline = std::chrono::seconds(parse_integer(arg, value_of(arg), 1, 7 * 24 * 3600));
    } else if (arg == "--no-prefix") {
      options.prefix_output = false;
    } else {
      throw UsageError("unknown option '" + arg + "' (the command goes after --)");
    }
  }
  if (!have_nproc) throw UsageError("--nproc is required");
  for (; i < argc; ++i) options.command.push_back(argv[i]);
  if (options.command.empty()) throw UsageError("no command given after --");
  return options;
}

int launch_main(int argc, char** argv) {
  fsdpsim::LaunchOptions options;
  try {
    options = parse(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "fsdpsim_launch: " << e.what() << " (see --help)" << std::endl;
    return 2;
  }
  try {
    fsdpsim::LaunchResult result = fsdpsim::launch_processes(options);
    std::cout << std::flush;
    std::cerr << result.report() << std::flush;
    return result.ok() ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "fsdpsim_launch: " << e.what() << std::endl;
    return 2;
  }
}

}  // namespace

int main(int argc, char** argv) {
  return fsdpsim::tools::guarded_main("fsdpsim_launch", [&] { return launch_main(argc, argv); });
}
