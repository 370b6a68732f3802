#pragma once
// Trace of a world: every collective each rank issued (and, from the engine,
// events such as unshard / reshard / post_backward) with wall-clock times and
// a per-rank Lamport clock, written as a Chrome trace (Perfetto) or as a
// versioned JSONL file the replay tool reads back.
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
#include <utility>
#include <vector>

#include "backends/clock.h"
#include "backends/forwarding_process_group.h"
#include "backends/process_group.h"

namespace fsdpsim::sim {

/// One record of a trace. Collectives (kind "collective") fill every field;
/// engine events (any other kind, e.g. "unshard", "post_backward") use name =
/// the unit's FQN, detail = the training state, issue_ns = start_ns, and leave
/// the collective fields at their defaults.
struct TraceEvent {
  uint64_t id = 0;        ///< recording order within the world (unique)
  int rank = 0;           ///< global rank
  std::string kind;       ///< "collective" or an engine event kind
  std::string name;       ///< collectives: the op ("all_gather"); engine: unit FQN
  std::string detail;     ///< collectives: CollectiveDesc::call_string(); engine: training state

  // Collectives only.
  std::string group;             ///< process group name
  std::vector<int> group_ranks;  ///< global ranks of the group, by group rank
  uint64_t seq = 0;              ///< per-group sequence number (1, 2, ...)
  CollectiveOp op = CollectiveOp::Barrier;
  std::string dtype;             ///< c10's name, as Kineto writes it: "Float", "BFloat16"
  int64_t in_numel = 0;
  int64_t out_numel = 0;
  ReduceOp reduce_op = ReduceOp::Sum;
  int root = 0;                  ///< broadcast root (group rank)

  /// Nanoseconds of the recording clock; 0 = never happened.
  int64_t issue_ns = 0;
  int64_t start_ns = 0;
  int64_t end_ns = 0;
  /// The rank's Lamport clock when issued and when completed (0 = not yet).
  uint64_t logical_clock_issue = 0;
  uint64_t logical_clock_end = 0;
  std::string status;  ///< "completed", "failed" or "in_flight"
  std::string error;   ///< what() of the failure, empty otherwise

  bool is_collective() const { return kind == kCollectiveKind; }

  static constexpr const char* kCollectiveKind = "collective";
};

bool operator==(const TraceEvent& a, const TraceEvent& b);
inline bool operator!=(const TraceEvent& a, const TraceEvent& b) { return !(a == b); }

/// What read_jsonl_trace() returns: the header and the events.
struct JsonlTrace {
  int version = 0;
  int world_size = 0;
  std::vector<TraceEvent> events;
};

/// Records one world's events and writes them out.
///
/// A recorder describes one run of a world: (group, seq) must name one
/// collective (a World that runs twice needs a recorder per run).
///
/// Logical clock (Lamport): every recorded event ticks its rank's clock. When
/// a collective completes on rank r, clock_r = max(clock_r, issue clocks of
/// every rank's entry for the same (group, seq) recorded so far) + 1. The
/// traced group records an issue before handing the call to the backend, so a
/// completion's clock exceeds the issue clock of every rank that took part.
class TraceRecorder {
 public:
  /// Largest world a trace describes, and most events read_jsonl accepts.
  static constexpr int kMaxWorldSize = 1 << 16;
  static constexpr size_t kMaxJsonlEvents = size_t{1} << 24;
  /// Longest JSONL line read_jsonl accepts (bytes).
  static constexpr size_t kMaxJsonlLineBytes = size_t{1} << 20;

  explicit TraceRecorder(int world_size);

  int world_size() const { return world_size_; }

  /// A collective was issued on global rank `rank`; returns the id to pass to
  /// record_completion. Throws std::invalid_argument for a rank outside the world.
  size_t record_issue(int rank, const CollectiveDesc& desc, const std::vector<int>& group_ranks,
                      int64_t issue_ns);
  /// The collective `id` completed (error == nullptr) or failed. start/end
  /// come from `times`; its issue_ns is ignored (the recorded one stays). A
  /// second completion of the same id is ignored.
  void record_completion(size_t id, const WorkTimes& times, std::exception_ptr error);
  /// An engine event that ran on `rank` from start_ns to end_ns. `kind` is a
  /// lowercase identifier other than "collective".
  void record_engine_event(int rank, std::string kind, std::string name, std::string detail,
                           int64_t start_ns, int64_t end_ns);

  /// Adds events recorded elsewhere (another process's rank), keeping their
  /// times and logical clocks; ids are renumbered. Throws
  /// std::invalid_argument for a rank outside the world.
  void import_events(const std::vector<TraceEvent>& events);

  /// Every event, rank by rank, each rank's in recording order (issue order
  /// for collectives; an engine event is recorded when it ends).
  std::vector<TraceEvent> events() const;
  size_t size() const;

  /// Chrome trace JSON (Perfetto, chrome://tracing); see trace.cpp for layout.
  void write_chrome_trace(std::ostream& out) const;
  /// The Chrome trace's process, and the thread track of each rank (pid and
  /// tid 0 are avoided: viewers treat them as the kernel's idle task).
  static constexpr int kChromePid = 1;
  static constexpr int chrome_tid(int rank) { return rank + 1; }
  /// Header line {"schema":"fsdpsim.trace","version":1,"world_size":N}, then
  /// one JSON object per event in events() order, keyed as TraceEvent's
  /// fields: id, rank, kind, name, detail, [group, group_ranks, seq, op,
  /// dtype, in_numel, out_numel, reduce_op, root: collectives only], issue_ns,
  /// start_ns, end_ns, logical_clock_issue, logical_clock_end, status, error.
  /// op and reduce_op are spelled as to_string() spells them. Adding a field
  /// means a new version: the reader rejects unknown fields.
  void write_jsonl(std::ostream& out) const;

  /// Reads write_jsonl's output, validating every field. Throws
  /// std::runtime_error("trace line N: <field>: <problem>") on malformed
  /// input; bounded by kMaxJsonlLineBytes / kMaxJsonlEvents.
  static std::vector<TraceEvent> read_jsonl(std::istream& in);
  static JsonlTrace read_jsonl_trace(std::istream& in);

  static constexpr const char* kSchema = "fsdpsim.trace";
  static constexpr int kVersion = 1;

 private:
  uint64_t tick_locked(int rank) { return ++clocks_[static_cast<size_t>(rank)]; }
  void check_rank(int rank) const;

  const int world_size_;
  mutable std::mutex mutex_;
  std::vector<TraceEvent> events_;         // by id; guarded by mutex_
  std::vector<uint64_t> clocks_;           // per rank; guarded by mutex_
  // (group, seq) -> ids of every rank's entry; guarded by mutex_.
  std::map<std::pair<std::string, uint64_t>, std::vector<size_t>> by_collective_;
};

/// Decorator that records every collective of `inner` in a TraceRecorder:
/// the issue before the call reaches the backend, the completion (times,
/// error) from Work::on_completion. Local argument errors (the checks in
/// collective_checks.h) are not recorded: such a call never issues. A backend
/// that throws while issuing is recorded as failed. `clock` must be the clock
/// of `inner`'s Work times and outlive this group and its subgroups.
///
/// Thread-safety: as ProcessGroup (one rank's group); the recorder is shared.
/// The completion callback calls Work::times() and Work::exception(), so a
/// backend must run on_completion callbacks without holding the lock those take.
class TracedProcessGroup final : public ForwardingProcessGroup {
 public:
  TracedProcessGroup(ProcessGroupPtr inner, std::shared_ptr<TraceRecorder> recorder, int global_rank,
                     const Clock& clock = SteadyClock::instance());

  const std::shared_ptr<TraceRecorder>& recorder() const { return recorder_; }

 protected:
  WorkPtr call(const CollectiveDesc& desc, const std::function<WorkPtr()>& issue) override;
  /// The subgroup is traced into the same recorder.
  ProcessGroupPtr wrap(ProcessGroupPtr sub) override;

 private:
  std::shared_ptr<TraceRecorder> recorder_;
  int global_rank_;
  const Clock* clock_;
};

}  // namespace fsdpsim::sim
