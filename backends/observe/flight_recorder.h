#pragma once
// Flight recorder: the last K collectives of each rank in a per-rank ring,
// and a dump() that prints them per rank with a summary of where each rank
// is in each group -- what one reads first when a world hangs or desyncs.
//
// Two ways to fill it: live, as a sink of ObservedProcessGroup (memory stays
// bounded however long the run); or post mortem from a trace's records
// (from_trace).
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
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backends/observe/record.h"
#include "backends/observe/sink.h"
#include "backends/process_group.h"

namespace fsdpsim::observe {

enum class FlightState { Scheduled, Started, Completed, Failed };
const char* to_string(FlightState state);

/// One ring slot: the record (id = recording order within the recorder,
/// issue/start/end times, the call in detail) and where it stands.
struct FlightEntry {
  Record record;
  FlightState state = FlightState::Scheduled;
};

/// Names one recorded entry for the later state updates.
struct FlightHandle {
  int rank = -1;
  uint64_t id = 0;
};

class FlightRecorder final : public CollectiveSink {
 public:
  /// Throws std::invalid_argument for world_size outside [1, kMaxWorldSize] or capacity 0.
  explicit FlightRecorder(int world_size, size_t capacity_per_rank = 32);

  int world_size() const override { return world_size_; }
  size_t capacity_per_rank() const { return capacity_; }

  /// Appends a scheduled entry to `rank`'s ring (the oldest falls out when
  /// full). Throws std::invalid_argument for a rank outside the world.
  FlightHandle record_scheduled(int rank, const CollectiveDesc& desc, const std::vector<int>& group_ranks,
                                int64_t now_ns);
  /// As above, from a collective's record (its id is replaced).
  FlightHandle record_scheduled(const Record& issued);
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
  /// (engine events are skipped). Throws std::invalid_argument for a record
  /// whose rank is outside the world.
  static std::unique_ptr<FlightRecorder> from_trace(const std::vector<Record>& records, int world_size,
                                                    size_t capacity_per_rank = 32);

  // CollectiveSink
  uint64_t on_issue(const Record& issued) override { return record_scheduled(issued).id; }
  void on_end(const Record& issued, uint64_t token, const WorkTimes& times, std::exception_ptr error) override;

 private:
  // One rank's last entries. Slots are overwritten in place once the ring
  // is full, so a record's strings reuse the slot's buffers: no allocation
  // per collective once warm (thousands of fiber ranks record every call).
  struct Ring {
    std::vector<FlightEntry> slots;  // grows to capacity, then wraps
    size_t oldest = 0;               // slot of the oldest entry once full
    std::vector<FlightEntry> ordered() const;
  };

  FlightEntry* find_locked(FlightHandle handle);
  void end(FlightHandle handle, FlightState state, int64_t start_ns, int64_t end_ns, const std::string& error);

  const int world_size_;
  const size_t capacity_;
  mutable std::mutex mutex_;
  uint64_t next_id_ = 0;            // guarded by mutex_
  std::vector<Ring> rings_;         // per rank; guarded by mutex_
  std::vector<uint64_t> recorded_;  // per rank; guarded by mutex_
};

}  // namespace fsdpsim::observe
