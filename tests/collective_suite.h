#pragma once
// Every collective checked bit for bit on one rank, nccl-tests style: inputs
// are small integers computed from (rank, index), so every sum, average with
// power-of-two factors, min and max is exact in every dtype and the expected
// output is known without talking to other ranks. Shared by the fake
// (threads, fibers) and Gloo (threads, processes) tests.

#include <ATen/ATen.h>

#include <string>

#include "backends/process_group.h"

namespace fsdpsim::testing {

/// value(rank, i) = ((rank * 7 + i * 3) % 11) - 5, as `dtype`.
at::Tensor crafted_values(int rank, int64_t count, at::ScalarType dtype);

/// Runs every collective (all-gather incl. in place, reduce-scatter and
/// all-reduce with each reduce op, divide factors, broadcast from two roots,
/// barrier, two collectives in flight) with `count` elements per rank and
/// throws std::runtime_error naming the first wrong element.
void check_all_collectives(ProcessGroup& group, at::ScalarType dtype, int64_t count);

/// The element counts the suites use: empty, one, odd, larger than a block.
inline const int64_t kSuiteCounts[] = {0, 1, 7, 2500};

}  // namespace fsdpsim::testing
