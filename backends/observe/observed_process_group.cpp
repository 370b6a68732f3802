#include "backends/observe/observed_process_group.h"

#include <string>
#include <utility>

#include "backends/errors.h"

namespace fsdpsim::observe {

ObservedProcessGroup::ObservedProcessGroup(ProcessGroupPtr inner, std::vector<SinkPtr> sinks, int global_rank,
                                           const Clock& clock)
    : ForwardingProcessGroup(std::move(inner), "ObservedProcessGroup"),
      sinks_(std::move(sinks)),
      global_rank_(global_rank),
      clock_(&clock),
      group_ranks_(global_ranks()) {
  if (sinks_.empty()) throw CommError("ObservedProcessGroup: no sink to record into");
  const auto& ranks = global_ranks();
  const int r = rank();
  if (r < 0 || static_cast<size_t>(r) >= ranks.size() || ranks[static_cast<size_t>(r)] != global_rank) {
    throw CommError("ObservedProcessGroup: global rank " + std::to_string(global_rank) + " is not group rank " +
                    std::to_string(r) + " of group " + name());
  }
  for (const auto& sink : sinks_) {
    if (!sink) throw CommError("ObservedProcessGroup: a sink is null");
    if (global_rank < 0 || global_rank >= sink->world_size()) {
      throw CommError("ObservedProcessGroup: global rank " + std::to_string(global_rank) +
                      " is outside the recorder's world of " + std::to_string(sink->world_size()));
    }
  }
}

namespace {
// What a collective's end reports to the sinks, in one allocation: the end
// observer then holds one pointer (no copies of the record or the sink list
// per collective, which thousands of fiber ranks pay for every call).
struct Issued {
  std::vector<SinkPtr> sinks;
  Record record;
  std::vector<uint64_t> tokens;
};
}  // namespace

WorkPtr ObservedProcessGroup::call(const CollectiveDesc& desc, const std::function<WorkPtr()>& issue) {
  auto issued = std::make_shared<Issued>();
  issued->sinks = sinks_;
  issued->record = collective_record(global_rank_, desc, group_ranks_, clock_->now_ns());
  issued->tokens.reserve(sinks_.size());
  for (const auto& sink : sinks_) issued->tokens.push_back(sink->on_issue(issued->record));
  return issue_observed(desc, issue, *clock_, [issued](const WorkTimes& times, std::exception_ptr error) {
    for (size_t i = 0; i < issued->sinks.size(); ++i) {
      issued->sinks[i]->on_end(issued->record, issued->tokens[i], times, error);
    }
  });
}

ProcessGroupPtr ObservedProcessGroup::wrap(ProcessGroupPtr sub) {
  return std::make_shared<ObservedProcessGroup>(std::move(sub), sinks_, global_rank_, *clock_);
}

}  // namespace fsdpsim::observe
