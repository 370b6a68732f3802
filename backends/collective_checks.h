#pragma once
// Local argument checks shared by every backend: each returns the
// CollectiveDesc of the call (with the next sequence number) or throws a
// CommError that names rank, group, sequence number, op and shapes.
//
// Thread-safety: the checks read their arguments only; a group's checks run
// on that group's rank, as its collectives do.

#include "backends/process_group.h"

namespace fsdpsim {

CollectiveDesc check_all_gather(const ProcessGroup& group, const at::Tensor& output, const at::Tensor& input);
CollectiveDesc check_reduce_scatter(const ProcessGroup& group, const at::Tensor& output, const at::Tensor& input,
                                    const ReduceScatterOptions& options);
CollectiveDesc check_all_reduce(const ProcessGroup& group, const at::Tensor& tensor, const AllReduceOptions& options);
CollectiveDesc check_broadcast(const ProcessGroup& group, const at::Tensor& tensor, const BroadcastOptions& options);
CollectiveDesc describe_barrier(const ProcessGroup& group);

/// "[2, 3]"
std::string shape_string(const std::vector<int64_t>& shape);
/// "{0-2,5}": ranks sorted, runs collapsed.
std::string rank_set_string(const std::vector<int>& ranks);
/// "rank 3" or "ranks {0-2,5}".
std::string ranks_text(const std::vector<int>& ranks);

}  // namespace fsdpsim
