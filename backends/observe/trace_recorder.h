#pragma once
// Trace of a world: every collective each rank issued (and, from the engine,
// events such as unshard / reshard / post_backward) with the clock's times
// and a per-rank Lamport clock; chrome_trace.h and jsonl.h write it out.
//
// Thread-safety: one TraceRecorder serves every rank of a world; all its
// methods are thread-safe (one internal mutex, held only for bookkeeping, never
// across a call into a backend, so it is also safe from fiber ranks and from
// Work::on_completion callbacks running on another rank's thread).

#include <cstddef>
#include <cstdint>
#include <exception>
#include <iosfwd>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "backends/observe/record.h"
#include "backends/observe/sink.h"
#include "backends/process_group.h"

namespace fsdpsim::observe {

/// Records one world's events.
///
/// A recorder describes one run of a world: (group, seq) must name one
/// collective (a World that runs twice needs a recorder per run).
///
/// Logical clock (Lamport): every recorded event ticks its rank's clock. When
/// a collective completes on rank r, clock_r = max(clock_r, issue clocks of
/// every rank's entry for the same (group, seq) recorded so far) + 1. The
/// observed group records an issue before handing the call to the backend, so
/// a completion's clock exceeds the issue clock of every rank that took part.
class TraceRecorder final : public CollectiveSink {
 public:
  /// Throws std::invalid_argument for world_size outside [1, kMaxWorldSize].
  explicit TraceRecorder(int world_size);

  int world_size() const override { return world_size_; }

  /// A collective was issued on global rank `rank`; returns the id to pass to
  /// record_completion. Throws std::invalid_argument for a rank outside the world.
  size_t record_issue(int rank, const CollectiveDesc& desc, const std::vector<int>& group_ranks, int64_t issue_ns);
  /// As above, from collective_record()'s record.
  size_t record_issue(Record issued);
  /// The collective `id` completed (error == nullptr) or failed. start/end
  /// come from `times`; its issue_ns is ignored (the recorded one stays). A
  /// second completion of the same id is ignored.
  void record_completion(size_t id, const WorkTimes& times, std::exception_ptr error);
  /// An engine event that ran on `rank` from start_ns to end_ns. `kind` is a
  /// lowercase identifier other than "collective" (is_engine_kind).
  void record_engine_event(int rank, std::string kind, std::string name, std::string detail, int64_t start_ns,
                           int64_t end_ns);

  /// Adds records made elsewhere (another process's rank), keeping their
  /// times and logical clocks; ids are renumbered. Throws
  /// std::invalid_argument for a rank outside the world.
  void import_events(const std::vector<Record>& events);

  /// Every record, rank by rank, each rank's in recording order (issue order
  /// for collectives; an engine event is recorded when it ends).
  std::vector<Record> events() const;
  size_t size() const;

  /// write_chrome_trace / write_jsonl (chrome_trace.h, jsonl.h) of events().
  void write_chrome_trace(std::ostream& out) const;
  void write_jsonl(std::ostream& out) const;

  // CollectiveSink
  uint64_t on_issue(const Record& issued) override { return record_issue(issued); }
  void on_end(const Record&, uint64_t token, const WorkTimes& times, std::exception_ptr error) override {
    record_completion(static_cast<size_t>(token), times, std::move(error));
  }

 private:
  uint64_t tick_locked(int rank) { return ++clocks_[static_cast<size_t>(rank)]; }
  void check_rank(int rank) const;

  const int world_size_;
  mutable std::mutex mutex_;
  std::vector<Record> events_;    // by id; guarded by mutex_
  std::vector<uint64_t> clocks_;  // per rank; guarded by mutex_
  // (group, seq) -> the largest issue clock of its entries so far, so that a
  // completion costs O(1) rather than a scan of every member's entry (O(N)
  // per rank, O(N^2) per collective); guarded by mutex_.
  std::map<std::pair<std::string, uint64_t>, uint64_t> latest_issue_;
};

}  // namespace fsdpsim::observe
