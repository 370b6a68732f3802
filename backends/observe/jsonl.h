#pragma once
// The line-per-record trace file (what `fsdpsim run` writes beside the
// Chrome trace and the replay tool reads): its writer and its validating
// reader.
//
// Format: a header line {"schema":"fsdpsim.trace","version":2,"world_size":N},
// then one JSON object per record, keyed as Record's fields: id, rank, kind,
// name, detail, [group, group_ranks, seq, op, dtype, in_numel, out_numel,
// reduce_op, root: collectives only], issue_ns, start_ns, end_ns,
// logical_clock_issue, logical_clock_end, status, error. op, reduce_op,
// dtype and status are spelled as their to_string() / dtype_name() spell
// them. Adding a field means a new version: the reader rejects unknown fields.
// Version 2 (written now) defines each group once, on a line
// {"kind":"group","group":NAME,"group_ranks":[...]} before the group's first
// record; its records leave group_ranks out (a record keeps it only where
// its group's name was defined with other ranks). Version 1 (still read)
// puts group_ranks on every collective record.
//
// A streamed trace (TraceRecorder::stream_to) is the same format; its
// records are interleaved across ranks (each rank's in recording order), so a
// reader that wants them rank by rank stable-sorts by rank (sort_by_rank).
//
// Thread-safety: pure functions of their arguments; a JsonlWriter is not
// thread-safe (its owner serialises calls).

#include <cstddef>
#include <functional>
#include <iosfwd>
#include <string>
#include <unordered_map>
#include <vector>

#include "backends/observe/record.h"

namespace fsdpsim::observe {

constexpr const char* kJsonlSchema = "fsdpsim.trace";
constexpr int kJsonlVersion = 2;
/// The kind of a version-2 group definition line.
constexpr const char* kGroupKind = "group";
/// Most records read_jsonl accepts, and its longest line (bytes).
constexpr size_t kMaxJsonlEvents = size_t{1} << 24;
constexpr size_t kMaxJsonlLineBytes = size_t{1} << 20;

/// What read_jsonl_trace() returns: the header and the records.
struct JsonlTrace {
  int version = 0;
  int world_size = 0;
  std::vector<Record> events;
};

/// Writes the format one record at a time: the header on construction, each
/// group's definition before its first record. write_jsonl and the streaming
/// TraceRecorder both write through it.
class JsonlWriter {
 public:
  JsonlWriter(std::ostream& out, int world_size);
  void write(const Record& record);

 private:
  std::ostream& out_;
  std::unordered_map<std::string, GroupRanks> defined_;  // group name -> the ranks its line defined
};

/// Writes the header and `records` in their order.
void write_jsonl(std::ostream& out, const std::vector<Record>& records, int world_size);

/// Reads write_jsonl's output, validating every field. Throws
/// std::runtime_error("trace line N: <field>: <problem>") on malformed
/// input; bounded by kMaxJsonlLineBytes / kMaxJsonlEvents.
JsonlTrace read_jsonl_trace(std::istream& in);
std::vector<Record> read_jsonl(std::istream& in);
/// As read_jsonl_trace, handing each record to `each` instead of keeping it
/// (memory: the groups and the ids seen). Returns the header's world size
/// through `header` before the first record.
void read_jsonl_records(std::istream& in, const std::function<void(const JsonlTrace& header)>& header,
                        const std::function<void(Record&& record)>& each);

/// Stable-sorts records by rank: a streamed trace in TraceRecorder::events()'s
/// order (each rank's records keep their file order).
void sort_by_rank(std::vector<Record>& records);

}  // namespace fsdpsim::observe
