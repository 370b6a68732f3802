// What ordinary training code trips over first: a backward that throws and
// is caught, a torch::nn::Sequential root through fsdp::call, a forward that
// calls a child unit directly. (zero_grad placements and rank-divergent
// models run through the parity harness: fsdp_parity_test.cpp.)
//
// Every comparison is bitwise: each case feeds every rank the same input, so
// the reduce-scatter's mean of identical grads (a rank-order sum, then a
// divide by the world size) is the unsharded grad exactly for world sizes 1,
// 2 and 4 (sums of 2^k equal values and divides by 2^k are exact).

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "backends/errors.h"
#include "fsdp/fully_shard.h"
#include "sim/fiber_autograd.h"
#include "sim/world.h"

namespace fsdpsim::fsdp {
namespace {

using ::testing::HasSubstr;

struct Block : torch::nn::Module {
  Block() : lin(register_module("lin", torch::nn::Linear(6, 6))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor out = torch::relu(lin(x));
    if (throw_in_backward) {
      out.register_hook([](const torch::Tensor&) -> torch::Tensor { throw std::runtime_error("user hook failed"); });
    }
    return out;
  }
  torch::nn::Linear lin;
  bool throw_in_backward = false;
};

// Three block units; the root owns `head`.
struct Stack : torch::nn::Module {
  Stack() {
    for (int i = 0; i < 3; ++i)
      blocks.push_back(register_module("block" + std::to_string(i), std::make_shared<Block>()));
    head = register_module("head", torch::nn::Linear(6, 5));
  }
  torch::Tensor forward(torch::Tensor x) {
    for (auto& block : blocks) x = fsdp::call(block, x);
    return head(x);
  }
  std::vector<std::shared_ptr<Block>> blocks;
  torch::nn::Linear head{nullptr};
};

std::mutex seed_mutex;  // torch::manual_seed is process-global

std::shared_ptr<Stack> make_stack() {
  std::lock_guard<std::mutex> lock(seed_mutex);
  torch::manual_seed(7);
  return std::make_shared<Stack>();
}

torch::Tensor input(int step) { return torch::linspace(-1.0, 1.0, 12).reshape({2, 6}) * static_cast<double>(step + 1); }

std::map<std::string, torch::Tensor> grads_of(torch::nn::Module& module) {
  std::map<std::string, torch::Tensor> grads;
  for (const auto& item : module.named_parameters()) {
    grads[item.key()] = item.value().grad().defined() ? item.value().grad().clone() : torch::Tensor();
  }
  return grads;
}

/// Rows [r c, r c + n) of `full`, c = ceil(dim0 / world): rank r's shard.
torch::Tensor shard_rows(const torch::Tensor& full, int rank, int world) {
  const int64_t chunk = (full.size(0) + world - 1) / world;
  const int64_t begin = std::min<int64_t>(rank * chunk, full.size(0));
  return full.narrow(0, begin, std::min<int64_t>(chunk, full.size(0) - begin));
}

void expect_shards_of(const std::map<std::string, torch::Tensor>& actual,
                      const std::map<std::string, torch::Tensor>& full, int rank, int world) {
  ASSERT_EQ(actual.size(), full.size());
  for (const auto& [name, grad] : full) {
    const torch::Tensor& mine = actual.at(name);
    ASSERT_EQ(mine.defined(), grad.defined()) << name;
    if (!grad.defined()) continue;
    const torch::Tensor expected = shard_rows(grad, rank, world);
    ASSERT_EQ(mine.sizes(), expected.sizes()) << name << " on rank " << rank;
    EXPECT_TRUE(torch::equal(mine, expected)) << name << " on rank " << rank;
  }
}

sim::WorldOptions world_of(int size, sim::RankKind kind) {
  sim::WorldOptions options;
  options.world_size = size;
  options.rank_kind = kind;
  return options;
}

EngineOptions engine_options() {
  EngineOptions options;
  options.queue_backward_callback = sim::queue_backward_callback;
  return options;
}

void shard_stack(Engine& engine, Stack& model, const ProcessGroupPtr& group) {
  FullyShardOptions options;
  options.shard_group = group;
  for (auto& block : model.blocks) engine.fully_shard(block, options);
  engine.fully_shard(model.shared_from_this(), options);
}

// ---------------------------------------------------------------------------
// A backward that throws, caught, then normal steps: the engine recovers and
// the failed backward leaves no trace in the grads.

struct RecoveryCase {
  sim::RankKind kind;
  int world;
};

class BackwardFailure : public ::testing::TestWithParam<RecoveryCase> {};

TEST_P(BackwardFailure, NextStepsRunAsIfTheFailedBackwardNeverHad) {
  const auto [kind, world] = GetParam();
  // Unsharded: step 0, then step 1 with the grads accumulated (no zero_grad).
  at::set_num_threads(1);  // as every rank: the thread count changes matmul sums
  auto reference = make_stack();
  reference->forward(input(0)).sum().backward();
  reference->forward(input(1)).sum().backward();
  const auto expected = grads_of(*reference);

  sim::World sharded(world_of(world, kind));
  auto result = sharded.run([&](sim::RankContext& ctx) {
    at::set_num_threads(1);
    auto model = make_stack();
    Engine engine(engine_options());
    shard_stack(engine, *model, ctx.world_group());
    sim::backward(fsdp::call(model, input(0)).sum());  // step 0

    model->blocks[1]->throw_in_backward = true;  // fails after block2's reduce-scatter was issued
    auto failing = fsdp::call(model, input(5)).sum();
    EXPECT_THROW(sim::backward(failing), std::exception);
    model->blocks[1]->throw_in_backward = false;

    sim::backward(fsdp::call(model, input(1)).sum());  // step 1, accumulating onto step 0
    for (const Unit* unit : engine.units()) EXPECT_FALSE(unit->is_unsharded()) << unit->fqn();
    expect_shards_of(grads_of(*model), expected, ctx.rank(), world);
    // And it keeps working: another step runs without "Cannot writeback".
    sim::backward(fsdp::call(model, input(2)).sum());
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
}

INSTANTIATE_TEST_SUITE_P(
    All, BackwardFailure,
    ::testing::Values(RecoveryCase{sim::RankKind::Threads, 2}, RecoveryCase{sim::RankKind::Threads, 4},
                      RecoveryCase{sim::RankKind::Fibers, 2}, RecoveryCase{sim::RankKind::Fibers, 4}),
    [](const ::testing::TestParamInfo<RecoveryCase>& info) {
      return std::string(sim::to_string(info.param.kind)) + "_w" + std::to_string(info.param.world);
    });

// ---------------------------------------------------------------------------
// zero_grad between forward and backward zeroes the sharded grads the engine
// holds aside (it used to leave them to be added again).

TEST(ZeroGradAfterForward, ClearsTheGradsOfUnitsStillGathered) {
  for (auto strategy : {ShardingStrategy::FullShard, ShardingStrategy::ShardGradOp}) {
    SCOPED_TRACE(to_string(strategy));
    at::set_num_threads(1);
    auto reference = make_stack();
    reference->forward(input(1)).sum().backward();
    const auto expected = grads_of(*reference);

    sim::World sharded(world_of(2, sim::RankKind::Threads));
    auto result = sharded.run([&](sim::RankContext& ctx) {
      at::set_num_threads(1);
      auto model = make_stack();
      Engine engine(engine_options());
      FullyShardOptions options;
      options.shard_group = ctx.world_group();
      options.strategy = strategy;
      for (auto& block : model->blocks) engine.fully_shard(block, options);
      engine.fully_shard(model, options);
      torch::optim::SGD optimizer(model->parameters(), 0.0);
      for (int step = 0; step < 3; ++step) {
        auto loss = fsdp::call(model, input(step == 2 ? 1 : step)).sum();
        optimizer.zero_grad();  // after forward: the root is still gathered
        sim::backward(loss);
      }
      expect_shards_of(grads_of(*model), expected, ctx.rank(), 2);
    });
    ASSERT_TRUE(result.ok()) << result.error_report();
  }
}

// ---------------------------------------------------------------------------
// A torch::nn::Sequential root whose children are units, through fsdp::call.

// A Sequential nested in a Sequential needs a non-template forward (LibTorch's
// AnyModule cannot hold a plain Sequential).
struct NestedSequentialImpl : torch::nn::SequentialImpl {
  using SequentialImpl::SequentialImpl;
  torch::Tensor forward(torch::Tensor x) { return SequentialImpl::forward(std::move(x)); }
};
TORCH_MODULE(NestedSequential);

torch::nn::Sequential make_sequential() {
  std::lock_guard<std::mutex> lock(seed_mutex);
  torch::manual_seed(3);
  return torch::nn::Sequential(torch::nn::Linear(10, 10), torch::nn::ReLU(), torch::nn::Linear(10, 10),
                               NestedSequential(torch::nn::Linear(10, 8), torch::nn::Linear(8, 7)));
}

TEST(SequentialRoot, CallGathersEveryChildUnit) {
  at::set_num_threads(1);
  auto reference = make_sequential();
  const auto x = torch::linspace(-2.0, 2.0, 40).reshape({4, 10});
  const auto expected_out = reference->forward(x);
  expected_out.sum().backward();
  const auto expected = grads_of(*reference);

  for (auto kind : {sim::RankKind::Threads, sim::RankKind::Fibers}) {
    sim::World sharded(world_of(4, kind));
    auto result = sharded.run([&](sim::RankContext& ctx) {
      at::set_num_threads(1);
      auto model = make_sequential();
      Engine engine(engine_options());
      FullyShardOptions options;
      options.shard_group = ctx.world_group();
      engine.fully_shard(model->ptr(0), options);
      engine.fully_shard(model->ptr(2), options);
      auto nested = std::dynamic_pointer_cast<NestedSequentialImpl>(model->ptr(3));
      engine.fully_shard(nested->ptr(1), options);  // a unit inside a nested Sequential unit
      engine.fully_shard(model->ptr(3), options);
      engine.fully_shard(model.ptr(), options);
      auto out = fsdp::call(model.ptr(), x);
      EXPECT_TRUE(torch::equal(out, expected_out));
      sim::backward(out.sum());
      expect_shards_of(grads_of(*model), expected, ctx.rank(), 4);
    });
    ASSERT_TRUE(result.ok()) << sim::to_string(kind) << ": " << result.error_report();
  }
}

// ---------------------------------------------------------------------------
// A forward that calls a child unit directly computes with its shards:
// refused, naming the unit and the fix, whether or not the shapes happen to fit.

struct DirectCaller : torch::nn::Module {
  DirectCaller()
      : a(register_module("a", torch::nn::Linear(10, 10))), b(register_module("b", torch::nn::Linear(10, 10))) {}
  torch::Tensor forward(torch::Tensor x) { return calls_b ? b(a(x)) : a(x); }
  torch::nn::Linear a;
  torch::nn::Linear b;
  bool calls_b = false;
};

// Units for the model's children `a` and `b`, then for the model itself.
template <typename Model>
void shard_children_then_root(Engine& engine, const std::shared_ptr<Model>& model, ProcessGroupPtr group) {
  FullyShardOptions options;
  options.shard_group = std::move(group);
  engine.fully_shard(model->a.ptr(), options);
  engine.fully_shard(model->b.ptr(), options);
  engine.fully_shard(model, options);
}

std::string forward_error(bool calls_b, bool grad_enabled) {
  std::vector<std::string> errors(2);
  sim::World world(world_of(2, sim::RankKind::Threads));
  auto result = world.run([&](sim::RankContext& ctx) {
    auto model = std::make_shared<DirectCaller>();
    model->calls_b = calls_b;
    Engine engine(engine_options());
    shard_children_then_root(engine, model, ctx.world_group());
    torch::AutoGradMode mode(grad_enabled);
    try {
      fsdp::call(model, torch::ones({4, 10}));
    } catch (const std::exception& e) {
      errors[ctx.rank()] = e.what();
    }
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
  EXPECT_EQ(errors[0], errors[1]);
  return errors[0];
}

TEST(DirectChildCall, ShardsThatFitAreRefusedByName) {
  // a's weight shard is [5, 10]: a(x) "works" and gives 5 of 10 features.
  const std::string error = forward_error(/*calls_b=*/false, /*grad_enabled=*/true);
  EXPECT_THAT(error, HasSubstr("computed with the shard of param 'a.weight' of sub-unit 'a'"));
  EXPECT_THAT(error, HasSubstr("fsdp::call(child, args...)"));
}

TEST(DirectChildCall, ShapeErrorsFromShardsNameTheUngatheredUnits) {
  for (bool grad_enabled : {true, false}) {
    const std::string error = forward_error(/*calls_b=*/true, grad_enabled);
    EXPECT_THAT(error, HasSubstr("forward of unit '' failed"));
    EXPECT_THAT(error, HasSubstr("sub-unit(s) 'a', 'b' were not called through fsdp::call"));
    EXPECT_THAT(error, HasSubstr("fsdp::call(sequential, x)"));
  }
}

// A collective that fails inside a unit's forward before its sub-units ran
// (here: a sub-unit's all-gather times out) is a comm failure, not a
// direct child call: it keeps its type, so callers can tell a timeout, and
// gets no note about fsdp::call. (The note used to turn it into a plain
// runtime_error, and a process rank reported a timeout as a failure.)
struct CallsThroughFsdp : torch::nn::Module {
  CallsThroughFsdp()
      : a(register_module("a", torch::nn::Linear(10, 10))), b(register_module("b", torch::nn::Linear(10, 10))) {}
  torch::Tensor forward(torch::Tensor x) { return fsdp::call(b.ptr(), fsdp::call(a.ptr(), x)); }
  torch::nn::Linear a;
  torch::nn::Linear b;
};

TEST(DirectChildCall, CollectiveTimeoutInsideAForwardKeepsItsType) {
  sim::WorldOptions world_options = world_of(2, sim::RankKind::Threads);
  world_options.collective_timeout = std::chrono::milliseconds(300);
  std::atomic<bool> rank0_done{false};
  std::string caught;
  sim::World world(world_options);
  auto result = world.run([&](sim::RankContext& ctx) {
    auto model = std::make_shared<CallsThroughFsdp>();
    Engine engine(engine_options());
    shard_children_then_root(engine, model, ctx.world_group());
    if (ctx.rank() == 1) {  // never joins the all-gather; stays alive so that rank 0 times out
      while (!rank0_done) std::this_thread::sleep_for(std::chrono::milliseconds(5));
      return;
    }
    try {
      fsdp::call(model, torch::ones({4, 10}));
      caught = "no error";
    } catch (const CollectiveTimeoutError& e) {
      caught = std::string("CollectiveTimeoutError: ") + e.what();
    } catch (const std::exception& e) {
      caught = std::string("other: ") + e.what();
    }
    rank0_done = true;
  });
  EXPECT_THAT(caught, ::testing::StartsWith("CollectiveTimeoutError: "));
  EXPECT_THAT(caught, ::testing::Not(HasSubstr("were not called through fsdp::call")));
  (void)result;  // rank 0 failed its collective; whether the world reports it is not this test's point
}

// ---------------------------------------------------------------------------
// A whole unit skipped on some ranks: its collectives cannot line up across
// ranks (PyTorch's FSDP hangs there). Same-shaped units ('trunk' and
// 'branch') would even mix data silently; the engine labels each collective
// with its unit, so the fake backend and checked Gloo fail with a report.

struct SkippedBranch : torch::nn::Module {
  explicit SkippedBranch(bool takes_branch)
      : trunk(register_module("trunk", torch::nn::Linear(6, 6))),
        branch(register_module("branch", torch::nn::Linear(6, 6))),
        head(register_module("head", torch::nn::Linear(6, 6))),
        takes_branch(takes_branch) {}
  torch::Tensor forward(torch::Tensor x) {
    x = fsdp::call(trunk, x);
    if (takes_branch) x = fsdp::call(branch, x);
    return head(x);
  }
  torch::nn::Linear trunk, branch, head;
  bool takes_branch;
};

TEST(UnitSkippedOnSomeRanks, FailsWithAReportNamingTheUnits) {
  for (auto backend : {sim::CommBackend::Fake, sim::CommBackend::Gloo}) {
    for (auto kind : {sim::RankKind::Threads, sim::RankKind::Fibers}) {
      if (backend == sim::CommBackend::Gloo && kind == sim::RankKind::Fibers) continue;  // Gloo ranks are threads
      SCOPED_TRACE(std::string(sim::to_string(backend)) + " " + sim::to_string(kind));
      sim::WorldOptions options = world_of(2, kind);
      options.backend = backend;
      options.collective_timeout = std::chrono::seconds(20);
      sim::World world(options);
      auto result = world.run([&](sim::RankContext& ctx) {
        auto model = std::make_shared<SkippedBranch>(ctx.rank() == 0);
        Engine engine(engine_options());
        FullyShardOptions shard;
        shard.shard_group = ctx.world_group();
        engine.fully_shard(model->trunk.ptr(), shard);
        engine.fully_shard(model->branch.ptr(), shard);
        engine.fully_shard(model, shard);
        sim::backward(fsdp::call(model, torch::ones({2, 6})).sum());
      });
      ASSERT_FALSE(result.ok());
      const std::string report = result.error_report();
      EXPECT_THAT(report, HasSubstr("collective mismatch"));
      EXPECT_THAT(report, HasSubstr("of unit 'branch'"));
    }
  }
}

}  // namespace
}  // namespace fsdpsim::fsdp
