#include <nlohmann/json.hpp>
#include <ostream>

#include "backends/observe/jsonl.h"

namespace fsdpsim::observe {

namespace {

using OrderedJson = nlohmann::ordered_json;

// nlohmann throws on invalid UTF-8 when dumping; error texts are not ours to
// vouch for, so replace bad bytes instead.
std::string dump(const OrderedJson& j) { return j.dump(-1, ' ', false, nlohmann::detail::error_handler_t::replace); }

OrderedJson record_json(const Record& e) {
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

void write_jsonl(std::ostream& out, const std::vector<Record>& records, int world_size) {
  OrderedJson header;
  header["schema"] = kJsonlSchema;
  header["version"] = kJsonlVersion;
  header["world_size"] = world_size;
  out << dump(header) << "\n";
  for (const Record& e : records) out << dump(record_json(e)) << "\n";
}

}  // namespace fsdpsim::observe
