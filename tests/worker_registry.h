#pragma once
// Worker mode of the test binary, through the tools' one worker protocol
// (tools/worker.h): a test that needs real processes starts this binary with
// set_worker_job(options, {{"kind", NAME}, ...}) and main() runs the worker
// registered under NAME instead of the tests (the tools' own kinds, such as
// the replay's, work here too); its return value is the process's exit code.
// Workers read the launcher's RANK, WORLD_SIZE, ... from the environment and
// their inputs from the job.
//
// Thread-safety: registration happens during static initialisation, lookups
// from main(); neither needs a lock.

#include <nlohmann/json.hpp>

#include "tools/worker.h"

namespace fsdpsim::testing {

struct WorkerRegistration {
  WorkerRegistration(const std::string& name, tools::WorkerFn worker) {
    tools::register_worker(name, std::move(worker));
  }
};

/// Makes `options` start this binary as test worker `name` (the job's other
/// fields are its inputs).
inline void set_test_worker(LaunchOptions& options, const std::string& name, nlohmann::json job = {}) {
  job["kind"] = name;
  tools::set_worker_job(options, job);
}

}  // namespace fsdpsim::testing

/// FSDPSIM_REGISTER_WORKER(my_worker) { ...context.job()...; return 0; }
#define FSDPSIM_REGISTER_WORKER(NAME)                                                                             \
  static int fsdpsim_worker_##NAME(const ::fsdpsim::tools::WorkerContext& context);                               \
  static const ::fsdpsim::testing::WorkerRegistration fsdpsim_worker_registration_##NAME{#NAME,                   \
                                                                                         &fsdpsim_worker_##NAME}; \
  static int fsdpsim_worker_##NAME([[maybe_unused]] const ::fsdpsim::tools::WorkerContext& context)
