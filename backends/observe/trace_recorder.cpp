#include "backends/observe/trace_recorder.h"

#include <algorithm>
#include <stdexcept>

#include "backends/errors.h"
#include "backends/observe/chrome_trace.h"
#include "backends/observe/jsonl.h"

namespace fsdpsim::observe {

TraceRecorder::TraceRecorder(int world_size) : world_size_(world_size) {
  if (world_size < 1 || world_size > kMaxWorldSize) {
    throw std::invalid_argument("TraceRecorder: world_size " + std::to_string(world_size) + " is outside [1, " +
                                std::to_string(kMaxWorldSize) + "]");
  }
  clocks_.assign(static_cast<size_t>(world_size), 0);
}

void TraceRecorder::check_rank(int rank) const {
  if (rank < 0 || rank >= world_size_) {
    throw std::invalid_argument("TraceRecorder: rank " + std::to_string(rank) + " is outside the world of " +
                                std::to_string(world_size_) + " ranks");
  }
}

size_t TraceRecorder::record_issue(int rank, const CollectiveDesc& desc, const std::vector<int>& group_ranks,
                                   int64_t issue_ns) {
  return record_issue(collective_record(rank, desc, group_ranks, issue_ns));
}

size_t TraceRecorder::record_issue(Record issued) {
  check_rank(issued.rank);
  issued.status = RecordStatus::InFlight;
  std::lock_guard<std::mutex> lock(mutex_);
  const size_t id = events_.size();
  issued.id = id;
  issued.logical_clock_issue = tick_locked(issued.rank);
  uint64_t& latest = latest_issue_[{issued.group, issued.seq}];
  latest = std::max(latest, issued.logical_clock_issue);
  events_.push_back(std::move(issued));
  return id;
}

void TraceRecorder::import_events(const std::vector<Record>& events) {
  for (const auto& event : events) check_rank(event.rank);
  std::lock_guard<std::mutex> lock(mutex_);
  for (Record event : events) {
    event.id = events_.size();
    uint64_t& clock = clocks_[static_cast<size_t>(event.rank)];
    clock = std::max({clock, event.logical_clock_issue, event.logical_clock_end});
    if (event.is_collective()) {
      uint64_t& latest = latest_issue_[{event.group, event.seq}];
      latest = std::max(latest, event.logical_clock_issue);
    }
    events_.push_back(std::move(event));
  }
}

void TraceRecorder::record_completion(size_t id, const WorkTimes& times, std::exception_ptr error) {
  std::string message = error_text(error);
  std::lock_guard<std::mutex> lock(mutex_);
  if (id >= events_.size() || !events_[id].is_collective()) {
    throw std::out_of_range("TraceRecorder: no collective with id " + std::to_string(id));
  }
  Record& event = events_[id];
  if (event.status != RecordStatus::InFlight) return;
  uint64_t& clock = clocks_[static_cast<size_t>(event.rank)];
  uint64_t latest = clock;
  auto peers = latest_issue_.find({event.group, event.seq});
  if (peers != latest_issue_.end()) latest = std::max(latest, peers->second);
  clock = latest + 1;
  event.logical_clock_end = clock;
  event.start_ns = times.start_ns;
  event.end_ns = times.end_ns;
  event.status = error ? RecordStatus::Failed : RecordStatus::Completed;
  event.error = std::move(message);
}

void TraceRecorder::record_engine_event(int rank, std::string kind, std::string name, std::string detail,
                                        int64_t start_ns, int64_t end_ns) {
  check_rank(rank);
  if (!is_engine_kind(kind)) {
    throw std::invalid_argument("TraceRecorder: engine event kind '" + kind +
                                "' must be a lowercase identifier other than 'collective'");
  }
  if (start_ns < 0 || end_ns < start_ns) {
    throw std::invalid_argument("TraceRecorder: engine event " + kind + " " + name + " has times [" +
                                std::to_string(start_ns) + ", " + std::to_string(end_ns) + "]");
  }
  Record event;
  event.rank = rank;
  event.kind = std::move(kind);
  event.name = std::move(name);
  event.detail = std::move(detail);
  event.issue_ns = start_ns;
  event.start_ns = start_ns;
  event.end_ns = end_ns;
  event.status = RecordStatus::Completed;

  std::lock_guard<std::mutex> lock(mutex_);
  event.id = events_.size();
  event.logical_clock_issue = event.logical_clock_end = tick_locked(rank);
  events_.push_back(std::move(event));
}

std::vector<Record> TraceRecorder::events() const {
  std::vector<Record> out;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    out = events_;
  }
  // Ids are recording order, and a rank records its own issues in call order.
  std::stable_sort(out.begin(), out.end(), [](const Record& a, const Record& b) { return a.rank < b.rank; });
  return out;
}

size_t TraceRecorder::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return events_.size();
}

void TraceRecorder::write_chrome_trace(std::ostream& out) const {
  observe::write_chrome_trace(out, events(), world_size_);
}

void TraceRecorder::write_jsonl(std::ostream& out) const { observe::write_jsonl(out, events(), world_size_); }

}  // namespace fsdpsim::observe
