#pragma once
// CommHooks: the seam every collective passes through, so tests can observe,
// delay, replace or fail collectives (a GoogleMock mock of CommHooks is the
// usual client). HookedProcessGroup wraps any backend and calls the hooks
// around each collective; DefaultCommHooks just delegates.
//
// Thread-safety: a hooks object may be shared by the groups of one rank
// (split() passes it on); share one across ranks only if it is thread-safe.

#include <memory>

#include "backends/forwarding_process_group.h"
#include "backends/process_group.h"

namespace fsdpsim {

class CommHooks {
 public:
  virtual ~CommHooks() = default;
  /// Before the collective is issued. May block (a delay) or throw (a failure
  /// injected before any data moves).
  virtual void before(const CollectiveDesc& desc) = 0;
  /// Issues the collective: `issue` runs it on the wrapped backend. An
  /// override may return another Work instead (replace the op) or throw.
  [[nodiscard]] virtual WorkPtr run(const CollectiveDesc& desc, const std::function<WorkPtr()>& issue) = 0;
  /// After the collective was issued (it may still be in flight).
  virtual void after(const CollectiveDesc& desc, const WorkPtr& work) = 0;
};

/// Observes nothing and issues every collective unchanged.
class DefaultCommHooks : public CommHooks {
 public:
  void before(const CollectiveDesc&) override {}
  WorkPtr run(const CollectiveDesc&, const std::function<WorkPtr()>& issue) override { return issue(); }
  void after(const CollectiveDesc&, const WorkPtr&) override {}
};

class HookedProcessGroup final : public ForwardingProcessGroup {
 public:
  HookedProcessGroup(ProcessGroupPtr inner, std::shared_ptr<CommHooks> hooks);

 protected:
  WorkPtr call(const CollectiveDesc& desc, const std::function<WorkPtr()>& issue) override;
  /// The subgroup is hooked with the same hooks object.
  ProcessGroupPtr wrap(ProcessGroupPtr sub) override;

 private:
  std::shared_ptr<CommHooks> hooks_;
};

}  // namespace fsdpsim
