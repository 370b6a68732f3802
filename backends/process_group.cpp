#include "backends/process_group.h"

#include <c10/core/ScalarType.h>

#include <set>
#include <sstream>
#include <stdexcept>

#include "backends/collective_checks.h"
#include "backends/errors.h"

namespace fsdpsim {

const char* to_string(CollectiveOp op) {
  switch (op) {
    case CollectiveOp::AllGather: return "all_gather";
    case CollectiveOp::ReduceScatter: return "reduce_scatter";
    case CollectiveOp::AllReduce: return "all_reduce";
    case CollectiveOp::Broadcast: return "broadcast";
    case CollectiveOp::Barrier: return "barrier";
  }
  return "unknown";
}

const char* to_string(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return "sum";
    case ReduceOp::Avg: return "avg";
    case ReduceOp::Min: return "min";
    case ReduceOp::Max: return "max";
  }
  return "unknown";
}

CollectiveOp collective_op_from_string(const std::string& name) {
  for (auto op : {CollectiveOp::AllGather, CollectiveOp::ReduceScatter, CollectiveOp::AllReduce,
                  CollectiveOp::Broadcast, CollectiveOp::Barrier}) {
    if (name == to_string(op)) return op;
  }
  throw std::invalid_argument("unknown collective op '" + name + "'");
}

namespace {
int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}
}  // namespace

int64_t CollectiveDesc::input_numel() const { return op == CollectiveOp::Barrier ? 0 : numel_of(input_shape); }
int64_t CollectiveDesc::output_numel() const { return op == CollectiveOp::Barrier ? 0 : numel_of(output_shape); }

bool CollectiveDesc::matches(const CollectiveDesc& other) const {
  if (op != other.op || label != other.label) return false;
  if (op == CollectiveOp::Barrier) return true;
  if (dtype != other.dtype || input_shape != other.input_shape || output_shape != other.output_shape) return false;
  switch (op) {
    case CollectiveOp::ReduceScatter:
      return reduce_op == other.reduce_op && predivide_factor == other.predivide_factor &&
             postdivide_factor == other.postdivide_factor;
    case CollectiveOp::AllReduce: return reduce_op == other.reduce_op;
    case CollectiveOp::Broadcast: return root == other.root;
    default: return true;
  }
}

std::string CollectiveDesc::labelled_call_string() const {
  return label.empty() ? call_string() : call_string() + " for " + label;
}

// Built by appending (each collective's record calls this once per rank); the
// rare factors keep the stream's %g-style formatting.
std::string CollectiveDesc::call_string() const {
  std::string out = fsdpsim::to_string(op);
  if (op == CollectiveOp::Barrier) return out;
  out += " ";
  out += c10::toString(dtype);
  out += " in ";
  out += shape_string(input_shape);
  out += " out ";
  out += shape_string(output_shape);
  if (op == CollectiveOp::ReduceScatter || op == CollectiveOp::AllReduce) {
    out += " op ";
    out += fsdpsim::to_string(reduce_op);
  }
  if (op == CollectiveOp::ReduceScatter && (predivide_factor != 1.0 || postdivide_factor != 1.0)) {
    std::ostringstream factors;
    factors << " predivide " << predivide_factor << " postdivide " << postdivide_factor;
    out += factors.str();
  }
  if (op == CollectiveOp::Broadcast) out += " root " + std::to_string(root);
  return out;
}

std::string CollectiveDesc::to_string() const {
  std::ostringstream out;
  out << "group " << group << " seq " << seq << " rank " << group_rank << ": " << labelled_call_string();
  return out.str();
}

void check_partition(const ProcessGroup& group, const std::vector<std::vector<int>>& partition) {
  std::set<int> seen;
  for (const auto& ranks : partition) {
    if (ranks.empty()) {
      throw CommError("split of group " + group.name() + " (rank " + std::to_string(group.rank()) +
                      "): the partition holds an empty rank list");
    }
    for (int r : ranks) {
      if (r < 0 || r >= group.size()) {
        throw CommError("split of group " + group.name() + " (rank " + std::to_string(group.rank()) + "): rank " +
                        std::to_string(r) + " is outside [0, " + std::to_string(group.size()) + ")");
      }
      if (!seen.insert(r).second) {
        throw CommError("split of group " + group.name() + " (rank " + std::to_string(group.rank()) + "): rank " +
                        std::to_string(r) + " appears twice in the partition");
      }
    }
  }
}

}  // namespace fsdpsim
