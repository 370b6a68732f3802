#pragma once
// The one record type of the observability layer: a collective one rank
// issued (kind "collective") or an engine event (unshard, post_backward, ...)
// with times in the int64 nanoseconds of backends/clock.h. The trace
// recorder, the flight recorder, the Chrome and JSONL writers, the JSONL
// reader and the replay tool all speak it.
//
// Thread-safety: plain values and pure functions; no shared state.

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <initializer_list>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backends/process_group.h"

namespace fsdpsim::observe {

/// Largest world a trace or flight recorder describes.
constexpr int kMaxWorldSize = 1 << 16;

/// Where a collective stands on its rank. Engine events are always Completed.
enum class RecordStatus { InFlight, Completed, Failed };
/// "in_flight", "completed", "failed" (the trace files' spelling).
const char* to_string(RecordStatus status);
std::optional<RecordStatus> record_status_from_string(const std::string& name);

/// c10's name of a dtype, as Kineto writes it ("Float", "BFloat16"), and back
/// (nullopt for a name no ScalarType has).
std::string dtype_name(at::ScalarType dtype);
std::optional<at::ScalarType> dtype_from_name(const std::string& name);

/// The global ranks of a collective's group, by group rank: immutable, and
/// shared by every copy of a record and every record made from one value
/// (the observe layer makes one per group), so a world of N ranks does not
/// copy N numbers into each record. Reads like a const std::vector<int>.
class GroupRanks {
 public:
  GroupRanks() : ranks_(empty_ranks()) {}
  GroupRanks(std::vector<int> ranks)  // NOLINT(google-explicit-constructor): a vector is a group's ranks
      : ranks_(std::make_shared<const std::vector<int>>(std::move(ranks))) {}
  GroupRanks(std::initializer_list<int> ranks) : GroupRanks(std::vector<int>(ranks)) {}

  const std::vector<int>& vector() const { return *ranks_; }
  operator const std::vector<int>&() const { return *ranks_; }  // NOLINT(google-explicit-constructor)
  size_t size() const { return ranks_->size(); }
  bool empty() const { return ranks_->empty(); }
  int operator[](size_t i) const { return (*ranks_)[i]; }
  std::vector<int>::const_iterator begin() const { return ranks_->begin(); }
  std::vector<int>::const_iterator end() const { return ranks_->end(); }

  friend bool operator==(const GroupRanks& a, const GroupRanks& b) {
    return a.ranks_ == b.ranks_ || *a.ranks_ == *b.ranks_;
  }
  friend bool operator!=(const GroupRanks& a, const GroupRanks& b) { return !(a == b); }
  friend bool operator==(const GroupRanks& a, const std::vector<int>& b) { return *a.ranks_ == b; }
  friend bool operator!=(const GroupRanks& a, const std::vector<int>& b) { return *a.ranks_ != b; }

 private:
  static const std::shared_ptr<const std::vector<int>>& empty_ranks() {
    static const auto none = std::make_shared<const std::vector<int>>();
    return none;
  }
  std::shared_ptr<const std::vector<int>> ranks_;  // never null
};

/// One record. Collectives fill every field; engine events use name = the
/// unit's FQN, detail = the training state, issue_ns = start_ns, and leave
/// the collective fields at their defaults.
struct Record {
  uint64_t id = 0;     ///< recording order within its recorder (unique)
  int rank = 0;        ///< global rank
  std::string kind;    ///< "collective" or an engine event kind
  std::string name;    ///< collectives: the op ("all_gather"); engine: unit FQN
  std::string detail;  ///< collectives: CollectiveDesc::call_string(); engine: training state

  // Collectives only.
  std::string group;       ///< process group name
  GroupRanks group_ranks;  ///< global ranks of the group, by group rank
  uint64_t seq = 0;        ///< per-group sequence number (1, 2, ...)
  CollectiveOp op = CollectiveOp::Barrier;
  at::ScalarType dtype = at::ScalarType::Undefined;
  int64_t in_numel = 0;
  int64_t out_numel = 0;
  ReduceOp reduce_op = ReduceOp::Sum;
  int root = 0;  ///< broadcast root (group rank)

  /// Nanoseconds of the recording clock; 0 = never happened.
  int64_t issue_ns = 0;
  int64_t start_ns = 0;
  int64_t end_ns = 0;
  /// The rank's Lamport clock when issued and when completed (0 = not yet).
  uint64_t logical_clock_issue = 0;
  uint64_t logical_clock_end = 0;
  RecordStatus status = RecordStatus::InFlight;
  std::string error;  ///< what() of the failure, empty otherwise

  bool is_collective() const { return kind == kCollectiveKind; }
  /// Bytes of one element of dtype (c10::elementSize); throws for a dtype
  /// without one (Undefined: an engine event).
  int64_t element_size() const;
  int64_t in_bytes() const { return in_numel * element_size(); }
  int64_t out_bytes() const { return out_numel * element_size(); }

  static constexpr const char* kCollectiveKind = "collective";
};

bool operator==(const Record& a, const Record& b);
inline bool operator!=(const Record& a, const Record& b) { return !(a == b); }

/// The in-flight record of a collective `rank` issued at `issue_ns` (id and
/// logical clocks are the recorder's to set).
Record collective_record(int rank, const CollectiveDesc& desc, GroupRanks group_ranks, int64_t issue_ns);

/// Whether `kind` may name an engine event: a lowercase identifier (a-z,
/// 0-9, _) of 1-64 characters other than "collective".
bool is_engine_kind(const std::string& kind);

/// What one rank moved: all-gather outputs, reduce-scatter and all-reduce
/// inputs, in bytes of each record's own dtype; and how many of each op.
struct CommVolume {
  int64_t gathered_bytes = 0;
  int64_t reduced_bytes = 0;
  std::map<std::string, int64_t> op_counts;  ///< by to_string(op)
};
CommVolume comm_volume(const std::vector<Record>& records, int rank);
/// Adds one record (of any rank; engine events add nothing) to `volume`.
void add_to_comm_volume(CommVolume& volume, const Record& record);

}  // namespace fsdpsim::observe
