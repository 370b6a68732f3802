#pragma once
// Trace of a world: every collective each rank issued (and, from the engine,
// events such as unshard / reshard / post_backward) with the clock's times
// and a per-rank Lamport clock; chrome_trace.h and jsonl.h write it out.
// In streaming mode (stream_to) each record is written to a JSONL stream
// once final and dropped, so memory holds only what is still in flight.
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
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
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
/// The largest issue clock of a (group, seq) is kept until every member of its
/// group (group_ranks.size() records) has ended: no completion can need it
/// after that, so the bookkeeping is O(collectives in flight).
///
/// Streaming (stream_to): a record is final once its collective completed or
/// failed (an engine event when recorded). It is written to the stream, then
/// dropped, once it and every earlier record of its rank are final, so the
/// file holds each rank's records in recording order, ranks interleaved
/// (sort_by_rank in jsonl.h gives events()'s order). Memory: the records in
/// flight and those of their rank recorded behind them.
class TraceRecorder final : public CollectiveSink {
 public:
  /// Throws std::invalid_argument for world_size outside [1, kMaxWorldSize].
  explicit TraceRecorder(int world_size);
  ~TraceRecorder() override;

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

  /// Every record in memory, rank by rank, each rank's in recording order
  /// (issue order for collectives; an engine event is recorded when it ends).
  /// Streaming: only the records not yet written.
  std::vector<Record> events() const;
  /// Records in memory now, and at most so far.
  size_t size() const;
  size_t peak_size() const;
  /// Records recorded so far (written or in memory).
  uint64_t recorded() const;
  /// (group, seq)s kept for the logical clock: those some member has not ended.
  size_t open_collectives() const;

  /// Streams every record from now on to `out` (named `name` in errors) as a
  /// JSONL trace (jsonl.h), writing its header now. Call before the first
  /// record; throws std::logic_error otherwise or when already streaming.
  /// `out` must outlive finish_stream().
  void stream_to(std::ostream& out, std::string name);
  bool streaming() const;
  /// Writes the records still in memory (in flight, or behind one on their
  /// rank) and flushes. Throws std::runtime_error naming the stream if any
  /// write failed (then the records from the failure on are lost). Records
  /// after it throw std::logic_error; completions of written ones are ignored.
  void finish_stream();
  /// What rank `rank` moved (comm_volume of its records), streaming or not.
  CommVolume comm_volume(int rank) const;

  /// write_chrome_trace / write_jsonl (chrome_trace.h, jsonl.h) of events().
  void write_chrome_trace(std::ostream& out) const;
  void write_jsonl(std::ostream& out) const;

  // CollectiveSink
  uint64_t on_issue(const Record& issued) override { return record_issue(issued); }
  void on_end(const Record&, uint64_t token, const WorkTimes& times, std::exception_ptr error) override {
    record_completion(static_cast<size_t>(token), times, std::move(error));
  }

 private:
  // The largest issue clock of a (group, seq)'s records so far, and how many
  // of them ended (the entry goes once all group_ranks.size() have).
  struct Issues {
    uint64_t latest = 0;
    size_t ended = 0;
  };
  using CollectiveKey = std::pair<std::string, uint64_t>;  // (group, seq)

  uint64_t tick_locked(int rank) { return ++clocks_[static_cast<size_t>(rank)]; }
  void check_rank(int rank) const;
  void check_recording_locked() const;
  // Gives `record` the next id and keeps it (memory) or queues it (streaming).
  uint64_t add_locked(Record record);
  Record* find_locked(uint64_t id);
  void note_issue_locked(const Record& record);
  void note_end_locked(const Record& record);
  // Streaming: writes rank's leading final records and drops them.
  void drain_locked(int rank);
  void write_locked(const Record& record);

  const int world_size_;
  mutable std::mutex mutex_;
  // Everything below is guarded by mutex_.
  std::vector<Record> events_;    // by id; memory mode
  std::vector<uint64_t> clocks_;  // per rank
  // (group, seq) -> its issues, so that a completion costs O(1) rather than a
  // scan of every member's entry (O(N) per rank, O(N^2) per collective).
  std::map<CollectiveKey, Issues> issues_;
  uint64_t next_id_ = 0;
  size_t peak_ = 0;

  // Streaming mode.
  struct Stream;
  std::unique_ptr<Stream> stream_;
};

}  // namespace fsdpsim::observe
