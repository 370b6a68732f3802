#pragma once
// Deferred initialisation: build a model with its parameters on the meta
// device (shapes only, no memory), fully_shard it, then let
// Engine::materialize allocate each rank's shard on the real device and fill
// it (FSDP2's flow: fully_shard on meta, then model.to_empty(device) and
// reset_parameters(), DTensor's RNG giving each rank its part of the full
// init). Each rank holds only its shard: no rank ever allocates a full param.
//
// Building on meta in LibTorch: a module creates its params as
// torch::empty(shape, options.device(torch::kMeta)). LibTorch's stock modules
// (Linear, ...) allocate their params in their constructors and
// Module::to(kMeta) refuses the move (set_data between dispatch key sets), so
// they cannot be built on meta; give such layers a device option instead.
//
// Matching a full init bitwise: the init functions here draw each row of a
// param from its own generator, seeded from (seed, param FQN, row), so a
// row's values do not depend on which rank draws it or how many rows it
// draws. FSDP2 gets this from DTensor's offset-based Philox RNG; LibTorch's
// CPU generator (mt19937) cannot skip ahead cheaply, so rows are seeded
// instead of offset. init_full applies the same function to a whole
// (eager) model: its shards then equal a meta-built model's, bit for bit.
//
// Thread-safety: the returned functions hold only their seed and bound and
// may be called from any rank's thread.

#include <torch/nn/module.h>

#include <cstdint>

#include "fsdp/fully_shard.h"

namespace fsdpsim::fsdp {

/// Fills every row r of a param with U(-bound, bound) drawn from a generator
/// seeded from (seed, fqn, r) (bound <= 0: 1 / sqrt(row length), LibTorch's
/// Linear bound for a weight of fan_in row length).
ShardInitFn seeded_uniform_rows(uint64_t seed, double bound = 0.0);

/// Moves every param and buffer of `module` to the meta device in place:
/// each keeps its TensorImpl (identity, requires_grad, names) and its shape
/// and dtype, and drops its storage. What a data-free run (EngineOptions::
/// data_free) does to a model built on the CPU by stock modules, which
/// cannot be built on meta.
void move_to_meta(torch::nn::Module& module);

/// Runs `init` over every param of `module` whole (row_begin 0, FQNs from
/// `module`, each TensorImpl once): the eager twin of Engine::materialize.
void init_full(torch::nn::Module& module, const ShardInitFn& init);

}  // namespace fsdpsim::fsdp
