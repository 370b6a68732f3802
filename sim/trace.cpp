#include "sim/trace.h"

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <istream>
#include <limits>
#include <nlohmann/json.hpp>
#include <ostream>
#include <set>
#include <stdexcept>
#include <streambuf>
#include <unordered_set>

#include "backends/collective_checks.h"
#include "backends/errors.h"

namespace fsdpsim::sim {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;

namespace {

constexpr const char* kCompleted = "completed";
constexpr const char* kFailed = "failed";
constexpr const char* kInFlight = "in_flight";

bool is_engine_kind(const std::string& kind) {
  if (kind.empty() || kind.size() > 64 || kind == TraceEvent::kCollectiveKind) return false;
  return std::all_of(kind.begin(), kind.end(),
                     [](char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'; });
}

std::string ranks_string(const std::vector<int>& ranks) {
  std::string out = "[";
  for (size_t i = 0; i < ranks.size(); ++i) out += (i ? ", " : "") + std::to_string(ranks[i]);
  return out + "]";
}

// nlohmann throws on invalid UTF-8 when dumping; exception texts are not ours
// to vouch for, so replace bad bytes instead.
template <typename J>
std::string dump(const J& j) {
  return j.dump(-1, ' ', false, nlohmann::detail::error_handler_t::replace);
}

}  // namespace

bool operator==(const TraceEvent& a, const TraceEvent& b) {
  return a.id == b.id && a.rank == b.rank && a.kind == b.kind && a.name == b.name && a.detail == b.detail &&
         a.group == b.group && a.group_ranks == b.group_ranks && a.seq == b.seq && a.op == b.op &&
         a.dtype == b.dtype && a.in_numel == b.in_numel && a.out_numel == b.out_numel &&
         a.reduce_op == b.reduce_op && a.root == b.root && a.issue_ns == b.issue_ns &&
         a.start_ns == b.start_ns && a.end_ns == b.end_ns && a.logical_clock_issue == b.logical_clock_issue &&
         a.logical_clock_end == b.logical_clock_end && a.status == b.status && a.error == b.error;
}

// ---------------------------------------------------------------------------
// Recording

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
  check_rank(rank);
  TraceEvent event;
  event.rank = rank;
  event.kind = TraceEvent::kCollectiveKind;
  event.name = to_string(desc.op);
  event.detail = desc.call_string();
  event.group = desc.group;
  event.group_ranks = group_ranks;
  event.seq = desc.seq;
  event.op = desc.op;
  event.dtype = c10::toString(desc.dtype);
  event.in_numel = desc.input_numel();
  event.out_numel = desc.output_numel();
  event.reduce_op = desc.reduce_op;
  event.root = desc.root;
  event.issue_ns = issue_ns;
  event.status = kInFlight;

  std::lock_guard<std::mutex> lock(mutex_);
  const size_t id = events_.size();
  event.id = id;
  event.logical_clock_issue = tick_locked(rank);
  events_.push_back(std::move(event));
  by_collective_[{desc.group, desc.seq}].push_back(id);
  return id;
}

void TraceRecorder::import_events(const std::vector<TraceEvent>& events) {
  for (const auto& event : events) check_rank(event.rank);
  std::lock_guard<std::mutex> lock(mutex_);
  for (TraceEvent event : events) {
    event.id = events_.size();
    uint64_t& clock = clocks_[static_cast<size_t>(event.rank)];
    clock = std::max({clock, event.logical_clock_issue, event.logical_clock_end});
    if (event.is_collective()) by_collective_[{event.group, event.seq}].push_back(event.id);
    events_.push_back(std::move(event));
  }
}

void TraceRecorder::record_completion(size_t id, const WorkTimes& times, std::exception_ptr error) {
  std::string message = error_text(error);
  std::lock_guard<std::mutex> lock(mutex_);
  if (id >= events_.size() || !events_[id].is_collective()) {
    throw std::out_of_range("TraceRecorder: no collective with id " + std::to_string(id));
  }
  TraceEvent& event = events_[id];
  if (event.status != kInFlight) return;
  uint64_t& clock = clocks_[static_cast<size_t>(event.rank)];
  uint64_t latest = clock;
  auto peers = by_collective_.find({event.group, event.seq});
  if (peers != by_collective_.end()) {
    for (size_t peer : peers->second) latest = std::max(latest, events_[peer].logical_clock_issue);
  }
  clock = latest + 1;
  event.logical_clock_end = clock;
  event.start_ns = times.start_ns;
  event.end_ns = times.end_ns;
  event.status = error ? kFailed : kCompleted;
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
  TraceEvent event;
  event.rank = rank;
  event.kind = std::move(kind);
  event.name = std::move(name);
  event.detail = std::move(detail);
  event.issue_ns = start_ns;
  event.start_ns = start_ns;
  event.end_ns = end_ns;
  event.status = kCompleted;

  std::lock_guard<std::mutex> lock(mutex_);
  event.id = events_.size();
  event.logical_clock_issue = event.logical_clock_end = tick_locked(rank);
  events_.push_back(std::move(event));
}

std::vector<TraceEvent> TraceRecorder::events() const {
  std::vector<TraceEvent> out;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    out = events_;
  }
  // Ids are recording order, and a rank records its own issues in call order.
  std::stable_sort(out.begin(), out.end(), [](const TraceEvent& a, const TraceEvent& b) { return a.rank < b.rank; });
  return out;
}

size_t TraceRecorder::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return events_.size();
}

// ---------------------------------------------------------------------------
// Chrome trace
//
// Layout (pid kChromePid = the world, tid chrome_tid(r) = rank r; pid 0 and
// tid 0 are the kernel's idle task, which Perfetto treats specially):
// - each collective is an async span b/e (cat "collective", id = event id)
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

namespace {

struct ChromeEvent {
  int tid;
  int64_t ts_ns;  // relative to the trace's origin
  int order;      // at equal ts: ends, then slices (longest first), then begins, then flows
  int64_t dur_ns;
  OrderedJson json;
};

OrderedJson collective_args(const TraceEvent& e) {
  OrderedJson args;
  args["Collective name"] = e.name;
  args["In msg nelems"] = e.in_numel;
  args["Out msg nelems"] = e.out_numel;
  args["Group size"] = e.group_ranks.size();
  args["Process Group Name"] = e.group;
  args["Process Group Ranks"] = ranks_string(e.group_ranks);
  args["dtype"] = e.dtype;
  args["Seq"] = e.seq;
  args["rank"] = e.rank;
  args["logical_clock"] = e.logical_clock_issue;
  args["logical_clock_end"] = e.logical_clock_end;
  args["status"] = e.status;
  if (!e.error.empty()) args["error"] = e.error;
  args["call"] = e.detail;
  return args;
}

constexpr int64_t kAnchorNs = 1000;  // anchor slice length: 1 us

}  // namespace

void TraceRecorder::write_chrome_trace(std::ostream& out) const {
  const std::vector<TraceEvent> all = events();

  int64_t origin = std::numeric_limits<int64_t>::max();
  int64_t last = 0;
  for (const TraceEvent& e : all) {
    for (int64_t t : {e.issue_ns, e.start_ns, e.end_ns}) {
      if (t == 0) continue;
      origin = std::min(origin, t);
      last = std::max(last, t);
    }
  }
  if (origin == std::numeric_limits<int64_t>::max()) origin = 0;
  auto rel = [origin](int64_t t) { return t > origin ? t - origin : 0; };
  const int64_t trace_end = rel(last);

  std::vector<ChromeEvent> timed;
  auto add = [&timed](int tid, int64_t ts, int order, int64_t dur, OrderedJson json) {
    timed.push_back(ChromeEvent{tid, ts, order, dur, std::move(json)});
  };
  auto base = [](const char* ph, const std::string& name, const char* cat, int tid) {
    OrderedJson j;
    j["ph"] = ph;
    j["name"] = name;
    j["cat"] = cat;
    j["pid"] = kChromePid;
    j["tid"] = chrome_tid(tid);
    return j;
  };

  // Anchors per rank, and the collectives by (group, seq) for the flows.
  std::vector<int64_t> anchor(all.size(), 0);  // by position in `all`
  std::map<std::pair<std::string, uint64_t>, std::vector<size_t>> by_collective;
  std::vector<std::vector<std::pair<int64_t, int64_t>>> anchors_of_rank(static_cast<size_t>(world_size_));
  {
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
      const TraceEvent& e = all[i];
      if (e.rank != prev_rank) prev_end = 0;
      prev_rank = e.rank;
      anchor[i] = std::max(rel(e.issue_ns), prev_end);
      prev_end = anchor[i] + kAnchorNs;
      anchors_of_rank[static_cast<size_t>(e.rank)].emplace_back(anchor[i], prev_end);
      by_collective[{e.group, e.seq}].push_back(i);
    }
  }

  for (size_t i = 0; i < all.size(); ++i) {
    const TraceEvent& e = all[i];
    if (!e.is_collective()) continue;
    const OrderedJson args = collective_args(e);
    const int64_t issue = rel(e.issue_ns);
    int64_t end = e.end_ns != 0 ? rel(e.end_ns) : (e.status == kInFlight ? trace_end : rel(std::max(e.issue_ns, e.start_ns)));
    end = std::max(end, issue);

    OrderedJson x = base("X", e.name, "collective", e.rank);
    x["ts"] = ns_to_us(anchor[i]);
    x["dur"] = ns_to_us(kAnchorNs);
    x["args"] = args;
    add(e.rank, anchor[i], 1, kAnchorNs, std::move(x));

    OrderedJson b = base("b", e.name, "collective", e.rank);
    b["id"] = e.id;
    b["ts"] = ns_to_us(issue);
    b["args"] = args;
    add(e.rank, issue, 2, 0, std::move(b));
    OrderedJson en = base("e", e.name, "collective", e.rank);
    en["id"] = e.id;
    en["ts"] = ns_to_us(end);
    add(e.rank, end, 0, 0, std::move(en));
  }

  uint64_t flow_id = 0;
  for (auto& [key, members] : by_collective) {
    if (members.size() < 2) continue;
    std::sort(members.begin(), members.end(), [&](size_t a, size_t b) {
      if (anchor[a] != anchor[b]) return anchor[a] < anchor[b];
      return all[a].rank < all[b].rank;
    });
    ++flow_id;
    const int64_t n = static_cast<int64_t>(members.size());
    for (int64_t k = 0; k < n; ++k) {
      const size_t i = members[static_cast<size_t>(k)];
      const TraceEvent& e = all[i];
      // Strictly inside the anchor, and strictly increasing along the chain
      // even when anchors tie; kept 100 ns from the edges against rounding.
      const int64_t ts = anchor[i] + 100 + (k * 800) / (n - 1);
      const char* ph = k == 0 ? "s" : (k == n - 1 ? "f" : "t");
      // Viewers chain v1 flow events by (id, cat, name): one name for all.
      OrderedJson f = base(ph, "collective", "collective_flow", e.rank);
      f["id"] = flow_id;
      f["ts"] = ns_to_us(ts);
      if (k == n - 1) f["bp"] = "e";
      add(e.rank, ts, 3, 0, std::move(f));
    }
  }

  // Engine events: X where they nest with the rank's other thread slices.
  {
    std::vector<size_t> order;
    for (size_t i = 0; i < all.size(); ++i) {
      if (!all[i].is_collective()) order.push_back(i);
    }
    std::stable_sort(order.begin(), order.end(), [&all](size_t a, size_t b) {
      if (all[a].rank != all[b].rank) return all[a].rank < all[b].rank;
      if (all[a].start_ns != all[b].start_ns) return all[a].start_ns < all[b].start_ns;
      return all[a].end_ns > all[b].end_ns;
    });
    // Starts or ends strictly inside an anchor: it would cross the anchor, or
    // sit inside it and steal the anchor's flow arrows.
    auto touches_anchor = [&anchors_of_rank](int rank, int64_t s, int64_t t) {
      const auto& anchors = anchors_of_rank[static_cast<size_t>(rank)];
      for (int64_t point : {s, t}) {
        auto it = std::upper_bound(anchors.begin(), anchors.end(),
                                   std::make_pair(point, std::numeric_limits<int64_t>::max()));
        if (it == anchors.begin()) continue;
        const auto& a = *std::prev(it);  // the last anchor starting at or before point
        if (a.first < point && point < a.second) return true;
      }
      return false;
    };
    int prev_rank = -1;
    std::vector<int64_t> open_ends;  // ends of the accepted X engine slices enclosing the current point
    for (size_t i : order) {
      const TraceEvent& e = all[i];
      if (e.rank != prev_rank) open_ends.clear();
      prev_rank = e.rank;
      const int64_t s = rel(e.start_ns);
      const int64_t t = std::max(rel(e.end_ns), s);
      while (!open_ends.empty() && open_ends.back() <= s) open_ends.pop_back();
      const bool nests = (open_ends.empty() || t <= open_ends.back()) && !touches_anchor(e.rank, s, t);
      const std::string label = e.name.empty() ? e.kind : e.kind + " " + e.name;
      OrderedJson args;
      args["kind"] = e.kind;
      args["unit"] = e.name;
      args["state"] = e.detail;
      args["rank"] = e.rank;
      args["logical_clock"] = e.logical_clock_issue;
      if (nests) {
        open_ends.push_back(t);
        OrderedJson x = base("X", label, "engine", e.rank);
        x["ts"] = ns_to_us(s);
        x["dur"] = ns_to_us(t - s);
        x["args"] = std::move(args);
        add(e.rank, s, 1, t - s, std::move(x));
      } else {
        OrderedJson b = base("b", label, "engine", e.rank);
        b["id"] = e.id;
        b["ts"] = ns_to_us(s);
        b["args"] = std::move(args);
        add(e.rank, s, 2, 0, std::move(b));
        OrderedJson en = base("e", label, "engine", e.rank);
        en["id"] = e.id;
        en["ts"] = ns_to_us(t);
        add(e.rank, t, 0, 0, std::move(en));
      }
    }
  }

  std::stable_sort(timed.begin(), timed.end(), [](const ChromeEvent& a, const ChromeEvent& b) {
    if (a.tid != b.tid) return a.tid < b.tid;
    if (a.ts_ns != b.ts_ns) return a.ts_ns < b.ts_ns;
    if (a.order != b.order) return a.order < b.order;
    return a.dur_ns > b.dur_ns;
  });

  OrderedJson trace_events = OrderedJson::array();
  {
    OrderedJson m;
    m["ph"] = "M";
    m["name"] = "process_name";
    m["pid"] = kChromePid;
    m["args"]["name"] = "fsdpsim world";
    trace_events.push_back(std::move(m));
  }
  for (int r = 0; r < world_size_; ++r) {
    OrderedJson m;
    m["ph"] = "M";
    m["name"] = "thread_name";
    m["pid"] = kChromePid;
    m["tid"] = chrome_tid(r);
    m["args"]["name"] = "rank " + std::to_string(r);
    trace_events.push_back(std::move(m));
    OrderedJson s;
    s["ph"] = "M";
    s["name"] = "thread_sort_index";
    s["pid"] = kChromePid;
    s["tid"] = chrome_tid(r);
    s["args"]["sort_index"] = r;
    trace_events.push_back(std::move(s));
  }
  for (ChromeEvent& e : timed) trace_events.push_back(std::move(e.json));

  OrderedJson root;
  root["traceEvents"] = std::move(trace_events);
  root["displayTimeUnit"] = "ms";
  out << dump(root) << "\n";
}

// ---------------------------------------------------------------------------
// JSONL

void TraceRecorder::write_jsonl(std::ostream& out) const {
  const std::vector<TraceEvent> all = events();
  OrderedJson header;
  header["schema"] = kSchema;
  header["version"] = kVersion;
  header["world_size"] = world_size_;
  out << dump(header) << "\n";
  for (const TraceEvent& e : all) {
    OrderedJson j;
    j["id"] = e.id;
    j["rank"] = e.rank;
    j["kind"] = e.kind;
    j["name"] = e.name;
    j["detail"] = e.detail;
    if (e.is_collective()) {
      j["group"] = e.group;
      j["group_ranks"] = e.group_ranks;
      j["seq"] = e.seq;
      j["op"] = to_string(e.op);
      j["dtype"] = e.dtype;
      j["in_numel"] = e.in_numel;
      j["out_numel"] = e.out_numel;
      j["reduce_op"] = to_string(e.reduce_op);
      j["root"] = e.root;
    }
    j["issue_ns"] = e.issue_ns;
    j["start_ns"] = e.start_ns;
    j["end_ns"] = e.end_ns;
    j["logical_clock_issue"] = e.logical_clock_issue;
    j["logical_clock_end"] = e.logical_clock_end;
    j["status"] = e.status;
    j["error"] = e.error;
    out << dump(j) << "\n";
  }
}

namespace {

[[noreturn]] void fail_line(size_t line, const std::string& what) {
  throw std::runtime_error("trace line " + std::to_string(line) + ": " + what);
}

[[noreturn]] void fail_field(size_t line, const std::string& field, const std::string& what) {
  fail_line(line, "field '" + field + "': " + what);
}

const char* type_name(const Json& j) {
  if (j.is_number_float()) return "a fraction";
  return j.type_name();
}

// Reads one line of at most max_bytes (without the newline; a trailing '\r'
// is dropped). Returns false at the end of input.
bool read_line(std::streambuf* buf, size_t max_bytes, size_t line_number, std::string& line) {
  line.clear();
  using Traits = std::char_traits<char>;
  auto c = buf->sbumpc();
  if (Traits::eq_int_type(c, Traits::eof())) return false;
  while (!Traits::eq_int_type(c, Traits::eof()) && Traits::to_char_type(c) != '\n') {
    if (line.size() >= max_bytes) fail_line(line_number, "longer than " + std::to_string(max_bytes) + " bytes");
    line.push_back(Traits::to_char_type(c));
    c = buf->sbumpc();
  }
  if (!line.empty() && line.back() == '\r') line.pop_back();
  return true;
}

// The schema nests two levels deep; refusing more before parsing keeps
// hostile input from costing deep recursion anywhere.
void check_nesting(const std::string& line, size_t line_number) {
  constexpr int kMaxDepth = 4;
  int depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (char c : line) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    else if (c == '[' || c == '{') {
      if (++depth > kMaxDepth) fail_line(line_number, "nested deeper than " + std::to_string(kMaxDepth) + " levels");
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
}

Json parse_object(const std::string& line, size_t line_number) {
  if (line.find_first_not_of(" \t") == std::string::npos) fail_line(line_number, "empty line");
  check_nesting(line, line_number);
  Json j;
  try {
    j = Json::parse(line);
  } catch (const Json::exception& e) {
    // nlohmann quotes the last token read, which hostile input can make huge.
    std::string what = e.what();
    if (what.size() > 200) what = what.substr(0, 200) + "...";
    fail_line(line_number, "not valid JSON (" + what + ")");
  }
  if (!j.is_object()) fail_line(line_number, std::string("expected a JSON object, got ") + type_name(j));
  return j;
}

class FieldReader {
 public:
  FieldReader(const Json& object, size_t line) : object_(object), line_(line) {}

  void only(const std::vector<const char*>& allowed) const {
    for (const auto& item : object_.items()) {
      bool known = std::any_of(allowed.begin(), allowed.end(), [&](const char* k) { return item.key() == k; });
      if (!known) fail_field(line_, item.key(), "unknown field");
    }
  }

  const Json& get(const char* key) const {
    auto it = object_.find(key);
    if (it == object_.end()) fail_field(line_, key, "missing");
    return *it;
  }

  std::string string(const char* key) const {
    const Json& j = get(key);
    if (!j.is_string()) fail_field(line_, key, std::string("expected a string, got ") + type_name(j));
    return j.get<std::string>();
  }

  int64_t integer(const char* key, int64_t min, int64_t max) const { return integer_of(get(key), key, min, max); }

  int64_t integer_of(const Json& j, const std::string& key, int64_t min, int64_t max) const {
    if (!j.is_number_integer()) fail_field(line_, key, std::string("expected an integer, got ") + type_name(j));
    int64_t value;
    if (j.is_number_unsigned()) {
      uint64_t u = j.get<uint64_t>();
      if (u > static_cast<uint64_t>(max)) out_of_range(key, std::to_string(u), min, max);
      value = static_cast<int64_t>(u);
    } else {
      value = j.get<int64_t>();
    }
    if (value < min || value > max) out_of_range(key, std::to_string(value), min, max);
    return value;
  }

  uint64_t unsigned_integer(const char* key, uint64_t min) const {
    const Json& j = get(key);
    if (!j.is_number_integer()) fail_field(line_, key, std::string("expected an integer, got ") + type_name(j));
    if (!j.is_number_unsigned()) fail_field(line_, key, "must not be negative, got " + std::to_string(j.get<int64_t>()));
    uint64_t value = j.get<uint64_t>();
    if (value < min) fail_field(line_, key, "must be at least " + std::to_string(min) + ", got " + std::to_string(value));
    return value;
  }

  [[noreturn]] void fail(const std::string& key, const std::string& what) const { fail_field(line_, key, what); }

 private:
  [[noreturn]] void out_of_range(const std::string& key, const std::string& value, int64_t min, int64_t max) const {
    fail_field(line_, key, value + " is outside [" + std::to_string(min) + ", " + std::to_string(max) + "]");
  }

  const Json& object_;
  size_t line_;
};

const std::set<std::string>& dtype_names() {
  static const std::set<std::string> names = [] {
    std::set<std::string> out;
    for (int i = 0; i < static_cast<int>(c10::ScalarType::NumOptions); ++i) {
      out.insert(c10::toString(static_cast<c10::ScalarType>(i)));
    }
    out.erase("UNKNOWN_SCALAR");
    return out;
  }();
  return names;
}

ReduceOp reduce_op_from_string(const FieldReader& fields, const std::string& name) {
  for (auto op : {ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Min, ReduceOp::Max}) {
    if (name == to_string(op)) return op;
  }
  fields.fail("reduce_op", "unknown reduce op '" + name + "'");
}

constexpr int64_t kMaxNs = std::numeric_limits<int64_t>::max();

TraceEvent parse_event(const Json& object, size_t line, int world_size) {
  FieldReader f(object, line);
  TraceEvent e;
  e.kind = f.string("kind");
  const bool collective = e.kind == TraceEvent::kCollectiveKind;
  if (!collective && !is_engine_kind(e.kind)) {
    f.fail("kind", "'" + e.kind + "' is neither 'collective' nor a lowercase engine event kind");
  }
  std::vector<const char*> allowed = {"id",     "rank",   "kind",     "name",
                                      "detail", "issue_ns", "start_ns", "end_ns",
                                      "logical_clock_issue", "logical_clock_end", "status", "error"};
  if (collective) {
    for (const char* k : {"group", "group_ranks", "seq", "op", "dtype", "in_numel", "out_numel", "reduce_op", "root"}) {
      allowed.push_back(k);
    }
  }
  f.only(allowed);

  e.id = f.unsigned_integer("id", 0);
  e.rank = static_cast<int>(f.integer("rank", 0, world_size - 1));
  e.name = f.string("name");
  e.detail = f.string("detail");
  e.issue_ns = f.integer("issue_ns", 0, kMaxNs);
  e.start_ns = f.integer("start_ns", 0, kMaxNs);
  e.end_ns = f.integer("end_ns", 0, kMaxNs);
  e.logical_clock_issue = f.unsigned_integer("logical_clock_issue", 1);
  e.logical_clock_end = f.unsigned_integer("logical_clock_end", 0);
  e.status = f.string("status");
  e.error = f.string("error");

  if (e.status != kCompleted && e.status != kFailed && e.status != kInFlight) {
    f.fail("status", "'" + e.status + "' is not completed, failed or in_flight");
  }
  if (e.status != kFailed && !e.error.empty()) f.fail("error", "set on an event with status " + e.status);
  if (e.status == kInFlight) {
    if (e.logical_clock_end != 0) f.fail("logical_clock_end", "must be 0 while in flight");
    if (e.end_ns != 0) f.fail("end_ns", "must be 0 while in flight");
  }
  if (e.start_ns != 0 && e.end_ns != 0 && e.end_ns < e.start_ns) f.fail("end_ns", "is before start_ns");

  if (!collective) {
    if (e.status != kCompleted) f.fail("status", "engine events are always completed");
    if (e.issue_ns != e.start_ns) f.fail("issue_ns", "must equal start_ns for an engine event");
    if (e.end_ns < e.start_ns) f.fail("end_ns", "is before start_ns");
    if (e.logical_clock_end != e.logical_clock_issue) {
      f.fail("logical_clock_end", "must equal logical_clock_issue for an engine event");
    }
    return e;
  }

  if (e.status != kInFlight && e.logical_clock_end <= e.logical_clock_issue) {
    f.fail("logical_clock_end", "must exceed logical_clock_issue once completed");
  }
  e.group = f.string("group");
  if (e.group.empty()) f.fail("group", "is empty");
  const Json& ranks = f.get("group_ranks");
  if (!ranks.is_array()) f.fail("group_ranks", std::string("expected an array, got ") + type_name(ranks));
  if (ranks.empty() || ranks.size() > static_cast<size_t>(world_size)) {
    f.fail("group_ranks", "has " + std::to_string(ranks.size()) + " entries, expected 1 to " +
                              std::to_string(world_size));
  }
  std::vector<bool> seen(static_cast<size_t>(world_size), false);
  for (const Json& r : ranks) {
    int rank = static_cast<int>(f.integer_of(r, "group_ranks", 0, world_size - 1));
    if (seen[static_cast<size_t>(rank)]) f.fail("group_ranks", "rank " + std::to_string(rank) + " appears twice");
    seen[static_cast<size_t>(rank)] = true;
    e.group_ranks.push_back(rank);
  }
  if (!seen[static_cast<size_t>(e.rank)]) f.fail("group_ranks", "does not contain the event's rank " + std::to_string(e.rank));
  e.seq = f.unsigned_integer("seq", 1);
  const std::string op = f.string("op");
  try {
    e.op = collective_op_from_string(op);
  } catch (const std::invalid_argument&) {
    f.fail("op", "unknown collective op '" + op + "'");
  }
  e.dtype = f.string("dtype");
  if (!dtype_names().count(e.dtype)) f.fail("dtype", "unknown dtype '" + e.dtype + "'");
  e.in_numel = f.integer("in_numel", 0, std::numeric_limits<int64_t>::max());
  e.out_numel = f.integer("out_numel", 0, std::numeric_limits<int64_t>::max());
  e.reduce_op = reduce_op_from_string(f, f.string("reduce_op"));
  e.root = static_cast<int>(f.integer("root", 0, static_cast<int64_t>(e.group_ranks.size()) - 1));
  return e;
}

}  // namespace

JsonlTrace TraceRecorder::read_jsonl_trace(std::istream& in) {
  std::streambuf* buf = in.rdbuf();
  if (buf == nullptr) throw std::runtime_error("trace line 1: the stream has no buffer");
  JsonlTrace trace;
  std::string line;
  size_t line_number = 1;
  if (!read_line(buf, kMaxJsonlLineBytes, line_number, line)) fail_line(1, "missing header (empty input)");
  {
    const Json header = parse_object(line, line_number);
    FieldReader f(header, line_number);
    f.only({"schema", "version", "world_size"});
    const std::string schema = f.string("schema");
    if (schema != kSchema) f.fail("schema", "'" + schema + "' is not '" + kSchema + "'");
    trace.version = static_cast<int>(f.integer("version", 0, std::numeric_limits<int>::max()));
    if (trace.version != kVersion) {
      f.fail("version", "version " + std::to_string(trace.version) + " is not supported (this build reads " +
                            std::to_string(kVersion) + ")");
    }
    trace.world_size = static_cast<int>(f.integer("world_size", 1, kMaxWorldSize));
  }
  std::unordered_set<uint64_t> ids;
  while (read_line(buf, kMaxJsonlLineBytes, ++line_number, line)) {
    if (trace.events.size() >= kMaxJsonlEvents) {
      fail_line(line_number, "more than " + std::to_string(kMaxJsonlEvents) + " events");
    }
    TraceEvent e = parse_event(parse_object(line, line_number), line_number, trace.world_size);
    if (!ids.insert(e.id).second) fail_field(line_number, "id", std::to_string(e.id) + " appears twice");
    trace.events.push_back(std::move(e));
  }
  if (in.bad()) fail_line(line_number, "read error");
  return trace;
}

std::vector<TraceEvent> TraceRecorder::read_jsonl(std::istream& in) { return read_jsonl_trace(in).events; }

// ---------------------------------------------------------------------------
// TracedProcessGroup

TracedProcessGroup::TracedProcessGroup(ProcessGroupPtr inner, std::shared_ptr<TraceRecorder> recorder,
                                       int global_rank, const Clock& clock)
    : ForwardingProcessGroup(std::move(inner), "TracedProcessGroup"),
      recorder_(std::move(recorder)),
      global_rank_(global_rank),
      clock_(&clock) {
  if (!recorder_) throw CommError("TracedProcessGroup: the trace recorder is null");
  const auto& ranks = global_ranks();
  const int r = rank();
  if (r < 0 || static_cast<size_t>(r) >= ranks.size() || ranks[static_cast<size_t>(r)] != global_rank) {
    throw CommError("TracedProcessGroup: global rank " + std::to_string(global_rank) +
                    " is not group rank " + std::to_string(r) + " of group " + name());
  }
  if (global_rank < 0 || global_rank >= recorder_->world_size()) {
    throw CommError("TracedProcessGroup: global rank " + std::to_string(global_rank) +
                    " is outside the recorder's world of " + std::to_string(recorder_->world_size()));
  }
}

WorkPtr TracedProcessGroup::call(const CollectiveDesc& desc, const std::function<WorkPtr()>& issue) {
  const size_t id = recorder_->record_issue(global_rank_, desc, global_ranks(), clock_->now_ns());
  return issue_observed(desc, issue, *clock_, [recorder = recorder_, id](const WorkTimes& times, std::exception_ptr error) {
    recorder->record_completion(id, times, error);
  });
}

ProcessGroupPtr TracedProcessGroup::wrap(ProcessGroupPtr sub) {
  return std::make_shared<TracedProcessGroup>(std::move(sub), recorder_, global_rank_, *clock_);
}

}  // namespace fsdpsim::sim
