#pragma once
// Flight recorder: the last K collectives of each rank (group, seq, op,
// dtype, shapes, state scheduled / started / completed / failed, timestamps)
// in a per-rank ring buffer, and a dump() that prints them per rank with a
// summary of where each rank is in each group -- what one reads first when a
// world hangs or desyncs.
//
// Two ways to fill it: live, by wrapping a rank's group in a
// FlightRecordingProcessGroup (memory stays bounded however long the run);
// or post mortem from a TraceRecorder's events (from_trace), which is what
// `fsdpsim run` does when a world fails.
//
// State: scheduled = this rank issued it; started = every rank of the group
// had issued it (the transport could move data); completed / failed = this
// rank's part ended. A live recorder learns the start time only when the
// collective ends (Work reports times then), so an entry that never ends
// stays "scheduled"; from_trace marks an unfinished entry "started" when
// the trace holds every member's issue of the same (group, seq).
//
// Thread-safety: all methods are thread-safe (one mutex, held for
// bookkeeping only); record_* may be called from any rank's thread or fiber
// and from Work::on_completion callbacks on other threads.

#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backends/forwarding_process_group.h"
#include "backends/clock.h"
#include "backends/process_group.h"

namespace fsdpsim::sim {

struct TraceEvent;

enum class FlightState { Scheduled, Started, Completed, Failed };
const char* to_string(FlightState state);

struct FlightEntry {
  uint64_t record_id = 0;  ///< recording order within the recorder (unique)
  int rank = 0;            ///< global rank
  std::string group;
  std::vector<int> group_ranks;  ///< global ranks of the group, by group rank
  uint64_t seq = 0;
  CollectiveOp op = CollectiveOp::Barrier;
  std::string dtype;  ///< c10's name ("Float")
  std::vector<int64_t> input_shape;
  std::vector<int64_t> output_shape;
  std::string call;  ///< CollectiveDesc::call_string(), or the trace's detail
  FlightState state = FlightState::Scheduled;
  int64_t scheduled_ns = 0;
  int64_t started_ns = 0;    ///< 0 = unknown
  int64_t completed_ns = 0;  ///< 0 = not ended
  std::string error;         ///< failed only
};

/// Names one recorded entry for the later state updates.
struct FlightHandle {
  int rank = -1;
  uint64_t id = 0;
};

class FlightRecorder {
 public:
  /// Throws std::invalid_argument for world_size outside [1, 65536] or capacity 0.
  explicit FlightRecorder(int world_size, size_t capacity_per_rank = 32);

  int world_size() const { return world_size_; }
  size_t capacity_per_rank() const { return capacity_; }

  /// Appends a scheduled entry to `rank`'s ring (the oldest falls out when
  /// full). Throws std::invalid_argument for a rank outside the world.
  FlightHandle record_scheduled(int rank, const CollectiveDesc& desc, const std::vector<int>& group_ranks,
                                int64_t now_ns);
  /// Updates an entry; a no-op once the entry fell out of its ring or
  /// already ended (a completion is final).
  void record_started(FlightHandle handle, int64_t start_ns);
  void record_completed(FlightHandle handle, int64_t start_ns, int64_t end_ns);
  void record_failed(FlightHandle handle, int64_t start_ns, int64_t end_ns, const std::string& error);

  /// `rank`'s entries, oldest first.
  std::vector<FlightEntry> entries(int rank) const;
  /// How many of `rank`'s entries were recorded in total (kept + dropped).
  uint64_t recorded(int rank) const;

  /// Per rank, oldest first, times in ms since the earliest kept timestamp;
  /// then "where each rank is": per group, the ranks grouped by their last
  /// recorded seq and state, e.g.
  ///   group world: ranks {0-1,3} at seq 6 all_reduce (failed); rank 2 at seq 5 all_reduce (completed)
  std::string dump() const;

  /// The last `capacity_per_rank` collectives of each rank of a trace
  /// (engine events are skipped). Throws std::invalid_argument for an event
  /// whose rank is outside the world.
  static std::unique_ptr<FlightRecorder> from_trace(const std::vector<TraceEvent>& events, int world_size,
                                                    size_t capacity_per_rank = 32);

 private:
  FlightEntry* find_locked(FlightHandle handle);
  void end(FlightHandle handle, FlightState state, int64_t start_ns, int64_t end_ns, const std::string& error);

  const int world_size_;
  const size_t capacity_;
  mutable std::mutex mutex_;
  uint64_t next_id_ = 0;                        // guarded by mutex_
  std::vector<std::deque<FlightEntry>> rings_;  // per rank, oldest first; guarded by mutex_
  std::vector<uint64_t> recorded_;              // per rank; guarded by mutex_
};

/// Decorator that records every collective of `inner` in a FlightRecorder
/// (scheduled at the call, completed / failed from Work::on_completion with
/// the Work's times). Local argument errors are not recorded; a backend that
/// throws while issuing records a failed entry. `clock` must outlive this
/// group and its subgroups; subgroups from split() are recorded too.
///
/// Thread-safety: as ProcessGroup (one rank's group); the recorder is shared.
class FlightRecordingProcessGroup final : public ForwardingProcessGroup {
 public:
  FlightRecordingProcessGroup(ProcessGroupPtr inner, std::shared_ptr<FlightRecorder> recorder, int global_rank,
                              const Clock& clock = SteadyClock::instance());

 protected:
  WorkPtr call(const CollectiveDesc& desc, const std::function<WorkPtr()>& issue) override;
  ProcessGroupPtr wrap(ProcessGroupPtr sub) override;

 private:
  std::shared_ptr<FlightRecorder> recorder_;
  int global_rank_;
  const Clock* clock_;
};

}  // namespace fsdpsim::sim
