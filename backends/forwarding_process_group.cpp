#include "backends/forwarding_process_group.h"

#include "backends/collective_checks.h"
#include "backends/collective_label.h"
#include "backends/errors.h"

namespace fsdpsim {

ForwardingProcessGroup::ForwardingProcessGroup(ProcessGroupPtr inner, const char* what) : inner_(std::move(inner)) {
  if (!inner_) throw CommError(std::string(what) + ": the wrapped process group is null");
}

namespace {
// Runs `forward` (the call on the wrapped group) under the label the call
// came with: a decorator may yield (a fiber sleeping in a hook) between
// reading the label and forwarding, and the label is thread-local.
template <typename Forward>
WorkPtr under_label(const CollectiveDesc& desc, Forward&& forward) {
  ScopedCollectiveLabel label(desc.label);
  return forward();
}
}  // namespace

WorkPtr ForwardingProcessGroup::all_gather_into_tensor(const at::Tensor& output, const at::Tensor& input) {
  const CollectiveDesc desc = check_all_gather(*inner_, output, input);
  return call(desc, [&] { return under_label(desc, [&] { return inner_->all_gather_into_tensor(output, input); }); });
}

WorkPtr ForwardingProcessGroup::reduce_scatter_tensor(const at::Tensor& output, const at::Tensor& input,
                                                      const ReduceScatterOptions& options) {
  const CollectiveDesc desc = check_reduce_scatter(*inner_, output, input, options);
  return call(desc,
              [&] { return under_label(desc, [&] { return inner_->reduce_scatter_tensor(output, input, options); }); });
}

WorkPtr ForwardingProcessGroup::all_reduce(const at::Tensor& tensor, const AllReduceOptions& options) {
  const CollectiveDesc desc = check_all_reduce(*inner_, tensor, options);
  return call(desc, [&] { return under_label(desc, [&] { return inner_->all_reduce(tensor, options); }); });
}

WorkPtr ForwardingProcessGroup::broadcast(const at::Tensor& tensor, const BroadcastOptions& options) {
  const CollectiveDesc desc = check_broadcast(*inner_, tensor, options);
  return call(desc, [&] { return under_label(desc, [&] { return inner_->broadcast(tensor, options); }); });
}

WorkPtr ForwardingProcessGroup::barrier() {
  const CollectiveDesc desc = describe_barrier(*inner_);
  return call(desc, [&] { return under_label(desc, [&] { return inner_->barrier(); }); });
}

WorkPtr ForwardingProcessGroup::issue_observed(const CollectiveDesc& desc, const std::function<WorkPtr()>& issue,
                                               const Clock& clock, EndObserver ended) {
  WorkPtr work;
  try {
    work = issue();
    if (!work) throw CommError("backend returned no Work for " + desc.to_string());
  } catch (...) {
    ended(WorkTimes{0, 0, clock.now_ns()}, std::current_exception());
    throw;
  }
  // The cycle the callback makes through a backend that stores callbacks
  // (Work -> callback -> Work) ends when they run.
  work->on_completion([work, clock = &clock, ended = std::move(ended)] {
    try {
      WorkTimes times = work->times();
      if (times.end_ns == 0) times.end_ns = clock->now_ns();
      ended(times, work->exception());
    } catch (...) {}
  });
  return work;
}

ProcessGroupPtr ForwardingProcessGroup::split(const std::vector<std::vector<int>>& partition) {
  ProcessGroupPtr sub = inner_->split(partition);
  return sub ? wrap(std::move(sub)) : nullptr;
}

}  // namespace fsdpsim
