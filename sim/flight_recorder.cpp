#include "sim/flight_recorder.h"

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cstdio>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <tuple>

#include "backends/collective_checks.h"
#include "backends/errors.h"
#include "sim/fake_process_group.h"
#include "sim/trace.h"

namespace fsdpsim::sim {

const char* to_string(FlightState state) {
  switch (state) {
    case FlightState::Scheduled: return "scheduled";
    case FlightState::Started: return "started";
    case FlightState::Completed: return "completed";
    case FlightState::Failed: return "failed";
  }
  return "unknown";
}

namespace {

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

std::string ms(int64_t ns, int64_t origin) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.3f", static_cast<double>(ns - origin) / 1e6);
  return buffer;
}

}  // namespace

FlightRecorder::FlightRecorder(int world_size, size_t capacity_per_rank)
    : world_size_(world_size), capacity_(capacity_per_rank) {
  if (world_size < 1 || world_size > TraceRecorder::kMaxWorldSize) {
    throw std::invalid_argument("FlightRecorder: world_size " + std::to_string(world_size) + " is outside [1, " +
                                std::to_string(TraceRecorder::kMaxWorldSize) + "]");
  }
  if (capacity_per_rank == 0) throw std::invalid_argument("FlightRecorder: capacity_per_rank must be >= 1");
  rings_.resize(static_cast<size_t>(world_size));
  recorded_.assign(static_cast<size_t>(world_size), 0);
}

FlightHandle FlightRecorder::record_scheduled(int rank, const CollectiveDesc& desc, const std::vector<int>& group_ranks,
                                              int64_t now_ns) {
  if (rank < 0 || rank >= world_size_) {
    throw std::invalid_argument("FlightRecorder: rank " + std::to_string(rank) + " is outside the world of " +
                                std::to_string(world_size_));
  }
  FlightEntry entry;
  entry.rank = rank;
  entry.group = desc.group;
  entry.group_ranks = group_ranks;
  entry.seq = desc.seq;
  entry.op = desc.op;
  entry.dtype = c10::toString(desc.dtype);
  entry.input_shape = desc.input_shape;
  entry.output_shape = desc.output_shape;
  entry.call = desc.call_string();
  entry.scheduled_ns = now_ns;
  std::lock_guard<std::mutex> lock(mutex_);
  entry.record_id = next_id_++;
  auto& ring = rings_[static_cast<size_t>(rank)];
  if (ring.size() == capacity_) ring.pop_front();
  ring.push_back(std::move(entry));
  ++recorded_[static_cast<size_t>(rank)];
  return FlightHandle{rank, ring.back().record_id};
}

FlightEntry* FlightRecorder::find_locked(FlightHandle handle) {
  if (handle.rank < 0 || handle.rank >= world_size_) return nullptr;
  auto& ring = rings_[static_cast<size_t>(handle.rank)];
  // Ids grow along the ring: binary search.
  auto it = std::lower_bound(ring.begin(), ring.end(), handle.id,
                             [](const FlightEntry& e, uint64_t id) { return e.record_id < id; });
  return it != ring.end() && it->record_id == handle.id ? &*it : nullptr;
}

void FlightRecorder::record_started(FlightHandle handle, int64_t start_ns) {
  std::lock_guard<std::mutex> lock(mutex_);
  FlightEntry* e = find_locked(handle);
  if (e == nullptr || e->state == FlightState::Completed || e->state == FlightState::Failed) return;
  e->state = FlightState::Started;
  e->started_ns = start_ns;
}

void FlightRecorder::end(FlightHandle handle, FlightState state, int64_t start_ns, int64_t end_ns,
                         const std::string& error) {
  std::lock_guard<std::mutex> lock(mutex_);
  FlightEntry* e = find_locked(handle);
  if (e == nullptr || e->state == FlightState::Completed || e->state == FlightState::Failed) return;
  e->state = state;
  if (start_ns != 0) e->started_ns = start_ns;
  e->completed_ns = end_ns;
  e->error = error;
}

void FlightRecorder::record_completed(FlightHandle handle, int64_t start_ns, int64_t end_ns) {
  end(handle, FlightState::Completed, start_ns, end_ns, "");
}

void FlightRecorder::record_failed(FlightHandle handle, int64_t start_ns, int64_t end_ns, const std::string& error) {
  end(handle, FlightState::Failed, start_ns, end_ns, error.empty() ? "unknown error" : error);
}

std::vector<FlightEntry> FlightRecorder::entries(int rank) const {
  if (rank < 0 || rank >= world_size_) {
    throw std::invalid_argument("FlightRecorder: rank " + std::to_string(rank) + " is outside the world");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  const auto& ring = rings_[static_cast<size_t>(rank)];
  return std::vector<FlightEntry>(ring.begin(), ring.end());
}

uint64_t FlightRecorder::recorded(int rank) const {
  if (rank < 0 || rank >= world_size_) {
    throw std::invalid_argument("FlightRecorder: rank " + std::to_string(rank) + " is outside the world");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  return recorded_[static_cast<size_t>(rank)];
}

std::string FlightRecorder::dump() const {
  std::vector<std::deque<FlightEntry>> rings;
  std::vector<uint64_t> recorded;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    rings = rings_;
    recorded = recorded_;
  }
  int64_t origin = std::numeric_limits<int64_t>::max();
  for (const auto& ring : rings) {
    for (const auto& e : ring) {
      for (int64_t t : {e.scheduled_ns, e.started_ns, e.completed_ns}) {
        if (t != 0) origin = std::min(origin, t);
      }
    }
  }
  if (origin == std::numeric_limits<int64_t>::max()) origin = 0;

  std::ostringstream out;
  out << "flight recorder: the last " << capacity_ << " collectives of each rank, oldest first "
      << "(times in ms since the earliest one shown)\n";
  // Ranks with nothing recorded are listed together, not one line each.
  std::vector<int> silent;
  for (int r = 0; r < world_size_; ++r) {
    const auto& ring = rings[static_cast<size_t>(r)];
    if (ring.empty()) {
      silent.push_back(r);
      continue;
    }
    const uint64_t dropped = recorded[static_cast<size_t>(r)] - ring.size();
    out << "rank " << r << " (" << recorded[static_cast<size_t>(r)] << " recorded";
    if (dropped) out << ", " << dropped << " older not shown";
    out << "):\n";
    for (const auto& e : ring) {
      out << "  #" << e.record_id << " group " << e.group << " seq " << e.seq << " " << e.call << "  "
          << to_string(e.state) << "  scheduled " << ms(e.scheduled_ns, origin);
      if (e.started_ns) out << " started " << ms(e.started_ns, origin);
      if (e.completed_ns) out << (e.state == FlightState::Failed ? " failed " : " completed ") << ms(e.completed_ns, origin);
      if (!e.error.empty()) out << "\n      error: " << first_line(e.error);
      out << "\n";
    }
  }
  if (!silent.empty()) {
    out << ranks_text(silent)
        << ": no collective recorded\n";
  }

  // Where each rank is, per group: the last recorded entry of each member.
  std::map<std::string, std::vector<int>> members;
  for (const auto& ring : rings) {
    for (const auto& e : ring) members.emplace(e.group, e.group_ranks);
  }
  if (!members.empty()) out << "where each rank is (last recorded collective per group):\n";
  for (const auto& [group, ranks] : members) {
    std::map<std::tuple<uint64_t, std::string, std::string>, std::vector<int>> by_place;  // (seq, op, state)
    std::vector<int> none;
    for (int r : ranks) {
      if (r < 0 || r >= world_size_) continue;
      const FlightEntry* last = nullptr;
      for (const auto& e : rings[static_cast<size_t>(r)]) {
        if (e.group == group && (last == nullptr || e.seq >= last->seq)) last = &e;
      }
      if (last == nullptr) {
        none.push_back(r);
      } else {
        by_place[{last->seq, to_string(last->op), to_string(last->state)}].push_back(r);
      }
    }
    out << "  group " << group << ":";
    bool first = true;
    // Highest seq first: the ranks that got furthest lead the line.
    for (auto it = by_place.rbegin(); it != by_place.rend(); ++it) {
      const auto& [seq, op, state] = it->first;
      const auto& rs = it->second;
      out << (first ? " " : "; ") << ranks_text(rs)
          << " at seq " << seq << " " << op << " (" << state << ")";
      first = false;
    }
    if (!none.empty()) {
      out << (first ? " " : "; ") << ranks_text(none)
          << ": no record";
    }
    out << "\n";
  }
  return out.str();
}

std::unique_ptr<FlightRecorder> FlightRecorder::from_trace(const std::vector<TraceEvent>& events, int world_size,
                                                           size_t capacity_per_rank) {
  auto recorder = std::make_unique<FlightRecorder>(world_size, capacity_per_rank);
  // Which ranks issued each (group, seq): decides "started" for unfinished entries.
  std::map<std::pair<std::string, uint64_t>, std::set<int>> issued;
  for (const auto& e : events) {
    if (e.is_collective()) issued[{e.group, e.seq}].insert(e.rank);
  }
  std::vector<const TraceEvent*> ordered;
  for (const auto& e : events) {
    if (!e.is_collective()) continue;
    if (e.rank < 0 || e.rank >= world_size) {
      throw std::invalid_argument("FlightRecorder::from_trace: event rank " + std::to_string(e.rank) +
                                  " is outside the world of " + std::to_string(world_size));
    }
    ordered.push_back(&e);
  }
  // Record ids follow the trace's ids (recording order across ranks).
  std::stable_sort(ordered.begin(), ordered.end(), [](const TraceEvent* a, const TraceEvent* b) { return a->id < b->id; });
  for (const TraceEvent* e : ordered) {
    CollectiveDesc desc;
    desc.group = e->group;
    desc.seq = e->seq;
    desc.op = e->op;
    desc.group_size = static_cast<int>(e->group_ranks.size());
    for (int i = 0; i < static_cast<int>(c10::ScalarType::NumOptions); ++i) {
      if (e->dtype == c10::toString(static_cast<c10::ScalarType>(i))) desc.dtype = static_cast<c10::ScalarType>(i);
    }
    desc.input_shape = {e->in_numel};
    desc.output_shape = {e->out_numel};
    desc.reduce_op = e->reduce_op;
    desc.root = e->root;
    FlightHandle h = recorder->record_scheduled(e->rank, desc, e->group_ranks, e->issue_ns);
    {
      // The trace's own description (keeps factors the desc above lacks).
      std::lock_guard<std::mutex> lock(recorder->mutex_);
      if (FlightEntry* entry = recorder->find_locked(h)) {
        entry->dtype = e->dtype;
        if (!e->detail.empty()) entry->call = e->detail;
      }
    }
    if (e->status == "completed") {
      recorder->record_completed(h, e->start_ns, e->end_ns);
    } else if (e->status == "failed") {
      recorder->record_failed(h, e->start_ns, e->end_ns, e->error);
    } else {
      const auto& who = issued[{e->group, e->seq}];
      const bool all = std::all_of(e->group_ranks.begin(), e->group_ranks.end(), [&](int r) { return who.count(r) > 0; });
      if (all) recorder->record_started(h, e->start_ns);
    }
  }
  return recorder;
}

// ---------------------------------------------------------------------------

FlightRecordingProcessGroup::FlightRecordingProcessGroup(ProcessGroupPtr inner, std::shared_ptr<FlightRecorder> recorder,
                                                         int global_rank, const Clock& clock)
    : ForwardingProcessGroup(std::move(inner), "FlightRecordingProcessGroup"),
      recorder_(std::move(recorder)),
      global_rank_(global_rank),
      clock_(&clock) {
  if (!recorder_) throw CommError("FlightRecordingProcessGroup: the flight recorder is null");
  if (global_rank < 0 || global_rank >= recorder_->world_size()) {
    throw CommError("FlightRecordingProcessGroup: global rank " + std::to_string(global_rank) +
                    " is outside the recorder's world of " + std::to_string(recorder_->world_size()));
  }
}

WorkPtr FlightRecordingProcessGroup::call(const CollectiveDesc& desc, const std::function<WorkPtr()>& issue) {
  const FlightHandle handle = recorder_->record_scheduled(global_rank_, desc, global_ranks(), clock_->now_ns());
  return issue_observed(desc, issue, *clock_,
                        [recorder = recorder_, handle](const WorkTimes& times, std::exception_ptr error) {
                          if (error) {
                            recorder->record_failed(handle, times.start_ns, times.end_ns, error_text(error));
                          } else {
                            recorder->record_completed(handle, times.start_ns, times.end_ns);
                          }
                        });
}

ProcessGroupPtr FlightRecordingProcessGroup::wrap(ProcessGroupPtr sub) {
  return std::make_shared<FlightRecordingProcessGroup>(std::move(sub), recorder_, global_rank_, *clock_);
}

}  // namespace fsdpsim::sim
