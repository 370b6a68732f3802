#pragma once
// The one observing decorator: every collective of the wrapped group becomes
// a Record handed to each sink (trace recorder, flight recorder, ...) before
// the call reaches the backend, and its end (times, error) from
// Work::on_completion. Local argument errors (collective_checks.h) are not
// recorded: such a call never issues. A backend that throws while issuing is
// recorded as failed. Subgroups from split() are observed by the same sinks.
//
// Thread-safety: as ProcessGroup (one rank's group); the sinks are shared by
// the ranks and must be thread-safe (sink.h). The completion callback calls
// Work::times() and Work::exception(), so a backend must run on_completion
// callbacks without holding the lock those take.

#include <memory>
#include <vector>

#include "backends/clock.h"
#include "backends/forwarding_process_group.h"
#include "backends/observe/sink.h"
#include "backends/process_group.h"

namespace fsdpsim::observe {

using SinkPtr = std::shared_ptr<CollectiveSink>;

class ObservedProcessGroup final : public ForwardingProcessGroup {
 public:
  /// `global_rank` is this rank in the world the sinks record (it must be
  /// the wrapped group's own global rank and inside every sink's world);
  /// `clock` must be the clock of `inner`'s Work times and outlive this group
  /// and its subgroups. Throws CommError for a null or missing sink or a
  /// rank that does not fit.
  ObservedProcessGroup(ProcessGroupPtr inner, std::vector<SinkPtr> sinks, int global_rank,
                       const Clock& clock = SteadyClock::instance());

  const std::vector<SinkPtr>& sinks() const { return *sinks_; }

 protected:
  WorkPtr call(const CollectiveDesc& desc, const std::function<WorkPtr()>& issue) override;
  ProcessGroupPtr wrap(ProcessGroupPtr sub) override;

 private:
  // Shared with every collective in flight (one reference, not a copy, each).
  std::shared_ptr<const std::vector<SinkPtr>> sinks_;
  int global_rank_;
  const Clock* clock_;
  const GroupRanks group_ranks_;  // shared by every record of this group
};

}  // namespace fsdpsim::observe
