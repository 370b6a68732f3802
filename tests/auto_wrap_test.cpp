// fsdp::apply_fully_shard (fsdp/auto_wrap.h): the units a policy picks.
// - Each scenario's policy makes exactly its hand-listed units (same
//   modules, same order, same params), and training through them keeps
//   bitwise parity with the unsharded reference (threads and fibers, odd
//   worlds).
// - wrap_by_size picks what FSDP1's size_based_auto_wrap_policy picks: the
//   expected units come from a transcription of FSDP1's `_recursive_wrap`
//   (torch/distributed/fsdp/wrap.py) in this file, which counts params
//   itself and never asks the engine.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "fsdp/auto_wrap.h"
#include "fsdp/fully_shard.h"
#include "scenarios/models.h"
#include "scenarios/parity.h"
#include "scenarios/trainer.h"
#include "sim/world.h"
#include "tests/parity_case.h"

namespace fsdpsim::fsdp {
namespace {

using scenarios::ParityConfig;
using scenarios::ScenarioConfig;
using scenarios::TrainConfig;
using scenarios::Trainer;
using sim::RankKind;

// The scenarios whose units one options value describes (not
// mixture_of_experts, whose expert unit has a group of its own, nor
// rank_divergent, whose block unit reduces unused params).
const std::vector<std::string> kWrappableScenarios = {"nested_wrapped",       "always_wrap_nested", "transformer",
                                                      "non_uniform_req_grad", "double_linear",      "mlp_stack",
                                                      "uneven_shapes"};

// Unit FQNs (once a forward found the root) and each unit's param FQNs.
std::vector<std::pair<std::string, std::vector<std::string>>> units_of(const Engine& engine) {
  std::vector<std::pair<std::string, std::vector<std::string>>> units;
  for (const Unit* unit : engine.units()) units.emplace_back(unit->fqn(), unit->param_fqns());
  return units;
}

TEST(AutoWrap, ScenarioPoliciesMakeTheHandListedUnits) {
  for (const std::string& name : kWrappableScenarios) {
    SCOPED_TRACE(name);
    TrainConfig hand;
    hand.scenario.name = name;
    TrainConfig automatic = hand;
    automatic.auto_wrap = true;
    sim::WorldOptions options;
    options.world_size = 3;
    std::vector<std::pair<std::string, std::vector<std::string>>> hand_units, auto_units;
    sim::World(options)
        .run([&](sim::RankContext& ctx) {
          Trainer by_hand(hand, ctx.rank(), ctx.world_group());
          Trainer by_policy(automatic, ctx.rank(), ctx.world_group());
          by_hand.step(0);
          by_policy.step(0);
          if (ctx.rank() != 0) return;
          hand_units = units_of(*by_hand.engine());
          auto_units = units_of(*by_policy.engine());
        })
        .throw_if_failed();
    ASSERT_GE(hand_units.size(), 3u);
    EXPECT_EQ(auto_units, hand_units);
    EXPECT_EQ(hand_units.back().first, "");  // the root last
  }
}

TEST(AutoWrap, ScenarioWithoutAPolicyIsRefused) {
  TrainConfig config;
  config.scenario.name = "mixture_of_experts";
  config.auto_wrap = true;
  sim::WorldOptions options;
  options.world_size = 2;
  sim::WorldResult result =
      sim::World(options).run([&](sim::RankContext& ctx) { Trainer trainer(config, ctx.rank(), ctx.world_group()); });
  ASSERT_FALSE(result.ranks[0].error.empty());
  EXPECT_NE(result.ranks[0].error.find("mixture_of_experts has no wrap policy"), std::string::npos)
      << result.ranks[0].error;
}

using parity_cases::ScenarioCase;

class AutoWrapParity : public ::testing::TestWithParam<ScenarioCase> {};

TEST_P(AutoWrapParity, MatchesTheDdpReferenceBitwise) {
  parity_cases::expect_parity(GetParam(), [](ParityConfig& config) { config.auto_wrap = true; });
}

std::vector<ScenarioCase> auto_wrap_parity_cases() {
  std::vector<ScenarioCase> cases;
  for (const std::string& name : kWrappableScenarios) {
    cases.push_back({name, RankKind::Threads, 3, ShardingStrategy::FullShard});
    cases.push_back({name, RankKind::Fibers, 5, ShardingStrategy::FullShard});
  }
  cases.push_back({"transformer", RankKind::Threads, 3, ShardingStrategy::ShardGradOp});
  cases.push_back({"mlp_stack", RankKind::Fibers, 3, ShardingStrategy::NoShard});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Scenarios, AutoWrapParity, ::testing::ValuesIn(auto_wrap_parity_cases()),
                         [](const ::testing::TestParamInfo<ScenarioCase>& info) {
                           return parity_cases::case_name(info.param);
                         });

// ---------------------------------------------------------------------------
// The size policy against FSDP1.

// FSDP1's `_recursive_wrap` with size_based_auto_wrap_policy, transcribed:
// the count of a module's params not yet in a wrapped module (each once),
// taken before its children recurse; recurse if large and not a forced leaf;
// the remainder (that count minus what the children wrapped) decides the
// module, unless it is an excluded container. The root only wraps children
// (FSDP1's only_wrap_children=True: its constructor wraps the root).
class Fsdp1SizeWrap {
 public:
  explicit Fsdp1SizeWrap(int64_t min_num_params) : min_(min_num_params) {}

  std::vector<std::string> wrapped_under(const torch::nn::Module& root) {
    recursive_wrap(root, "", /*only_wrap_children=*/true);
    return wrapped_;
  }

 private:
  // Returns the params it wrapped (FSDP1's second return value).
  int64_t recursive_wrap(const torch::nn::Module& module, const std::string& fqn, bool only_wrap_children) {
    int64_t nonwrapped = 0;
    std::unordered_set<const c10::TensorImpl*> seen;
    for (const auto& p : module.parameters()) {
      if (flattened_.count(p.unsafeGetTensorImpl()) || !seen.insert(p.unsafeGetTensorImpl()).second) continue;
      nonwrapped += p.numel();
    }
    const bool large = nonwrapped >= min_;
    if (!(large && module.name() != "torch::nn::MultiheadAttention")) return 0;
    int64_t total_wrapped = 0;
    for (const auto& child : module.named_children()) {
      total_wrapped += recursive_wrap(*child.value(), fqn.empty() ? child.key() : fqn + "." + child.key(), false);
    }
    const int64_t remainder = nonwrapped - total_wrapped;
    const bool excluded = module.name() == "torch::nn::ModuleListImpl" || module.name() == "torch::nn::ModuleDictImpl";
    if (!only_wrap_children && remainder >= min_ && !excluded) {
      wrapped_.push_back(fqn);
      for (const auto& p : module.parameters()) flattened_.insert(p.unsafeGetTensorImpl());
      return nonwrapped;
    }
    return total_wrapped;
  }

  int64_t min_;
  std::vector<std::string> wrapped_;
  std::unordered_set<const c10::TensorImpl*> flattened_;
};

// Runs `body` on one fake rank (fully_shard needs a group).
template <typename Body>
void on_one_rank(Body body) {
  sim::WorldOptions options;
  options.world_size = 1;
  sim::World(options).run([&](sim::RankContext& ctx) { body(ctx.world_group()); }).throw_if_failed();
}

// The FQNs (from the root) of `modules`.
std::vector<std::string> fqns_of(const torch::nn::Module& root,
                                 const std::vector<std::shared_ptr<torch::nn::Module>>& modules) {
  std::unordered_map<const torch::nn::Module*, std::string> names;
  for (const auto& item : root.named_modules()) names.emplace(item.value().get(), item.key());
  std::vector<std::string> result;
  for (const auto& module : modules) result.push_back(names.at(module.get()));
  return result;
}

std::vector<std::string> size_wrapped(const std::string& scenario, int64_t min_num_params,
                                      const ProcessGroupPtr& group) {
  ScenarioConfig config;
  config.name = scenario;
  auto model = scenarios::make_scenario(config, 0);
  Engine engine;
  FullyShardOptions options;
  options.shard_group = group;
  SizeWrapOptions size;
  size.min_num_params = min_num_params;
  return fqns_of(*model->module(), apply_fully_shard(engine, model->module(), options, wrap_by_size(size)));
}

TEST(AutoWrapBySize, PicksWhatFsdp1SizeBasedPolicyPicks) {
  on_one_rank([](const ProcessGroupPtr& group) {
    for (const std::string name : {"mlp_stack", "transformer", "nested_wrapped", "uneven_shapes"}) {
      for (int64_t min_num_params : {0, 1, 100, 500, 800, 1000, 1200, 1600, 2200, 3000, 5000, 9000, 100000}) {
        SCOPED_TRACE(name + " min_num_params " + std::to_string(min_num_params));
        ScenarioConfig config;
        config.name = name;
        auto model = scenarios::make_scenario(config, 0);
        std::vector<std::string> expected = Fsdp1SizeWrap(min_num_params).wrapped_under(*model->module());
        expected.push_back("");  // apply_fully_shard wraps the root last, as FSDP1's constructor does
        EXPECT_EQ(size_wrapped(name, min_num_params, group), expected);
      }
    }
  });
}

// One threshold worked by hand: mlp_stack at dim 16 holds MLP(16, 3)
// (in_proj 48x16 + 48 = 816, out_proj 16x48 + 16 = 784: 1600), MLP(16, 4)
// (1088 + 1040 = 2128), MLP(16, 3) and a LayerNorm (32). At 1000: the first
// MLP's linears are too small alone, so the MLP takes them; the second's are
// each large enough, so they are units and leave it nothing.
TEST(AutoWrapBySize, MlpStackAtOneThousandByHand) {
  on_one_rank([](const ProcessGroupPtr& group) {
    EXPECT_EQ(size_wrapped("mlp_stack", 1000, group),
              (std::vector<std::string>{"0", "1.in_proj", "1.out_proj", "2", ""}));
  });
}

// The transformer's attention is a forced leaf (never a unit of its own,
// nor is anything inside it) and its ModuleLists are never units: with the
// threshold one above an encoder layer's size, the encoder's ModuleList of
// two layers would qualify, and the encoder above it takes them instead.
TEST(AutoWrapBySize, ForcedLeavesAndContainersAreNotUnits) {
  on_one_rank([](const ProcessGroupPtr& group) {
    ScenarioConfig config;
    config.name = "transformer";
    auto model = scenarios::make_scenario(config, 0);
    auto numel = [&](const std::string& fqn) {
      int64_t total = 0;
      for (const auto& p : model->module()->named_modules()[fqn]->parameters()) total += p.numel();
      return total;
    };
    const int64_t layer = numel("transformer.encoder.layers.0");
    const std::vector<std::string> small = size_wrapped("transformer", 1, group);
    ASSERT_EQ(model->module()->named_modules()["transformer.encoder.layers.0.self_attn"]->name(),
              "torch::nn::MultiheadAttention");  // the name LibTorch gives it (not its class's)
    for (const std::string& fqn : small) EXPECT_EQ(fqn.find("attn"), std::string::npos) << fqn;
    EXPECT_NE(std::find(small.begin(), small.end(), "transformer.encoder.layers.0.linear1"), small.end());
    const std::vector<std::string> mid = size_wrapped("transformer", layer + 1, group);
    const std::set<std::string> mid_set(mid.begin(), mid.end());
    EXPECT_FALSE(mid_set.count("transformer.encoder.layers"));
    EXPECT_FALSE(mid_set.count("transformer.encoder.layers.0"));
    EXPECT_TRUE(mid_set.count("transformer.encoder"));
  });
}

TEST(AutoWrap, ModulesAlreadyUnitsAreSkippedAndTheRootWrappedOnce) {
  on_one_rank([](const ProcessGroupPtr& group) {
    ScenarioConfig config;
    config.name = "mlp_stack";
    auto model = scenarios::make_scenario(config, 0);
    Engine engine;
    FullyShardOptions options;
    options.shard_group = group;
    auto first = model->module()->named_children()["0"];
    engine.fully_shard(first, options);
    auto all = wrap_modules_where([](const torch::nn::Module&, const std::string&) { return true; });
    const auto wrapped = apply_fully_shard(engine, model->module(), options, all);
    // "0" and everything inside it were a unit already: not looked into.
    EXPECT_EQ(fqns_of(*model->module(), wrapped),
              (std::vector<std::string>{"1.in_proj", "1.out_proj", "1", "2.in_proj", "2.out_proj", "2", "3", ""}));
    EXPECT_TRUE(apply_fully_shard(engine, model->module(), options, all).empty());
  });
}

TEST(AutoWrap, BadArgumentsAreRefused) {
  on_one_rank([](const ProcessGroupPtr& group) {
    Engine engine;
    FullyShardOptions options;
    options.shard_group = group;
    auto model = std::make_shared<torch::nn::LinearImpl>(2, 2);
    EXPECT_THROW(apply_fully_shard(engine, model, options, nullptr), std::invalid_argument);
    EXPECT_THROW(apply_fully_shard(engine, nullptr, options, wrap_by_size({})), std::invalid_argument);
    EXPECT_THROW(wrap_modules_where({}), std::invalid_argument);
    EXPECT_THROW(wrap_module_types(std::set<std::string>{}), std::invalid_argument);
    SizeWrapOptions negative;
    negative.min_num_params = -1;
    EXPECT_THROW(wrap_by_size(negative), std::invalid_argument);
  });
}

}  // namespace
}  // namespace fsdpsim::fsdp
