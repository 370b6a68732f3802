// Engine semantics that parity alone does not pin down: event order through
// EngineHooks (GoogleMock), state after forward/backward, misuse errors.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "backends/errors.h"
#include "fsdp/fully_shard.h"
#include "sim/fiber_autograd.h"
#include "sim/testing/mock_hooks.h"
#include "sim/world.h"

namespace fsdpsim::fsdp {
namespace {

using ::testing::HasSubstr;

struct Block : torch::nn::Module {
  Block(int64_t in, int64_t out) : lin(register_module("lin", torch::nn::Linear(in, out))) {}
  torch::Tensor forward(const torch::Tensor& x) { return torch::relu(lin(x)); }
  torch::nn::Linear lin;
};

// Root with three blocks: L0..L2 units, the root owns `head`.
struct Stack : torch::nn::Module {
  Stack() {
    for (int i = 0; i < 3; ++i)
      blocks.push_back(register_module("block" + std::to_string(i), std::make_shared<Block>(6, 6)));
    head = register_module("head", torch::nn::Linear(6, 5));
  }
  torch::Tensor forward(torch::Tensor x) {
    for (size_t i = 0; i < blocks.size(); ++i) {
      for (int k = 0; k < (i == 1 ? block1_calls : 1); ++k) x = fsdp::call(blocks[i], x);
    }
    return head(x);
  }
  int block1_calls = 1;  // > 1: a module called several times in one forward
  std::vector<std::shared_ptr<Block>> blocks;
  torch::nn::Linear head{nullptr};
};

class RecordingHooks : public EngineHooks {
 public:
  void on_unshard(const std::string& unit, TrainingState) override { events.push_back("U " + name(unit)); }
  void on_reshard(const std::string& unit, TrainingState) override { events.push_back("R " + name(unit)); }
  void on_pre_backward(const std::string&, TrainingState) override {}
  void on_post_backward(const std::string& unit, TrainingState) override { events.push_back("PB " + name(unit)); }
  void on_final_callback(const std::string&, TrainingState) override { events.push_back("final"); }
  void on_prefetch(const std::string&, const std::string&, TrainingState) override {}
  static std::string name(const std::string& unit) { return unit.empty() ? "root" : unit; }
  std::vector<std::string> events;
};

sim::WorldOptions threads(int world_size) {
  sim::WorldOptions options;
  options.world_size = world_size;
  return options;
}

std::shared_ptr<Stack> make_stack(Engine& engine, const ProcessGroupPtr& group, ShardingStrategy strategy) {
  torch::manual_seed(0);
  auto model = std::make_shared<Stack>();
  FullyShardOptions options;
  options.shard_group = group;
  options.strategy = strategy;
  for (auto& block : model->blocks) engine.fully_shard(block, options);
  engine.fully_shard(model, options);
  return model;
}

TEST(FsdpEngine, ImplicitOrderAndStateAfterForwardAndBackward) {
  sim::World world(threads(2));
  std::vector<std::vector<std::string>> events(2);
  std::mutex init;
  auto result = world.run([&](sim::RankContext& ctx) {
    auto hooks = std::make_shared<RecordingHooks>();
    EngineOptions engine_options;
    engine_options.hooks = {hooks};
    engine_options.queue_backward_callback = sim::queue_backward_callback;
    Engine engine(engine_options);
    std::shared_ptr<Stack> model;
    {
      std::lock_guard<std::mutex> lock(init);  // torch::manual_seed is process-global
      model = make_stack(engine, ctx.world_group(), ShardingStrategy::FullShard);
    }
    auto x = torch::ones({2, 6}) * (ctx.rank() + 1);
    auto out = fsdp::call(model, x);
    // After forward: root gathered, the blocks sharded again.
    EXPECT_TRUE(engine.root()->is_unsharded());
    EXPECT_EQ(model->head->weight.sizes(), (std::vector<int64_t>{5, 6}));
    EXPECT_EQ(model->blocks[0]->lin->weight.sizes(), (std::vector<int64_t>{3, 6}));
    sim::backward(out.sum());
    for (const Unit* unit : engine.units()) EXPECT_FALSE(unit->is_unsharded()) << unit->fqn();
    // head: 5 rows over 2 ranks pad to 3 per rank; rank 1 owns the last 2.
    EXPECT_EQ(model->head->weight.grad().sizes(), (std::vector<int64_t>{ctx.rank() == 0 ? 3 : 2, 6}));
    EXPECT_EQ(model->blocks[2]->lin->bias.grad().sizes(), (std::vector<int64_t>{3}));
    events[ctx.rank()] = hooks->events;
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
  const std::vector<std::string> expected = {"U root", "U block0", "R block0", "U block1", "R block1", "U block2",
                                             "R block2",  // forward
                                             // backward, implicit BACKWARD_PRE prefetch: each unshard one slot early
                                             // (the reference's U L2, U L1, PB L2, U L0, PB L1, PB L0, PB root)
                                             // block0 (fed the raw input) and the root have no post-backward hook:
                                             // the end-of-backward step reduces them in module pre-order, the root
                                             // first, as FSDP2 does (tests/conformance: its K1 check before the fix)
                                             "U block2", "U block1", "R block2", "PB block2", "U block0", "R block1",
                                             "PB block1", "R root", "PB root", "R block0", "PB block0", "final"};
  EXPECT_EQ(events[0], expected);
  EXPECT_EQ(events[1], expected);
}

}  // namespace
}  // namespace fsdpsim::fsdp

namespace fsdpsim::fsdp {
namespace {

FullyShardOptions full_shard(const ProcessGroupPtr& group) {
  FullyShardOptions options;
  options.shard_group = group;
  return options;
}

TEST(FsdpEngineErrors, MisuseIsRejectedWithContext) {
  sim::World world(threads(2));
  auto result = world.run([](sim::RankContext& ctx) {
    Engine engine;
    auto linear = torch::nn::Linear(4, 3);
    engine.fully_shard(linear.ptr(), full_shard(ctx.world_group()));
    try {
      engine.fully_shard(linear.ptr(), full_shard(ctx.world_group()));
      ADD_FAILURE() << "sharded twice";
    } catch (const std::invalid_argument& e) {
      EXPECT_THAT(e.what(), HasSubstr("already sharded"));
    }
    // A param on another device than the rest of its unit.
    auto mixed = std::make_shared<torch::nn::Module>();
    mixed->register_parameter("cpu_weight", torch::ones({4}));
    mixed->register_parameter("meta_weight", torch::ones({4}, torch::kMeta));
    try {
      engine.fully_shard(mixed, full_shard(ctx.world_group()));
      ADD_FAILURE() << "mixed devices accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_THAT(e.what(), HasSubstr("meta_weight"));
      EXPECT_THAT(e.what(), HasSubstr("meta"));
    }
    FullyShardOptions no_group;
    EXPECT_THROW(engine.fully_shard(torch::nn::Linear(2, 2).ptr(), no_group), std::invalid_argument);
    FullyShardOptions hybrid = full_shard(ctx.world_group());
    hybrid.strategy = ShardingStrategy::HybridShard;  // without a replicate group
    EXPECT_THROW(engine.fully_shard(torch::nn::Linear(2, 2).ptr(), hybrid), std::invalid_argument);
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
}

TEST(FsdpEngineErrors, WritesBetweenStepsLandInTheShardOrFailClearly) {
  sim::World world(threads(2));
  auto result = world.run([](sim::RankContext& ctx) {
    Engine engine;
    torch::nn::Linear linear(4, 3);
    engine.fully_shard(linear.ptr(), full_shard(ctx.world_group()));
    const int64_t rows = ctx.rank() == 0 ? 2 : 1;  // 3 rows over 2 ranks
    ASSERT_EQ(linear->weight.size(0), rows);
    {
      torch::NoGradGuard no_grad;
      linear->weight.fill_(ctx.rank() + 1);             // in place: the shard itself
      linear->bias.set_data(torch::full({rows}, 7.0));  // replaced data, right shape
    }
    torch::Tensor out;
    {
      torch::NoGradGuard no_grad;  // no backward follows: every unit reshards
      out = fsdp::call(linear.ptr(), torch::ones({1, 4}));
    }
    // Gathered weight rows 0-1 came from rank 0 (1.0), row 2 from rank 1 (2.0).
    EXPECT_TRUE(torch::equal(out, torch::tensor({{4.0f + 7, 4.0f + 7, 8.0f + 7}}))) << out;
    linear->weight.set_data(torch::ones({5, 5}));
    try {
      fsdp::call(linear.ptr(), torch::ones({1, 4}));
      ADD_FAILURE() << "a wrong-shape write was accepted";
    } catch (const std::runtime_error& e) {
      EXPECT_THAT(e.what(), HasSubstr("Cannot writeback"));
      EXPECT_THAT(e.what(), HasSubstr("weight"));
    }
    // A root stays gathered after a forward with grad; replacing its params
    // then is refused instead of silently computing with them.
    linear->weight.set_data(torch::zeros({rows, 4}));
    fsdp::call(linear.ptr(), torch::ones({1, 4}));
    linear->weight.set_data(torch::zeros({3, 4}));
    try {
      fsdp::call(linear.ptr(), torch::ones({1, 4}));
      ADD_FAILURE() << "a write to gathered params was accepted";
    } catch (const std::runtime_error& e) {
      EXPECT_THAT(e.what(), HasSubstr("replaced while gathered"));
    }
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
}

TEST(FsdpEngineErrors, ParamReplacedBetweenForwardAndBackwardRaises) {
  sim::World world(threads(2));
  auto result = world.run([](sim::RankContext& ctx) {
    EngineOptions options;
    options.queue_backward_callback = sim::queue_backward_callback;
    Engine engine(options);
    torch::nn::Linear linear(4, 4);
    FullyShardOptions shard = full_shard(ctx.world_group());
    shard.strategy = ShardingStrategy::ShardGradOp;  // params stay gathered until backward
    engine.fully_shard(linear.ptr(), shard);
    auto out = fsdp::call(linear.ptr(), torch::ones({2, 4}, torch::requires_grad()));
    linear->weight.set_data(torch::zeros({4, 4}));
    try {
      sim::backward(out.sum());
      ADD_FAILURE() << "backward ran on replaced params";
    } catch (const std::exception& e) {
      EXPECT_THAT(e.what(), HasSubstr("replaced between forward and backward"));
    }
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
}

TEST(FsdpEngine, NoGradAndEvalForwardsLeaveNothingGatheredAndAgree) {
  sim::World world(threads(2));
  auto result = world.run([](sim::RankContext& ctx) {
    Engine engine;
    auto model = std::make_shared<Stack>();
    FullyShardOptions options = full_shard(ctx.world_group());
    for (auto& block : model->blocks) engine.fully_shard(block, options);
    engine.fully_shard(model, options);
    auto x = torch::ones({2, 6});
    torch::Tensor no_grad_out;
    {
      torch::NoGradGuard no_grad;
      no_grad_out = fsdp::call(model, x);
    }
    for (const Unit* unit : engine.units()) EXPECT_FALSE(unit->is_unsharded()) << unit->fqn();
    EXPECT_EQ(engine.unsharded_bytes(), 0);
    model->eval();
    torch::Tensor eval_out;
    {
      torch::NoGradGuard no_grad;
      eval_out = fsdp::call(model, x);
    }
    EXPECT_TRUE(torch::equal(no_grad_out, eval_out));
    EXPECT_FALSE(no_grad_out.requires_grad());
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
}

// At a world larger than dim 0 most gathered rows are padding (FSDP2 pads
// dim 0 to world x ceil(dim0 / world)). A gathered param must keep only its
// own rows: one narrowed out of the padded block would keep every padding row
// of every param alive per rank (world / dim0 times the model at scale).
// Values against the unsharded model built from the same seed.
TEST(FsdpEngineMemory, GatheredParamsHoldOnlyTheirOwnRows) {
  for (auto [kind, world_size] : {std::pair{sim::RankKind::Threads, 8}, std::pair{sim::RankKind::Fibers, 5}}) {
    SCOPED_TRACE(std::string(sim::to_string(kind)) + " world " + std::to_string(world_size));
    sim::WorldOptions options = threads(world_size);
    options.rank_kind = kind;
    sim::World world(options);
    auto result = world.run([](sim::RankContext& ctx) {
      static std::mutex seed;  // the seed is process-global: thread ranks build one at a time
      std::shared_ptr<Stack> model;
      {
        std::lock_guard<std::mutex> lock(seed);
        torch::manual_seed(0);
        model = std::make_shared<Stack>();
      }
      std::vector<torch::Tensor> reference;
      for (const auto& param : model->parameters()) reference.push_back(param.detach().clone());
      Engine engine;
      FullyShardOptions options = full_shard(ctx.world_group());
      for (auto& block : model->blocks) engine.fully_shard(block, options);
      engine.fully_shard(model, options);
      FullParamsOptions summon;
      summon.writeback = false;
      auto full = engine.summon_full_params(summon);
      const auto params = model->parameters();
      ASSERT_EQ(params.size(), reference.size());
      for (size_t i = 0; i < params.size(); ++i) {
        EXPECT_TRUE(torch::equal(params[i], reference[i])) << i;
        EXPECT_TRUE(params[i].is_contiguous()) << i;
        // dim 0 is 6 or 5 here: padded to 8 rows (world 8) or 10 (world 5).
        EXPECT_EQ(params[i].storage().nbytes(), params[i].nbytes()) << "param " << i << " " << params[i].sizes();
      }
    });
    EXPECT_TRUE(result.ok()) << result.error_report();
  }
}

}  // namespace
}  // namespace fsdpsim::fsdp

#include "backends/observe/trace_recorder.h"
#include "scenarios/engine_trace.h"

namespace fsdpsim::fsdp {
namespace {

// Plain autograd on the unsharded module: what every rank's shard must match
// after the DDP mean (sum over ranks in rank order, divided by the world).
struct ReferenceGrads {
  std::vector<torch::Tensor> mean;
};

using fsdpsim::testing::MockEngineHooks;

TEST(FsdpEngineHooks, GMockSeesTheEventsInOrderWithTrainingStates) {
  sim::WorldOptions options = threads(1);
  sim::World world(options);
  auto result = world.run([](sim::RankContext& ctx) {
    auto mock = std::make_shared<::testing::StrictMock<MockEngineHooks>>();
    EngineOptions engine_options;
    engine_options.hooks = {mock};
    engine_options.queue_backward_callback = sim::queue_backward_callback;
    Engine engine(engine_options);
    auto model = std::make_shared<Stack>();
    FullyShardOptions shard = full_shard(ctx.world_group());
    for (auto& block : model->blocks) engine.fully_shard(block, shard);
    engine.fully_shard(model, shard);
    {
      ::testing::InSequence in_order;
      for (const char* unit : {"block2", "block1"}) {
        EXPECT_CALL(*mock, on_pre_backward(unit, TrainingState::PreBackward));
        EXPECT_CALL(*mock, on_post_backward(unit, TrainingState::PostBackward));
      }
      EXPECT_CALL(*mock, on_pre_backward("block0", TrainingState::PreBackward));
      // The root and block0 (fed the raw input) reduce in the end-of-backward
      // step, in module pre-order: the root first (FSDP2's order).
      EXPECT_CALL(*mock, on_post_backward("", TrainingState::PostBackward));
      EXPECT_CALL(*mock, on_post_backward("block0", TrainingState::PostBackward));
      EXPECT_CALL(*mock, on_final_callback("", TrainingState::Idle));
    }
    // A world of one gathers nothing: no unshard/reshard events (StrictMock
    // fails on any). The root's pre-backward comes first of all.
    EXPECT_CALL(*mock, on_pre_backward("", TrainingState::PreBackward)).Times(1);
    EXPECT_CALL(*mock, on_prefetch(::testing::_, ::testing::_, ::testing::_)).Times(::testing::AnyNumber());
    auto out = fsdp::call(model, torch::ones({2, 6}));
    sim::backward(out.sum());
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
}

// Runs `body` on every rank of a 2-rank world with Stack sharded FullShard
// and compares each rank's grad shards with the mean of plain autograd over
// both ranks' inputs. The arithmetic is the same (fp32, rank-order sum, then
// divide by 2) except where a test says so, so the comparison is exact.
void expect_grads_match_reference(
    const std::function<torch::Tensor(std::shared_ptr<Stack>&, const torch::Tensor&)>& loss_of, double tolerance) {
  const int world_size = 2;
  auto input_of = [](int rank) { return torch::arange(12, torch::kFloat).reshape({2, 6}) * (rank + 1) / 10; };
  at::set_num_threads(1);
  torch::manual_seed(0);
  auto reference = std::make_shared<Stack>();
  std::vector<torch::Tensor> mean;
  for (int r = 0; r < world_size; ++r) {
    reference->zero_grad();
    loss_of(reference, input_of(r)).backward();
    auto params = reference->parameters();
    for (size_t i = 0; i < params.size(); ++i) {
      auto g = params[i].grad().clone();
      if (r == 0) {
        mean.push_back(g);
      } else {
        mean[i].add_(g);
      }
    }
  }
  for (auto& m : mean) m.div_(world_size);

  std::mutex init;
  sim::World world(threads(world_size));
  auto result = world.run([&](sim::RankContext& ctx) {
    EngineOptions engine_options;
    engine_options.queue_backward_callback = sim::queue_backward_callback;
    Engine engine(engine_options);
    std::shared_ptr<Stack> model;
    {
      std::lock_guard<std::mutex> lock(init);
      model = make_stack(engine, ctx.world_group(), ShardingStrategy::FullShard);
    }
    sim::backward(loss_of(model, input_of(ctx.rank())));
    auto params = model->parameters();
    ASSERT_EQ(params.size(), mean.size());
    for (size_t i = 0; i < params.size(); ++i) {
      const int64_t rows_per_rank = (mean[i].size(0) + world_size - 1) / world_size;
      const int64_t begin = std::min<int64_t>(ctx.rank() * rows_per_rank, mean[i].size(0));
      const int64_t rows = std::min<int64_t>(rows_per_rank, mean[i].size(0) - begin);
      auto expected = mean[i].narrow(0, begin, rows);
      ASSERT_TRUE(params[i].grad().defined()) << "param " << i;
      if (tolerance == 0) {
        EXPECT_TRUE(torch::equal(params[i].grad(), expected)) << "param " << i << " rank " << ctx.rank();
      } else {
        EXPECT_TRUE(torch::allclose(params[i].grad(), expected, tolerance, tolerance))
            << "param " << i << " rank " << ctx.rank() << " max diff "
            << (params[i].grad() - expected).abs().max().item<float>();
      }
    }
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
}

TEST(FsdpEngineSemantics, ModuleCalledTwiceInOneForward) {
  // block1 runs twice; its two gradient contributions are reduced separately
  // and added (a + b rounds like the reference's accumulated grad only up to
  // fp32 rounding of the sum order): tolerance 1e-6.
  expect_grads_match_reference(
      [](std::shared_ptr<Stack>& model, const torch::Tensor& x) {
        model->block1_calls = 2;
        return fsdp::call(model, x).sum();
      },
      1e-6);
}

TEST(FsdpEngineSemantics, TwoForwardsThenOneBackward) {
  expect_grads_match_reference(
      [](std::shared_ptr<Stack>& model, const torch::Tensor& x) {
        auto first = fsdp::call(model, x).sum();
        auto second = fsdp::call(model, x * 2).sum();
        return first + second;
      },
      1e-6);
}

TEST(FsdpEngineSemantics, SingleForwardIsExact) {
  expect_grads_match_reference(
      [](std::shared_ptr<Stack>& model, const torch::Tensor& x) { return fsdp::call(model, x).pow(2).sum(); }, 0);
}

TEST(FsdpEngineSemantics, SyncModuleStatesBroadcastsParamsAndBuffersFromRankZero) {
  sim::World world(threads(3));
  auto result = world.run([](sim::RankContext& ctx) {
    Engine engine;
    torch::nn::Linear linear(4, 6);
    {
      torch::NoGradGuard no_grad;
      linear->weight.fill_(ctx.rank() + 1);
    }
    auto buffer = linear->register_buffer("steps", torch::full({2}, static_cast<int64_t>(ctx.rank() * 10)));
    FullyShardOptions options = full_shard(ctx.world_group());
    options.sync_module_states = true;
    engine.fully_shard(linear.ptr(), options);
    EXPECT_TRUE(torch::equal(linear->weight, torch::ones_like(linear->weight)));  // rank 0's value
    EXPECT_TRUE(torch::equal(linear->named_buffers()["steps"], torch::zeros({2}, torch::kLong)));
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
}

TEST(FsdpEngineTrace, EngineEventsAreRecordedBesideTheCollectives) {
  auto recorder = std::make_shared<observe::TraceRecorder>(2);
  sim::WorldOptions options = threads(2);
  options.trace = recorder;
  sim::World world(options);
  std::mutex init;
  auto result = world.run([&](sim::RankContext& ctx) {
    EngineOptions engine_options;
    engine_options.hooks = {std::make_shared<scenarios::TraceEngineHooks>(recorder, ctx.rank())};
    engine_options.queue_backward_callback = sim::queue_backward_callback;
    Engine engine(engine_options);
    std::shared_ptr<Stack> model;
    {
      std::lock_guard<std::mutex> lock(init);
      model = make_stack(engine, ctx.world_group(), ShardingStrategy::FullShard);
    }
    sim::backward(fsdp::call(model, torch::ones({2, 6})).sum());
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
  std::vector<std::string> rank0;
  for (const auto& event : recorder->events()) {
    if (event.rank != 0) continue;
    rank0.push_back(event.is_collective() ? to_string(event.op) : event.kind + " " + event.name);
  }
  // Each unshard is followed by its all-gather; each post-backward by... the
  // reduce-scatter is issued just before the post_backward event.
  ASSERT_GE(rank0.size(), 4u);
  EXPECT_EQ(rank0[0], "all_gather");
  EXPECT_EQ(rank0[1], "unshard <root>");
  EXPECT_EQ(std::count(rank0.begin(), rank0.end(), "all_gather"), 7);      // B+1 forward, B backward
  EXPECT_EQ(std::count(rank0.begin(), rank0.end(), "reduce_scatter"), 4);  // B+1
  EXPECT_EQ(rank0.back(), "final_callback <root>");
}

}  // namespace
}  // namespace fsdpsim::fsdp

#include "backends/comm_hooks.h"

namespace fsdpsim::fsdp {
namespace {

// Records the options of every reduce-scatter it sees.
class ReduceScatterSpy final : public DefaultCommHooks {
 public:
  void before(const CollectiveDesc& desc) override {
    if (desc.op == CollectiveOp::ReduceScatter) seen.push_back(desc);
  }
  std::vector<CollectiveDesc> seen;
};

TEST(FsdpEngineSemantics, GradientPredivideFactorSplitsTheAverage) {
  // With factor f each grad is divided by f before the sum and the sum by
  // world / f after: (a/2 + b/2 + c/2 + d/2) / 2 is bitwise (a+b+c+d) / 4
  // (halving is exact in fp32), so the grads equal the plain average's.
  auto grads_with = [](double factor, std::vector<std::vector<CollectiveDesc>>* seen) {
    std::vector<torch::Tensor> grads(4);
    sim::World world(threads(4));
    auto result = world.run([&](sim::RankContext& ctx) {
      auto spy = std::make_shared<ReduceScatterSpy>();
      auto group = std::make_shared<HookedProcessGroup>(ctx.world_group(), spy);
      EngineOptions engine_options;
      engine_options.queue_backward_callback = sim::queue_backward_callback;
      Engine engine(engine_options);
      torch::nn::Linear linear(8, 8);
      {
        torch::NoGradGuard no_grad;
        linear->weight.copy_(torch::arange(64, torch::kFloat).reshape({8, 8}) / 7);
        linear->bias.fill_(0.5);
      }
      FullyShardOptions options = full_shard(group);
      options.gradient_predivide_factor = factor;
      engine.fully_shard(linear.ptr(), options);
      auto x = torch::arange(16, torch::kFloat).reshape({2, 8}) * (ctx.rank() + 1) / 3;
      sim::backward(fsdp::call(linear.ptr(), x).pow(2).sum());
      grads[ctx.rank()] = linear->weight.grad().clone();
      if (seen) (*seen)[ctx.rank()] = spy->seen;
    });
    EXPECT_TRUE(result.ok()) << result.error_report();
    return grads;
  };
  std::vector<std::vector<CollectiveDesc>> seen(4);
  auto averaged = grads_with(1.0, nullptr);
  auto predivided = grads_with(2.0, &seen);
  for (int r = 0; r < 4; ++r) {
    EXPECT_TRUE(torch::equal(averaged[r], predivided[r])) << "rank " << r;
    ASSERT_EQ(seen[r].size(), 1u);
    EXPECT_EQ(seen[r][0].reduce_op, ReduceOp::Sum);
    EXPECT_EQ(seen[r][0].predivide_factor, 2.0);
    EXPECT_EQ(seen[r][0].postdivide_factor, 2.0);
  }
}

}  // namespace
}  // namespace fsdpsim::fsdp
