#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <unordered_map>
#include <vector>

#include "backends/observe/jsonl.h"

namespace fsdpsim::observe {

namespace {

using OrderedJson = nlohmann::ordered_json;

// nlohmann throws on invalid UTF-8 when dumping; error texts are not ours to
// vouch for, so replace bad bytes instead.
std::string dump(const OrderedJson& j) { return j.dump(-1, ' ', false, nlohmann::detail::error_handler_t::replace); }

// with_ranks: the record names its group's ranks itself (a group line
// defines them otherwise).
OrderedJson record_json(const Record& e, bool with_ranks) {
  OrderedJson j;
  j["id"] = e.id;
  j["rank"] = e.rank;
  j["kind"] = e.kind;
  j["name"] = e.name;
  j["detail"] = e.detail;
  if (e.is_collective()) {
    j["group"] = e.group;
    if (with_ranks) j["group_ranks"] = e.group_ranks.vector();
    j["seq"] = e.seq;
    j["op"] = to_string(e.op);
    j["dtype"] = dtype_name(e.dtype);
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
  j["status"] = to_string(e.status);
  j["error"] = e.error;
  return j;
}

}  // namespace

JsonlWriter::JsonlWriter(std::ostream& out, int world_size) : out_(out) {
  OrderedJson header;
  header["schema"] = kJsonlSchema;
  header["version"] = kJsonlVersion;
  header["world_size"] = world_size;
  out_ << dump(header) << "\n";
}

void JsonlWriter::write(const Record& e) {
  bool with_ranks = false;
  if (e.is_collective()) {
    // Each group's ranks once, on a line before its first record: a world of
    // N ranks would otherwise repeat N numbers on every record.
    auto [found, added] = defined_.emplace(e.group, e.group_ranks);
    if (added) {
      OrderedJson group;
      group["kind"] = kGroupKind;
      group["group"] = e.group;
      group["group_ranks"] = e.group_ranks.vector();
      out_ << dump(group) << "\n";
    }
    with_ranks = found->second != e.group_ranks;  // one name, other ranks: say them here
  }
  out_ << dump(record_json(e, with_ranks)) << "\n";
}

void write_jsonl(std::ostream& out, const std::vector<Record>& records, int world_size) {
  JsonlWriter writer(out, world_size);
  for (const Record& e : records) writer.write(e);
}

}  // namespace fsdpsim::observe
