// Representative ranks (WorldOptions::played_ranks, `fsdpsim run
// --representative-ranks`): a data-free world that runs one rank per class
// of shard shapes, each playing its global rank of the full world, must give
// each representative exactly the collectives (op, group, seq, sizes) and the
// simulated issue/start/end and step times of the same rank in the full
// data-free world.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "backends/errors.h"
#include "backends/observe/trace_recorder.h"
#include "scenarios/models.h"
#include "scenarios/trainer.h"
#include "sim/representative_ranks.h"
#include "sim/world.h"
#include "tools/runner.h"

namespace fsdpsim::sim {
namespace {

using ::testing::HasSubstr;

// Per global rank (empty for ranks not run): one line per collective, and the step times.
struct Played {
  std::vector<std::vector<std::string>> collectives;
  std::vector<std::vector<int64_t>> step_ns;
};

std::string describe(const observe::Record& r, bool times, int64_t t0) {
  std::string line = r.group + " seq " + std::to_string(r.seq) + " " + r.name + " " + observe::dtype_name(r.dtype) +
                     " in " + std::to_string(r.in_numel) + " out " + std::to_string(r.out_numel) + " group size " +
                     std::to_string(r.group_ranks.size());
  if (times && r.issue_ns >= t0) {
    line += " issue " + std::to_string(r.issue_ns - t0) + " start " + std::to_string(r.start_ns - t0) + " end " +
            std::to_string(r.end_ns - t0);
  }
  return line;
}

// A data-free training run of `config` on `options` (played_ranks set or not).
Played train(scenarios::TrainConfig config, WorldOptions options) {
  config.data_free = true;
  const int n = options.world_size;
  auto recorder = std::make_shared<observe::TraceRecorder>(n);
  options.trace = recorder;
  World world(options);
  Played out;
  out.step_ns.resize(n);
  std::vector<int64_t> t0(n);
  auto result = world.run([&](RankContext& ctx) {
    const int rank = ctx.played_rank();
    EXPECT_EQ(ctx.world_group()->rank(), rank);
    EXPECT_EQ(ctx.world_group()->size(), n);
    scenarios::Trainer trainer(config, rank, ctx.world_group());
    ctx.world_group()->barrier()->wait();  // times count from here (setup differs from nothing, but alike)
    t0[rank] = ctx.clock().now_ns();
    for (int step = 0; step < config.steps; ++step) {
      const int64_t start = ctx.clock().now_ns();
      trainer.step(step);
      out.step_ns[rank].push_back(ctx.clock().now_ns() - start);
    }
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
  out.collectives.resize(n);
  for (const auto& record : recorder->events()) {
    if (record.is_collective()) {
      out.collectives[record.rank].push_back(describe(record, options.simulated_time, t0[record.rank]));
    }
  }
  return out;
}

scenarios::TrainConfig mlp_stack(int dim) {
  scenarios::TrainConfig config;
  config.scenario.name = "mlp_stack";
  config.scenario.mlp_dim = dim;
  config.steps = 2;
  return config;
}

std::vector<int64_t> dim0s_of(const scenarios::TrainConfig& config) {
  std::vector<int64_t> dim0s;
  const auto scenario = scenarios::make_scenario(config.scenario, 0);
  for (const at::Tensor& p : scenarios::unique_parameters(*scenario->module())) dim0s.push_back(p.size(0));
  return dim0s;
}

// Each rank's shard sizes over the params, from LibTorch's chunk (what FSDP2
// shards with): an independent source for the classes.
std::vector<std::vector<int64_t>> shard_tuples(const std::vector<int64_t>& dim0s, int n) {
  std::vector<std::vector<int64_t>> tuples(n);
  for (int64_t d : dim0s) {
    const auto chunks = at::arange(d).chunk(n);
    for (int r = 0; r < n; ++r) tuples[r].push_back(r < static_cast<int>(chunks.size()) ? chunks[r].size(0) : 0);
  }
  return tuples;
}

void expect_matches_full_run(const scenarios::TrainConfig& config, WorldOptions options, bool times) {
  const int n = options.world_size;
  const Played full = train(config, options);
  options.played_ranks = shard_class_ranks(dim0s_of(config), n);
  ASSERT_LT(options.played_ranks.size(), static_cast<size_t>(n));
  const Played rep = train(config, options);
  for (int r = 0; r < n; ++r) {
    const bool played = std::count(options.played_ranks.begin(), options.played_ranks.end(), r) > 0;
    SCOPED_TRACE("global rank " + std::to_string(r));
    if (!played) {
      EXPECT_TRUE(rep.collectives[r].empty());
      continue;
    }
    ASSERT_FALSE(full.collectives[r].empty());
    EXPECT_EQ(rep.collectives[r], full.collectives[r]);
    if (times) EXPECT_EQ(rep.step_ns[r], full.step_ns[r]);
  }
  if (times) EXPECT_GT(full.step_ns[0][0], 0);
}

WorldOptions simulated_fibers(int n) {
  WorldOptions options;
  options.world_size = n;
  options.rank_kind = RankKind::Fibers;
  options.simulated_time = true;
  options.cost_model = cost_model_preset("ib-ndr400");
  options.compute_time = ComputeTime::Fixed;
  options.fixed_compute_ns = 7000;
  return options;
}

TEST(RepresentativeRanks, AutoPicksHoldEveryShardShapeTuple) {
  const std::vector<std::vector<int64_t>> models = {dim0s_of(mlp_stack(8)), dim0s_of(mlp_stack(24)), {7, 1, 100, 33}};
  for (const auto& dim0s : models) {
    for (int n : {1, 2, 5, 7, 13, 16, 33, 64, 101, 1000}) {
      const auto tuples = shard_tuples(dim0s, n);
      const std::vector<int> picks = shard_class_ranks(dim0s, n);
      std::set<std::vector<int64_t>> all(tuples.begin(), tuples.end()), picked;
      for (int r : picks) picked.insert(tuples.at(r));
      EXPECT_EQ(picked, all) << "world " << n;
      EXPECT_EQ(picks.front(), 0);
      EXPECT_EQ(picks.back(), n - 1);
      EXPECT_TRUE(std::is_sorted(picks.begin(), picks.end()));
      EXPECT_EQ(std::set<int>(picks.begin(), picks.end()).size(), picks.size());
      for (int r = 0; r < n; ++r) EXPECT_EQ(shard_rows(dim0s[0], r, n), tuples[r][0]);
    }
  }
  // Few classes at scale: 4 dim0s give at most 4 x 3 + 2 ranks.
  EXPECT_LE(shard_class_ranks(dim0s_of(mlp_stack(64)), 131072).size(), 14u);
}

// mlp_stack dim 8 at 13 ranks: ranks 0-7 hold a row of each weight, 8-12 none;
// the 1-row head is on rank 0 only. 5 representatives.
TEST(RepresentativeRanks, FibersGiveTheFullRunsCollectivesAndTimesAtAnOddWorld) {
  expect_matches_full_run(mlp_stack(8), simulated_fibers(13), true);
}

// dim 24 at 16 ranks: chunks of 2 rows, ranks 12-15 empty.
TEST(RepresentativeRanks, FibersGiveTheFullRunsCollectivesAndTimesAtAnEvenWorld) {
  expect_matches_full_run(mlp_stack(24), simulated_fibers(16), true);
}

TEST(RepresentativeRanks, ThreadsGiveTheFullRunsCollectives) {
  WorldOptions options;
  options.world_size = 9;
  expect_matches_full_run(mlp_stack(8), options, false);
}

TEST(RepresentativeRanks, BadPlayedRanksAreRefused) {
  WorldOptions options;
  options.world_size = 4;
  options.played_ranks = {0, 4};
  EXPECT_THAT([&] { World world(options); },
              ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("rank 4 is outside the world [0, 4)")));
  options.played_ranks = {1, 1};
  EXPECT_THAT([&] { World world(options); },
              ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("rank 1 is listed twice")));
  options.played_ranks = {0, 1};
  options.backend = CommBackend::Gloo;
  EXPECT_THAT([&] { World world(options); },
              ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("fake backend")));
}

// Data (CPU tensors) cannot be stood in for, nor can a subgroup of absent ranks.
// Fiber ranks 0 and 5 of a world of 6.
WorldOptions two_of_six() {
  WorldOptions options;
  options.world_size = 6;
  options.rank_kind = RankKind::Fibers;
  options.played_ranks = {0, 5};
  return options;
}

TEST(RepresentativeRanks, DataCollectivesAndSplitsFailClearly) {
  World world(two_of_six());
  auto result = world.run([](RankContext& ctx) {
    const auto& group = ctx.world_group();
    EXPECT_EQ(group->global_ranks().size(), 6u);
    auto meta = at::empty({2}, at::TensorOptions().device(at::kMeta));
    group->all_gather_into_tensor(at::empty({12}, meta.options()), meta)->wait();  // data-free: fine
    group->barrier()->wait();
    EXPECT_THAT([&] { group->all_reduce(at::ones({2}), {}); },
                ::testing::ThrowsMessage<CommError>(HasSubstr("must be data-free (meta tensors")));
    EXPECT_THAT(
        [&] {
          group->split({{0, 1, 2}, {3, 4, 5}});
        },
        ::testing::ThrowsMessage<CommError>(HasSubstr("which no representative plays")));
  });
  EXPECT_TRUE(result.ok()) << result.error_report();
}

// Errors name the ranks played, not their index in the World.
TEST(RepresentativeRanks, MismatchesNameThePlayedRanks) {
  World world(two_of_six());
  auto result = world.run([](RankContext& ctx) {
    auto in = at::empty({ctx.played_rank() == 5 ? 3 : 2}, at::TensorOptions().device(at::kMeta));
    ctx.world_group()->all_gather_into_tensor(at::empty({6 * in.numel()}, in.options()), in)->wait();
  });
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.ranks[1].rank, 5);
  EXPECT_THAT(result.ranks[1].error, HasSubstr("rank 5 called all_gather"));
  EXPECT_THAT(result.ranks[1].error, HasSubstr("rank 0 called all_gather"));
}

}  // namespace
}  // namespace fsdpsim::sim

namespace fsdpsim::tools {
namespace {

std::vector<std::string> data_free_args(const std::string& representatives, int n) {
  return {"--ranks",          "fibers",
          "--simulated-time", "--data-free",
          "--compute-time",   "fixed:7",
          "--world-size",     std::to_string(n),
          "--mlp-dim",        "8",
          "--steps",          "2",
          "--no-trace",       "--representative-ranks",
          representatives};
}

void expect_refused(std::vector<std::string> args, const std::string& message) {
  EXPECT_THAT([&] { parse_run_options(args).validate(); },
              ::testing::ThrowsMessage<std::invalid_argument>(::testing::HasSubstr(message)))
      << ::testing::PrintToString(args);
}

TEST(RepresentativeRanks, RunnerRefusesBadListsAndWhatBreaksSymmetry) {
  expect_refused(data_free_args("0,13", 13), "--representative-ranks: rank 13 is outside the world [0, 13)");
  expect_refused(data_free_args("0,2,2", 13), "--representative-ranks: rank 2 is listed twice");
  expect_refused(data_free_args("0,x", 13), "'x' is not a rank");
  expect_refused(data_free_args("-1", 13), "rank -1 is outside");
  expect_refused(data_free_args(",", 13), "'' is not a rank");
  expect_refused(data_free_args("", 13), "needs auto or a list of ranks");
  expect_refused({"--ranks", "fibers", "--simulated-time", "--world-size", "8", "--representative-ranks", "auto"},
                 "it needs --data-free");
  auto straggler = data_free_args("auto", 13);
  straggler.insert(straggler.end(), {"--straggler", "3:2"});
  expect_refused(straggler, "--straggler slow one rank");
  auto hsdp = data_free_args("auto", 8);
  hsdp.insert(hsdp.end(), {"--strategy", "hybrid_shard", "--mesh", "2x4"});
  expect_refused(hsdp, "plays a 1-D FSDP world");
}

// Through the CLI: the summary's predicted step time equals the full run's.
TEST(RepresentativeRanks, RunnerPredictsTheFullRunsStepTime) {
  auto predicted = [](const std::vector<std::string>& args, std::string* all) {
    std::ostringstream out, err;
    EXPECT_EQ(run_scenario(parse_run_options(args), out, err), 0) << err.str();
    *all = out.str();
    const size_t at = all->find("step time predicted");
    return at == std::string::npos ? std::string() : all->substr(at, all->find('\n', at) - at);
  };
  std::string full_out, rep_out;
  auto full_args = data_free_args("auto", 13);
  full_args.resize(full_args.size() - 2);
  const std::string full = predicted(full_args, &full_out);
  const std::string rep = predicted(data_free_args("auto", 13), &rep_out);
  ASSERT_FALSE(full.empty()) << full_out;
  EXPECT_EQ(rep, full);
  EXPECT_THAT(rep_out, ::testing::HasSubstr("ran, standing for 13 ranks (global ranks {0,"));
}

}  // namespace
}  // namespace fsdpsim::tools
