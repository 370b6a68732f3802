#pragma once
// A parameterised GoogleTest fixture over worlds of fake-backend ranks: each
// test runs a per-rank body under every (rank kind, world size) it is
// instantiated with.
//
//   class MyTest : public fsdpsim::testing::WorldTest {};
//   TEST_P(MyTest, AllReduceSums) {
//     auto result = run_ranks([](sim::RankContext& ctx) { ... });
//     EXPECT_TRUE(RanksSucceeded(result));
//   }
//   INSTANTIATE_TEST_SUITE_P(All, MyTest, WorldParams({sim::RankKind::Threads, sim::RankKind::Fibers}, {2, 3, 4}),
//                            WorldParamName);
//
// Thread-safety: the fixture's methods run on the test's thread; the body
// runs once per rank, concurrently on thread ranks, so it may touch shared
// state only per rank (index by ctx.rank()) or under a lock.

#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "sim/world.h"

namespace fsdpsim::testing {

/// One world shape a WorldTest runs under.
struct WorldParam {
  sim::RankKind rank_kind = sim::RankKind::Threads;
  int world_size = 1;
};

void PrintTo(const WorldParam& param, std::ostream* out);

/// Every (kind, size) pair, kinds outermost: the generator for INSTANTIATE_TEST_SUITE_P.
::testing::internal::ParamGenerator<WorldParam> WorldParams(const std::vector<sim::RankKind>& kinds,
                                                            const std::vector<int>& sizes);

/// Test-name suffix: "threads4", "fibers2".
std::string WorldParamName(const ::testing::TestParamInfo<WorldParam>& info);

/// Success, or a failure message listing every failed rank's error.
::testing::AssertionResult RanksSucceeded(const sim::WorldResult& result);

/// One object per rank (a mock each: GoogleMock expectations are per object).
template <typename T>
std::vector<std::shared_ptr<T>> make_per_rank(int world_size) {
  std::vector<std::shared_ptr<T>> objects;
  for (int r = 0; r < world_size; ++r) objects.push_back(std::make_shared<T>());
  return objects;
}

class WorldTest : public ::testing::TestWithParam<WorldParam> {
 protected:
  sim::RankKind rank_kind() const { return GetParam().rank_kind; }
  int world_size() const { return GetParam().world_size; }

  /// The parameter's world on the fake backend, with a collective timeout
  /// that tolerates a loaded machine (20 s); adjust the copy before run_ranks.
  sim::WorldOptions options() const;

  /// Runs `body` on every rank of a World built from `options` (default:
  /// options()) and returns every rank's outcome.
  sim::WorldResult run_ranks(const std::function<void(sim::RankContext&)>& body) const;
  sim::WorldResult run_ranks(const sim::WorldOptions& options,
                             const std::function<void(sim::RankContext&)>& body) const;

  /// make_per_rank for this world's size.
  template <typename T>
  std::vector<std::shared_ptr<T>> per_rank() const {
    return make_per_rank<T>(world_size());
  }
};

}  // namespace fsdpsim::testing
