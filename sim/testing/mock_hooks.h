#pragma once
// GoogleMock mocks of the two seams a test observes: CommHooks (every
// collective of a HookedProcessGroup) and fsdp::EngineHooks (unshard, reshard,
// backward steps, prefetch decisions).
//
// Thread-safety: as GoogleMock's: calls may come from any thread or fiber, but
// set every expectation before the ranks run (never concurrently with calls),
// and give each rank its own mock (make_per_rank in sim/testing/world_fixture.h).

#include <gmock/gmock.h>

#include <functional>
#include <string>

#include "backends/comm_hooks.h"
#include "fsdp/fully_shard.h"

namespace fsdpsim::testing {

/// CommHooks whose default actions delegate to DefaultCommHooks: set
/// EXPECT_CALLs on what a test asserts, every collective still runs.
class MockCommHooks : public CommHooks {
 public:
  MockCommHooks() {
    ON_CALL(*this, before).WillByDefault([this](const CollectiveDesc& d) { default_.before(d); });
    ON_CALL(*this, run).WillByDefault([this](const CollectiveDesc& d, const std::function<WorkPtr()>& issue) {
      return default_.run(d, issue);
    });
    ON_CALL(*this, after).WillByDefault([this](const CollectiveDesc& d, const WorkPtr& w) { default_.after(d, w); });
  }

  MOCK_METHOD(void, before, (const CollectiveDesc& desc), (override));
  MOCK_METHOD(WorkPtr, run, (const CollectiveDesc& desc, const std::function<WorkPtr()>& issue), (override));
  MOCK_METHOD(void, after, (const CollectiveDesc& desc, const WorkPtr& work), (override));

 private:
  DefaultCommHooks default_;
};

/// fsdp::EngineHooks; every event is a no-op unless a test expects it. Unit
/// names are the module paths ("" for the root, "block0", ...).
class MockEngineHooks : public fsdp::EngineHooks {
 public:
  MOCK_METHOD(void, on_unshard, (const std::string& unit, fsdp::TrainingState state), (override));
  MOCK_METHOD(void, on_reshard, (const std::string& unit, fsdp::TrainingState state), (override));
  MOCK_METHOD(void, on_pre_backward, (const std::string& unit, fsdp::TrainingState state), (override));
  MOCK_METHOD(void, on_post_backward, (const std::string& unit, fsdp::TrainingState state), (override));
  MOCK_METHOD(void, on_final_callback, (const std::string& unit, fsdp::TrainingState state), (override));
  MOCK_METHOD(void, on_prefetch, (const std::string& unit, const std::string& target, fsdp::TrainingState state),
              (override));
};

}  // namespace fsdpsim::testing
