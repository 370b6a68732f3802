// One test binary with two modes: GoogleTest, or (with --fsdpsim-worker=NAME)
// a worker process that multi-process tests launch; see worker_registry.h.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <exception>
#include <iostream>
#include <string>

#include "tests/worker_registry.h"

int run_registered_worker(const std::string& name) {
  auto& registry = fsdpsim::testing::worker_registry();
  auto found = registry.find(name);
  if (found == registry.end()) {
    std::cerr << "fsdpsim tests: no worker named '" << name << "'; registered:";
    for (const auto& entry : registry) std::cerr << " " << entry.first;
    std::cerr << std::endl;
    return 2;
  }
  try {
    return found->second();
  } catch (const std::exception& e) {
    std::cerr << "fsdpsim tests: worker '" << name << "' threw: " << e.what() << std::endl;
    return 1;
  }
}

int main(int argc, char** argv) {
  const char* prefix = "--fsdpsim-worker=";
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], prefix, std::strlen(prefix)) == 0) {
      return run_registered_worker(argv[i] + std::strlen(prefix));
    }
  }
  testing::InitGoogleMock(&argc, argv);
  return RUN_ALL_TESTS();
}
