#pragma once
// The models of PyTorch's FSDP test suite, ported as scenarios: each one
// builds its module (deterministically from a seed), says which submodules
// the reference wraps as units, draws per-rank inputs and computes the loss.
// The parity harness (scenarios/parity.h) runs them unsharded as the DDP
// reference and sharded through fsdp::Engine, and compares the two.
//
// Determinism: every parameter and buffer is drawn from a private
// at::Generator seeded from ScenarioConfig::seed (the global RNG is shared by
// rank threads), so make_scenario(config, r) gives bitwise the same model on
// every rank, except the params the model declares rank-local (MoE experts,
// seeded 42 + rank as in the reference). Inputs are drawn from (seed, rank,
// step): the same on every call, different across ranks (mlp_stack's and
// rank_divergent's do not change with the step: each rank fits its own fixed
// batch to a fixed teacher, so the loss falls and levels off).
//
// Thread-safety: a Scenario belongs to one rank (one thread or fiber) or one
// reference replica; different instances share nothing.

#include <ATen/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "backends/process_group.h"
#include "fsdp/auto_wrap.h"
#include "fsdp/fully_shard.h"

namespace fsdpsim::scenarios {

/// The strategy and the groups fully_shard needs, built from a world group.
///
///   strategy      shard_group          replicate_group
///   FullShard     world                -
///   ShardGradOp   world                -
///   NoShard       self (size 1)        world
///   HybridShard   mesh shard axis      mesh replicate axis
///
/// self_group (this rank alone) is always built: rank-local units (MoE
/// experts) are sharded over it with no replication.
struct ShardingSetup {
  fsdp::ShardingStrategy strategy = fsdp::ShardingStrategy::FullShard;
  ProcessGroupPtr world;
  ProcessGroupPtr shard_group;
  ProcessGroupPtr replicate_group;
  ProcessGroupPtr self_group;
  /// Every unit's mixed precision (rank-local units too).
  fsdp::MixedPrecisionPolicy mp_policy;
  /// Every unit's offload policy (FSDP2's CPUOffloadPolicy when cpu_offload).
  fsdp::OffloadPolicy offload_policy;
  /// Unset: every unit takes options() as is. Set: called on each unit's
  /// options (the unit's module first) before fully_shard, e.g. to give
  /// some units all_gather_extensions (the conformance family `ext`).
  std::function<void(const torch::nn::Module& unit, fsdp::FullyShardOptions& options)> adjust_unit_options;

  /// Options for a unit sharded with the strategy.
  fsdp::FullyShardOptions options() const;
  /// Options for a rank-local unit: shard over self_group, no replication
  /// (ShardGradOp under ShardGradOp, FullShard under every other strategy).
  fsdp::FullyShardOptions rank_local_options() const;
};

/// Builds the groups for `strategy` from `world`. Collective over `world`
/// (sub-groups are split from it): every rank calls it, in the same order
/// relative to its other collectives. HybridShard: `replicate_size` replicas
/// of world / replicate_size ranks (row-major, see make_mesh_2d); ignored
/// otherwise. Throws std::invalid_argument if it does not divide the world.
ShardingSetup make_sharding_setup(const ProcessGroupPtr& world, fsdp::ShardingStrategy strategy,
                                  int replicate_size = 1);

struct ScenarioConfig {
  /// One of scenario_names().
  std::string name = "nested_wrapped";
  /// Seeds parameter init and inputs.
  uint64_t seed = 0;
  /// transformer: a BatchNorm1d over the target embeddings (root-owned).
  bool batch_norm = true;
  /// double_linear: forward returns both linears' outputs (true) or lin1's
  /// only, leaving lin2 unused.
  bool use_second_linear = true;
  /// mlp_stack, double_linear and rank_divergent: the model dimension.
  int64_t mlp_dim = 16;
  /// mlp_stack: each MLP adds a (non-trainable) buffer to its output.
  bool mlp_buffer = false;
  /// mlp_stack, nested_wrapped: every unit but the root runs its own
  /// computation (not its sub-units') under fsdp::checkpoint (activation
  /// checkpointing inside the unit). Other scenarios refuse it.
  bool checkpoint_units = false;
};

/// One instance per rank (or per reference replica).
class Scenario {
 public:
  virtual ~Scenario() = default;

  virtual const std::string& name() const = 0;
  /// The root module.
  virtual std::shared_ptr<torch::nn::Module> module() = 0;
  /// Applies engine.fully_shard to the units the reference wraps, children
  /// first and the root last, with setup.options() (rank-local units with
  /// setup.rank_local_options()).
  virtual void shard(fsdp::Engine& engine, const ShardingSetup& setup) = 0;
  /// A policy under which fsdp::apply_fully_shard makes the units shard()
  /// lists, in the same order; nullptr where one options value cannot do it
  /// (mixture_of_experts: its rank-local expert takes other options).
  virtual fsdp::WrapPolicyPtr wrap_policy() const = 0;
  /// The batch of `rank` at `step`, from (seed, rank, step).
  virtual std::vector<at::Tensor> input(int rank, int step) = 0;
  /// Runs the root through fsdp::call (so sharded units gather) and returns
  /// the scalar loss.
  virtual at::Tensor forward_loss(const std::vector<at::Tensor>& input) = 0;
  /// FQNs of params that differ per rank and are not averaged (MoE experts).
  virtual std::set<std::string> rank_local_params() const { return {}; }
  /// B of the communication-count table: units besides the root.
  virtual int sharded_blocks() const = 0;
};

/// Throws std::invalid_argument, listing scenario_names(), for an unknown name.
/// `rank` seeds rank-divergent params (MoE experts); other params ignore it.
std::unique_ptr<Scenario> make_scenario(const ScenarioConfig& config, int rank);

/// nested_wrapped, always_wrap_nested, transformer, mixture_of_experts,
/// non_uniform_req_grad, double_linear, mlp_stack, uneven_shapes,
/// rank_divergent (a branch inside a unit taken on even ranks only).
std::vector<std::string> scenario_names();

/// named_parameters() with each TensorImpl once, under the first FQN it is
/// registered with (PyTorch's remove_duplicate=True). Tied params (the
/// transformer's embedding / output projection) are registered twice in
/// LibTorch; optimisers and comparisons must see them once.
std::vector<std::pair<std::string, at::Tensor>> unique_named_parameters(const torch::nn::Module& module);
std::vector<at::Tensor> unique_parameters(const torch::nn::Module& module);

}  // namespace fsdpsim::scenarios
