// The collective cost model: the ring / tree formulas with exact numbers,
// nccl-tests' size and bus-bandwidth definitions, presets, and the fit
// recovering known parameters from synthetic measurements.

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "sim/cost_model.h"

namespace fsdpsim::sim {
namespace {

CostModelParams params(double latency_us, double bandwidth_gbps, int links = 0, double overhead_us = 0) {
  CostModelParams p;
  p.latency_us = latency_us;
  p.bandwidth_gbps = bandwidth_gbps;
  p.max_parallel_links = links;
  p.overhead_us = overhead_us;
  return p;
}

constexpr CollectiveOp kAllOps[] = {CollectiveOp::AllGather, CollectiveOp::ReduceScatter, CollectiveOp::AllReduce,
                                    CollectiveOp::Broadcast, CollectiveOp::Barrier};

TEST(CostModel, RingFormulasGiveExactTimes) {
  const CostModelParams p = params(5, 10);  // 5 us per step, 10 GB/s = 10 bytes/ns
  const int64_t s = 4'000'000;
  // (n-1) * (L + S/(nB)) = 3 * (5000 + 100000)
  EXPECT_EQ(predict_ns(CollectiveOp::AllGather, s, 4, p), 315'000);
  EXPECT_EQ(predict_ns(CollectiveOp::ReduceScatter, s, 4, p), 315'000);
  // 2(n-1) * (L + S/(nB))
  EXPECT_EQ(predict_ns(CollectiveOp::AllReduce, s, 4, p), 630'000);
  // L * ceil(log2 n) + S/B
  EXPECT_EQ(predict_ns(CollectiveOp::Broadcast, s, 4, p), 410'000);
  EXPECT_EQ(predict_ns(CollectiveOp::Broadcast, s, 5, p), 415'000);
  EXPECT_EQ(predict_ns(CollectiveOp::Barrier, 0, 8, p), 15'000);
  EXPECT_EQ(predict_ns(CollectiveOp::Barrier, 0, 9, p), 20'000);
  EXPECT_EQ(predict_ns(CollectiveOp::AllGather, 0, 2, p), 5'000);  // latency only
  EXPECT_EQ(predict_ns(CollectiveOp::AllGather, s, 2, p), 5'000 + 200'000);
}

TEST(CostModel, WorldOfOneCostsNothing) {
  const CostModelParams p = params(5, 10, 2, 7);
  for (CollectiveOp op : kAllOps) EXPECT_EQ(predict_ns(op, 1 << 20, 1, p), 0) << to_string(op);
}

TEST(CostModel, SharedLinksAndOverhead) {
  // 2 links for 4 ranks: the bandwidth term doubles; overhead adds once.
  const CostModelParams p = params(5, 10, 2, 2);
  EXPECT_EQ(predict_ns(CollectiveOp::AllGather, 4'000'000, 4, p), 2'000 + 15'000 + 600'000);
  EXPECT_EQ(predict_ns(CollectiveOp::AllReduce, 4'000'000, 4, p), 2'000 + 30'000 + 1'200'000);
  // As many links as ranks: no sharing.
  EXPECT_EQ(predict_ns(CollectiveOp::AllGather, 4'000'000, 2, params(5, 10, 2)), 205'000);
  EXPECT_EQ(predict_ns(CollectiveOp::Barrier, 0, 4, p), 2'000 + 10'000);
}

TEST(CostModel, RejectsInvalidInput) {
  const CostModelParams p = params(5, 10);
  EXPECT_THROW(predict_ns(CollectiveOp::AllGather, -1, 4, p), std::invalid_argument);
  EXPECT_THROW(predict_ns(CollectiveOp::AllGather, 16, 0, p), std::invalid_argument);
  EXPECT_THROW(predict_ns(CollectiveOp::AllGather, 16, 4, params(5, 0)), std::invalid_argument);
  EXPECT_THROW(predict_ns(CollectiveOp::AllGather, 16, 4, params(-1, 10)), std::invalid_argument);
  EXPECT_THROW(predict_ns(CollectiveOp::AllGather, 16, 4, params(std::nan(""), 10)), std::invalid_argument);
  EXPECT_THROW(predict_ns(CollectiveOp::AllGather, 16, 4, params(5, 10, -1)), std::invalid_argument);
  EXPECT_THROW(predict_ns(CollectiveOp::AllGather, 16, 4, params(5, 10, 0, -3)), std::invalid_argument);
  EXPECT_THROW(predict_ns(CollectiveOp::Broadcast, std::numeric_limits<int64_t>::max(), 4, params(5, 1e-9)),
               std::overflow_error);
}

TEST(CostModel, TotalBytesAndBusFactorFollowNcclTests) {
  EXPECT_EQ(total_bytes(CollectiveOp::AllGather, 4, 16, 4), 64);
  EXPECT_EQ(total_bytes(CollectiveOp::ReduceScatter, 16, 4, 4), 64);
  EXPECT_EQ(total_bytes(CollectiveOp::AllReduce, 10, 10, 2), 20);
  EXPECT_EQ(total_bytes(CollectiveOp::Broadcast, 3, 3, 8), 24);
  EXPECT_EQ(total_bytes(CollectiveOp::Barrier, 0, 0, 4), 0);
  EXPECT_THROW(total_bytes(CollectiveOp::AllReduce, int64_t{1} << 62, int64_t{1} << 62, 4), std::overflow_error);

  EXPECT_DOUBLE_EQ(bus_factor(CollectiveOp::AllReduce, 4), 1.5);
  EXPECT_DOUBLE_EQ(bus_factor(CollectiveOp::AllGather, 4), 0.75);
  EXPECT_DOUBLE_EQ(bus_factor(CollectiveOp::ReduceScatter, 8), 0.875);
  EXPECT_DOUBLE_EQ(bus_factor(CollectiveOp::Broadcast, 8), 1.0);
  EXPECT_DOUBLE_EQ(bus_factor(CollectiveOp::Barrier, 8), 0.0);
  EXPECT_DOUBLE_EQ(bus_factor(CollectiveOp::AllReduce, 1), 0.0);
}

TEST(CostModel, PresetsResolveAndUnknownNamesListTheKnownOnes) {
  const auto names = cost_model_preset_names();
  ASSERT_EQ(names.size(), 6u);
  for (const auto& name : names) EXPECT_NO_THROW(cost_model_preset(name).validate()) << name;
  EXPECT_DOUBLE_EQ(cost_model_preset("nvlink-h100").bandwidth_gbps, 450);
  EXPECT_EQ(cost_model_preset("fake-2core").max_parallel_links, 2);
  try {
    cost_model_preset("infiniband");
    FAIL() << "expected an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("unknown cost model preset 'infiniband' (known: nvlink-h100, ib-ndr400"),
              std::string::npos)
        << e.what();
  }
}

// Synthetic samples: every op, sizes 1 KiB .. 64 MiB, worlds 2, 4, 8.
std::vector<CostSample> synthetic(const CostModelParams& p, double noise = 0) {
  std::vector<CostSample> samples;
  uint64_t state = 12345;
  for (int n : {2, 4, 8}) {
    for (CollectiveOp op : kAllOps) {
      for (int64_t bytes = 1024; bytes <= (int64_t{64} << 20); bytes *= 8) {
        CostSample s;
        s.op = op;
        s.bytes = op == CollectiveOp::Barrier ? 0 : bytes;
        s.world_size = n;
        double t = static_cast<double>(predict_ns(op, s.bytes, n, p));
        if (noise > 0) {
          state = state * 6364136223846793005ULL + 1442695040888963407ULL;
          const double u = static_cast<double>(state >> 11) / static_cast<double>(uint64_t{1} << 53);  // [0, 1)
          t *= 1 + noise * (2 * u - 1);
        }
        s.time_ns = static_cast<int64_t>(std::llround(t));
        samples.push_back(s);
        if (op == CollectiveOp::Barrier) break;
      }
    }
  }
  return samples;
}

TEST(CostModel, FitRecoversLatencyAndBandwidth) {
  const CostModelParams truth = params(7.5, 3.2);
  const CostModelParams fit = fit_cost_model(synthetic(truth), 0, /*fit_overhead=*/false);
  EXPECT_NEAR(fit.latency_us, 7.5, 7.5 * 1e-4);
  EXPECT_NEAR(fit.bandwidth_gbps, 3.2, 3.2 * 1e-4);
  EXPECT_EQ(fit.max_parallel_links, 0);
  EXPECT_DOUBLE_EQ(fit.overhead_us, 0);
  EXPECT_LT(rms_relative_error(synthetic(truth), fit), 1e-4);
}

TEST(CostModel, FitRecoversOverheadWithSharedLinks) {
  const CostModelParams truth = params(3, 6, 2, 20);
  const CostModelParams fit = fit_cost_model(synthetic(truth), 2);
  EXPECT_NEAR(fit.overhead_us, 20, 20 * 1e-3);
  EXPECT_NEAR(fit.latency_us, 3, 3 * 1e-3);
  EXPECT_NEAR(fit.bandwidth_gbps, 6, 6 * 1e-4);
  EXPECT_EQ(fit.max_parallel_links, 2);
}

TEST(CostModel, FitWithoutOverheadInTheDataFindsNone) {
  const CostModelParams truth = params(12, 0.35, 2);
  const CostModelParams fit = fit_cost_model(synthetic(truth), 2);
  EXPECT_NEAR(fit.overhead_us, 0, 1e-3);
  EXPECT_NEAR(fit.latency_us, 12, 12 * 1e-3);
  EXPECT_NEAR(fit.bandwidth_gbps, 0.35, 0.35 * 1e-4);
}

TEST(CostModel, FitToleratesNoise) {
  const CostModelParams truth = params(10, 5);
  const auto noisy = synthetic(truth, 0.05);
  const CostModelParams fit = fit_cost_model(noisy, 0, false);
  EXPECT_NEAR(fit.latency_us, 10, 10 * 0.1);
  EXPECT_NEAR(fit.bandwidth_gbps, 5, 5 * 0.1);
  EXPECT_LT(rms_relative_error(noisy, fit), 0.05);
}

TEST(CostModel, OneSampleFitsBandwidthWithZeroLatency) {
  CostSample s;
  s.op = CollectiveOp::AllGather;
  s.bytes = 4'000'000;
  s.world_size = 4;
  s.time_ns = 300'000;  // (3/4) * 4e6 bytes in 300 us = 10 GB/s
  const CostModelParams fit = fit_cost_model({s});
  EXPECT_DOUBLE_EQ(fit.latency_us, 0);
  EXPECT_DOUBLE_EQ(fit.overhead_us, 0);
  EXPECT_NEAR(fit.bandwidth_gbps, 10, 1e-9);
}

TEST(CostModel, FitRefusesSamplesThatCannotDetermineTheBandwidth) {
  CostSample barrier;
  barrier.op = CollectiveOp::Barrier;
  barrier.world_size = 4;
  barrier.time_ns = 1000;
  EXPECT_THROW(fit_cost_model({barrier}), std::invalid_argument);
  CostSample alone;
  alone.op = CollectiveOp::AllGather;
  alone.bytes = 1 << 20;
  alone.world_size = 1;
  alone.time_ns = 1000;
  EXPECT_THROW(fit_cost_model({alone}), std::invalid_argument);
  EXPECT_THROW(fit_cost_model({}), std::invalid_argument);
  CostSample zero = alone;
  zero.world_size = 4;
  zero.time_ns = 0;
  EXPECT_THROW(fit_cost_model({zero}), std::invalid_argument);
}

}  // namespace
}  // namespace fsdpsim::sim
