#pragma once
// The Chrome trace (JSON Perfetto and chrome://tracing open) of a world's
// records; the layout is described in chrome_trace.cpp.
//
// Thread-safety: a pure function of its arguments.

#include <iosfwd>
#include <vector>

#include "backends/observe/record.h"

namespace fsdpsim::observe {

/// The trace's process, and the thread track of each rank (pid and tid 0 are
/// avoided: viewers treat them as the kernel's idle task).
constexpr int kChromePid = 1;
constexpr int chrome_tid(int rank) { return rank + 1; }

/// Writes `records` (every rank's, as TraceRecorder::events() orders them)
/// of a world of `world_size` ranks as one JSON object and a newline.
void write_chrome_trace(std::ostream& out, const std::vector<Record>& records, int world_size);

/// The Chrome trace of a JSONL trace (jsonl.h; streamed or not): its records
/// rank by rank (sort_by_rank) through write_chrome_trace, so the result is
/// byte-equal to writing the same records from memory. Throws read_jsonl's
/// std::runtime_error for a malformed trace.
void write_chrome_trace_from_jsonl(std::istream& jsonl, std::ostream& out);

}  // namespace fsdpsim::observe
