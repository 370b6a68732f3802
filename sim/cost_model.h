#pragma once
// Analytical cost model of one collective: a latency per step plus a
// bandwidth term, with the ring formulas nccl-tests' bus-bandwidth factors
// come from. Used to predict a trace's communication time at another world
// size, after calibrating latency and bandwidth against measurements
// (fit_cost_model) on the machine at hand.
//
// Sizes: S is the TOTAL size in bytes as nccl-tests defines it (all-gather:
// the output, reduce-scatter: the input, all-reduce / broadcast: the tensor;
// see total_bytes()). n is the group size. L = latency, B = link bandwidth.
// - all_gather, reduce_scatter: ring, n-1 steps of S/n each:
//     t = (n-1) * (L + S/(n B))
// - all_reduce: ring reduce-scatter then ring all-gather, 2(n-1) steps:
//     t = 2(n-1) * (L + S/(n B))
// - broadcast: binomial tree for the latency, pipelined so that the data
//     crosses each link once:  t = L * ceil(log2 n) + S/B
// - barrier: t = L * ceil(log2 n) (dissemination rounds)
// - n == 1: t = 0 (nothing moves; backends return at once).
// plus, for n > 1, a fixed overhead per collective (overhead_us, default 0):
// the part of a call that depends on neither the size nor the world (a
// kernel launch, waking a thread). In-memory ranks on one host are mostly
// overhead for small messages; a real network mostly latency and bandwidth.
//
// Shared links: on one host, in-memory ranks (or loopback processes) do not
// have a link each; their copies share the cores. With
// max_parallel_links = c > 0 at most c of the n ring links run at once, so
// the bandwidth term is multiplied by n / min(n, c). 0 means every rank has
// its own link (a real network).
//
// Thread-safety: free functions over values; no state.

#include <cstdint>
#include <string>
#include <vector>

#include "backends/process_group.h"

namespace fsdpsim::sim {

struct CostModelParams {
  /// Per-step latency, microseconds (>= 0).
  double latency_us = 5;
  /// Link bandwidth, GB/s (1e9 bytes/s, as nccl-tests counts; > 0).
  double bandwidth_gbps = 10;
  /// How many ring links can move data at once (0 = one per rank).
  int max_parallel_links = 0;
  /// Fixed cost of every collective over more than one rank, microseconds (>= 0).
  double overhead_us = 0;

  /// Throws std::invalid_argument naming the bad field.
  void validate() const;
  /// "latency 5 us, bandwidth 10 GB/s" (+ ", 2 parallel links").
  std::string to_string() const;
};

/// Named presets. Network figures are round numbers of the kind quoted for
/// the hardware (per-GPU link, NCCL-level latency); the local ones come from
/// /work/shared/reference measurements on a 2-core host.
///   nvlink-h100     latency 3 us,  450 GB/s
///   ib-ndr400       latency 8 us,  50 GB/s
///   pcie4           latency 10 us, 25 GB/s
///   ethernet-100g   latency 20 us, 12.5 GB/s
///   gloo-loopback   latency 50 us, 0.35 GB/s, 2 parallel links
///   fake-2core      latency 20 us, 6 GB/s, 2 parallel links
/// Throws std::invalid_argument listing the names for an unknown one.
CostModelParams cost_model_preset(const std::string& name);
std::vector<std::string> cost_model_preset_names();

/// Predicted time of one collective in nanoseconds (rounded). Throws
/// std::invalid_argument for bytes < 0, world_size < 1 or invalid params.
int64_t predict_ns(CollectiveOp op, int64_t bytes_total, int world_size, const CostModelParams& params);

/// S of one collective from one rank's element counts (trace fields):
/// all_gather out, reduce_scatter in, all_reduce / broadcast the tensor,
/// barrier 0. Throws std::overflow_error if it does not fit in int64.
int64_t total_bytes(CollectiveOp op, int64_t in_numel, int64_t out_numel, int64_t element_size);

/// busbw = algbw * bus_factor: all_reduce 2(n-1)/n; all_gather and
/// reduce_scatter (n-1)/n; broadcast 1; barrier 0 (it moves no data).
double bus_factor(CollectiveOp op, int world_size);

/// One measured collective: op, S, group size, time.
struct CostSample {
  CollectiveOp op = CollectiveOp::AllGather;
  int64_t bytes = 0;
  int world_size = 1;
  int64_t time_ns = 0;
};

/// The model is linear in (overhead, L, 1/B):
///   t = overhead + steps(op, n) * L + volume(op, S, n, c) / B      (n > 1)
/// fit_cost_model minimises the sum of squared RELATIVE errors
/// ((t_model - t) / t)^2, so small and large messages weigh alike, under
/// overhead >= 0, L >= 0, 1/B > 0 (the best of the least-squares solutions
/// with some of overhead and L pinned to 0 that satisfies them). Samples from
/// one world size cannot tell overhead from latency well: calibrate on two.
/// With fit_overhead false, overhead stays 0 (the plain latency-bandwidth
/// model). max_parallel_links is not fitted: it is taken from `links`.
/// Throws std::invalid_argument when the samples cannot determine the
/// bandwidth (no sample moves data, or a world of one only) or a sample is
/// invalid (time <= 0, bytes < 0, world < 1).
CostModelParams fit_cost_model(const std::vector<CostSample>& samples, int links = 0, bool fit_overhead = true);

/// Root mean square of (predicted - measured) / measured over `samples`.
double rms_relative_error(const std::vector<CostSample>& samples, const CostModelParams& params);

}  // namespace fsdpsim::sim
