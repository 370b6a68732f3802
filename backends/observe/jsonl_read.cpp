// The JSONL reader: a trace file is untrusted input, so every line is bounded
// and every field checked before it becomes a Record.

#include <algorithm>
#include <istream>
#include <limits>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <streambuf>
#include <string>
#include <unordered_map>
#include <unordered_set>

#include "backends/observe/jsonl.h"

namespace fsdpsim::observe {

namespace {

using Json = nlohmann::json;

constexpr int64_t kMaxNs = std::numeric_limits<int64_t>::max();

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
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
      continue;
    }
    if (c == '"')
      in_string = true;
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
    if (!j.is_number_unsigned())
      fail_field(line_, key, "must not be negative, got " + std::to_string(j.get<int64_t>()));
    uint64_t value = j.get<uint64_t>();
    if (value < min)
      fail_field(line_, key, "must be at least " + std::to_string(min) + ", got " + std::to_string(value));
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

ReduceOp reduce_op_from_string(const FieldReader& fields, const std::string& name) {
  for (auto op : {ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Min, ReduceOp::Max}) {
    if (name == to_string(op)) return op;
  }
  fields.fail("reduce_op", "unknown reduce op '" + name + "'");
}

// The fields every record has, and the checks that need only them.
void read_common_fields(const FieldReader& f, int world_size, Record& e) {
  e.id = f.unsigned_integer("id", 0);
  e.rank = static_cast<int>(f.integer("rank", 0, world_size - 1));
  e.name = f.string("name");
  e.detail = f.string("detail");
  e.issue_ns = f.integer("issue_ns", 0, kMaxNs);
  e.start_ns = f.integer("start_ns", 0, kMaxNs);
  e.end_ns = f.integer("end_ns", 0, kMaxNs);
  e.logical_clock_issue = f.unsigned_integer("logical_clock_issue", 1);
  e.logical_clock_end = f.unsigned_integer("logical_clock_end", 0);
  const std::string status = f.string("status");
  e.error = f.string("error");

  const auto parsed = record_status_from_string(status);
  if (!parsed) f.fail("status", "'" + status + "' is not completed, failed or in_flight");
  e.status = *parsed;
  if (e.status != RecordStatus::Failed && !e.error.empty()) f.fail("error", "set on an event with status " + status);
  if (e.status == RecordStatus::InFlight) {
    if (e.logical_clock_end != 0) f.fail("logical_clock_end", "must be 0 while in flight");
    if (e.end_ns != 0) f.fail("end_ns", "must be 0 while in flight");
  }
  if (e.start_ns != 0 && e.end_ns != 0 && e.end_ns < e.start_ns) f.fail("end_ns", "is before start_ns");
}

void check_engine_event(const FieldReader& f, const Record& e) {
  if (e.status != RecordStatus::Completed) f.fail("status", "engine events are always completed");
  if (e.issue_ns != e.start_ns) f.fail("issue_ns", "must equal start_ns for an engine event");
  if (e.end_ns < e.start_ns) f.fail("end_ns", "is before start_ns");
  if (e.logical_clock_end != e.logical_clock_issue) {
    f.fail("logical_clock_end", "must equal logical_clock_issue for an engine event");
  }
}

// Distinct ranks of the world.
std::vector<int> read_group_ranks(const FieldReader& f, int world_size) {
  const Json& ranks = f.get("group_ranks");
  if (!ranks.is_array()) f.fail("group_ranks", std::string("expected an array, got ") + type_name(ranks));
  if (ranks.empty() || ranks.size() > static_cast<size_t>(world_size)) {
    f.fail("group_ranks",
           "has " + std::to_string(ranks.size()) + " entries, expected 1 to " + std::to_string(world_size));
  }
  std::vector<bool> seen(static_cast<size_t>(world_size), false);
  std::vector<int> out;
  for (const Json& r : ranks) {
    int member = static_cast<int>(f.integer_of(r, "group_ranks", 0, world_size - 1));
    if (seen[static_cast<size_t>(member)]) f.fail("group_ranks", "rank " + std::to_string(member) + " appears twice");
    seen[static_cast<size_t>(member)] = true;
    out.push_back(member);
  }
  return out;
}

// Version 2: the groups defined so far by "group" lines, by name.
using GroupDefinitions = std::unordered_map<std::string, GroupRanks>;  // records share them

// A record's group ranks: inline (version 1 always; version 2 for a group
// whose name another definition holds), else the group's definition.
GroupRanks record_group_ranks(const FieldReader& f, bool has_inline, int world_size, const std::string& group,
                              const GroupDefinitions* groups) {
  if (has_inline || groups == nullptr) return read_group_ranks(f, world_size);
  auto found = groups->find(group);
  if (found == groups->end()) f.fail("group", "'" + group + "' is not defined by an earlier group line");
  return found->second;
}

void read_collective_fields(const FieldReader& f, int world_size, const GroupDefinitions* groups, bool has_inline,
                            Record& e) {
  if (e.status != RecordStatus::InFlight && e.logical_clock_end <= e.logical_clock_issue) {
    f.fail("logical_clock_end", "must exceed logical_clock_issue once completed");
  }
  e.group = f.string("group");
  if (e.group.empty()) f.fail("group", "is empty");
  e.group_ranks = record_group_ranks(f, has_inline, world_size, e.group, groups);
  if (std::find(e.group_ranks.begin(), e.group_ranks.end(), e.rank) == e.group_ranks.end()) {
    f.fail("group_ranks", "does not contain the event's rank " + std::to_string(e.rank));
  }
  e.seq = f.unsigned_integer("seq", 1);
  const std::string op = f.string("op");
  try {
    e.op = collective_op_from_string(op);
  } catch (const std::invalid_argument&) {
    f.fail("op", "unknown collective op '" + op + "'");
  }
  const std::string dtype = f.string("dtype");
  const auto type = dtype_from_name(dtype);
  if (!type) f.fail("dtype", "unknown dtype '" + dtype + "'");
  e.dtype = *type;
  e.in_numel = f.integer("in_numel", 0, std::numeric_limits<int64_t>::max());
  e.out_numel = f.integer("out_numel", 0, std::numeric_limits<int64_t>::max());
  e.reduce_op = reduce_op_from_string(f, f.string("reduce_op"));
  e.root = static_cast<int>(f.integer("root", 0, static_cast<int64_t>(e.group_ranks.size()) - 1));
}

// groups: version 2's definitions (group_ranks optional), nullptr for version 1.
Record parse_record(const Json& object, size_t line, int world_size, const GroupDefinitions* groups) {
  FieldReader f(object, line);
  Record e;
  e.kind = f.string("kind");
  const bool collective = e.kind == Record::kCollectiveKind;
  if (!collective && !is_engine_kind(e.kind)) {
    f.fail("kind", "'" + e.kind + "' is neither 'collective' nor a lowercase engine event kind");
  }
  std::vector<const char*> allowed = {"id",
                                      "rank",
                                      "kind",
                                      "name",
                                      "detail",
                                      "issue_ns",
                                      "start_ns",
                                      "end_ns",
                                      "logical_clock_issue",
                                      "logical_clock_end",
                                      "status",
                                      "error"};
  if (collective) {
    for (const char* k : {"group", "group_ranks", "seq", "op", "dtype", "in_numel", "out_numel", "reduce_op", "root"}) {
      allowed.push_back(k);
    }
  }
  f.only(allowed);
  read_common_fields(f, world_size, e);
  if (collective) {
    read_collective_fields(f, world_size, groups, object.contains("group_ranks"), e);
  } else {
    check_engine_event(f, e);
  }
  return e;
}

bool is_group_line(const Json& object) {
  auto kind = object.find("kind");
  return kind != object.end() && kind->is_string() && kind->get<std::string>() == kGroupKind;
}

// {"kind":"group","group":NAME,"group_ranks":[...]}: once per name.
void read_group_definition(const Json& object, size_t line, int world_size, GroupDefinitions& groups) {
  FieldReader f(object, line);
  f.only({"kind", "group", "group_ranks"});
  const std::string name = f.string("group");
  if (name.empty()) f.fail("group", "is empty");
  GroupRanks ranks(read_group_ranks(f, world_size));
  if (!groups.emplace(name, std::move(ranks)).second) f.fail("group", "'" + name + "' is defined twice");
}

void read_header(const std::string& line, size_t line_number, JsonlTrace& trace) {
  const Json header = parse_object(line, line_number);
  FieldReader f(header, line_number);
  f.only({"schema", "version", "world_size"});
  const std::string schema = f.string("schema");
  if (schema != kJsonlSchema) f.fail("schema", "'" + schema + "' is not '" + kJsonlSchema + "'");
  trace.version = static_cast<int>(f.integer("version", 0, std::numeric_limits<int>::max()));
  if (trace.version < 1 || trace.version > kJsonlVersion) {
    f.fail("version", "version " + std::to_string(trace.version) + " is not supported (this build reads 1 to " +
                          std::to_string(kJsonlVersion) + ")");
  }
  trace.world_size = static_cast<int>(f.integer("world_size", 1, kMaxWorldSize));
}

}  // namespace

void read_jsonl_records(std::istream& in, const std::function<void(const JsonlTrace& header)>& header,
                        const std::function<void(Record&& record)>& each) {
  std::streambuf* buf = in.rdbuf();
  if (buf == nullptr) throw std::runtime_error("trace line 1: the stream has no buffer");
  JsonlTrace trace;
  std::string line;
  size_t line_number = 1;
  if (!read_line(buf, kMaxJsonlLineBytes, line_number, line)) fail_line(1, "missing header (empty input)");
  read_header(line, line_number, trace);
  header(trace);
  std::unordered_set<uint64_t> ids;
  GroupDefinitions groups;
  while (read_line(buf, kMaxJsonlLineBytes, ++line_number, line)) {
    if (ids.size() >= kMaxJsonlEvents) {
      fail_line(line_number, "more than " + std::to_string(kMaxJsonlEvents) + " events");
    }
    const Json object = parse_object(line, line_number);
    if (trace.version >= 2 && is_group_line(object)) {
      read_group_definition(object, line_number, trace.world_size, groups);
      continue;
    }
    Record e = parse_record(object, line_number, trace.world_size, trace.version >= 2 ? &groups : nullptr);
    if (!ids.insert(e.id).second) fail_field(line_number, "id", std::to_string(e.id) + " appears twice");
    each(std::move(e));
  }
  if (in.bad()) fail_line(line_number, "read error");
}

JsonlTrace read_jsonl_trace(std::istream& in) {
  JsonlTrace trace;
  read_jsonl_records(
      in,
      [&trace](const JsonlTrace& header) {
        trace.version = header.version;
        trace.world_size = header.world_size;
      },
      [&trace](Record&& e) { trace.events.push_back(std::move(e)); });
  return trace;
}

std::vector<Record> read_jsonl(std::istream& in) { return read_jsonl_trace(in).events; }

void sort_by_rank(std::vector<Record>& records) {
  std::stable_sort(records.begin(), records.end(), [](const Record& a, const Record& b) { return a.rank < b.rank; });
}

}  // namespace fsdpsim::observe
