#include "sim/testing/world_fixture.h"

namespace fsdpsim::testing {

void PrintTo(const WorldParam& param, std::ostream* out) {
  *out << sim::to_string(param.rank_kind) << " x " << param.world_size;
}

::testing::internal::ParamGenerator<WorldParam> WorldParams(const std::vector<sim::RankKind>& kinds,
                                                            const std::vector<int>& sizes) {
  std::vector<WorldParam> params;
  for (sim::RankKind kind : kinds) {
    for (int size : sizes) params.push_back(WorldParam{kind, size});
  }
  return ::testing::ValuesIn(params);
}

std::string WorldParamName(const ::testing::TestParamInfo<WorldParam>& info) {
  return std::string(sim::to_string(info.param.rank_kind)) + std::to_string(info.param.world_size);
}

::testing::AssertionResult RanksSucceeded(const sim::WorldResult& result) {
  if (result.ok()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "ranks failed:\n" << result.error_report();
}

sim::WorldOptions WorldTest::options() const {
  sim::WorldOptions o;
  o.world_size = world_size();
  o.rank_kind = rank_kind();
  o.collective_timeout = std::chrono::milliseconds(20000);
  return o;
}

sim::WorldResult WorldTest::run_ranks(const std::function<void(sim::RankContext&)>& body) const {
  return run_ranks(options(), body);
}

sim::WorldResult WorldTest::run_ranks(const sim::WorldOptions& options,
                                      const std::function<void(sim::RankContext&)>& body) const {
  sim::World world(options);
  return world.run(body);
}

}  // namespace fsdpsim::testing
