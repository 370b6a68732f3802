#include "backends/observe/flight_recorder.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <tuple>

#include "backends/clock.h"
#include "backends/collective_checks.h"
#include "backends/errors.h"

namespace fsdpsim::observe {

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

using Rings = std::vector<std::vector<FlightEntry>>;  // per rank, oldest first

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

std::string ms(int64_t ns, int64_t origin) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.3f", ns_to_ms(ns - origin));
  return buffer;
}

bool ended(FlightState state) { return state == FlightState::Completed || state == FlightState::Failed; }

// The earliest timestamp kept (0 when none).
int64_t origin_of(const Rings& rings) {
  int64_t origin = std::numeric_limits<int64_t>::max();
  for (const auto& ring : rings) {
    for (const auto& entry : ring) {
      for (int64_t t : {entry.record.issue_ns, entry.record.start_ns, entry.record.end_ns}) {
        if (t != 0) origin = std::min(origin, t);
      }
    }
  }
  return origin == std::numeric_limits<int64_t>::max() ? 0 : origin;
}

void dump_entry(std::ostream& out, const FlightEntry& entry, int64_t origin) {
  const Record& e = entry.record;
  out << "  #" << e.id << " group " << e.group << " seq " << e.seq << " " << e.detail << "  " << to_string(entry.state)
      << "  scheduled " << ms(e.issue_ns, origin);
  if (e.start_ns) out << " started " << ms(e.start_ns, origin);
  if (e.end_ns) out << (entry.state == FlightState::Failed ? " failed " : " completed ") << ms(e.end_ns, origin);
  if (!e.error.empty()) out << "\n      error: " << first_line(e.error);
  out << "\n";
}

// Ranks with nothing recorded are listed together, not one line each.
void dump_rings(std::ostream& out, const Rings& rings, const std::vector<uint64_t>& recorded) {
  const int64_t origin = origin_of(rings);
  std::vector<int> silent;
  for (size_t r = 0; r < rings.size(); ++r) {
    const auto& ring = rings[r];
    if (ring.empty()) {
      silent.push_back(static_cast<int>(r));
      continue;
    }
    const uint64_t dropped = recorded[r] - ring.size();
    out << "rank " << r << " (" << recorded[r] << " recorded";
    if (dropped) out << ", " << dropped << " older not shown";
    out << "):\n";
    for (const auto& entry : ring) dump_entry(out, entry, origin);
  }
  if (!silent.empty()) out << ranks_text(silent) << ": no collective recorded\n";
}

// One group's line: its members grouped by their last recorded entry.
void dump_group_place(std::ostream& out, const Rings& rings, const std::string& group, const std::vector<int>& ranks) {
  std::map<std::tuple<uint64_t, std::string, std::string>, std::vector<int>> by_place;  // (seq, op, state)
  std::vector<int> none;
  for (int r : ranks) {
    if (r < 0 || static_cast<size_t>(r) >= rings.size()) continue;
    const FlightEntry* last = nullptr;
    for (const auto& entry : rings[static_cast<size_t>(r)]) {
      if (entry.record.group == group && (last == nullptr || entry.record.seq >= last->record.seq)) last = &entry;
    }
    if (last == nullptr) {
      none.push_back(r);
    } else {
      by_place[{last->record.seq, to_string(last->record.op), to_string(last->state)}].push_back(r);
    }
  }
  out << "  group " << group << ":";
  bool first = true;
  // Highest seq first: the ranks that got furthest lead the line.
  for (auto it = by_place.rbegin(); it != by_place.rend(); ++it) {
    const auto& [seq, op, state] = it->first;
    out << (first ? " " : "; ") << ranks_text(it->second) << " at seq " << seq << " " << op << " (" << state << ")";
    first = false;
  }
  if (!none.empty()) out << (first ? " " : "; ") << ranks_text(none) << ": no record";
  out << "\n";
}

// "all_gather Float in [4] out [16]": a trace record without its call text.
std::string call_of(const Record& e) {
  if (!e.detail.empty()) return e.detail;
  CollectiveDesc desc;
  desc.group = e.group;
  desc.seq = e.seq;
  desc.op = e.op;
  desc.group_size = static_cast<int>(e.group_ranks.size());
  if (e.dtype != at::ScalarType::Undefined) desc.dtype = e.dtype;
  desc.input_shape = {e.in_numel};
  desc.output_shape = {e.out_numel};
  desc.reduce_op = e.reduce_op;
  desc.root = e.root;
  return desc.call_string();
}

}  // namespace

FlightRecorder::FlightRecorder(int world_size, size_t capacity_per_rank)
    : world_size_(world_size), capacity_(capacity_per_rank) {
  if (world_size < 1 || world_size > kMaxWorldSize) {
    throw std::invalid_argument("FlightRecorder: world_size " + std::to_string(world_size) + " is outside [1, " +
                                std::to_string(kMaxWorldSize) + "]");
  }
  if (capacity_per_rank == 0) throw std::invalid_argument("FlightRecorder: capacity_per_rank must be >= 1");
  rings_.resize(static_cast<size_t>(world_size));
  recorded_.assign(static_cast<size_t>(world_size), 0);
}

FlightHandle FlightRecorder::record_scheduled(int rank, const CollectiveDesc& desc, const std::vector<int>& group_ranks,
                                              int64_t now_ns) {
  return record_scheduled(collective_record(rank, desc, group_ranks, now_ns));
}

FlightHandle FlightRecorder::record_scheduled(const Record& issued) {
  const int rank = issued.rank;
  if (rank < 0 || rank >= world_size_) {
    throw std::invalid_argument("FlightRecorder: rank " + std::to_string(rank) + " is outside the world of " +
                                std::to_string(world_size_));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  Ring& ring = rings_[static_cast<size_t>(rank)];
  FlightEntry* slot = nullptr;
  if (ring.slots.size() < capacity_) {
    slot = &ring.slots.emplace_back();
  } else {
    slot = &ring.slots[ring.oldest];
    ring.oldest = (ring.oldest + 1) % capacity_;
  }
  slot->record = issued;  // copy-assigned: the slot's string buffers are reused
  slot->record.id = next_id_++;
  slot->record.status = RecordStatus::InFlight;
  slot->state = FlightState::Scheduled;
  ++recorded_[static_cast<size_t>(rank)];
  return FlightHandle{rank, slot->record.id};
}

std::vector<FlightEntry> FlightRecorder::Ring::ordered() const {
  std::vector<FlightEntry> out;
  out.reserve(slots.size());
  for (size_t k = 0; k < slots.size(); ++k) out.push_back(slots[(oldest + k) % slots.size()]);
  return out;
}

FlightEntry* FlightRecorder::find_locked(FlightHandle handle) {
  if (handle.rank < 0 || handle.rank >= world_size_) return nullptr;
  auto& slots = rings_[static_cast<size_t>(handle.rank)].slots;
  // At most capacity_ slots; the entry that ends is usually a recent one.
  for (auto& entry : slots) {
    if (entry.record.id == handle.id) return &entry;
  }
  return nullptr;
}

void FlightRecorder::record_started(FlightHandle handle, int64_t start_ns) {
  std::lock_guard<std::mutex> lock(mutex_);
  FlightEntry* e = find_locked(handle);
  if (e == nullptr || ended(e->state)) return;
  e->state = FlightState::Started;
  e->record.start_ns = start_ns;
}

void FlightRecorder::end(FlightHandle handle, FlightState state, int64_t start_ns, int64_t end_ns,
                         const std::string& error) {
  std::lock_guard<std::mutex> lock(mutex_);
  FlightEntry* e = find_locked(handle);
  if (e == nullptr || ended(e->state)) return;
  e->state = state;
  e->record.status = state == FlightState::Failed ? RecordStatus::Failed : RecordStatus::Completed;
  if (start_ns != 0) e->record.start_ns = start_ns;
  e->record.end_ns = end_ns;
  e->record.error = error;
}

void FlightRecorder::record_completed(FlightHandle handle, int64_t start_ns, int64_t end_ns) {
  end(handle, FlightState::Completed, start_ns, end_ns, "");
}

void FlightRecorder::record_failed(FlightHandle handle, int64_t start_ns, int64_t end_ns, const std::string& error) {
  end(handle, FlightState::Failed, start_ns, end_ns, error.empty() ? "unknown error" : error);
}

void FlightRecorder::on_end(const Record& issued, uint64_t token, const WorkTimes& times, std::exception_ptr error) {
  const FlightHandle handle{issued.rank, token};
  if (error) {
    record_failed(handle, times.start_ns, times.end_ns, error_text(error));
  } else {
    record_completed(handle, times.start_ns, times.end_ns);
  }
}

std::vector<FlightEntry> FlightRecorder::entries(int rank) const {
  if (rank < 0 || rank >= world_size_) {
    throw std::invalid_argument("FlightRecorder: rank " + std::to_string(rank) + " is outside the world");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  return rings_[static_cast<size_t>(rank)].ordered();
}

uint64_t FlightRecorder::recorded(int rank) const {
  if (rank < 0 || rank >= world_size_) {
    throw std::invalid_argument("FlightRecorder: rank " + std::to_string(rank) + " is outside the world");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  return recorded_[static_cast<size_t>(rank)];
}

std::string FlightRecorder::dump() const {
  Rings rings;
  std::vector<uint64_t> recorded;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const Ring& ring : rings_) rings.push_back(ring.ordered());
    recorded = recorded_;
  }
  std::ostringstream out;
  out << "flight recorder: the last " << capacity_ << " collectives of each rank, oldest first "
      << "(times in ms since the earliest one shown)\n";
  dump_rings(out, rings, recorded);
  // Where each rank is, per group: the last recorded entry of each member.
  std::map<std::string, std::vector<int>> members;
  for (const auto& ring : rings) {
    for (const auto& entry : ring) members.emplace(entry.record.group, entry.record.group_ranks);
  }
  if (!members.empty()) out << "where each rank is (last recorded collective per group):\n";
  for (const auto& [group, ranks] : members) dump_group_place(out, rings, group, ranks);
  return out.str();
}

std::unique_ptr<FlightRecorder> FlightRecorder::from_trace(const std::vector<Record>& records, int world_size,
                                                           size_t capacity_per_rank) {
  auto recorder = std::make_unique<FlightRecorder>(world_size, capacity_per_rank);
  // Which ranks issued each (group, seq): decides "started" for unfinished entries.
  std::map<std::pair<std::string, uint64_t>, std::set<int>> issued;
  std::vector<const Record*> ordered;
  for (const auto& e : records) {
    if (!e.is_collective()) continue;
    if (e.rank < 0 || e.rank >= world_size) {
      throw std::invalid_argument("FlightRecorder::from_trace: event rank " + std::to_string(e.rank) +
                                  " is outside the world of " + std::to_string(world_size));
    }
    issued[{e.group, e.seq}].insert(e.rank);
    ordered.push_back(&e);
  }
  // Record ids follow the trace's ids (recording order across ranks).
  std::stable_sort(ordered.begin(), ordered.end(), [](const Record* a, const Record* b) { return a->id < b->id; });
  for (const Record* e : ordered) {
    Record scheduled = *e;
    scheduled.detail = call_of(*e);
    scheduled.start_ns = scheduled.end_ns = 0;
    scheduled.error.clear();
    const FlightHandle h = recorder->record_scheduled(scheduled);
    if (e->status == RecordStatus::Completed) {
      recorder->record_completed(h, e->start_ns, e->end_ns);
    } else if (e->status == RecordStatus::Failed) {
      recorder->record_failed(h, e->start_ns, e->end_ns, e->error);
    } else {
      const auto& who = issued[{e->group, e->seq}];
      const bool all =
          std::all_of(e->group_ranks.begin(), e->group_ranks.end(), [&](int r) { return who.count(r) > 0; });
      if (all) recorder->record_started(h, e->start_ns);
    }
  }
  return recorder;
}

}  // namespace fsdpsim::observe
