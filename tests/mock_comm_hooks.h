#pragma once
// A GoogleMock CommHooks whose default actions delegate to DefaultCommHooks:
// set EXPECT_CALLs on what a test asserts, everything else runs normally.

#include <gmock/gmock.h>

#include "backends/comm_hooks.h"

namespace fsdpsim::testing {

class MockCommHooks : public CommHooks {
 public:
  MockCommHooks() {
    ON_CALL(*this, before).WillByDefault([this](const CollectiveDesc& d) { default_.before(d); });
    ON_CALL(*this, run).WillByDefault(
        [this](const CollectiveDesc& d, const std::function<WorkPtr()>& issue) { return default_.run(d, issue); });
    ON_CALL(*this, after).WillByDefault([this](const CollectiveDesc& d, const WorkPtr& w) { default_.after(d, w); });
  }

  MOCK_METHOD(void, before, (const CollectiveDesc& desc), (override));
  MOCK_METHOD(WorkPtr, run, (const CollectiveDesc& desc, const std::function<WorkPtr()>& issue), (override));
  MOCK_METHOD(void, after, (const CollectiveDesc& desc, const WorkPtr& work), (override));

 private:
  DefaultCommHooks default_;
};

}  // namespace fsdpsim::testing
