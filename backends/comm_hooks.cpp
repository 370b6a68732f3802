#include "backends/comm_hooks.h"

#include "backends/collective_checks.h"
#include "backends/errors.h"

namespace fsdpsim {

HookedProcessGroup::HookedProcessGroup(ProcessGroupPtr inner, std::shared_ptr<CommHooks> hooks)
    : inner_(std::move(inner)), hooks_(std::move(hooks)) {
  if (!inner_) throw CommError("HookedProcessGroup: the wrapped process group is null");
  if (!hooks_) throw CommError("HookedProcessGroup: hooks are null (use DefaultCommHooks)");
}

WorkPtr HookedProcessGroup::call(const CollectiveDesc& desc, const std::function<WorkPtr()>& issue) {
  hooks_->before(desc);
  WorkPtr work = hooks_->run(desc, issue);
  if (!work) throw CommError("comm hooks returned no Work for " + desc.to_string());
  hooks_->after(desc, work);
  return work;
}

WorkPtr HookedProcessGroup::all_gather_into_tensor(const at::Tensor& output, const at::Tensor& input) {
  return call(check_all_gather(*inner_, output, input),
              [&] { return inner_->all_gather_into_tensor(output, input); });
}

WorkPtr HookedProcessGroup::reduce_scatter_tensor(const at::Tensor& output, const at::Tensor& input,
                                                  const ReduceScatterOptions& options) {
  return call(check_reduce_scatter(*inner_, output, input, options),
              [&] { return inner_->reduce_scatter_tensor(output, input, options); });
}

WorkPtr HookedProcessGroup::all_reduce(const at::Tensor& tensor, const AllReduceOptions& options) {
  return call(check_all_reduce(*inner_, tensor, options), [&] { return inner_->all_reduce(tensor, options); });
}

WorkPtr HookedProcessGroup::broadcast(const at::Tensor& tensor, const BroadcastOptions& options) {
  return call(check_broadcast(*inner_, tensor, options), [&] { return inner_->broadcast(tensor, options); });
}

WorkPtr HookedProcessGroup::barrier() {
  return call(describe_barrier(*inner_), [&] { return inner_->barrier(); });
}

ProcessGroupPtr HookedProcessGroup::split(const std::vector<std::vector<int>>& partition) {
  ProcessGroupPtr sub = inner_->split(partition);
  if (!sub) return nullptr;
  return std::make_shared<HookedProcessGroup>(std::move(sub), hooks_);
}

}  // namespace fsdpsim
