// FSDP parity with PyTorch's test models (scenarios/models.h) against the
// unsharded DDP reference (scenarios/parity.h): every model x strategy x
// world size on fake thread ranks with SGD, a subset with Adam (alternating
// zero_grad(set_to_none)), fiber ranks (one run at 128 ranks with the uneven
// shapes), and Gloo thread ranks. Plus: the per-step communication counts of
// the reference's section 3 through a GoogleMock CommHooks, and bitwise
// reproducibility of seeded fiber runs.
//
// Exact (bitwise) comparison unless a case says otherwise:
// - HybridShard averages in two stages (the mean over the shard group, then
//   over the replicas), not the reference's single rank-order mean, so fp32
//   results differ in the last bits: atol 1e-5, rtol 1e-5.
// - Gloo's all_reduce may add the ranks' contributions in any order (its
//   reduce-scatter is a rank-order local sum, bitwise the fake's), so NoShard
//   and HybridShard on Gloo get the same tolerance.

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <memory>
#include <ostream>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "backends/comm_hooks.h"
#include "backends/observe/trace_recorder.h"
#include "fsdp/fully_shard.h"
#include "scenarios/models.h"
#include "scenarios/parity.h"
#include "scenarios/trainer.h"
#include "sim/fiber_autograd.h"
#include "sim/testing/collective_matchers.h"
#include "sim/testing/mock_hooks.h"
#include "sim/world.h"

namespace fsdpsim::scenarios {
namespace {

using fsdp::ShardingStrategy;
using sim::CommBackend;
using sim::RankKind;
using ::testing::_;
using ::testing::AllOf;
using ::testing::AnyNumber;
using ::testing::Field;
using ::testing::HasSubstr;
using ::testing::NiceMock;
using ::testing::Truly;

constexpr Tolerance kTwoStageMean{1e-5, 1e-5};

// ---------------------------------------------------------------------------
// The models themselves (no sharding).

TEST(ScenarioModels, UnknownNameListsTheKnownOnes) {
  ScenarioConfig config;
  config.name = "resnet";
  try {
    make_scenario(config, 0);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    EXPECT_THAT(e.what(), HasSubstr("unknown scenario 'resnet'"));
    for (const auto& name : scenario_names()) EXPECT_THAT(e.what(), HasSubstr(name));
  }
}

// checkpoint_units (the conformance mode ckpt) keeps the FQNs, the init and,
// unsharded, the loss and every grad bit for bit; other scenarios refuse it.
TEST(ScenarioModels, CheckpointUnitsKeepsParamsAndGradsAndIsRefusedElsewhere) {
  for (const std::string name : {"mlp_stack", "nested_wrapped"}) {
    SCOPED_TRACE(name);
    std::vector<std::vector<std::pair<std::string, at::Tensor>>> grads;
    std::vector<at::Tensor> losses;
    for (bool checkpointed : {false, true}) {
      ScenarioConfig config;
      config.name = name;
      config.checkpoint_units = checkpointed;
      auto scenario = make_scenario(config, 1);
      at::Tensor loss = scenario->forward_loss(scenario->input(1, 0));
      loss.backward();
      losses.push_back(loss.detach());
      grads.emplace_back();
      for (const auto& [fqn, param] : unique_named_parameters(*scenario->module())) {
        ASSERT_TRUE(param.grad().defined()) << fqn;
        grads.back().emplace_back(fqn, param.grad());
      }
    }
    EXPECT_TRUE(torch::equal(losses[0], losses[1]));
    ASSERT_EQ(grads[0].size(), grads[1].size());
    for (size_t i = 0; i < grads[0].size(); ++i) {
      EXPECT_EQ(grads[0][i].first, grads[1][i].first);
      EXPECT_TRUE(torch::equal(grads[0][i].second, grads[1][i].second)) << grads[0][i].first;
    }
  }
  ScenarioConfig config;
  config.name = "transformer";
  config.checkpoint_units = true;
  try {
    make_scenario(config, 0);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    EXPECT_THAT(e.what(), HasSubstr("'transformer': checkpoint_units is supported by mlp_stack and nested_wrapped"));
  }
}

TEST(ScenarioModels, SameInitOnEveryRankExceptExpertsAndInputsDifferAcrossRanks) {
  for (const auto& name : scenario_names()) {
    SCOPED_TRACE(name);
    ScenarioConfig config;
    config.name = name;
    config.seed = 3;
    auto a = make_scenario(config, 0);
    auto b = make_scenario(config, 1);
    const auto local = a->rank_local_params();
    auto pa = unique_named_parameters(*a->module());
    auto pb = unique_named_parameters(*b->module());
    ASSERT_EQ(pa.size(), pb.size());
    for (size_t i = 0; i < pa.size(); ++i) {
      ASSERT_EQ(pa[i].first, pb[i].first);
      EXPECT_EQ(at::equal(pa[i].second, pb[i].second), local.count(pa[i].first) == 0) << pa[i].first;
    }
    auto ia = a->input(0, 0);
    auto ib = a->input(1, 0);
    auto ia_again = b->input(0, 0);
    ASSERT_EQ(ia.size(), ib.size());
    bool differ = false;
    for (size_t i = 0; i < ia.size(); ++i) {
      EXPECT_TRUE(at::equal(ia[i], ia_again[i]));
      differ = differ || !at::equal(ia[i], ib[i]);
    }
    EXPECT_TRUE(differ);
    auto loss = a->forward_loss(ia);
    EXPECT_EQ(loss.dim(), 0);
    EXPECT_TRUE(std::isfinite(loss.item<double>()));
  }
}

TEST(ScenarioModels, ShapesNamesAndBlocksFollowTheReference) {
  auto params_of = [](const std::string& name, int rank = 0) {
    ScenarioConfig config;
    config.name = name;
    auto scenario = make_scenario(config, rank);
    std::map<std::string, std::vector<int64_t>> shapes;
    for (const auto& item : scenario->module()->named_parameters()) shapes[item.key()] = item.value().sizes().vec();
    return std::make_pair(std::move(scenario), shapes);
  };
  {
    auto [scenario, shapes] = params_of("nested_wrapped");
    EXPECT_EQ(scenario->sharded_blocks(), 3);
    EXPECT_EQ(shapes.at("module.0.weight"), (std::vector<int64_t>{4, 8}));
    EXPECT_EQ(shapes.at("module.1.0.weight"), (std::vector<int64_t>{16, 4}));
    EXPECT_EQ(shapes.at("module.1.1.weight"), (std::vector<int64_t>{16, 16}));
    EXPECT_EQ(shapes.at("module.2.weight"), (std::vector<int64_t>{4, 16}));
    EXPECT_EQ(shapes.at("module.3.weight"), (std::vector<int64_t>{8, 4}));
    EXPECT_EQ(scenario->forward_loss(scenario->input(0, 0)).dim(), 0);
  }
  {
    auto [scenario, shapes] = params_of("always_wrap_nested");
    EXPECT_EQ(scenario->sharded_blocks(), 7);
  }
  {
    auto [scenario, shapes] = params_of("transformer");
    EXPECT_EQ(scenario->sharded_blocks(), 4);
    auto named = scenario->module()->named_parameters();
    // The tie: one TensorImpl under two names, listed once by unique_named_parameters.
    EXPECT_TRUE(named["output_proj.weight"].is_same(named["embed_tokens.weight"]));
    EXPECT_EQ(shapes.at("embed_tokens.weight"), (std::vector<int64_t>{23, 16}));
    EXPECT_EQ(shapes.at("output_proj.bias"), (std::vector<int64_t>{23}));
    EXPECT_EQ(shapes.at("transformer.encoder.layers.1.linear1.weight"), (std::vector<int64_t>{8, 16}));
    EXPECT_EQ(shapes.at("transformer.decoder.layers.0.multihead_attn.in_proj_weight"), (std::vector<int64_t>{48, 16}));
    EXPECT_EQ(shapes.at("bn.weight"), (std::vector<int64_t>{2}));
    EXPECT_EQ(unique_named_parameters(*scenario->module()).size(), named.size() - 1);
    auto buffers = scenario->module()->named_buffers();
    EXPECT_EQ(buffers["vocab_bias"].scalar_type(), at::kFloat);
    EXPECT_EQ(buffers["long_buffer"].scalar_type(), at::kLong);
  }
  {
    auto [scenario, shapes] = params_of("mixture_of_experts", 1);
    EXPECT_EQ(scenario->sharded_blocks(), 2);
    EXPECT_EQ(scenario->rank_local_params(), (std::set<std::string>{"module.2.weight", "module.2.bias"}));
    EXPECT_EQ(shapes.at("module.1.weight"), (std::vector<int64_t>{23, 12}));
    EXPECT_EQ(shapes.at("module.2.weight"), (std::vector<int64_t>{12, 23}));
  }
  {
    auto [scenario, shapes] = params_of("non_uniform_req_grad");
    std::vector<std::string> trainable;
    for (const auto& item : scenario->module()->named_parameters()) {
      if (item.value().requires_grad()) trainable.push_back(item.key());
    }
    EXPECT_EQ(trainable, (std::vector<std::string>{"module.2.1.weight", "module.2.1.bias"}));
  }
  {
    auto [scenario, shapes] = params_of("mlp_stack");
    EXPECT_EQ(scenario->sharded_blocks(), 3);
    EXPECT_EQ(shapes.at("0.in_proj.weight"), (std::vector<int64_t>{48, 16}));
    EXPECT_EQ(shapes.at("1.in_proj.weight"), (std::vector<int64_t>{64, 16}));
    EXPECT_EQ(shapes.at("3.weight"), (std::vector<int64_t>{16}));
  }
  {
    auto [scenario, shapes] = params_of("uneven_shapes");
    std::multiset<std::vector<int64_t>> got;
    for (const auto& item : shapes) got.insert(item.second);
    EXPECT_EQ(got, (std::multiset<std::vector<int64_t>>{
                       {17, 257}, {17}, {64, 312}, {64}, {64, 64}, {512, 64}, {256}, {64, 297}}));
  }
}

// The shared trainer: plain and sharded at world 1 move no data, so every
// step's loss is bitwise the same (what fsdpsim_bench_engine relies on).
TEST(Trainer, PlainAndShardedAtWorldOneGiveBitwiseTheSameLosses) {
  for (const std::string name : {"mlp_stack", "transformer", "nested_wrapped"}) {
    SCOPED_TRACE(name);
    TrainConfig config;
    config.scenario.name = name;
    config.steps = 4;
    sim::WorldOptions options;
    options.world_size = 1;
    std::vector<double> plain_losses, sharded_losses;
    sim::World(options)
        .run([&](sim::RankContext& ctx) {
          Trainer plain(config, 0);
          Trainer sharded(config, 0, ctx.world_group());
          ASSERT_EQ(plain.engine(), nullptr);
          ASSERT_NE(sharded.engine(), nullptr);
          plain_losses = plain.train();
          sharded_losses = sharded.train();
        })
        .throw_if_failed();
    ASSERT_EQ(plain_losses.size(), 4u);
    EXPECT_EQ(plain_losses, sharded_losses);
  }
}

// The demo (`fsdpsim run`'s default: mlp_stack, dim 64, 4 ranks, SGD) trains
// a real objective: the loss falls and levels off instead of running off.
TEST(Trainer, MlpStackRegressionLossFallsAndLevelsOff) {
  TrainConfig config;
  config.scenario.name = "mlp_stack";
  config.scenario.mlp_dim = 64;
  config.steps = 40;
  sim::WorldOptions options;
  options.world_size = 4;
  std::vector<std::vector<double>> losses(4);
  std::vector<int> callbacks(4, 0);
  sim::World(options)
      .run([&](sim::RankContext& ctx) {
        Trainer trainer(config, ctx.rank(), ctx.world_group());
        StepCallbacks count;
        count.after_step = [&](int, const at::Tensor&) { ++callbacks[ctx.rank()]; };
        losses[ctx.rank()] = trainer.train(count);
      })
      .throw_if_failed();
  std::vector<double> mean(40, 0.0);
  for (const auto& rank : losses) {
    ASSERT_EQ(rank.size(), 40u);
    for (size_t s = 0; s < rank.size(); ++s) mean[s] += rank[s] / 4;
  }
  EXPECT_EQ(callbacks, std::vector<int>(4, 40));
  for (double loss : mean) EXPECT_GT(loss, 0.0);  // a mean squared error
  EXPECT_LT(mean[19], 0.7 * mean[0]);
  EXPECT_LT(mean[39], 0.35 * mean[0]);
  // Levelled off: the last ten steps stay within 5% of the first loss.
  const auto [low, high] = std::minmax_element(mean.begin() + 30, mean.end());
  EXPECT_LT(*high - *low, 0.05 * mean[0]);
}

// ---------------------------------------------------------------------------
// Parity.

struct ParityCase {
  ParityConfig config;
  std::string name;  // gtest-safe
};

void PrintTo(const ParityCase& c, std::ostream* out) { *out << c.config.describe(); }

const char* short_name(ShardingStrategy strategy) {
  switch (strategy) {
    case ShardingStrategy::FullShard: return "FullShard";
    case ShardingStrategy::ShardGradOp: return "ShardGradOp";
    case ShardingStrategy::NoShard: return "NoShard";
    case ShardingStrategy::HybridShard: return "HybridShard";
  }
  return "?";
}

/// A model variant: its scenario config and a gtest-safe label.
struct Model {
  ScenarioConfig config;
  std::string label;
};

Model model(const std::string& name) {
  Model m;
  m.config.name = name;
  m.label = name;
  return m;
}

Model lin1_only() {
  Model m = model("double_linear");
  m.config.use_second_linear = false;
  m.label = "double_linear_lin1_only";
  return m;
}

Model with_mlp_buffer() {
  Model m = model("mlp_stack");
  m.config.mlp_buffer = true;
  m.label = "mlp_stack_with_buffer";
  return m;
}

Model without_bn() {
  Model m = model("transformer");
  m.config.batch_norm = false;
  m.label = "transformer_no_bn";
  return m;
}

ParityCase make_case(const Model& m, ShardingStrategy strategy, int world, RankKind kind = RankKind::Threads,
                     CommBackend backend = CommBackend::Fake, OptimizerKind optimizer = OptimizerKind::SGD) {
  ParityCase c;
  c.config.scenario = m.config;
  c.config.strategy = strategy;
  c.config.world.world_size = world;
  c.config.world.rank_kind = kind;
  c.config.world.backend = backend;
  c.config.optimizer = optimizer;
  if (strategy == ShardingStrategy::HybridShard) {
    c.config.replicate_size = 2;
    c.config.tolerance = kTwoStageMean;
  }
  if (backend == CommBackend::Gloo && strategy == ShardingStrategy::NoShard) c.config.tolerance = kTwoStageMean;
  if (optimizer == OptimizerKind::Adam) c.config.zero_grad_set_to_none_alternate = true;
  c.name = m.label + "_" + short_name(strategy) + "_w" + std::to_string(world) + "_" +
           (kind == RankKind::Threads ? "threads" : "fibers") + "_" + (backend == CommBackend::Fake ? "fake" : "gloo") +
           "_" + to_string(optimizer);
  return c;
}

ParityCase seeded(ParityCase c, uint64_t seed) {
  c.config.world.schedule = sim::SchedulePolicy::SeededRandom;
  c.config.world.seed = seed;
  c.name += "_sched" + std::to_string(seed);
  return c;
}

std::vector<Model> all_models() {
  return {model("nested_wrapped"),       model("always_wrap_nested"), model("transformer"), model("mixture_of_experts"),
          model("non_uniform_req_grad"), model("double_linear"),      lin1_only(),          model("mlp_stack"),
          model("rank_divergent")};
}

/// Every model x {FullShard, ShardGradOp, NoShard} x worlds {1, 2, 3, 4, 8},
/// plus HybridShard 2x2 and 2x4; SGD on fake thread ranks.
std::vector<ParityCase> sgd_thread_cases() {
  std::vector<ParityCase> cases;
  for (const auto& m : all_models()) {
    for (auto strategy : {ShardingStrategy::FullShard, ShardingStrategy::ShardGradOp, ShardingStrategy::NoShard}) {
      for (int world : {1, 2, 3, 4, 8}) cases.push_back(make_case(m, strategy, world));
    }
    for (int world : {4, 8}) cases.push_back(make_case(m, ShardingStrategy::HybridShard, world));
  }
  for (int world : {2, 3, 8}) cases.push_back(make_case(model("uneven_shapes"), ShardingStrategy::FullShard, world));
  cases.push_back(make_case(model("uneven_shapes"), ShardingStrategy::ShardGradOp, 5));
  return cases;
}

std::vector<ParityCase> adam_cases() {
  const auto adam = OptimizerKind::Adam;
  const auto threads = RankKind::Threads;
  const auto fake = CommBackend::Fake;
  return {
      make_case(model("nested_wrapped"), ShardingStrategy::FullShard, 3, threads, fake, adam),
      make_case(model("always_wrap_nested"), ShardingStrategy::FullShard, 8, threads, fake, adam),
      make_case(model("transformer"), ShardingStrategy::FullShard, 2, threads, fake, adam),
      make_case(without_bn(), ShardingStrategy::ShardGradOp, 4, threads, fake, adam),
      make_case(model("mixture_of_experts"), ShardingStrategy::FullShard, 4, threads, fake, adam),
      make_case(model("non_uniform_req_grad"), ShardingStrategy::FullShard, 2, threads, fake, adam),
      make_case(lin1_only(), ShardingStrategy::NoShard, 3, threads, fake, adam),
      make_case(model("mlp_stack"), ShardingStrategy::ShardGradOp, 4, threads, fake, adam),
      make_case(model("mlp_stack"), ShardingStrategy::HybridShard, 4, threads, fake, adam),
      make_case(with_mlp_buffer(), ShardingStrategy::FullShard, 3, threads, fake, adam),
  };
}

std::vector<ParityCase> fiber_cases() {
  const auto fibers = RankKind::Fibers;
  const auto fake = CommBackend::Fake;
  return {
      make_case(model("nested_wrapped"), ShardingStrategy::FullShard, 4, fibers),
      seeded(make_case(model("always_wrap_nested"), ShardingStrategy::FullShard, 5, fibers), 11),
      make_case(model("transformer"), ShardingStrategy::FullShard, 3, fibers),
      seeded(make_case(model("transformer"), ShardingStrategy::ShardGradOp, 4, fibers), 5),
      make_case(model("mixture_of_experts"), ShardingStrategy::ShardGradOp, 4, fibers),
      make_case(model("non_uniform_req_grad"), ShardingStrategy::NoShard, 3, fibers),
      make_case(model("double_linear"), ShardingStrategy::FullShard, 2, fibers),
      make_case(model("mlp_stack"), ShardingStrategy::HybridShard, 8, fibers),
      seeded(make_case(model("mlp_stack"), ShardingStrategy::FullShard, 8, fibers, fake, OptimizerKind::Adam), 3),
      make_case(model("uneven_shapes"), ShardingStrategy::FullShard, 128, fibers),
  };
}

std::vector<ParityCase> gloo_cases() {
  const auto threads = RankKind::Threads;
  const auto gloo = CommBackend::Gloo;
  return {
      make_case(model("nested_wrapped"), ShardingStrategy::FullShard, 2, threads, gloo),
      make_case(model("transformer"), ShardingStrategy::FullShard, 2, threads, gloo),
      make_case(model("mixture_of_experts"), ShardingStrategy::FullShard, 3, threads, gloo),
      make_case(model("mlp_stack"), ShardingStrategy::ShardGradOp, 3, threads, gloo),
      make_case(model("mlp_stack"), ShardingStrategy::NoShard, 4, threads, gloo),
      make_case(model("nested_wrapped"), ShardingStrategy::HybridShard, 4, threads, gloo),
  };
}

ParityCase zero_grad_at(ParityCase c, ZeroGradAt at, bool set_to_none) {
  c.config.zero_grad_at = at;
  c.config.zero_grad_set_to_none = set_to_none;
  c.name += std::string("_zero_grad_") + (at == ZeroGradAt::BeforeForward ? "before_forward" : "before_backward") +
            (set_to_none ? "_to_none" : "_in_place");
  return c;
}

/// zero_grad before forward and between forward and backward (the root and
/// ShardGradOp units are still gathered there), set to none or zeroed in
/// place, on every backend.
std::vector<ParityCase> zero_grad_cases() {
  std::vector<ParityCase> cases;
  const auto fibers = RankKind::Fibers;
  const auto threads = RankKind::Threads;
  for (auto at : {ZeroGradAt::BeforeForward, ZeroGradAt::BeforeBackward}) {
    for (bool set_to_none : {true, false}) {
      for (auto strategy : {ShardingStrategy::FullShard, ShardingStrategy::ShardGradOp, ShardingStrategy::NoShard}) {
        cases.push_back(zero_grad_at(make_case(model("mlp_stack"), strategy, 3), at, set_to_none));
      }
      cases.push_back(
          zero_grad_at(make_case(model("nested_wrapped"), ShardingStrategy::FullShard, 4, fibers), at, set_to_none));
      cases.push_back(
          zero_grad_at(make_case(model("transformer"), ShardingStrategy::ShardGradOp, 2, threads, CommBackend::Gloo),
                       at, set_to_none));
    }
  }
  cases.push_back(zero_grad_at(
      make_case(model("mlp_stack"), ShardingStrategy::FullShard, 4, threads, CommBackend::Fake, OptimizerKind::Adam),
      ZeroGradAt::BeforeBackward, true));
  return cases;
}

/// rank_divergent (a branch inside a unit taken on even ranks only) beyond
/// the thread cases of every model: fibers, Gloo, an odd world.
std::vector<ParityCase> rank_divergent_cases() {
  const Model m = model("rank_divergent");
  return {
      make_case(m, ShardingStrategy::FullShard, 5, RankKind::Fibers),
      seeded(make_case(m, ShardingStrategy::ShardGradOp, 3, RankKind::Fibers), 7),
      make_case(m, ShardingStrategy::FullShard, 3, RankKind::Threads, CommBackend::Gloo),
      make_case(m, ShardingStrategy::NoShard, 2, RankKind::Threads, CommBackend::Gloo),
      make_case(m, ShardingStrategy::FullShard, 3, RankKind::Threads, CommBackend::Fake, OptimizerKind::Adam),
  };
}

ParityCase round_trip(ParityCase c, RoundTripVia via) {
  c.config.steps = 3;
  c.config.round_trip.after_step = 1;
  c.config.round_trip.via = via;
  c.name += std::string("_round_trip_") + (via == RoundTripVia::StateDict ? "state_dict" : "checkpoint");
  return c;
}

/// A save/load round trip after step 1 of 3 (PyTorch's
/// _train_for_several_steps(save_model=True)) in every model x strategy:
/// each model on threads and fibers, at world 2 and an odd world (HybridShard
/// 2x2, or 2x3: shard groups of 3), SGD and Adam; one strategy per model
/// goes through a DCP checkpoint on disk, the others through state dicts in
/// memory. mixture_of_experts and the transformer with BatchNorm keep to
/// state dicts: their experts / running stats differ per rank, and a DCP
/// checkpoint (like PyTorch's) holds one copy of each tensor that is not
/// sharded. HybridShard's transformer trains with SGD: the attention key
/// bias's grad is rounding noise around 0, which Adam scales up to lr-sized
/// steps, so the two-stage mean's last bits (within 1e-5) move the param by
/// 1e-3.
std::vector<ParityCase> round_trip_cases() {
  std::vector<Model> models = all_models();
  models.push_back(model("uneven_shapes"));
  models.push_back(with_mlp_buffer());
  models.push_back(without_bn());
  const ShardingStrategy strategies[] = {ShardingStrategy::FullShard, ShardingStrategy::ShardGradOp,
                                         ShardingStrategy::NoShard, ShardingStrategy::HybridShard};
  std::vector<ParityCase> cases;
  for (size_t mi = 0; mi < models.size(); ++mi) {
    for (size_t si = 0; si < 4; ++si) {
      const bool odd = si % 2 == 1;
      const bool fibers = (si / 2 + mi) % 2 == 1;
      const bool hybrid = strategies[si] == ShardingStrategy::HybridShard;
      const int world = hybrid ? (odd ? 6 : 4) : (odd ? 3 : 2);
      const ScenarioConfig& scenario = models[mi].config;
      const bool transformer = scenario.name == "transformer";
      const auto optimizer = (mi + si) % 2 == 1 && !(hybrid && transformer) ? OptimizerKind::Adam : OptimizerKind::SGD;
      const bool per_rank_state = scenario.name == "mixture_of_experts" || (transformer && scenario.batch_norm);
      const bool on_disk = si == mi % 4 && !per_rank_state;
      cases.push_back(round_trip(make_case(models[mi], strategies[si], world,
                                           fibers ? RankKind::Fibers : RankKind::Threads, CommBackend::Fake, optimizer),
                                 on_disk ? RoundTripVia::Checkpoint : RoundTripVia::StateDict));
    }
  }
  return cases;
}

class FsdpParity : public ::testing::TestWithParam<ParityCase> {};

TEST_P(FsdpParity, MatchesTheDdpReference) {
  const ParityReport report = run_parity(GetParam().config);
  EXPECT_TRUE(report.ok()) << report.summary();
  ASSERT_EQ(report.losses.size(), static_cast<size_t>(GetParam().config.world.world_size));
  for (const auto& losses : report.losses) EXPECT_EQ(losses.size(), static_cast<size_t>(GetParam().config.steps));
}

std::string case_name(const ::testing::TestParamInfo<ParityCase>& info) { return info.param.name; }

INSTANTIATE_TEST_SUITE_P(SgdThreads, FsdpParity, ::testing::ValuesIn(sgd_thread_cases()), case_name);
INSTANTIATE_TEST_SUITE_P(Adam, FsdpParity, ::testing::ValuesIn(adam_cases()), case_name);
INSTANTIATE_TEST_SUITE_P(Fibers, FsdpParity, ::testing::ValuesIn(fiber_cases()), case_name);
INSTANTIATE_TEST_SUITE_P(Gloo, FsdpParity, ::testing::ValuesIn(gloo_cases()), case_name);
INSTANTIATE_TEST_SUITE_P(ZeroGrad, FsdpParity, ::testing::ValuesIn(zero_grad_cases()), case_name);
INSTANTIATE_TEST_SUITE_P(RankDivergent, FsdpParity, ::testing::ValuesIn(rank_divergent_cases()), case_name);
INSTANTIATE_TEST_SUITE_P(RoundTrip, FsdpParity, ::testing::ValuesIn(round_trip_cases()), case_name);

// ---------------------------------------------------------------------------
// The harness itself, and parity under delayed collectives (reference
// section 5).

// Sleeps before every all-gather and reduce-scatter of one rank.
class DelayHooks : public DefaultCommHooks {
 public:
  explicit DelayHooks(std::chrono::microseconds delay) : delay_(delay) {}
  void before(const CollectiveDesc& desc) override {
    if (desc.op == CollectiveOp::AllGather || desc.op == CollectiveOp::ReduceScatter) sim::sleep_for(delay_);
  }

 private:
  std::chrono::microseconds delay_;
};

class FsdpParityUnderDelays : public ::testing::TestWithParam<RankKind> {};

TEST_P(FsdpParityUnderDelays, ExactWithOneSlowRank) {
  for (auto strategy : {ShardingStrategy::FullShard, ShardingStrategy::ShardGradOp}) {
    ParityCase c = make_case(model("mlp_stack"), strategy, 4, GetParam());
    c.config.comm_hooks = [](int rank) -> std::shared_ptr<CommHooks> {
      if (rank != 1) return nullptr;
      return std::make_shared<DelayHooks>(std::chrono::milliseconds(2));
    };
    const ParityReport report = run_parity(c.config);
    EXPECT_TRUE(report.ok()) << report.summary();
  }
}

INSTANTIATE_TEST_SUITE_P(All, FsdpParityUnderDelays, ::testing::Values(RankKind::Threads, RankKind::Fibers),
                         [](const ::testing::TestParamInfo<RankKind>& info) {
                           return std::string(info.param == RankKind::Threads ? "Threads" : "Fibers");
                         });

// Bitwise comparison sees the last-bit differences of HybridShard's two-stage
// mean, and names where they are.
TEST(ParityHarness, BitwiseComparisonReportsWhereValuesDiffer) {
  ParityCase c = make_case(model("mlp_stack"), ShardingStrategy::HybridShard, 4);
  c.config.tolerance = Tolerance{};
  c.config.steps = 2;
  const ParityReport report = run_parity(c.config);
  ASSERT_TRUE(report.error.empty()) << report.error;
  ASSERT_FALSE(report.ok());
  ASSERT_FALSE(report.mismatches.empty());
  const Mismatch& first = report.mismatches.front();
  EXPECT_EQ(first.step, 0);
  EXPECT_EQ(first.what, "grad");
  EXPECT_FALSE(first.fqn.empty());
  EXPECT_GT(first.max_abs_diff, 0.0);
  EXPECT_LT(first.max_abs_diff, 1e-4);
  EXPECT_THAT(first.detail, HasSubstr("elements differ"));
  EXPECT_THAT(report.summary(), HasSubstr("PARITY BROKEN"));
  EXPECT_EQ(report.steps[0].loss, 0.0);  // identical params before the first step
}

// The round trip's checks catch a load that restores nothing: the restored
// state differs from what was taken out right away, and the next step's
// loss, params and optimiser state (Adam's step counter 1, the reference's 3)
// differ from the reference.
TEST(ParityHarness, RoundTripWithoutTheLoadBreaksParity) {
  for (auto via : {RoundTripVia::StateDict, RoundTripVia::Checkpoint}) {
    for (auto kind : {RankKind::Threads, RankKind::Fibers}) {
      ParityCase c = round_trip(
          make_case(model("mlp_stack"), ShardingStrategy::FullShard, 3, kind, CommBackend::Fake, OptimizerKind::Adam),
          via);
      c.config.round_trip.load_back = false;
      SCOPED_TRACE(c.config.describe());
      const ParityReport report = run_parity(c.config);
      ASSERT_TRUE(report.error.empty()) << report.error;
      ASSERT_FALSE(report.ok());
      ASSERT_FALSE(report.mismatches.empty());
      EXPECT_EQ(report.mismatches.front().step, 1);
      EXPECT_EQ(report.mismatches.front().what, "round trip");
      EXPECT_THAT(report.mismatches.front().fqn, ::testing::StartsWith("model."));
      ASSERT_EQ(report.steps.size(), 3u);
      EXPECT_EQ(report.steps[1].param_after_step, 0.0);  // compared before the round trip
      EXPECT_EQ(report.steps[1].optimizer_state, 0.0);
      EXPECT_GT(report.steps[2].loss, 0.0);
      EXPECT_GT(report.steps[2].param_after_step, 0.0);
      EXPECT_GE(report.steps[2].optimizer_state, 1.0);  // at least the step counter
    }
  }
}

TEST(ParityHarness, RoundTripOutsideTheStepsIsRefused) {
  ParityCase c = make_case(model("mlp_stack"), ShardingStrategy::FullShard, 2);
  c.config.steps = 2;
  for (int after : {-2, 2}) {
    c.config.round_trip.after_step = after;
    try {
      run_parity(c.config);
      FAIL() << "expected std::invalid_argument for after_step " << after;
    } catch (const std::invalid_argument& e) {
      EXPECT_THAT(e.what(), HasSubstr("round_trip.after_step " + std::to_string(after) + " is not a step of 2"));
      EXPECT_THAT(e.what(), HasSubstr("use 0..1, or -1 for none"));
    }
  }
}

// A rank that fails is reported, not thrown.
TEST(ParityHarness, FailedRankIsReported) {
  class FailingHooks : public DefaultCommHooks {
   public:
    void before(const CollectiveDesc& desc) override {
      if (desc.op == CollectiveOp::ReduceScatter) throw std::runtime_error("injected failure");
    }
  };
  ParityCase c = make_case(model("nested_wrapped"), ShardingStrategy::FullShard, 2);
  c.config.comm_hooks = [](int rank) -> std::shared_ptr<CommHooks> {
    return rank == 0 ? std::make_shared<FailingHooks>() : nullptr;
  };
  c.config.world.collective_timeout = std::chrono::seconds(10);
  const ParityReport report = run_parity(c.config);
  EXPECT_FALSE(report.ok());
  EXPECT_THAT(report.error, HasSubstr("injected failure"));
}

// ---------------------------------------------------------------------------
// Communication counts per step (reference section 3): B + 1 all-gathers in
// forward; in backward B with reshard-after-forward (FullShard: the root is
// not resharded after forward) and 0 without (ShardGradOp); B + 1
// reduce-scatters; no all-reduce; nothing in the optimiser step.

using fsdpsim::testing::MockCommHooks;
using fsdpsim::testing::OpIs;

struct CommCase {
  const char* scenario;
  ShardingStrategy strategy;
  int world_size;
  RankKind rank_kind;
};

void PrintTo(const CommCase& c, std::ostream* out) {
  *out << c.scenario << " " << fsdp::to_string(c.strategy) << " world " << c.world_size << " "
       << sim::to_string(c.rank_kind);
}

class CommCount : public ::testing::TestWithParam<CommCase> {};

TEST_P(CommCount, AllGathersAndReduceScattersPerStep) {
  const CommCase& c = GetParam();
  constexpr int kSteps = 2;
  enum { kForward = 0, kBackward = 1, kOptimizer = 2 };
  const bool reshard_after_forward = c.strategy == ShardingStrategy::FullShard;
  ScenarioConfig config;
  config.name = c.scenario;
  const int blocks = make_scenario(config, 0)->sharded_blocks();
  ASSERT_EQ(blocks, 3);

  // Expectations are set before the world runs (never concurrently with
  // calls); each rank's current (step, phase) selects which one matches.
  std::vector<std::shared_ptr<NiceMock<MockCommHooks>>> mocks;
  std::vector<int> where(static_cast<size_t>(c.world_size), -1);
  for (int rank = 0; rank < c.world_size; ++rank) {
    auto mock = std::make_shared<NiceMock<MockCommHooks>>();
    int* at = &where[static_cast<size_t>(rank)];
    auto in = [at](int step, int phase) {
      return Truly([at, step, phase](const CollectiveDesc&) { return *at == step * 3 + phase; });
    };
    EXPECT_CALL(*mock, before(_)).Times(AnyNumber());  // setup (sub-group splits)
    for (int step = 0; step < kSteps; ++step) {
      EXPECT_CALL(*mock, before(AllOf(OpIs(CollectiveOp::AllGather), in(step, kForward)))).Times(blocks + 1);
      EXPECT_CALL(*mock, before(AllOf(OpIs(CollectiveOp::ReduceScatter), in(step, kForward)))).Times(0);
      EXPECT_CALL(*mock, before(AllOf(OpIs(CollectiveOp::AllReduce), in(step, kForward)))).Times(0);
      EXPECT_CALL(*mock, before(AllOf(OpIs(CollectiveOp::AllGather), in(step, kBackward))))
          .Times(reshard_after_forward ? blocks : 0);
      EXPECT_CALL(*mock, before(AllOf(OpIs(CollectiveOp::ReduceScatter), in(step, kBackward)))).Times(blocks + 1);
      EXPECT_CALL(*mock, before(AllOf(OpIs(CollectiveOp::AllReduce), in(step, kBackward)))).Times(0);
      EXPECT_CALL(*mock, before(in(step, kOptimizer))).Times(0);
    }
    mocks.push_back(std::move(mock));
  }

  sim::WorldOptions options;
  options.world_size = c.world_size;
  options.rank_kind = c.rank_kind;
  sim::World world(options);
  auto result = world.run([&](sim::RankContext& ctx) {
    const size_t rank = static_cast<size_t>(ctx.rank());
    ProcessGroupPtr group = std::make_shared<HookedProcessGroup>(ctx.world_group(), mocks[rank]);
    ShardingSetup setup = make_sharding_setup(group, c.strategy);
    auto scenario = make_scenario(config, ctx.rank());
    fsdp::EngineOptions engine_options;
    engine_options.queue_backward_callback = sim::queue_backward_callback;
    fsdp::Engine engine(engine_options);
    scenario->shard(engine, setup);
    torch::optim::SGD optimizer(unique_parameters(*scenario->module()), torch::optim::SGDOptions(1e-2).momentum(0.9));
    for (int step = 0; step < kSteps; ++step) {
      where[rank] = step * 3 + kForward;
      optimizer.zero_grad();
      auto loss = scenario->forward_loss(scenario->input(ctx.rank(), step));
      where[rank] = step * 3 + kBackward;
      sim::backward(loss);
      where[rank] = step * 3 + kOptimizer;
      optimizer.step();
    }
    where[rank] = -1;
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
  for (auto& mock : mocks) ::testing::Mock::VerifyAndClearExpectations(mock.get());
}

INSTANTIATE_TEST_SUITE_P(
    All, CommCount,
    ::testing::Values(CommCase{"mlp_stack", ShardingStrategy::FullShard, 2, RankKind::Threads},
                      CommCase{"mlp_stack", ShardingStrategy::ShardGradOp, 2, RankKind::Threads},
                      CommCase{"mlp_stack", ShardingStrategy::FullShard, 4, RankKind::Fibers},
                      CommCase{"mlp_stack", ShardingStrategy::ShardGradOp, 3, RankKind::Fibers},
                      CommCase{"nested_wrapped", ShardingStrategy::FullShard, 2, RankKind::Threads},
                      CommCase{"nested_wrapped", ShardingStrategy::ShardGradOp, 2, RankKind::Threads},
                      CommCase{"nested_wrapped", ShardingStrategy::FullShard, 3, RankKind::Fibers},
                      CommCase{"nested_wrapped", ShardingStrategy::ShardGradOp, 4, RankKind::Fibers}),
    [](const ::testing::TestParamInfo<CommCase>& info) {
      return std::string(info.param.scenario) + "_" + short_name(info.param.strategy) + "_w" +
             std::to_string(info.param.world_size) +
             (info.param.rank_kind == RankKind::Threads ? "_threads" : "_fibers");
    });

// The parity harness's own counter agrees with the table.
TEST(CommCount, ParityReportCountsPerPhase) {
  ParityCase c = make_case(model("nested_wrapped"), ShardingStrategy::FullShard, 3);
  c.config.steps = 2;
  const ParityReport report = run_parity(c.config);
  ASSERT_TRUE(report.ok()) << report.summary();
  ASSERT_EQ(report.comm_counts.size(), 3u);
  for (const auto& per_step : report.comm_counts) {
    ASSERT_EQ(per_step.size(), 2u);
    for (const auto& counts : per_step) {
      EXPECT_EQ(counts.forward.of(CollectiveOp::AllGather), 4);
      EXPECT_EQ(counts.backward.of(CollectiveOp::AllGather), 3);
      EXPECT_EQ(counts.backward.of(CollectiveOp::ReduceScatter), 4);
      EXPECT_EQ(counts.optimizer.total(), 0);
    }
  }
}

// ---------------------------------------------------------------------------
// Reproducibility: a seeded fiber schedule gives the same trace (modulo
// wall-clock times) and bitwise the same params.

struct ReproCase {
  const char* scenario;
  ShardingStrategy strategy;
  int world_size;
};

void PrintTo(const ReproCase& c, std::ostream* out) {
  *out << c.scenario << " " << fsdp::to_string(c.strategy) << " world " << c.world_size;
}

class FsdpReproducibility : public ::testing::TestWithParam<ReproCase> {};

TEST_P(FsdpReproducibility, SeededFiberRunIsBitwiseReproducible) {
  const ReproCase& c = GetParam();
  auto run = [&] {
    ParityConfig config;
    config.scenario.name = c.scenario;
    config.strategy = c.strategy;
    config.world.world_size = c.world_size;
    config.replicate_size = 2;
    config.world.rank_kind = RankKind::Fibers;
    config.world.schedule = sim::SchedulePolicy::SeededRandom;
    config.world.seed = 1234;
    config.optimizer = OptimizerKind::Adam;
    config.zero_grad_set_to_none_alternate = true;
    config.run_reference = false;
    config.world.trace = std::make_shared<observe::TraceRecorder>(c.world_size);
    ParityReport report = run_parity(config);
    auto events = config.world.trace->events();
    for (auto& event : events) event.issue_ns = event.start_ns = event.end_ns = 0;
    return std::make_pair(std::move(report), std::move(events));
  };
  auto [first, first_events] = run();
  auto [second, second_events] = run();
  ASSERT_TRUE(first.ok()) << first.summary();
  ASSERT_TRUE(second.ok()) << second.summary();
  ASSERT_FALSE(first_events.empty());
  ASSERT_EQ(first_events.size(), second_events.size());
  for (size_t i = 0; i < first_events.size(); ++i) {
    ASSERT_TRUE(first_events[i] == second_events[i])
        << "event " << i << ": " << first_events[i].name << " " << first_events[i].detail << " on rank "
        << first_events[i].rank << " vs " << second_events[i].name << " " << second_events[i].detail << " on rank "
        << second_events[i].rank;
  }
  EXPECT_EQ(first.losses, second.losses);
  ASSERT_EQ(first.final_shards.size(), second.final_shards.size());
  for (size_t r = 0; r < first.final_shards.size(); ++r) {
    ASSERT_EQ(first.final_shards[r].size(), second.final_shards[r].size());
    for (const auto& [fqn, shard] : first.final_shards[r]) {
      EXPECT_TRUE(at::equal(shard, second.final_shards[r].at(fqn))) << "rank " << r << " " << fqn;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(All, FsdpReproducibility,
                         ::testing::Values(ReproCase{"mlp_stack", ShardingStrategy::FullShard, 4},
                                           ReproCase{"mixture_of_experts", ShardingStrategy::HybridShard, 4},
                                           ReproCase{"transformer", ShardingStrategy::ShardGradOp, 3}),
                         [](const ::testing::TestParamInfo<ReproCase>& info) {
                           return std::string(info.param.scenario) + "_" + short_name(info.param.strategy) + "_w" +
                                  std::to_string(info.param.world_size);
                         });

}  // namespace
}  // namespace fsdpsim::scenarios
