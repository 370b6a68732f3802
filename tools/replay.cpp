// fsdpsim_replay: check, replay and predict JSONL traces of fsdpsim worlds.
// The logic lives in tools/replay_lib.h (replay_main); see `fsdpsim_replay --help`.
//
// Gloo process mode: the replay re-executes this binary as
// `fsdpsim_replay worker` under launch_processes(); the worker reads its job
// from FSDPSIM_REPLAY_JOB.

#include <ATen/Parallel.h>

#include <unistd.h>

#include <iostream>
#include <string>
#include <vector>

#include "tools/format_util.h"
#include "tools/replay_lib.h"

namespace {

std::string self_exe() {
  char buffer[4096];
  const ssize_t n = readlink("/proc/self/exe", buffer, sizeof buffer - 1);
  return n > 0 ? std::string(buffer, static_cast<size_t>(n)) : std::string();
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  return fsdpsim::tools::guarded_main("fsdpsim_replay", [&] {
    at::set_num_threads(1);
    if (!args.empty() && args[0] == "worker") return fsdpsim::tools::replay_worker_main();
    std::vector<std::string> worker;
    const std::string exe = self_exe();
    if (!exe.empty()) worker = {exe, "worker"};
    return fsdpsim::tools::replay_main(args, std::cout, std::cerr, worker);
  });
}
