// `fsdpsim replay`: reading, check, planning and reports (no ranks run here;
// see replay_run.cpp for the replay itself and replay_cli.cpp for the
// command line).

#include "tools/replay_lib.h"
#include "tools/format_util.h"

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <limits>
#include <numeric>
#include <optional>
#include <set>
#include <sstream>
#include <tuple>

#include "backends/clock.h"
#include "backends/observe/jsonl.h"
#include "sim/fake_process_group.h"

namespace fsdpsim::tools {

namespace {

[[noreturn]] void fail_line(size_t line, const std::string& field, const std::string& what) {
  throw TraceFileError("trace line " + std::to_string(line) + ": field '" + field + "': " + what);
}

using sim::ranks_text;

std::string list_string(const std::vector<int>& ranks) {
  std::string out = "[";
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (i) out += ",";  // appended separately: GCC 12 misreads "" + string (-Wrestrict)
    out += std::to_string(ranks[i]);
  }
  return out + "]";
}

// Error texts come from other runs (and from hostile files): one line,
// bounded, printable.
std::string short_error(const std::string& text) {
  constexpr size_t kMax = 300;
  std::string out;
  for (char c : text.substr(0, text.find('\n'))) {
    if (out.size() >= kMax) {
      out += "...";
      break;
    }
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      char buffer[8];
      std::snprintf(buffer, sizeof buffer, "\\x%02x", u);
      out += buffer;
    } else {
      out += c;
    }
  }
  return out;
}

// a * b with overflow detection (both >= 0).
bool mul_overflows(int64_t a, int64_t b, int64_t& result) { return __builtin_mul_overflow(a, b, &result); }

// "all_gather Float in [4] out [16]" (+ " op max" / " root 1" where it applies).
std::string call_text(const observe::Record& e, bool show_reduce_op) {
  std::string out = to_string(e.op);
  if (e.op == CollectiveOp::Barrier) return out;
  out += " " + observe::dtype_name(e.dtype) + " in [" + std::to_string(e.in_numel) + "] out [" +
         std::to_string(e.out_numel) + "]";
  const bool reduces = e.op == CollectiveOp::ReduceScatter || e.op == CollectiveOp::AllReduce;
  if (reduces && (show_reduce_op || e.reduce_op != ReduceOp::Sum)) out += std::string(" op ") + to_string(e.reduce_op);
  if (e.op == CollectiveOp::Broadcast) out += " root " + std::to_string(e.root);
  return out;
}

// The first attribute two records of one (group, seq) differ in, or none.
enum class Difference { None, Op, Dtype, Size, ReduceOp, Root };

Difference difference(const observe::Record& a, const observe::Record& b) {
  if (a.op != b.op) return Difference::Op;
  if (a.op == CollectiveOp::Barrier) return Difference::None;
  if (a.dtype != b.dtype) return Difference::Dtype;
  if (a.in_numel != b.in_numel || a.out_numel != b.out_numel) return Difference::Size;
  const bool reduces = a.op == CollectiveOp::ReduceScatter || a.op == CollectiveOp::AllReduce;
  if (reduces && a.reduce_op != b.reduce_op) return Difference::ReduceOp;
  if (a.op == CollectiveOp::Broadcast && a.root != b.root) return Difference::Root;
  return Difference::None;
}

}  // namespace

// ---------------------------------------------------------------------------
// Reading

int64_t dtype_element_size(const std::string& dtype) {
  auto type = observe::dtype_from_name(dtype);
  if (!type) throw TraceFileError("unknown dtype '" + short_error(dtype) + "'");
  try {
    return static_cast<int64_t>(c10::elementSize(*type));
  } catch (const std::exception&) {
    throw TraceFileError("dtype " + dtype + " has no element size");
  }
}

namespace {

// The element counts must fit the op over the group's ranks.
void check_counts(const observe::Record& e, size_t line) {
  const int64_t n = static_cast<int64_t>(e.group_ranks.size());
  const std::string op = to_string(e.op);
  int64_t product = 0;
  switch (e.op) {
    case CollectiveOp::AllGather:
      if (mul_overflows(e.in_numel, n, product) || product != e.out_numel) {
        fail_line(line, "out_numel",
                  op + " over " + std::to_string(n) + " ranks needs out_numel = " + std::to_string(n) + " x in_numel " +
                      std::to_string(e.in_numel) + ", got " + std::to_string(e.out_numel));
      }
      break;
    case CollectiveOp::ReduceScatter:
      if (mul_overflows(e.out_numel, n, product) || product != e.in_numel) {
        fail_line(line, "in_numel",
                  op + " over " + std::to_string(n) + " ranks needs in_numel = " + std::to_string(n) + " x out_numel " +
                      std::to_string(e.out_numel) + ", got " + std::to_string(e.in_numel));
      }
      break;
    case CollectiveOp::AllReduce:
    case CollectiveOp::Broadcast:
      if (e.in_numel != e.out_numel) {
        fail_line(line, "out_numel",
                  op + " is in place: out_numel must equal in_numel " + std::to_string(e.in_numel) + ", got " +
                      std::to_string(e.out_numel));
      }
      break;
    case CollectiveOp::Barrier:
      if (e.in_numel != 0 || e.out_numel != 0) fail_line(line, "in_numel", "a barrier moves no data; expected 0");
      break;
  }
}

}  // namespace

ReplayTrace parse_replay_trace(std::istream& in) {
  observe::JsonlTrace raw;
  try {
    raw = observe::read_jsonl_trace(in);
  } catch (const std::runtime_error& e) {
    throw TraceFileError(short_error(e.what()));
  }
  ReplayTrace trace;
  trace.world_size = raw.world_size;
  std::map<std::string, size_t> group_line;                                      // group -> first line
  std::map<std::tuple<int, std::string>, std::pair<uint64_t, size_t>> last_seq;  // (rank, group) -> (seq, line)
  // Rank by rank, each rank's records in file order: a streamed trace
  // interleaves ranks (jsonl.h); a trace written rank by rank keeps its order.
  std::vector<size_t> order(raw.events.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&raw](size_t a, size_t b) { return raw.events[a].rank < raw.events[b].rank; });
  for (size_t i : order) {
    observe::Record& e = raw.events[i];
    const size_t line = i + 2;  // the header is line 1; the reader refuses blank lines
    if (!e.is_collective()) {
      ++trace.engine_events;
      continue;
    }
    auto [group, inserted] = trace.groups.emplace(e.group, e.group_ranks);
    if (inserted) {
      if (trace.groups.size() > kMaxTraceGroups) {
        fail_line(line, "group", "more than " + std::to_string(kMaxTraceGroups) + " process groups");
      }
      group_line[e.group] = line;
    } else if (group->second != e.group_ranks) {
      fail_line(line, "group_ranks",
                "group '" + short_error(e.group) + "' has ranks " + list_string(e.group_ranks) + " here but " +
                    list_string(group->second) + " on line " + std::to_string(group_line[e.group]));
    }
    auto [prev, first] = last_seq.try_emplace({e.rank, e.group}, e.seq, line);
    if (!first) {
      if (e.seq == prev->second.first) {
        fail_line(line, "seq",
                  "rank " + std::to_string(e.rank) + " recorded group '" + short_error(e.group) + "' seq " +
                      std::to_string(e.seq) + " twice (also on line " + std::to_string(prev->second.second) + ")");
      }
      if (e.seq < prev->second.first) {
        fail_line(line, "seq",
                  "rank " + std::to_string(e.rank) + " recorded group '" + short_error(e.group) + "' seq " +
                      std::to_string(e.seq) + " after seq " + std::to_string(prev->second.first) + " (line " +
                      std::to_string(prev->second.second) + "); a rank issues a group's collectives in seq order");
      }
      prev->second = {e.seq, line};
    }
    check_counts(e, line);
    trace.collectives.push_back(std::move(e));
    trace.lines.push_back(line);
  }
  return trace;
}

ReplayTrace load_replay_trace(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw TraceFileError("cannot open '" + path + "'");
  return parse_replay_trace(in);
}

// ---------------------------------------------------------------------------
// check

const char* to_string(CheckFinding::Kind kind) {
  switch (kind) {
    case CheckFinding::Kind::OpMismatch: return "collective type mismatch";
    case CheckFinding::Kind::DtypeMismatch: return "dtype mismatch";
    case CheckFinding::Kind::SizeMismatch: return "size mismatch";
    case CheckFinding::Kind::ReduceOpMismatch: return "reduce op mismatch";
    case CheckFinding::Kind::RootMismatch: return "broadcast root mismatch";
    case CheckFinding::Kind::MissingRanks: return "missing ranks";
    case CheckFinding::Kind::StateMismatch: return "state mismatch";
    case CheckFinding::Kind::Failed: return "failed";
    case CheckFinding::Kind::InFlight: return "in flight";
    case CheckFinding::Kind::NoCollectives: return "no collectives";
    case CheckFinding::Kind::AbsentRanks: return "absent ranks";
  }
  return "unknown";
}

std::string CheckReport::text() const {
  std::ostringstream out;
  out << "world " << world_size << ", " << groups << (groups == 1 ? " group, " : " groups, ") << collectives
      << (collectives == 1 ? " collective, " : " collectives, ") << records
      << (records == 1 ? " record\n" : " records\n");
  if (clean()) {
    out << "OK: every collective of every group was joined by all its ranks with matching arguments and completed\n";
    return out.str();
  }
  out << findings.size() << (findings.size() == 1 ? " problem:\n" : " problems:\n");
  for (const auto& f : findings) out << "  " << f.message << "\n";
  out << "where each rank was (its last recorded collective):\n";
  for (const auto& line : where) out << "  " << line << "\n";
  return out.str();
}

namespace {

// How one rank stands on one group: seqs recorded.
struct RankOnGroup {
  uint64_t last = 0;
  std::set<uint64_t> seqs;
};

struct MissingRun {
  size_t finding = 0;
  std::vector<int> missing;
  uint64_t first_seq = 0;
  uint64_t last_seq = 0;
};

// Consecutive collectives of one group left in the same state on the same
// ranks (a hang leaves every later one in flight) make one finding.
struct StateRun {
  size_t finding = 0;
  std::string key;   // kind + the per-state rank sets
  std::string op;    // of the first collective
  std::string body;  // the message after "group G seq N op: "
  uint64_t first_seq = 0;
  uint64_t last_seq = 0;
  size_t count = 0;
};

// Problems of the trace as a whole: no collective at all, or ranks of the
// header's world that appear nowhere (a world_size the records do not back).
void add_world_findings(const ReplayTrace& trace, CheckReport& report) {
  if (trace.collectives.empty()) {
    CheckFinding f;
    f.kind = CheckFinding::Kind::NoCollectives;
    f.message = "the trace holds no collective record (world " + std::to_string(trace.world_size) + ")";
    report.findings.push_back(std::move(f));
    return;
  }
  std::vector<bool> in_group(static_cast<size_t>(trace.world_size), false);
  for (const auto& [name, ranks] : trace.groups) {
    for (int r : ranks) in_group[static_cast<size_t>(r)] = true;
  }
  CheckFinding f;
  f.kind = CheckFinding::Kind::AbsentRanks;
  for (int r = 0; r < trace.world_size; ++r) {
    if (!in_group[static_cast<size_t>(r)]) f.ranks.push_back(r);
  }
  if (f.ranks.empty()) return;
  f.message = ranks_text(f.ranks) + " of the header's world of " + std::to_string(trace.world_size) +
              " recorded no collective and belong to no group: the header's world_size does not match the records";
  report.findings.push_back(std::move(f));
}

}  // namespace

bool blocks_replay(CheckFinding::Kind kind) {
  switch (kind) {
    case CheckFinding::Kind::StateMismatch:
    case CheckFinding::Kind::Failed:
    case CheckFinding::Kind::InFlight: return false;  // replayed with the recorded arguments
    default: return true;
  }
}

namespace {

// check_trace's passes over one trace. Each (group, seq) is checked for
// argument agreement, missing ranks and completion; runs of consecutive
// collectives with the same missing ranks or the same state make one finding
// each, whose message is written once the run is known.
class TraceChecker {
 public:
  explicit TraceChecker(const ReplayTrace& trace) : trace_(trace), events_(trace.collectives) {
    report_.world_size = trace.world_size;
    report_.groups = trace.groups.size();
    report_.records = trace.collectives.size();
    last_of_rank_.resize(static_cast<size_t>(trace.world_size));
    for (size_t i = 0; i < events_.size(); ++i) {
      const auto& e = events_[i];
      by_group_seq_[e.group][e.seq].push_back(i);
      auto& og = on_group_[{e.rank, e.group}];
      og.last = std::max(og.last, e.seq);
      og.seqs.insert(e.seq);
      last_of_rank_[static_cast<size_t>(e.rank)] = i;
    }
  }

  CheckReport run() {
    add_world_findings(trace_, report_);
    for (const auto& [group, seqs] : by_group_seq_) {
      const std::vector<int>& members = trace_.groups.at(group);
      report_.collectives += seqs.size();
      open_missing_ = kNone;
      open_state_ = kNone;
      for (const auto& [seq, indices] : seqs) {
        check_arguments(group, seq, indices);
        check_missing(group, seq, indices, members);
        check_states(group, seq, indices);
      }
    }
    write_state_messages();
    write_missing_messages();
    if (!report_.findings.empty()) write_where();
    return std::move(report_);
  }

 private:
  static constexpr size_t kNone = std::numeric_limits<size_t>::max();

  std::vector<size_t> by_rank(const std::vector<size_t>& indices) const {
    std::vector<size_t> sorted = indices;
    std::sort(sorted.begin(), sorted.end(), [&](size_t a, size_t b) { return events_[a].rank < events_[b].rank; });
    return sorted;
  }

  // 1. Do the ranks that joined agree on what they called?
  void check_arguments(const std::string& group, uint64_t seq, const std::vector<size_t>& indices) {
    Difference worst = Difference::None;
    const auto& reference = events_[indices.front()];
    for (size_t i : indices) {
      Difference d = difference(reference, events_[i]);
      if (d != Difference::None && (worst == Difference::None || d < worst)) worst = d;
    }
    if (worst == Difference::None) return;
    std::vector<std::pair<std::string, std::vector<int>>> calls;  // in order of the lowest rank
    for (size_t i : by_rank(indices)) {
      std::string call = call_text(events_[i], worst == Difference::ReduceOp);
      auto it = std::find_if(calls.begin(), calls.end(), [&](const auto& c) { return c.first == call; });
      if (it == calls.end())
        calls.push_back({call, {events_[i].rank}});
      else
        it->second.push_back(events_[i].rank);
    }
    CheckFinding f;
    f.group = group;
    f.seq = seq;
    switch (worst) {
      case Difference::Op: f.kind = CheckFinding::Kind::OpMismatch; break;
      case Difference::Dtype: f.kind = CheckFinding::Kind::DtypeMismatch; break;
      case Difference::Size: f.kind = CheckFinding::Kind::SizeMismatch; break;
      case Difference::ReduceOp: f.kind = CheckFinding::Kind::ReduceOpMismatch; break;
      default: f.kind = CheckFinding::Kind::RootMismatch; break;
    }
    // The ranks at fault: all but the largest set (ties: the one holding the lowest rank).
    size_t majority = 0;
    for (size_t c = 1; c < calls.size(); ++c) {
      if (calls[c].second.size() > calls[majority].second.size()) majority = c;
    }
    std::string text = "group " + short_error(group) + " seq " + std::to_string(seq) + ": " + to_string(f.kind) + ": ";
    for (size_t c = 0; c < calls.size(); ++c) {
      text += (c ? ", " : "") + ranks_text(calls[c].second) + " called " + calls[c].first;
      if (c != majority) f.ranks.insert(f.ranks.end(), calls[c].second.begin(), calls[c].second.end());
    }
    std::sort(f.ranks.begin(), f.ranks.end());
    f.message = text;
    report_.findings.push_back(std::move(f));
  }

  // 2. Did every rank join? A replay needs every member's record, so a rank
  // whose records of the group start later (a ring buffer that dropped old
  // entries) is missing before its first record too.
  void check_missing(const std::string& group, uint64_t seq, const std::vector<size_t>& indices,
                     const std::vector<int>& members) {
    std::set<int> present;
    for (size_t i : indices) present.insert(events_[i].rank);
    std::vector<int> missing;
    for (int r : members) {
      if (!present.count(r)) missing.push_back(r);
    }
    if (missing.empty()) {
      open_missing_ = kNone;
    } else if (open_missing_ != kNone && missing_runs_[open_missing_].missing == missing) {
      missing_runs_[open_missing_].last_seq = seq;  // the same ranks are still missing: one finding
    } else {
      CheckFinding f;
      f.kind = CheckFinding::Kind::MissingRanks;
      f.group = group;
      f.seq = seq;
      f.ranks = missing;
      report_.findings.push_back(std::move(f));
      missing_runs_.push_back(MissingRun{report_.findings.size() - 1, missing, seq, seq});
      open_missing_ = missing_runs_.size() - 1;
    }
  }

  // 3. Did it complete on the ranks that joined?
  void check_states(const std::string& group, uint64_t seq, const std::vector<size_t>& indices) {
    std::vector<int> completed, failed, in_flight;
    const observe::Record* first_failure = nullptr;
    for (size_t i : by_rank(indices)) {
      const auto& e = events_[i];
      if (e.status == observe::RecordStatus::Completed) {
        completed.push_back(e.rank);
      } else if (e.status == observe::RecordStatus::Failed) {
        failed.push_back(e.rank);
        if (!first_failure) first_failure = &e;
      } else {
        in_flight.push_back(e.rank);
      }
    }
    if (failed.empty() && in_flight.empty()) {
      open_state_ = kNone;
      return;
    }
    CheckFinding f;
    f.group = group;
    f.seq = seq;
    std::string body = state_body(completed, failed, in_flight, f.kind);
    const std::string key = std::string(to_string(f.kind)) + "|" + body;
    if (first_failure) {
      body += "; rank " + std::to_string(first_failure->rank) + "'s error: " + short_error(first_failure->error);
    }
    if (open_state_ != kNone && state_runs_[open_state_].key == key) {
      state_runs_[open_state_].last_seq = seq;
      ++state_runs_[open_state_].count;
      return;
    }
    f.ranks = failed;
    f.ranks.insert(f.ranks.end(), in_flight.begin(), in_flight.end());
    std::sort(f.ranks.begin(), f.ranks.end());
    report_.findings.push_back(std::move(f));
    const std::string op = to_string(events_[indices.front()].op);
    state_runs_.push_back(StateRun{report_.findings.size() - 1, key, op, body, seq, seq, 1});
    open_state_ = state_runs_.size() - 1;
  }

  // The message after "group G seq N op: ", and the finding's kind.
  static std::string state_body(const std::vector<int>& completed, const std::vector<int>& failed,
                                const std::vector<int>& in_flight, CheckFinding::Kind& kind) {
    std::string states;
    auto add_state = [&](const std::vector<int>& ranks, const char* what) {
      if (ranks.empty()) return;
      states += (states.empty() ? "" : ", ") + ranks_text(ranks) + " " + what;
    };
    if (!completed.empty()) {
      kind = CheckFinding::Kind::StateMismatch;
      add_state(completed, "completed");
      add_state(failed, "failed");
      add_state(in_flight, "still in flight");
      return "state mismatch: " + states;
    }
    if (!failed.empty()) {
      kind = CheckFinding::Kind::Failed;
      add_state(failed, "failed");
      add_state(in_flight, "still in flight");
      return states;
    }
    kind = CheckFinding::Kind::InFlight;
    return "never completed: " + ranks_text(in_flight) + " still in flight when the trace was written";
  }

  void write_state_messages() {
    for (const auto& run : state_runs_) {
      CheckFinding& f = report_.findings[run.finding];
      if (run.count == 1) {
        f.message =
            "group " + short_error(f.group) + " seq " + std::to_string(run.first_seq) + " " + run.op + ": " + run.body;
      } else {
        f.message = "group " + short_error(f.group) + " seqs " + std::to_string(run.first_seq) + "-" +
                    std::to_string(run.last_seq) + " (" + std::to_string(run.count) + " collectives, from " + run.op +
                    "): " + run.body;
      }
    }
  }

  std::string last_collective_text(int rank) const {
    const auto& last = last_of_rank_[static_cast<size_t>(rank)];
    if (!last) return "rank " + std::to_string(rank) + " recorded no collective";
    const auto& e = events_[*last];
    return "rank " + std::to_string(rank) + "'s last collective: group " + short_error(e.group) + " seq " +
           std::to_string(e.seq) + " " + to_string(e.op) + " (" + to_string(e.status) + ")";
  }

  void write_missing_messages() {
    for (const auto& run : missing_runs_) {
      CheckFinding& f = report_.findings[run.finding];
      std::string text = "not all ranks joined collective " + std::to_string(run.first_seq) + " of group " +
                         short_error(f.group) + ": missing ranks " + rank_set_string(run.missing);
      for (int r : run.missing) {
        auto og = on_group_.find({r, f.group});
        if (og != on_group_.end() && og->second.last > run.first_seq) {
          text += "; rank " + std::to_string(r) + " has no record of it but recorded seq " +
                  std::to_string(*og->second.seqs.upper_bound(run.first_seq)) + " of the group later";
        } else {
          text += "; " + last_collective_text(r);
        }
      }
      if (run.last_seq != run.first_seq) {
        text += "; the same " + std::string(run.missing.size() == 1 ? "rank is" : "ranks are") +
                " missing from every later collective of the group up to seq " + std::to_string(run.last_seq);
      }
      f.message = text;
    }
  }

  // Where each rank was. Costs stay linear in the trace's size: each group's
  // member list is walked once.
  void write_where() {
    std::vector<std::vector<const std::string*>> groups_of_rank(static_cast<size_t>(trace_.world_size));
    for (const auto& [group, ranks] : trace_.groups) {
      if (!by_group_seq_.count(group)) continue;
      for (int r : ranks) groups_of_rank[static_cast<size_t>(r)].push_back(&group);
    }
    std::vector<std::pair<std::string, std::vector<int>>> places;
    std::map<std::string, size_t> place_index;
    for (int r = 0; r < trace_.world_size; ++r) {
      std::string text = "no collective recorded";
      if (const auto& last = last_of_rank_[static_cast<size_t>(r)]) {
        const auto& e = events_[*last];
        text = "group " + short_error(e.group) + " seq " + std::to_string(e.seq) + " " + call_text(e, false) + " (" +
               to_string(e.status) + ")";
      }
      bool early = false;
      for (const std::string* group : groups_of_rank[static_cast<size_t>(r)]) {
        auto og = on_group_.find({r, *group});
        if (og == on_group_.end() || og->second.last < by_group_seq_[*group].rbegin()->first) early = true;
      }
      if (early) text += ", stopped early";
      auto [it, inserted] = place_index.try_emplace(text, places.size());
      if (inserted) places.push_back({text, {}});
      places[it->second].second.push_back(r);
    }
    for (const auto& [text, ranks] : places) report_.where.push_back(ranks_text(ranks) + ": " + text);
  }

  const ReplayTrace& trace_;
  const std::vector<observe::Record>& events_;
  CheckReport report_;
  std::map<std::string, std::map<uint64_t, std::vector<size_t>>> by_group_seq_;
  std::map<std::pair<int, std::string>, RankOnGroup> on_group_;
  std::vector<std::optional<size_t>> last_of_rank_;
  std::vector<MissingRun> missing_runs_;
  std::vector<StateRun> state_runs_;
  size_t open_missing_ = kNone;  // index into missing_runs_ of the run still being extended
  size_t open_state_ = kNone;    // index into state_runs_, likewise
};

}  // namespace

CheckReport check_trace(const ReplayTrace& trace) { return TraceChecker(trace).run(); }

// ---------------------------------------------------------------------------
// Planning

namespace {

bool replayable(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
    case at::kDouble:
    case at::kHalf:
    case at::kBFloat16:
    case at::kInt:
    case at::kLong:
    case at::kShort:
    case at::kChar:
    case at::kByte:
    case at::kBool: return true;
    default: return false;
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

// Every collective must have been joined by all its ranks with the same
// arguments, or the replay would hang or fail on purpose. The verdict is
// check's own, so `check` finds everything a replay refuses. Returns the
// number of distinct collectives.
size_t refuse_unreplayable(const ReplayTrace& trace) {
  const CheckReport report = check_trace(trace);
  for (const auto& finding : report.findings) {
    if (blocks_replay(finding.kind)) {
      throw ReplayPlanError("cannot replay: " + finding.message + " (run 'fsdpsim replay check' for the full report)");
    }
  }
  return report.collectives;
}

// Builds one plan: the groups, then each rank's program of planned ops.
class Planner {
 public:
  Planner(const ReplayTrace& trace, int world_size, const ReplayLimits& limits)
      : trace_(trace), limits_(limits), n_(trace.world_size), m_(world_size == 0 ? n_ : world_size) {
    if (m_ < 1 || m_ > observe::kMaxWorldSize) {
      throw ReplayPlanError("world size " + std::to_string(m_) + " is outside [1, " +
                            std::to_string(observe::kMaxWorldSize) + "]");
    }
    // Each trace rank's records in issue (file) order.
    of_rank_.resize(static_cast<size_t>(n_));
    for (size_t i = 0; i < trace.collectives.size(); ++i) {
      of_rank_[static_cast<size_t>(trace.collectives[i].rank)].push_back(i);
    }
  }

  ReplayPlan build() {
    plan_.collectives = refuse_unreplayable(trace_);
    plan_.trace_world_size = n_;
    plan_.world_size = m_;
    plan_groups();
    check_plan_size();
    plan_.per_rank.resize(static_cast<size_t>(m_));
    if (m_ == n_) {
      for (int r = 0; r < n_; ++r) {
        const auto gaps = gaps_of(r);
        const auto& idx = of_rank_[static_cast<size_t>(r)];
        for (size_t k = 0; k < idx.size(); ++k)
          plan_.per_rank[static_cast<size_t>(r)].push_back(plan_op(idx[k], gaps[k]));
      }
      return std::move(plan_);
    }
    // Every group spans the world and every rank joined everything, so every
    // rank has rank 0's program; the gaps come from trace rank r % n.
    std::vector<std::vector<int64_t>> gaps(static_cast<size_t>(n_));
    for (int r = 0; r < n_; ++r) gaps[static_cast<size_t>(r)] = gaps_of(r);
    std::vector<PlannedOp> program;
    for (size_t idx : of_rank_[0]) program.push_back(plan_op(idx, 0));
    for (int r = 0; r < m_; ++r) {
      auto& mine = plan_.per_rank[static_cast<size_t>(r)];
      mine = program;
      const auto& g = gaps[static_cast<size_t>(r % n_)];
      for (size_t k = 0; k < mine.size() && k < g.size(); ++k) mine[k].gap_ns = g[k];
    }
    return std::move(plan_);
  }

 private:
  void plan_groups() {
    for (const auto& [name, ranks] : trace_.groups) {
      if (m_ != n_ && static_cast<int>(ranks.size()) != n_) {
        throw ReplayPlanError("group '" + short_error(name) + "' spans " + ranks_text(ranks) + " of the trace's " +
                              std::to_string(n_) + "; at world size " + std::to_string(m_) +
                              " only groups over the whole world can be replayed (they then span all " +
                              std::to_string(m_) + " ranks)");
      }
      PlannedGroup g;
      g.name = name;
      if (m_ == n_) {
        g.ranks = ranks;
      } else {
        for (int r = 0; r < m_; ++r) g.ranks.push_back(r);
      }
      group_index_[name] = plan_.groups.size();
      plan_.groups.push_back(std::move(g));
    }
  }

  // Rescaling copies rank 0's program to every rank: bound the plan's size.
  void check_plan_size() const {
    const long double planned = m_ == n_ ? static_cast<long double>(trace_.collectives.size())
                                         : static_cast<long double>(of_rank_[0].size()) * m_;
    if (planned > static_cast<long double>(kMaxPlannedOps)) {
      throw ReplayPlanError("the replay would hold " + std::to_string(static_cast<unsigned long long>(planned)) +
                            " collective calls over all ranks, over the limit of " + std::to_string(kMaxPlannedOps));
    }
  }

  // Trace rank r's recorded idle time before each of its collectives.
  std::vector<int64_t> gaps_of(int r) const {
    std::vector<int64_t> gaps;
    const auto& idx = of_rank_[static_cast<size_t>(r)];
    for (size_t k = 0; k < idx.size(); ++k) {
      int64_t gap = 0;
      if (k > 0) {
        const auto& prev = trace_.collectives[idx[k - 1]];
        const auto& cur = trace_.collectives[idx[k]];
        if (prev.end_ns > 0 && cur.issue_ns > prev.end_ns) gap = cur.issue_ns - prev.end_ns;
      }
      gaps.push_back(gap);
    }
    return gaps;
  }

  PlannedOp plan_op(size_t index, int64_t gap) {
    const auto& e = trace_.collectives[index];
    PlannedOp op;
    op.line = trace_.lines[index];
    op.group_index = group_index_.at(e.group);
    op.seq = e.seq;
    op.op = e.op;
    if (!replayable(e.dtype)) {
      throw ReplayPlanError("trace line " + std::to_string(op.line) +
                            ": field 'dtype': " + short_error(observe::dtype_name(e.dtype)) +
                            " cannot be replayed (Float, Double, Half, BFloat16, Int, Long, Short, Char, Byte, Bool)");
    }
    op.dtype = e.dtype;
    op.reduce_op = e.reduce_op;
    op.root = e.root;
    op.gap_ns = gap;
    op.in_numel = e.in_numel;
    op.out_numel = e.out_numel;
    if (m_ != n_) rescale(e, op);
    size_op(op);
    return op;
  }

  // At another world size all-gather / reduce-scatter keep their total size.
  void rescale(const observe::Record& e, PlannedOp& op) {
    if (e.op == CollectiveOp::AllGather) {
      op.in_numel = ceil_div(e.out_numel, m_);
      op.out_numel = op.in_numel * m_;  // <= out_numel + m - 1: no overflow below the limits checked next
    } else if (e.op == CollectiveOp::ReduceScatter) {
      op.out_numel = ceil_div(e.in_numel, m_);
      op.in_numel = op.out_numel * m_;
    }
    if (op.in_numel != e.in_numel || op.out_numel != e.out_numel) {
      const int64_t total = e.op == CollectiveOp::AllGather ? e.out_numel : e.in_numel;
      if (total % m_ != 0) plan_.padded = true;
    }
    if (e.op == CollectiveOp::Broadcast && e.root >= m_) {
      throw ReplayPlanError("trace line " + std::to_string(op.line) + ": field 'root': broadcast root " +
                            std::to_string(e.root) + " does not exist in a world of " + std::to_string(m_));
    }
  }

  // One rank's buffers for the op, within the limits.
  void size_op(PlannedOp& op) {
    const int64_t element = c10::elementSize(op.dtype);
    const bool in_place = op.op == CollectiveOp::AllReduce || op.op == CollectiveOp::Broadcast;
    const long double numel = in_place ? static_cast<long double>(op.in_numel)
                                       : static_cast<long double>(op.in_numel) + static_cast<long double>(op.out_numel);
    const long double bytes = numel * element;
    if (bytes > static_cast<long double>(limits_.max_bytes_per_collective)) {
      std::ostringstream msg;
      msg << "trace line " << op.line << ": field 'in_numel': " << to_string(op.op) << " of " << op.in_numel << " "
          << observe::dtype_name(op.dtype) << " elements in and " << op.out_numel << " out needs "
          << std::setprecision(4) << bytes << " bytes on each rank, over the limit of "
          << limits_.max_bytes_per_collective << " bytes per collective (--max-bytes)";
      throw ReplayPlanError(msg.str());
    }
    op.buffer_bytes = static_cast<int64_t>(bytes);
    op.total_bytes = sim::total_bytes(op.op, op.in_numel, op.out_numel, element);
    plan_.max_buffer_bytes = std::max(plan_.max_buffer_bytes, op.buffer_bytes);
  }

  const ReplayTrace& trace_;
  const ReplayLimits& limits_;
  const int n_;  // the trace's world
  const int m_;  // the replay's
  std::vector<std::vector<size_t>> of_rank_;
  std::map<std::string, size_t> group_index_;
  ReplayPlan plan_;
};

}  // namespace

ReplayPlan make_replay_plan(const ReplayTrace& trace, int world_size, const ReplayLimits& limits) {
  return Planner(trace, world_size, limits).build();
}

// ---------------------------------------------------------------------------
// Reports

int64_t ReplayResult::total_latency_ns() const {
  int64_t total = 0;
  for (const auto& c : collectives) total += c.latency_ns;
  return total;
}

std::vector<OpSummary> summarize(const std::vector<CollectiveTiming>& timings) {
  std::vector<OpSummary> out;
  for (CollectiveOp op : {CollectiveOp::AllGather, CollectiveOp::ReduceScatter, CollectiveOp::AllReduce,
                          CollectiveOp::Broadcast, CollectiveOp::Barrier}) {
    std::vector<int64_t> latencies;
    OpSummary s;
    s.op = op;
    double bus_bytes = 0;
    for (const auto& t : timings) {
      if (t.op != op) continue;
      ++s.count;
      s.total_bytes += t.total_bytes;
      s.per_rank_bytes += t.per_rank_bytes;
      s.total_ns += t.latency_ns;
      bus_bytes += static_cast<double>(t.total_bytes) * sim::bus_factor(op, t.group_size);
      latencies.push_back(t.latency_ns);
    }
    if (s.count == 0) continue;
    std::sort(latencies.begin(), latencies.end());
    auto nearest_rank = [&](double q) {
      size_t k = static_cast<size_t>(std::ceil(q * static_cast<double>(latencies.size())));
      return latencies[std::min(latencies.size(), std::max<size_t>(k, 1)) - 1];
    };
    s.p50_ns = nearest_rank(0.50);
    s.p95_ns = nearest_rank(0.95);
    if (s.total_ns > 0) {
      s.algbw_gbps = static_cast<double>(s.total_bytes) / static_cast<double>(s.total_ns);
      s.busbw_gbps = bus_bytes / static_cast<double>(s.total_ns);
    }
    out.push_back(s);
  }
  return out;
}

std::string format_summary(const std::vector<OpSummary>& summary) {
  std::ostringstream out;
  char line[256];
  std::snprintf(line, sizeof line, "  %-15s %6s %11s %11s %10s %10s %10s %8s %8s\n", "op", "count", "S total",
                "msg/rank", "p50 us", "p95 us", "total ms", "algbw", "busbw");
  out << line;
  int64_t total_ns = 0;
  size_t count = 0;
  for (const auto& s : summary) {
    std::snprintf(line, sizeof line, "  %-15s %6zu %11s %11s %10.1f %10.1f %10.3f %8.3f %8.3f\n", to_string(s.op),
                  s.count, human_bytes(static_cast<double>(s.total_bytes)).c_str(),
                  human_bytes(static_cast<double>(s.per_rank_bytes) / static_cast<double>(s.count)).c_str(),
                  ns_to_us(s.p50_ns), ns_to_us(s.p95_ns), ns_to_ms(s.total_ns), s.algbw_gbps, s.busbw_gbps);
    out << line;
    total_ns += s.total_ns;
    count += s.count;
  }
  std::snprintf(line, sizeof line, "  %-15s %6zu %11s %11s %10s %10s %10.3f\n", "total", count, "", "", "", "",
                ns_to_ms(total_ns));
  out << line;
  out << "  (S = total size as nccl-tests counts it; msg/rank = mean input per rank; latency = last rank's call to\n"
         "   last rank's completion; algbw = sum S / sum t, busbw = algbw x bus factor, GB/s)\n";
  return out.str();
}

namespace {

// The recorded timing, measured the way the replay measures ("" when some
// collective never ended).
std::string recorded_timing(const ReplayTrace& trace) {
  std::map<std::pair<std::string, uint64_t>, std::pair<int64_t, int64_t>> span;  // last issue, last end
  int64_t first_issue = std::numeric_limits<int64_t>::max(), last_end = 0;
  bool complete = true;
  for (const auto& e : trace.collectives) {
    auto& s = span[{e.group, e.seq}];
    s.first = std::max(s.first, e.issue_ns);
    s.second = std::max(s.second, e.end_ns);
    if (e.end_ns == 0) complete = false;
    if (e.issue_ns > 0) first_issue = std::min(first_issue, e.issue_ns);
    last_end = std::max(last_end, e.end_ns);
  }
  if (complete && last_end > 0) {
    int64_t comm = 0;
    for (const auto& [key, s] : span) comm += std::max<int64_t>(0, s.second - s.first);
    return fmt::format(
        "recorded: {:.3f} ms from the first call to the last completion; communication {:.3f} ms (sum over "
        "collectives of last call to last completion)\n",
        ns_to_ms(last_end - first_issue), ns_to_ms(comm));
  }
  return "";
}

}  // namespace

std::string format_plan_statistics(const ReplayTrace& trace, const ReplayPlan& plan) {
  std::ostringstream out;
  out << "trace: world " << trace.world_size << ", " << trace.groups.size()
      << (trace.groups.size() == 1 ? " group, " : " groups, ") << plan.collectives << " collectives, "
      << trace.collectives.size() << " collective records, " << trace.engine_events << " engine events\n";
  if (plan.world_size != plan.trace_world_size) {
    out << "replayed at world " << plan.world_size
        << ": all_gather / reduce_scatter keep their total size S, per-rank counts S / " << plan.world_size
        << (plan.padded ? " (rounded up: padded, as FSDP pads)" : "") << "\n";
  }
  // Per group and per op kind: distinct collectives, counted on each
  // group's first rank (one pass over the programs).
  struct Row {
    size_t count = 0;
    int64_t total = 0, min = std::numeric_limits<int64_t>::max(), max = 0, per_rank = 0;
  };
  std::vector<size_t> per_group(plan.groups.size(), 0);
  std::map<CollectiveOp, Row> rows;
  for (size_t r = 0; r < plan.per_rank.size(); ++r) {
    for (const auto& op : plan.per_rank[r]) {
      if (plan.groups[op.group_index].ranks.front() != static_cast<int>(r)) continue;
      ++per_group[op.group_index];
      Row& row = rows[op.op];
      ++row.count;
      row.total += op.total_bytes;
      row.min = std::min(row.min, op.total_bytes);
      row.max = std::max(row.max, op.total_bytes);
      row.per_rank += op.in_numel * static_cast<int64_t>(c10::elementSize(op.dtype));
    }
  }
  out << "groups:\n";
  for (size_t gi = 0; gi < plan.groups.size(); ++gi) {
    out << "  " << std::left << std::setw(24) << plan.groups[gi].name << std::right << " "
        << ranks_text(plan.groups[gi].ranks) << ", " << per_group[gi] << " collectives\n";
  }
  char line[256];
  out << "collectives per iteration (S = total size as nccl-tests counts it):\n";
  std::snprintf(line, sizeof line, "  %-15s %6s %11s %11s %11s %11s\n", "op", "count", "S total", "S min", "S max",
                "msg/rank");
  out << line;
  for (const auto& [op, row] : rows) {
    std::snprintf(line, sizeof line, "  %-15s %6zu %11s %11s %11s %11s\n", to_string(op), row.count,
                  human_bytes(static_cast<double>(row.total)).c_str(),
                  human_bytes(static_cast<double>(row.min)).c_str(), human_bytes(static_cast<double>(row.max)).c_str(),
                  human_bytes(static_cast<double>(row.per_rank) / static_cast<double>(row.count)).c_str());
    out << line;
  }
  // Per rank: how much each allocates and sends.
  std::map<std::pair<size_t, int64_t>, std::vector<int>> by_load;
  for (int r = 0; r < plan.world_size; ++r) {
    int64_t in_bytes = 0;
    for (const auto& op : plan.per_rank[static_cast<size_t>(r)]) {
      in_bytes += op.in_numel * static_cast<int64_t>(c10::elementSize(op.dtype));
    }
    by_load[{plan.per_rank[static_cast<size_t>(r)].size(), in_bytes}].push_back(r);
  }
  out << "per rank:\n";
  for (const auto& [load, ranks] : by_load) {
    out << "  " << ranks_text(ranks) << ": " << load.first << " collectives, "
        << human_bytes(static_cast<double>(load.second)) << " of inputs\n";
  }
  out << "largest buffers of one rank for one collective: " << human_bytes(static_cast<double>(plan.max_buffer_bytes))
      << "\n";
  out << recorded_timing(trace);
  return out.str();
}

// ---------------------------------------------------------------------------
// predict

int64_t predict_plan_ns(const ReplayPlan& plan, const sim::CostModelParams& params,
                        std::map<CollectiveOp, int64_t>* per_op) {
  int64_t total = 0;
  std::set<std::pair<size_t, uint64_t>> seen;
  for (const auto& program : plan.per_rank) {
    for (const auto& op : program) {
      if (!seen.insert({op.group_index, op.seq}).second) continue;
      const int size = static_cast<int>(plan.groups[op.group_index].ranks.size());
      const int64_t t = sim::predict_ns(op.op, op.total_bytes, size, params);
      total += t;
      if (per_op) (*per_op)[op.op] += t;
    }
  }
  return total;
}

}  // namespace fsdpsim::tools
