#pragma once
// One scenario parity case for value-parameterised tests: which scenario,
// where (rank kind, world size), how it is sharded, which optimiser; and the
// check every such test makes (scenarios::run_parity: bitwise against the
// DDP-semantics reference, a loss row per rank).
//
// Thread-safety: plain values and functions; call from the test's thread.

#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "fsdp/fully_shard.h"
#include "scenarios/parity.h"
#include "scenarios/trainer.h"
#include "sim/world.h"

namespace fsdpsim::parity_cases {

struct ScenarioCase {
  std::string scenario;
  sim::RankKind rank_kind;
  int world_size;
  fsdp::ShardingStrategy strategy;
  scenarios::OptimizerKind optimizer = scenarios::OptimizerKind::SGD;
};

/// A test name: scenario_kind_world_strategy_optimiser.
inline std::string case_name(const ScenarioCase& c) {
  return c.scenario + "_" + sim::to_string(c.rank_kind) + "_" + std::to_string(c.world_size) + "_" +
         fsdp::to_string(c.strategy) + "_" + scenarios::to_string(c.optimizer);
}

/// Trains `c` for `steps` steps with the feature `enable` sets on the config
/// and expects parity on every rank.
inline void expect_parity(const ScenarioCase& c, const std::function<void(scenarios::ParityConfig&)>& enable,
                          int steps = 3) {
  scenarios::ParityConfig config;
  config.scenario.name = c.scenario;
  config.strategy = c.strategy;
  config.optimizer = c.optimizer;
  config.steps = steps;
  config.world.world_size = c.world_size;
  config.world.rank_kind = c.rank_kind;
  enable(config);
  const scenarios::ParityReport report = scenarios::run_parity(config);
  EXPECT_TRUE(report.ok()) << report.summary();
  ASSERT_EQ(report.losses.size(), static_cast<size_t>(c.world_size));
}

}  // namespace fsdpsim::parity_cases
