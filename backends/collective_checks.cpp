#include "backends/collective_checks.h"

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <sstream>

#include "backends/collective_label.h"
#include "backends/errors.h"

namespace fsdpsim {

// Appends, not a stream: every collective's record formats its shapes, and an
// ostringstream costs a locale set-up per call (a fifth of a fiber rank's round).
std::string shape_string(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  out += "]";
  return out;
}

std::string rank_set_string(const std::vector<int>& ranks_in) {
  std::vector<int> ranks = ranks_in;
  std::sort(ranks.begin(), ranks.end());
  std::ostringstream out;
  out << "{";
  for (size_t i = 0; i < ranks.size();) {
    size_t j = i;
    while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
    out << (i ? "," : "") << ranks[i];
    if (j > i) out << "-" << ranks[j];
    i = j + 1;
  }
  out << "}";
  return out.str();
}

std::string ranks_text(const std::vector<int>& ranks) {
  return ranks.size() == 1 ? "rank " + std::to_string(ranks[0]) : "ranks " + rank_set_string(ranks);
}

namespace {

CollectiveDesc base_desc(const ProcessGroup& group, CollectiveOp op) {
  CollectiveDesc desc;
  desc.group = group.name();
  desc.group_rank = group.rank();
  desc.group_size = group.size();
  desc.seq = group.sequence_number() + 1;
  desc.op = op;
  desc.label = current_collective_label();
  return desc;
}

[[noreturn]] void fail(const CollectiveDesc& desc, const std::string& what) {
  throw CommError("rank " + std::to_string(desc.group_rank) + " group " + desc.group + " seq " +
                  std::to_string(desc.seq) + " " + to_string(desc.op) + ": " + what + " (" +
                  desc.labelled_call_string() + ")");
}

void check_tensor(const CollectiveDesc& desc, const at::Tensor& tensor, const char* role) {
  if (!tensor.defined()) fail(desc, std::string(role) + " tensor is undefined");
  if (!tensor.is_contiguous()) fail(desc, std::string(role) + " tensor is not contiguous");
  if (tensor.is_sparse()) fail(desc, std::string(role) + " tensor is sparse");
}

void check_reduce(const CollectiveDesc& desc, ReduceOp op) {
  if (op == ReduceOp::Avg && !c10::isFloatingType(desc.dtype)) {
    fail(desc, "reduce op avg needs a floating dtype, got " + std::string(c10::toString(desc.dtype)));
  }
  if (desc.dtype == at::kBool) fail(desc, "bool tensors cannot be reduced");
}

CollectiveDesc in_out_desc(const ProcessGroup& group, CollectiveOp op, const at::Tensor& output,
                           const at::Tensor& input) {
  CollectiveDesc desc = base_desc(group, op);
  if (input.defined()) {
    desc.dtype = input.scalar_type();
    desc.input_shape = input.sizes().vec();
  }
  if (output.defined()) desc.output_shape = output.sizes().vec();
  check_tensor(desc, input, "input");
  check_tensor(desc, output, "output");
  if (output.scalar_type() != input.scalar_type()) {
    fail(desc, std::string("output dtype ") + c10::toString(output.scalar_type()) + " differs from input dtype " +
                   c10::toString(input.scalar_type()));
  }
  if (output.device() != input.device()) fail(desc, "input and output are on different devices");
  return desc;
}

}  // namespace

CollectiveDesc check_all_gather(const ProcessGroup& group, const at::Tensor& output, const at::Tensor& input) {
  CollectiveDesc desc = in_out_desc(group, CollectiveOp::AllGather, output, input);
  if (output.numel() != input.numel() * group.size()) {
    fail(desc, "output has " + std::to_string(output.numel()) + " elements, expected " + std::to_string(group.size()) +
                   " ranks x " + std::to_string(input.numel()));
  }
  return desc;
}

CollectiveDesc check_reduce_scatter(const ProcessGroup& group, const at::Tensor& output, const at::Tensor& input,
                                    const ReduceScatterOptions& options) {
  CollectiveDesc desc = in_out_desc(group, CollectiveOp::ReduceScatter, output, input);
  desc.reduce_op = options.reduce_op;
  desc.predivide_factor = options.predivide_factor;
  desc.postdivide_factor = options.postdivide_factor;
  check_reduce(desc, options.reduce_op);
  if (input.numel() != output.numel() * group.size()) {
    fail(desc, "input has " + std::to_string(input.numel()) + " elements, expected " + std::to_string(group.size()) +
                   " ranks x " + std::to_string(output.numel()));
  }
  bool has_factors = options.predivide_factor != 1.0 || options.postdivide_factor != 1.0;
  if (has_factors && options.reduce_op != ReduceOp::Sum) {
    fail(desc, "pre/post divide factors apply to reduce op sum only");
  }
  if (!(options.predivide_factor > 0.0) || !(options.postdivide_factor > 0.0)) {
    fail(desc, "divide factors must be positive");
  }
  if (has_factors && !c10::isFloatingType(desc.dtype)) fail(desc, "divide factors need a floating dtype");
  return desc;
}

CollectiveDesc check_all_reduce(const ProcessGroup& group, const at::Tensor& tensor, const AllReduceOptions& options) {
  CollectiveDesc desc = in_out_desc(group, CollectiveOp::AllReduce, tensor, tensor);
  desc.reduce_op = options.reduce_op;
  check_reduce(desc, options.reduce_op);
  return desc;
}

CollectiveDesc check_broadcast(const ProcessGroup& group, const at::Tensor& tensor, const BroadcastOptions& options) {
  CollectiveDesc desc = in_out_desc(group, CollectiveOp::Broadcast, tensor, tensor);
  desc.root = options.root;
  if (options.root < 0 || options.root >= group.size()) {
    fail(desc, "root " + std::to_string(options.root) + " is outside [0, " + std::to_string(group.size()) + ")");
  }
  return desc;
}

CollectiveDesc describe_barrier(const ProcessGroup& group) { return base_desc(group, CollectiveOp::Barrier); }

}  // namespace fsdpsim
