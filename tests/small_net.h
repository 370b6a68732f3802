#pragma once
// A small model for engine tests beside an unsharded LibTorch reference: two
// Linear units (a: 6->7, b: 7->7) and a root owning `head` (7->2) and
// `extra` (7->2), `extra` used only when `use_extra` is set (a param whose
// grad stays None on every rank). At world 3, dim 7 shards unevenly (3, 3, 1
// rows) and dim 2 leaves rank 2 an empty shard.
//
// Thread-safety: make_small_net() serialises the process-global seed; each
// model belongs to one rank.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "fsdp/fully_shard.h"
#include "scenarios/models.h"
#include "sim/fiber_autograd.h"
#include "sim/world.h"

namespace fsdpsim::testnet {

/// Where a value-parameterised small-net test runs: rank kind, world size,
/// strategy (HybridShard: `replicate` replicas).
struct WorldCase {
  sim::RankKind kind;
  int world;
  fsdp::ShardingStrategy strategy = fsdp::ShardingStrategy::FullShard;
  int replicate = 1;
};

/// Test name: kind_wN_strategy.
inline std::string world_case_name(const ::testing::TestParamInfo<WorldCase>& info) {
  return std::string(sim::to_string(info.param.kind)) + "_w" + std::to_string(info.param.world) + "_" +
         fsdp::to_string(info.param.strategy);
}

inline sim::WorldOptions world_of(const WorldCase& c) {
  sim::WorldOptions options;
  options.world_size = c.world;
  options.rank_kind = c.kind;
  return options;
}

struct SmallNet : torch::nn::Module {
  SmallNet()
      : a(register_module("a", torch::nn::Linear(6, 7))),
        b(register_module("b", torch::nn::Linear(7, 7))),
        head(register_module("head", torch::nn::Linear(7, 2))),
        extra(register_module("extra", torch::nn::Linear(7, 2))) {}
  torch::Tensor forward(torch::Tensor x) {
    if (on_forward) on_forward();
    x = torch::relu(fsdp::call(a, x));
    x = torch::tanh(fsdp::call(b, x));
    torch::Tensor out = head(x);
    if (use_extra) out = out + extra(x);
    return out;
  }
  torch::nn::Linear a, b, head, extra;
  bool use_extra = true;
  std::function<void()> on_forward;  // runs inside the root's forward
};

inline std::shared_ptr<SmallNet> make_small_net() {
  static std::mutex seed_mutex;  // torch::manual_seed is process-global
  std::lock_guard<std::mutex> lock(seed_mutex);
  torch::manual_seed(11);
  return std::make_shared<SmallNet>();
}

/// Rank `rank`'s batch at `step` (different on every rank and step).
inline torch::Tensor small_input(int rank, int step) {
  return torch::sin(torch::linspace(-3.0, 3.0, 24).reshape({4, 6}) * (rank + 1.5) + 0.7 * step);
}

/// Rows [r c, r c + n) of `full`, c = ceil(dim0 / world): rank r's shard.
inline torch::Tensor shard_rows(const torch::Tensor& full, int rank, int world) {
  const int64_t chunk = (full.size(0) + world - 1) / world;
  const int64_t begin = std::min<int64_t>(rank * chunk, full.size(0));
  return full.narrow(0, begin, std::min<int64_t>(chunk, full.size(0) - begin));
}

inline std::map<std::string, torch::Tensor> named_params(torch::nn::Module& module) {
  std::map<std::string, torch::Tensor> params;
  for (const auto& item : module.named_parameters()) params[item.key()] = item.value();
  return params;
}

/// The DDP reference step: each rank's grads on `reference` (one backward per
/// rank's batch), summed in rank order and divided once (the fake backend's
/// ReduceOp::Avg), left on its params; None where no rank has a grad.
inline void reference_backward(SmallNet& reference, int world, int step) {
  const auto params = reference.parameters();
  std::vector<torch::Tensor> sums(params.size());
  for (int r = 0; r < world; ++r) {
    for (auto& p : params) p.mutable_grad() = torch::Tensor();
    reference.forward(small_input(r, step)).sum().backward();
    for (size_t i = 0; i < params.size(); ++i) {
      const torch::Tensor& grad = params[i].grad();
      if (!grad.defined()) continue;
      if (!sums[i].defined()) {
        sums[i] = r == 0 ? grad.clone() : torch::zeros_like(grad).add_(grad);
      } else {
        sums[i].add_(grad);
      }
    }
  }
  for (size_t i = 0; i < params.size(); ++i) {
    params[i].mutable_grad() = sums[i].defined() ? sums[i].div_(world) : torch::Tensor();
  }
}

/// Shards `model` (a, b, then the root) with `strategy` over `world`
/// (HybridShard: `replicate` replicas).
inline void shard_small_net(fsdp::Engine& engine, SmallNet& model, const ProcessGroupPtr& world,
                            fsdp::ShardingStrategy strategy, int replicate = 1) {
  const scenarios::ShardingSetup setup = scenarios::make_sharding_setup(world, strategy, replicate);
  engine.fully_shard(model.a.ptr(), setup.options());
  engine.fully_shard(model.b.ptr(), setup.options());
  engine.fully_shard(model.shared_from_this(), setup.options());
}

inline fsdp::EngineOptions fiber_safe_engine_options() {
  fsdp::EngineOptions options;
  options.queue_backward_callback = sim::queue_backward_callback;
  return options;
}

/// The shard group's (rank, size) of a rank under `strategy`: the rows of a
/// full tensor the rank owns (HybridShard: `replicate` x world/replicate mesh,
/// row-major; NoShard: all of it).
struct ShardPlace {
  int rank = 0;
  int size = 1;
};
inline ShardPlace shard_place(int global_rank, int world, fsdp::ShardingStrategy strategy, int replicate = 1) {
  switch (strategy) {
    case fsdp::ShardingStrategy::NoShard: return {0, 1};
    case fsdp::ShardingStrategy::HybridShard: return {global_rank % (world / replicate), world / replicate};
    default: return {global_rank, world};
  }
}

/// One rank's small net sharded as a WorldCase says, with a fiber-safe engine,
/// and the rows of the unsharded params this rank owns.
struct ShardedSmallNet {
  ShardedSmallNet(sim::RankContext& ctx, const WorldCase& c)
      : place(shard_place(ctx.rank(), c.world, c.strategy, c.replicate)) {
    shard_small_net(engine, *model, ctx.world_group(), c.strategy, c.replicate);
  }
  std::shared_ptr<SmallNet> model = make_small_net();
  fsdp::Engine engine{fiber_safe_engine_options()};
  ShardPlace place;
};

/// Runs `body` on every rank of c's world; a failing rank fails the test with
/// the world's report.
inline void run_world_case(const WorldCase& c, const std::function<void(sim::RankContext&)>& body) {
  sim::World world(world_of(c));
  const auto result = world.run(body);
  ASSERT_TRUE(result.ok()) << result.error_report();
}

}  // namespace fsdpsim::testnet
