#include "backends/comm_hooks.h"

#include "backends/errors.h"

namespace fsdpsim {

HookedProcessGroup::HookedProcessGroup(ProcessGroupPtr inner, std::shared_ptr<CommHooks> hooks)
    : ForwardingProcessGroup(std::move(inner), "HookedProcessGroup"), hooks_(std::move(hooks)) {
  if (!hooks_) throw CommError("HookedProcessGroup: hooks are null (use DefaultCommHooks)");
}

WorkPtr HookedProcessGroup::call(const CollectiveDesc& desc, const std::function<WorkPtr()>& issue) {
  hooks_->before(desc);
  WorkPtr work = hooks_->run(desc, issue);
  if (!work) throw CommError("comm hooks returned no Work for " + desc.to_string());
  hooks_->after(desc, work);
  return work;
}

ProcessGroupPtr HookedProcessGroup::wrap(ProcessGroupPtr sub) {
  return std::make_shared<HookedProcessGroup>(std::move(sub), hooks_);
}

}  // namespace fsdpsim
