#include "backends/observe/observed_process_group.h"

#include <string>
#include <utility>

#include <c10/util/SmallVector.h>

#include "backends/errors.h"

namespace fsdpsim::observe {

ObservedProcessGroup::ObservedProcessGroup(ProcessGroupPtr inner, std::vector<SinkPtr> sinks, int global_rank,
                                           const Clock& clock)
    : ForwardingProcessGroup(std::move(inner), "ObservedProcessGroup"),
      sinks_(std::make_shared<const std::vector<SinkPtr>>(std::move(sinks))),
      global_rank_(global_rank),
      clock_(&clock),
      group_ranks_(global_ranks()) {
  if (sinks_->empty()) throw CommError("ObservedProcessGroup: no sink to record into");
  const auto& ranks = global_ranks();
  const int r = rank();
  if (r < 0 || static_cast<size_t>(r) >= ranks.size() || ranks[static_cast<size_t>(r)] != global_rank) {
    throw CommError("ObservedProcessGroup: global rank " + std::to_string(global_rank) + " is not group rank " +
                    std::to_string(r) + " of group " + name());
  }
  for (const auto& sink : *sinks_) {
    if (!sink) throw CommError("ObservedProcessGroup: a sink is null");
    if (global_rank < 0 || global_rank >= sink->world_size()) {
      throw CommError("ObservedProcessGroup: global rank " + std::to_string(global_rank) +
                      " is outside the recorder's world of " + std::to_string(sink->world_size()));
    }
  }
}

namespace {
// One observed collective in one allocation: its record, the sinks' tokens
// and, once issued, its Work. The completion callback holds one pointer to
// it (no copies of the record or the sink list per collective, which
// thousands of fiber ranks pay for on every call).
struct Issued {
  std::shared_ptr<const std::vector<SinkPtr>> sinks;
  Record record;
  c10::SmallVector<uint64_t, 2> tokens;
  const Clock* clock = nullptr;
  WorkPtr work;  // Work -> callback -> Issued -> Work: the cycle ends when the callback runs

  // Errors from a sink are swallowed: observing never breaks a collective's completion path.
  void end(const WorkTimes& times, const std::exception_ptr& error) noexcept {
    for (size_t i = 0; i < sinks->size(); ++i) {
      try {
        (*sinks)[i]->on_end(record, tokens[i], times, error);
      } catch (...) {}
    }
  }
};
}  // namespace

// Each sink sees the issue, then exactly one end: at once (and the error is
// rethrown) when the backend throws or gives no Work, otherwise when the
// Work completes or fails, possibly on another rank's thread. Until then the
// callback owns the Work, so a caller that drops its Work early (a failed
// wait() unwinding) loses nothing.
WorkPtr ObservedProcessGroup::call(const CollectiveDesc& desc, const std::function<WorkPtr()>& issue) {
  auto issued = std::make_shared<Issued>();
  issued->sinks = sinks_;
  issued->clock = clock_;
  issued->record = collective_record(global_rank_, desc, group_ranks_, clock_->now_ns());
  for (const auto& sink : *sinks_) issued->tokens.push_back(sink->on_issue(issued->record));
  WorkPtr work;
  try {
    work = issue();
    if (!work) throw CommError("backend returned no Work for " + desc.to_string());
  } catch (...) {
    issued->end(WorkTimes{0, 0, clock_->now_ns()}, std::current_exception());
    throw;
  }
  issued->work = work;
  work->on_completion([issued] {
    std::exception_ptr error;
    WorkTimes times;
    try {
      times = issued->work->times();
      if (times.end_ns == 0) times.end_ns = issued->clock->now_ns();
      error = issued->work->exception();
    } catch (...) {
      error = std::current_exception();
    }
    issued->work.reset();
    issued->end(times, error);
  });
  return work;
}

ProcessGroupPtr ObservedProcessGroup::wrap(ProcessGroupPtr sub) {
  return std::make_shared<ObservedProcessGroup>(std::move(sub), *sinks_, global_rank_, *clock_);
}

}  // namespace fsdpsim::observe
