#include "backends/observe/trace_recorder.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ostream>
#include <stdexcept>

#include "backends/errors.h"
#include "backends/observe/chrome_trace.h"
#include "backends/observe/jsonl.h"

namespace fsdpsim::observe {

namespace {
// A rank's ids not yet written, in recording order (a vector: an empty
// std::deque allocates, and a world has up to 65536 of these).
struct RankQueue {
  std::vector<uint64_t> ids;
  size_t head = 0;
  bool empty() const { return head == ids.size(); }
  uint64_t front() const { return ids[head]; }
  void push_back(uint64_t id) { ids.push_back(id); }
  void pop_front() {
    if (++head == ids.size()) {
      ids.clear();
      head = 0;
    } else if (head >= 64 && head * 2 >= ids.size()) {  // a rank never idle: drop the written front
      ids.erase(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(head));
      head = 0;
    }
  }
};

}  // namespace

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

struct TraceRecorder::Stream {
  Stream(std::ostream& out, std::string name, int world_size)
      : out(out),
        name(std::move(name)),
        writer(out, world_size),
        queue(static_cast<size_t>(world_size)),
        volume(static_cast<size_t>(world_size)) {}
  std::ostream& out;
  const std::string name;
  JsonlWriter writer;
  std::unordered_map<uint64_t, Record> live;  // by id: every record not yet written
  std::vector<RankQueue> queue;               // per rank
  std::vector<CommVolume> volume;             // per rank, of the written records
  std::string error;                          // the first write failure
  bool finished = false;
};

TraceRecorder::~TraceRecorder() = default;

void TraceRecorder::check_recording_locked() const {
  if (stream_ && stream_->finished) {
    throw std::logic_error("TraceRecorder: a record after finish_stream() of " + stream_->name);
  }
}

uint64_t TraceRecorder::add_locked(Record record) {
  const uint64_t id = next_id_++;
  record.id = id;
  if (!stream_) {
    events_.push_back(std::move(record));
    peak_ = events_.size();
    return id;
  }
  const int rank = record.rank;
  stream_->queue[static_cast<size_t>(rank)].push_back(id);
  stream_->live.emplace(id, std::move(record));
  peak_ = std::max(peak_, stream_->live.size());
  drain_locked(rank);
  return id;
}

Record* TraceRecorder::find_locked(uint64_t id) {
  if (!stream_) return id < events_.size() ? &events_[id] : nullptr;
  auto found = stream_->live.find(id);
  return found == stream_->live.end() ? nullptr : &found->second;
}

void TraceRecorder::note_issue_locked(const Record& record) {
  Issues& issues = issues_[{record.group, record.seq}];
  issues.latest = std::max(issues.latest, record.logical_clock_issue);
}

void TraceRecorder::note_end_locked(const Record& record) {
  auto found = issues_.find({record.group, record.seq});
  if (found == issues_.end()) return;
  if (++found->second.ended >= record.group_ranks.size()) issues_.erase(found);
}

void TraceRecorder::drain_locked(int rank) {
  auto& queue = stream_->queue[static_cast<size_t>(rank)];
  while (!queue.empty()) {
    auto found = stream_->live.find(queue.front());
    if (found->second.status == RecordStatus::InFlight && !stream_->finished) return;
    write_locked(found->second);
    stream_->live.erase(found);
    queue.pop_front();
  }
}

void TraceRecorder::write_locked(const Record& record) {
  add_to_comm_volume(stream_->volume[static_cast<size_t>(record.rank)], record);
  if (!stream_->error.empty()) return;  // the stream failed: the rest is lost
  stream_->writer.write(record);
  if (!stream_->out) {
    stream_->error = errno != 0 ? std::strerror(errno) : "write failed";
  }
}

size_t TraceRecorder::record_issue(Record issued) {
  check_rank(issued.rank);
  issued.status = RecordStatus::InFlight;
  std::lock_guard<std::mutex> lock(mutex_);
  check_recording_locked();
  issued.logical_clock_issue = tick_locked(issued.rank);
  note_issue_locked(issued);
  return static_cast<size_t>(add_locked(std::move(issued)));
}

void TraceRecorder::import_events(const std::vector<Record>& events) {
  for (const auto& event : events) check_rank(event.rank);
  std::lock_guard<std::mutex> lock(mutex_);
  check_recording_locked();
  for (Record event : events) {
    uint64_t& clock = clocks_[static_cast<size_t>(event.rank)];
    clock = std::max({clock, event.logical_clock_issue, event.logical_clock_end});
    if (event.is_collective()) {
      note_issue_locked(event);
      if (event.status != RecordStatus::InFlight) note_end_locked(event);
    }
    add_locked(std::move(event));
  }
}

void TraceRecorder::record_completion(size_t id, const WorkTimes& times, std::exception_ptr error) {
  std::string message = error_text(error);
  std::lock_guard<std::mutex> lock(mutex_);
  Record* event = find_locked(id);
  if (event == nullptr && stream_ && id < next_id_) return;  // written already: a second completion
  if (event == nullptr || !event->is_collective()) {
    throw std::out_of_range("TraceRecorder: no collective with id " + std::to_string(id));
  }
  if (event->status != RecordStatus::InFlight) return;
  uint64_t& clock = clocks_[static_cast<size_t>(event->rank)];
  uint64_t latest = clock;
  auto peers = issues_.find({event->group, event->seq});
  if (peers != issues_.end()) latest = std::max(latest, peers->second.latest);
  clock = latest + 1;
  event->logical_clock_end = clock;
  event->start_ns = times.start_ns;
  event->end_ns = times.end_ns;
  event->status = error ? RecordStatus::Failed : RecordStatus::Completed;
  event->error = std::move(message);
  note_end_locked(*event);
  if (stream_) drain_locked(event->rank);
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
  check_recording_locked();
  event.logical_clock_issue = event.logical_clock_end = tick_locked(rank);
  add_locked(std::move(event));
}

std::vector<Record> TraceRecorder::events() const {
  std::vector<Record> out;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!stream_) {
      out = events_;
    } else {
      for (const auto& queue : stream_->queue) {
        for (size_t i = queue.head; i < queue.ids.size(); ++i) out.push_back(stream_->live.at(queue.ids[i]));
      }
    }
  }
  // Ids are recording order, and a rank records its own issues in call order.
  sort_by_rank(out);
  return out;
}

size_t TraceRecorder::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stream_ ? stream_->live.size() : events_.size();
}

size_t TraceRecorder::peak_size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return peak_;
}

uint64_t TraceRecorder::recorded() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return next_id_;
}

size_t TraceRecorder::open_collectives() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return issues_.size();
}

void TraceRecorder::stream_to(std::ostream& out, std::string name) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (stream_ || next_id_ != 0) {
    throw std::logic_error("TraceRecorder::stream_to(" + name + "): call it once, before the first record (" +
                           std::to_string(next_id_) + " recorded)");
  }
  stream_ = std::make_unique<Stream>(out, std::move(name), world_size_);
  if (!out) stream_->error = errno != 0 ? std::strerror(errno) : "write failed";
}

bool TraceRecorder::streaming() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stream_ != nullptr;
}

void TraceRecorder::finish_stream() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!stream_) throw std::logic_error("TraceRecorder::finish_stream: not streaming");
  if (!stream_->finished) {
    stream_->finished = true;
    for (int rank = 0; rank < world_size_; ++rank) drain_locked(rank);
    if (stream_->error.empty() && !stream_->out.flush()) {
      stream_->error = errno != 0 ? std::strerror(errno) : "flush failed";
    }
  }
  if (!stream_->error.empty()) {
    throw std::runtime_error("cannot write the trace stream " + stream_->name + ": " + stream_->error);
  }
}

CommVolume TraceRecorder::comm_volume(int rank) const {
  check_rank(rank);
  std::lock_guard<std::mutex> lock(mutex_);
  if (!stream_) return observe::comm_volume(events_, rank);
  CommVolume volume = stream_->volume[static_cast<size_t>(rank)];
  const RankQueue& queue = stream_->queue[static_cast<size_t>(rank)];
  for (size_t i = queue.head; i < queue.ids.size(); ++i) add_to_comm_volume(volume, stream_->live.at(queue.ids[i]));
  return volume;
}

void TraceRecorder::write_chrome_trace(std::ostream& out) const {
  observe::write_chrome_trace(out, events(), world_size_);
}

void TraceRecorder::write_jsonl(std::ostream& out) const { observe::write_jsonl(out, events(), world_size_); }

}  // namespace fsdpsim::observe
