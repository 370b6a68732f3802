#include "backends/forwarding_process_group.h"

#include "backends/collective_checks.h"
#include "backends/errors.h"

namespace fsdpsim {

ForwardingProcessGroup::ForwardingProcessGroup(ProcessGroupPtr inner, const char* what) : inner_(std::move(inner)) {
  if (!inner_) throw CommError(std::string(what) + ": the wrapped process group is null");
}

WorkPtr ForwardingProcessGroup::all_gather_into_tensor(const at::Tensor& output, const at::Tensor& input) {
  return call(check_all_gather(*inner_, output, input), [&] { return inner_->all_gather_into_tensor(output, input); });
}

WorkPtr ForwardingProcessGroup::reduce_scatter_tensor(const at::Tensor& output, const at::Tensor& input,
                                                      const ReduceScatterOptions& options) {
  return call(check_reduce_scatter(*inner_, output, input, options),
              [&] { return inner_->reduce_scatter_tensor(output, input, options); });
}

WorkPtr ForwardingProcessGroup::all_reduce(const at::Tensor& tensor, const AllReduceOptions& options) {
  return call(check_all_reduce(*inner_, tensor, options), [&] { return inner_->all_reduce(tensor, options); });
}

WorkPtr ForwardingProcessGroup::broadcast(const at::Tensor& tensor, const BroadcastOptions& options) {
  return call(check_broadcast(*inner_, tensor, options), [&] { return inner_->broadcast(tensor, options); });
}

WorkPtr ForwardingProcessGroup::barrier() {
  return call(describe_barrier(*inner_), [&] { return inner_->barrier(); });
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
    } catch (...) {
    }
  });
  return work;
}

ProcessGroupPtr ForwardingProcessGroup::split(const std::vector<std::vector<int>>& partition) {
  ProcessGroupPtr sub = inner_->split(partition);
  return sub ? wrap(std::move(sub)) : nullptr;
}

}  // namespace fsdpsim
