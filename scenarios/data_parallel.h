#pragma once
// The first scenario: an MLP trained data-parallel (DDP semantics: every rank
// holds the full model, gradients are averaged with all_reduce). It is the
// default job of the runner and the shape of the unsharded reference the
// FSDP parity tests compare against.

#include <cstdint>
#include <functional>
#include <vector>

#include "sim/world.h"

namespace fsdpsim::scenarios {

struct DataParallelOptions {
  int64_t dim = 64;
  int64_t batch = 8;
  int steps = 5;
  uint64_t seed = 0;
  double lr = 1e-2;
  double momentum = 0.9;
};

struct StepStats {
  double loss = 0.0;       ///< this rank's loss
  int64_t step_ns = 0;     ///< wall time of the whole step on this rank
};

/// Trains MLP(dim): in_proj Linear(dim, 4 dim) -> relu -> out_proj
/// Linear(4 dim, dim) -> relu. Every rank initialises the same parameters from
/// `seed` and draws its own batch from (seed, rank, step); gradients are
/// averaged over the world group (one all_reduce per parameter, issued
/// together, then waited); SGD with momentum steps. `on_step` (may be empty)
/// runs on every rank after each step.
std::vector<StepStats> train_data_parallel_mlp(sim::RankContext& ctx, const DataParallelOptions& options,
                                               const std::function<void(int step, const StepStats&)>& on_step);

}  // namespace fsdpsim::scenarios
