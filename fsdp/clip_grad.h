#pragma once
// clip_grad_norm_ over sharded grads: torch::nn::utils::clip_grad_norm_ of
// the unsharded model, computed from each rank's shards.
//
//   loss.backward();
//   double norm = fsdp::clip_grad_norm_(engine, /*max_norm=*/1.0);
//   optimizer.step();
//
// The total norm is the norm over every unit param's full grad: each rank
// sums |g|^p over its grad shards (in double), the sums are all-reduced (SUM;
// MAX for the inf norm) over each distinct shard group, once per group of
// more than one rank, and the groups' totals are added (or maxed). Replicas
// (HybridShard's replicate group, NoShard) hold equal grads after their
// all-reduce, so they are not reduced over again; units sharded over one rank
// (NoShard, rank-local experts) add their local grads. Every grad is then
// multiplied by max_norm / (total + 1e-6), clamped to at most 1, as LibTorch
// does. Params without a grad are skipped.
//
// Thread-safety: call it on the rank's own thread or fiber, between
// backward and the optimiser step, on every rank of the engine's groups alike
// (it issues their all-reduces).

#include <ATen/core/Tensor.h>

#include <vector>

namespace fsdpsim::fsdp {

class Engine;

/// Clips the grads of every param of every unit of `engine`; returns the
/// total norm of the unsharded grads. norm_type: any p > 0, or infinity.
/// Throws std::invalid_argument for another norm_type, std::runtime_error
/// inside a forward or backward, and, with error_if_nonfinite, for a total
/// that is NaN or infinite (on every rank alike, grads untouched).
double clip_grad_norm_(Engine& engine, double max_norm, double norm_type = 2.0, bool error_if_nonfinite = false);

/// As above, over `params` only (each a param of a unit of `engine`; every
/// rank passes the same params). Throws std::invalid_argument naming a param
/// no unit of `engine` manages.
double clip_grad_norm_(Engine& engine, const std::vector<at::Tensor>& params, double max_norm, double norm_type = 2.0,
                       bool error_if_nonfinite = false);

}  // namespace fsdpsim::fsdp
