#include "backends/observe/record.h"

#include <algorithm>
#include <stdexcept>

namespace fsdpsim::observe {

const char* to_string(RecordStatus status) {
  switch (status) {
    case RecordStatus::InFlight: return "in_flight";
    case RecordStatus::Completed: return "completed";
    case RecordStatus::Failed: return "failed";
  }
  return "unknown";
}

std::optional<RecordStatus> record_status_from_string(const std::string& name) {
  for (auto status : {RecordStatus::InFlight, RecordStatus::Completed, RecordStatus::Failed}) {
    if (name == to_string(status)) return status;
  }
  return std::nullopt;
}

std::string dtype_name(at::ScalarType dtype) { return c10::toString(dtype); }

std::optional<at::ScalarType> dtype_from_name(const std::string& name) {
  // Every named ScalarType; c10 spells the rest UNKNOWN_SCALAR.
  static const std::map<std::string, at::ScalarType> by_name = [] {
    std::map<std::string, at::ScalarType> out;
    for (int i = 0; i < static_cast<int>(c10::ScalarType::NumOptions); ++i) {
      const auto type = static_cast<c10::ScalarType>(i);
      out.emplace(c10::toString(type), type);
    }
    out.erase("UNKNOWN_SCALAR");
    return out;
  }();
  auto it = by_name.find(name);
  if (it == by_name.end()) return std::nullopt;
  return it->second;
}

int64_t Record::element_size() const { return static_cast<int64_t>(c10::elementSize(dtype)); }

bool operator==(const Record& a, const Record& b) {
  return a.id == b.id && a.rank == b.rank && a.kind == b.kind && a.name == b.name && a.detail == b.detail &&
         a.group == b.group && a.group_ranks == b.group_ranks && a.seq == b.seq && a.op == b.op && a.dtype == b.dtype &&
         a.in_numel == b.in_numel && a.out_numel == b.out_numel && a.reduce_op == b.reduce_op && a.root == b.root &&
         a.issue_ns == b.issue_ns && a.start_ns == b.start_ns && a.end_ns == b.end_ns &&
         a.logical_clock_issue == b.logical_clock_issue && a.logical_clock_end == b.logical_clock_end &&
         a.status == b.status && a.error == b.error;
}

Record collective_record(int rank, const CollectiveDesc& desc, GroupRanks group_ranks, int64_t issue_ns) {
  Record record;
  record.rank = rank;
  record.kind = Record::kCollectiveKind;
  record.name = to_string(desc.op);
  record.detail = desc.call_string();
  record.group = desc.group;
  record.group_ranks = std::move(group_ranks);
  record.seq = desc.seq;
  record.op = desc.op;
  record.dtype = desc.dtype;
  record.in_numel = desc.input_numel();
  record.out_numel = desc.output_numel();
  record.reduce_op = desc.reduce_op;
  record.root = desc.root;
  record.issue_ns = issue_ns;
  record.status = RecordStatus::InFlight;
  return record;
}

bool is_engine_kind(const std::string& kind) {
  if (kind.empty() || kind.size() > 64 || kind == Record::kCollectiveKind) return false;
  return std::all_of(kind.begin(), kind.end(),
                     [](char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'; });
}

void add_to_comm_volume(CommVolume& volume, const Record& record) {
  if (!record.is_collective()) return;
  if (record.op == CollectiveOp::AllGather) volume.gathered_bytes += record.out_bytes();
  if (record.op == CollectiveOp::ReduceScatter || record.op == CollectiveOp::AllReduce) {
    volume.reduced_bytes += record.in_bytes();
  }
  ++volume.op_counts[to_string(record.op)];
}

CommVolume comm_volume(const std::vector<Record>& records, int rank) {
  CommVolume volume;
  for (const Record& record : records) {
    if (record.rank == rank) add_to_comm_volume(volume, record);
  }
  return volume;
}

}  // namespace fsdpsim::observe
