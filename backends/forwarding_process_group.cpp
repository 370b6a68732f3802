#include "backends/forwarding_process_group.h"

#include "backends/collective_checks.h"
#include "backends/collective_label.h"
#include "backends/errors.h"

namespace fsdpsim {

ForwardingProcessGroup::ForwardingProcessGroup(ProcessGroupPtr inner, const char* what) : inner_(std::move(inner)) {
  if (!inner_) throw CommError(std::string(what) + ": the wrapped process group is null");
}

namespace {
// The `issue` for call(): `forward` (the call on the wrapped group) run under
// the label the call came with, since a decorator may yield (a fiber sleeping
// in a hook) between reading the label and forwarding, and the label is
// thread-local. It holds two references, so std::function keeps it inline:
// no allocation per collective.
template <typename Forward>
auto under_label(const CollectiveDesc& desc, const Forward& forward) {
  return [&desc, &forward] {
    ScopedCollectiveLabel label(desc.label);
    return forward();
  };
}
}  // namespace

WorkPtr ForwardingProcessGroup::all_gather_into_tensor(const at::Tensor& output, const at::Tensor& input) {
  const CollectiveDesc desc = check_all_gather(*inner_, output, input);
  const auto forward = [&] { return inner_->all_gather_into_tensor(output, input); };
  return call(desc, under_label(desc, forward));
}

WorkPtr ForwardingProcessGroup::reduce_scatter_tensor(const at::Tensor& output, const at::Tensor& input,
                                                      const ReduceScatterOptions& options) {
  const CollectiveDesc desc = check_reduce_scatter(*inner_, output, input, options);
  const auto forward = [&] { return inner_->reduce_scatter_tensor(output, input, options); };
  return call(desc, under_label(desc, forward));
}

WorkPtr ForwardingProcessGroup::all_reduce(const at::Tensor& tensor, const AllReduceOptions& options) {
  const CollectiveDesc desc = check_all_reduce(*inner_, tensor, options);
  const auto forward = [&] { return inner_->all_reduce(tensor, options); };
  return call(desc, under_label(desc, forward));
}

WorkPtr ForwardingProcessGroup::broadcast(const at::Tensor& tensor, const BroadcastOptions& options) {
  const CollectiveDesc desc = check_broadcast(*inner_, tensor, options);
  const auto forward = [&] { return inner_->broadcast(tensor, options); };
  return call(desc, under_label(desc, forward));
}

WorkPtr ForwardingProcessGroup::barrier() {
  const CollectiveDesc desc = describe_barrier(*inner_);
  const auto forward = [&] { return inner_->barrier(); };
  return call(desc, under_label(desc, forward));
}

ProcessGroupPtr ForwardingProcessGroup::split(const std::vector<std::vector<int>>& partition) {
  ProcessGroupPtr sub = inner_->split(partition);
  return sub ? wrap(std::move(sub)) : nullptr;
}

}  // namespace fsdpsim
