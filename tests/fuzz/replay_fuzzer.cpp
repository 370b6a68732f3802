// libFuzzer target for `fsdpsim replay`'s trace reader: parse, check and plan
// arbitrary bytes. Contract: any input either parses or throws
// TraceFileError starting "trace line N: "; planning throws only
// ReplayPlanError; nothing else escapes, crashes or allocates without bound.
//
// Built only with -DFSDPSIM_BUILD_FUZZERS=ON and clang (see tools/CMakeLists.txt):
//   cmake -S . -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DFSDPSIM_BUILD_FUZZERS=ON -DFSDPSIM_BUILD_TESTS=OFF
//   ninja -C build-fuzz fsdpsim_replay_fuzzer
//   ./build-fuzz/tools/fsdpsim_replay_fuzzer -max_len=4096 -max_total_time=60 tests/replay_corpus

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>

#include "tools/replay_lib.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace fsdpsim::tools;
  std::istringstream in(std::string(reinterpret_cast<const char*>(data), size));
  try {
    const ReplayTrace trace = parse_replay_trace(in);
    (void)check_trace(trace).text();
    ReplayLimits limits;
    limits.max_bytes_per_collective = 1 << 20;
    for (int world : {0, 3}) {
      try {
        const ReplayPlan plan = make_replay_plan(trace, world, limits);
        (void)format_plan_statistics(trace, plan);
      } catch (const ReplayPlanError&) {}
    }
  } catch (const TraceFileError& e) {
    if (std::strncmp(e.what(), "trace line ", 11) != 0) {
      std::cerr << "error without a line: " << e.what() << std::endl;
      std::abort();
    }
  }
  return 0;
}
