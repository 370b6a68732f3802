#pragma once
// Worker mode of the test binary: a test that needs real processes re-executes
// this binary (/proc/self/exe) with --fsdpsim-worker=NAME, and main() runs the
// function registered under NAME instead of the tests; its return value is the
// process's exit code. Workers read what they need from the environment
// (RANK, WORLD_SIZE, ... as set by the process launcher).
//
// Thread-safety: registration happens during static initialisation, lookups
// from main(); neither needs a lock.

#include <functional>
#include <iostream>
#include <map>
#include <string>

namespace fsdpsim::testing {

using WorkerMain = std::function<int()>;

inline std::map<std::string, WorkerMain>& worker_registry() {
  static std::map<std::string, WorkerMain> registry;
  return registry;
}

struct WorkerRegistration {
  WorkerRegistration(const std::string& name, WorkerMain worker) {
    if (!worker_registry().emplace(name, std::move(worker)).second) {
      std::cerr << "fsdpsim tests: worker '" << name << "' is registered twice" << std::endl;
      std::abort();
    }
  }
};

/// The argument that selects worker NAME: "--fsdpsim-worker=NAME".
inline std::string worker_flag(const std::string& name) { return "--fsdpsim-worker=" + name; }

}  // namespace fsdpsim::testing

/// Runs the registered worker `name` and returns its exit code; 2 (with a
/// message on stderr) if there is none and 1 if it throws.
int run_registered_worker(const std::string& name);

/// FSDPSIM_REGISTER_WORKER(my_worker) { ...; return 0; }
#define FSDPSIM_REGISTER_WORKER(NAME)                                                       \
  static int fsdpsim_worker_##NAME();                                                       \
  static const ::fsdpsim::testing::WorkerRegistration fsdpsim_worker_registration_##NAME{ \
      #NAME, &fsdpsim_worker_##NAME};                                                       \
  static int fsdpsim_worker_##NAME()
