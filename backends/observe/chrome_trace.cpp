// Chrome trace layout (pid kChromePid = the world, tid chrome_tid(r) = rank r;
// pid 0 and tid 0 are the kernel's idle task, which Perfetto treats specially):
// - each collective is an async span b/e (cat "collective", id = record id)
//   from issue to end, on async tracks so that collectives in flight at the
//   same time render side by side; an in-flight one ends at the trace's end;
// - plus a 1 us X slice on the rank's thread at its issue, the anchor of the
//   flow arrows that link one (group, seq) across ranks. The anchors of one
//   rank never overlap (an anchor issued within 1 us of the previous one is
//   shifted right), so the thread track always nests;
// - flow: s on the rank that issued first, t on the next ones, f ("bp":"e")
//   on the one that issued last. Viewers process flow events in time order,
//   so an arrow must start on the earliest anchor; ties go to the lower rank
//   (then the chain is lowest rank -> highest rank);
// - engine events are X slices on the rank's thread when they nest with the
//   thread's other slices and neither start nor end inside an anchor (the
//   usual case: forward/backward hooks run one at a time per rank), and async
//   spans (cat "engine") otherwise: an unshard that is prefetched can outlive
//   the unit that started it, and thread slices that cross each other are
//   dropped by Perfetto.
// Timestamps: ns_to_us of (t - earliest timestamp in the trace).

#include "backends/observe/chrome_trace.h"

#include <algorithm>
#include <iterator>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <utility>

#include "backends/clock.h"
#include "backends/collective_checks.h"
#include "backends/observe/jsonl.h"

namespace fsdpsim::observe {

namespace {

using OrderedJson = nlohmann::ordered_json;

constexpr int64_t kAnchorNs = 1000;  // anchor slice length: 1 us

// nlohmann throws on invalid UTF-8 when dumping; error texts are not ours to
// vouch for, so replace bad bytes instead.
std::string dump(const OrderedJson& j) { return j.dump(-1, ' ', false, nlohmann::detail::error_handler_t::replace); }

// Kept as its text: a JSON object costs several times its text (a large
// world's trace is hundreds of thousands of events).
struct ChromeEvent {
  int tid;
  int64_t ts_ns;  // relative to the trace's origin
  int order;      // at equal ts: ends, then slices (longest first), then begins, then flows
  int64_t dur_ns;
  std::string json;
};

// Times relative to the earliest timestamp of the trace.
struct TimeBase {
  int64_t origin = 0;
  int64_t end = 0;  // the latest timestamp, relative
  int64_t rel(int64_t t) const { return t > origin ? t - origin : 0; }
};

TimeBase time_base(const std::vector<Record>& all) {
  int64_t origin = std::numeric_limits<int64_t>::max();
  int64_t last = 0;
  for (const Record& e : all) {
    for (int64_t t : {e.issue_ns, e.start_ns, e.end_ns}) {
      if (t == 0) continue;
      origin = std::min(origin, t);
      last = std::max(last, t);
    }
  }
  TimeBase base;
  base.origin = origin == std::numeric_limits<int64_t>::max() ? 0 : origin;
  base.end = base.rel(last);
  return base;
}

OrderedJson base_json(const char* ph, const std::string& name, const char* cat, int rank) {
  OrderedJson j;
  j["ph"] = ph;
  j["name"] = name;
  j["cat"] = cat;
  j["pid"] = kChromePid;
  j["tid"] = chrome_tid(rank);
  return j;
}

// Kineto's list "[0, 1, 2]"; a group of more than kListedRanks ranks as
// ranges ("{0-1023}"), so a large world's events do not each repeat N numbers.
constexpr size_t kListedRanks = 64;

std::string ranks_string(const std::vector<int>& ranks) {
  if (ranks.size() > kListedRanks) return rank_set_string(ranks);
  std::string out = "[";
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (i) out += ", ";  // appended separately: GCC 12 misreads "" + string (-Wrestrict)
    out += std::to_string(ranks[i]);
  }
  return out + "]";
}

// Kineto's argument names where it has one.
OrderedJson collective_args(const Record& e) {
  OrderedJson args;
  args["Collective name"] = e.name;
  args["In msg nelems"] = e.in_numel;
  args["Out msg nelems"] = e.out_numel;
  args["Group size"] = e.group_ranks.size();
  args["Process Group Name"] = e.group;
  args["Process Group Ranks"] = ranks_string(e.group_ranks);
  args["dtype"] = dtype_name(e.dtype);
  args["Seq"] = e.seq;
  args["rank"] = e.rank;
  args["logical_clock"] = e.logical_clock_issue;
  args["logical_clock_end"] = e.logical_clock_end;
  args["status"] = to_string(e.status);
  if (!e.error.empty()) args["error"] = e.error;
  args["call"] = e.detail;
  return args;
}

// Each collective's anchor slice, per rank without overlaps.
struct Anchors {
  std::vector<int64_t> start;  // by position in the records; collectives only
  std::map<std::pair<std::string, uint64_t>, std::vector<size_t>> by_collective;
  std::vector<std::vector<std::pair<int64_t, int64_t>>> of_rank;  // [start, end) in time order
};

Anchors place_anchors(const std::vector<Record>& all, int world_size, const TimeBase& base) {
  Anchors anchors;
  anchors.start.assign(all.size(), 0);
  anchors.of_rank.resize(static_cast<size_t>(world_size));
  std::vector<size_t> order;
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i].is_collective()) order.push_back(i);
  }
  std::stable_sort(order.begin(), order.end(), [&all](size_t a, size_t b) {
    if (all[a].rank != all[b].rank) return all[a].rank < all[b].rank;
    return all[a].issue_ns < all[b].issue_ns;
  });
  int prev_rank = -1;
  int64_t prev_end = 0;
  for (size_t i : order) {
    const Record& e = all[i];
    if (e.rank != prev_rank) prev_end = 0;
    prev_rank = e.rank;
    anchors.start[i] = std::max(base.rel(e.issue_ns), prev_end);
    prev_end = anchors.start[i] + kAnchorNs;
    anchors.of_rank[static_cast<size_t>(e.rank)].emplace_back(anchors.start[i], prev_end);
    anchors.by_collective[{e.group, e.seq}].push_back(i);
  }
  return anchors;
}

class ChromeWriter {
 public:
  ChromeWriter(const std::vector<Record>& all, int world_size)
      : all_(all), world_size_(world_size), base_(time_base(all)), anchors_(place_anchors(all, world_size, base_)) {}

  void write(std::ostream& out) {
    add_collectives();
    add_flows();
    add_engine_events();
    std::stable_sort(timed_.begin(), timed_.end(), [](const ChromeEvent& a, const ChromeEvent& b) {
      if (a.tid != b.tid) return a.tid < b.tid;
      if (a.ts_ns != b.ts_ns) return a.ts_ns < b.ts_ns;
      if (a.order != b.order) return a.order < b.order;
      return a.dur_ns > b.dur_ns;
    });
    // What dump() of {"traceEvents":[...],"displayTimeUnit":"ms"} writes, an event at a time.
    out << "{\"traceEvents\":[";
    bool first = true;
    for (const OrderedJson& m : metadata()) {
      out << (first ? "" : ",") << dump(m);
      first = false;
    }
    for (const ChromeEvent& e : timed_) out << "," << e.json;
    out << "],\"displayTimeUnit\":\"ms\"}\n";
  }

 private:
  void add(int rank, int64_t ts, int order, int64_t dur, const OrderedJson& json) {
    timed_.push_back(ChromeEvent{rank, ts, order, dur, dump(json)});
  }

  // An anchor slice plus an async span from issue to end per collective.
  void add_collectives() {
    for (size_t i = 0; i < all_.size(); ++i) {
      const Record& e = all_[i];
      if (!e.is_collective()) continue;
      const OrderedJson args = collective_args(e);
      const int64_t issue = base_.rel(e.issue_ns);
      int64_t end = e.end_ns != 0 ? base_.rel(e.end_ns)
                                  : (e.status == RecordStatus::InFlight ? base_.end
                                                                        : base_.rel(std::max(e.issue_ns, e.start_ns)));
      end = std::max(end, issue);
      const int64_t anchor = anchors_.start[i];

      OrderedJson x = base_json("X", e.name, "collective", e.rank);
      x["ts"] = ns_to_us(anchor);
      x["dur"] = ns_to_us(kAnchorNs);
      x["args"] = args;
      add(e.rank, anchor, 1, kAnchorNs, x);

      OrderedJson b = base_json("b", e.name, "collective", e.rank);
      b["id"] = e.id;
      b["ts"] = ns_to_us(issue);
      b["args"] = args;
      add(e.rank, issue, 2, 0, b);
      OrderedJson en = base_json("e", e.name, "collective", e.rank);
      en["id"] = e.id;
      en["ts"] = ns_to_us(end);
      add(e.rank, end, 0, 0, en);
    }
  }

  void add_flows() {
    uint64_t flow_id = 0;
    for (auto& [key, members] : anchors_.by_collective) {
      if (members.size() < 2) continue;
      std::sort(members.begin(), members.end(), [&](size_t a, size_t b) {
        if (anchors_.start[a] != anchors_.start[b]) return anchors_.start[a] < anchors_.start[b];
        return all_[a].rank < all_[b].rank;
      });
      ++flow_id;
      const int64_t n = static_cast<int64_t>(members.size());
      for (int64_t k = 0; k < n; ++k) {
        const size_t i = members[static_cast<size_t>(k)];
        // Strictly inside the anchor, and strictly increasing along the chain
        // even when anchors tie; kept 100 ns from the edges against rounding.
        const int64_t ts = anchors_.start[i] + 100 + (k * 800) / (n - 1);
        const char* ph = k == 0 ? "s" : (k == n - 1 ? "f" : "t");
        // Viewers chain v1 flow events by (id, cat, name): one name for all.
        OrderedJson f = base_json(ph, "collective", "collective_flow", all_[i].rank);
        f["id"] = flow_id;
        f["ts"] = ns_to_us(ts);
        if (k == n - 1) f["bp"] = "e";
        add(all_[i].rank, ts, 3, 0, f);
      }
    }
  }

  // Starts or ends strictly inside an anchor: it would cross the anchor, or
  // sit inside it and steal the anchor's flow arrows.
  bool touches_anchor(int rank, int64_t s, int64_t t) const {
    const auto& anchors = anchors_.of_rank[static_cast<size_t>(rank)];
    for (int64_t point : {s, t}) {
      auto it =
          std::upper_bound(anchors.begin(), anchors.end(), std::make_pair(point, std::numeric_limits<int64_t>::max()));
      if (it == anchors.begin()) continue;
      const auto& a = *std::prev(it);  // the last anchor starting at or before point
      if (a.first < point && point < a.second) return true;
    }
    return false;
  }

  // Engine events by rank, then start, longest first.
  std::vector<size_t> engine_order() const {
    std::vector<size_t> order;
    for (size_t i = 0; i < all_.size(); ++i) {
      if (!all_[i].is_collective()) order.push_back(i);
    }
    std::stable_sort(order.begin(), order.end(), [this](size_t a, size_t b) {
      if (all_[a].rank != all_[b].rank) return all_[a].rank < all_[b].rank;
      if (all_[a].start_ns != all_[b].start_ns) return all_[a].start_ns < all_[b].start_ns;
      return all_[a].end_ns > all_[b].end_ns;
    });
    return order;
  }

  // X where they nest with the rank's other thread slices, async otherwise.
  void add_engine_events() {
    int prev_rank = -1;
    std::vector<int64_t> open_ends;  // ends of the accepted X engine slices enclosing the current point
    for (size_t i : engine_order()) {
      const Record& e = all_[i];
      if (e.rank != prev_rank) open_ends.clear();
      prev_rank = e.rank;
      const int64_t s = base_.rel(e.start_ns);
      const int64_t t = std::max(base_.rel(e.end_ns), s);
      while (!open_ends.empty() && open_ends.back() <= s) open_ends.pop_back();
      const bool nests = (open_ends.empty() || t <= open_ends.back()) && !touches_anchor(e.rank, s, t);
      if (nests) open_ends.push_back(t);
      add_engine_event(e, s, t, nests);
    }
  }

  void add_engine_event(const Record& e, int64_t s, int64_t t, bool nests) {
    const std::string label = e.name.empty() ? e.kind : e.kind + " " + e.name;
    OrderedJson args;
    args["kind"] = e.kind;
    args["unit"] = e.name;
    args["state"] = e.detail;
    args["rank"] = e.rank;
    args["logical_clock"] = e.logical_clock_issue;
    if (nests) {
      OrderedJson x = base_json("X", label, "engine", e.rank);
      x["ts"] = ns_to_us(s);
      x["dur"] = ns_to_us(t - s);
      x["args"] = std::move(args);
      add(e.rank, s, 1, t - s, x);
      return;
    }
    OrderedJson b = base_json("b", label, "engine", e.rank);
    b["id"] = e.id;
    b["ts"] = ns_to_us(s);
    b["args"] = std::move(args);
    add(e.rank, s, 2, 0, b);
    OrderedJson en = base_json("e", label, "engine", e.rank);
    en["id"] = e.id;
    en["ts"] = ns_to_us(t);
    add(e.rank, t, 0, 0, en);
  }

  // Process and thread names, ranks in order.
  OrderedJson metadata() const {
    OrderedJson events = OrderedJson::array();
    OrderedJson process;
    process["ph"] = "M";
    process["name"] = "process_name";
    process["pid"] = kChromePid;
    process["args"]["name"] = "fsdpsim world";
    events.push_back(std::move(process));
    for (int r = 0; r < world_size_; ++r) {
      for (const char* what : {"thread_name", "thread_sort_index"}) {
        OrderedJson m;
        m["ph"] = "M";
        m["name"] = what;
        m["pid"] = kChromePid;
        m["tid"] = chrome_tid(r);
        if (what == std::string("thread_name")) {
          m["args"]["name"] = "rank " + std::to_string(r);
        } else {
          m["args"]["sort_index"] = r;
        }
        events.push_back(std::move(m));
      }
    }
    return events;
  }

  const std::vector<Record>& all_;
  const int world_size_;
  const TimeBase base_;
  Anchors anchors_;
  std::vector<ChromeEvent> timed_;
};

}  // namespace

void write_chrome_trace(std::ostream& out, const std::vector<Record>& records, int world_size) {
  ChromeWriter(records, world_size).write(out);
}

void write_chrome_trace_from_jsonl(std::istream& jsonl, std::ostream& out) {
  JsonlTrace trace = read_jsonl_trace(jsonl);
  sort_by_rank(trace.events);
  write_chrome_trace(out, trace.events, trace.world_size);
}

}  // namespace fsdpsim::observe
