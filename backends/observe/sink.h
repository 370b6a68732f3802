#pragma once
// What ObservedProcessGroup feeds: a sink sees each collective twice, when
// its rank issues it and when it ends. TraceRecorder and FlightRecorder are
// the sinks; a test may add its own.
//
// Thread-safety: a sink is shared by every rank of a world, so on_issue and
// on_end must be thread-safe; on_end may run on another rank's thread (a
// Work::on_completion callback) and must not block on a collective.

#include <cstdint>
#include <exception>

#include "backends/observe/record.h"
#include "backends/process_group.h"

namespace fsdpsim::observe {

class CollectiveSink {
 public:
  virtual ~CollectiveSink() = default;
  /// Ranks this sink can record (global ranks 0 .. world_size() - 1).
  virtual int world_size() const = 0;
  /// `issued` (status InFlight, id and clocks unset) was just issued; the
  /// returned token comes back in on_end.
  virtual uint64_t on_issue(const Record& issued) = 0;
  /// The collective ended: completed (error == nullptr) or failed. `times`
  /// are the Work's (an end the backend left at 0 is the clock's).
  virtual void on_end(const Record& issued, uint64_t token, const WorkTimes& times, std::exception_ptr error) = 0;
};

}  // namespace fsdpsim::observe
