// One test binary with two modes: GoogleTest, or (started with the tools'
// worker protocol, tools/worker.h) a worker process that multi-process tests
// launch; see worker_registry.h.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tools/cli.h"
#include "tools/worker.h"

int main(int argc, char** argv) {
  fsdpsim::tools::register_tool_workers();
  if (auto code = fsdpsim::tools::run_worker_if_requested(argc, argv)) return *code;
  testing::InitGoogleMock(&argc, argv);
  return RUN_ALL_TESTS();
}
