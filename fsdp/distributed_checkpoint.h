#pragma once
// Training checkpoints in torch.distributed.checkpoint's format: the model's
// and the optimiser's sharded state dicts (fsdp/state_dict.h) written through
// fsdp::dcp (every rank its shards, rank 0 the metadata, atomically) and read
// back into any world size or strategy (dcp::load reshards).
//
//   fsdp::save_checkpoint(dir, engine, *model, &optimizer, fsdp::dcp::process_group_coordinator(*world), step);
//   ... a fresh world, possibly another size ...
//   int64_t step = fsdp::load_checkpoint(dir, engine, *model, &optimizer);
//
// Keys are what Python's dcp.save({"model": model_sd, "optim": optim_sd})
// writes for the tensors: "model.<fqn>" and "optim.state.<fqn>.<name>"
// (Python flattens nested dicts with dots), plus "fsdpsim.step" (a 0-dim
// int64). The optimiser's param_groups (hyperparameters) are not saved: the
// program that resumes sets them, as it built the optimiser.
//
// Thread-safety: as the Engine (one rank's thread or fiber); save issues the
// coordinator's collectives, so every rank calls it alike.

#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include <cstdint>
#include <filesystem>

#include "fsdp/dcp.h"
#include "fsdp/fully_shard.h"

namespace fsdpsim::fsdp {

/// Writes the model's sharded state (and the optimiser's, if given) and
/// `step` to `dir`. Returns this rank's bytes written.
int64_t save_checkpoint(const std::filesystem::path& dir, Engine& engine, const torch::nn::Module& root,
                        const torch::optim::Optimizer* optimizer, const dcp::Coordinator& coordinator,
                        int64_t step = 0);

/// Loads a checkpoint save_checkpoint wrote (at any world size or strategy)
/// into the model in place and, if given, the optimiser (its per-param state
/// created where missing). Returns the saved step. Throws std::runtime_error
/// naming the key for a tensor the model has and the checkpoint lacks (or of
/// another shape), and for a checkpoint without optimiser state when an
/// optimiser is given.
int64_t load_checkpoint(const std::filesystem::path& dir, Engine& engine, const torch::nn::Module& root,
                        torch::optim::Optimizer* optimizer);

}  // namespace fsdpsim::fsdp
