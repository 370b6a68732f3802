#include "sim/cost_model.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "backends/clock.h"

namespace fsdpsim::sim {

namespace {

// ceil(log2 n) for n >= 1.
int ceil_log2(int n) {
  int rounds = 0;
  int64_t reach = 1;
  while (reach < n) {
    reach *= 2;
    ++rounds;
  }
  return rounds;
}

// Coefficients of the linear model t = steps * L + volume * (1/B), L in ns,
// 1/B in ns per byte.
struct Terms {
  double calls = 0;  // 1 for n > 1: the fixed overhead applies
  double steps = 0;
  double volume = 0;  // bytes crossing the busiest link, shared-link multiplier applied
};

Terms terms(CollectiveOp op, int64_t bytes, int n, int links) {
  if (bytes < 0) throw std::invalid_argument("cost model: bytes must be >= 0, got " + std::to_string(bytes));
  if (n < 1) throw std::invalid_argument("cost model: world_size must be >= 1, got " + std::to_string(n));
  if (links < 0)
    throw std::invalid_argument("cost model: max_parallel_links must be >= 0, got " + std::to_string(links));
  Terms t;
  if (n == 1) return t;
  t.calls = 1;
  const double s = static_cast<double>(bytes);
  const double share = links > 0 ? static_cast<double>(n) / std::min(n, links) : 1.0;
  switch (op) {
    case CollectiveOp::AllGather:
    case CollectiveOp::ReduceScatter:
      t.steps = n - 1;
      t.volume = (n - 1) * s / n * share;
      break;
    case CollectiveOp::AllReduce:
      t.steps = 2.0 * (n - 1);
      t.volume = 2.0 * (n - 1) * s / n * share;
      break;
    case CollectiveOp::Broadcast:
      t.steps = ceil_log2(n);
      t.volume = s * share;
      break;
    case CollectiveOp::Barrier: t.steps = ceil_log2(n); break;
  }
  return t;
}

struct Preset {
  const char* name;
  CostModelParams params;
};

const std::vector<Preset>& presets() {
  static const std::vector<Preset> all = {
      {"nvlink-h100", {3, 450, 0}},     {"ib-ndr400", {8, 50, 0}},        {"pcie4", {10, 25, 0}},
      {"ethernet-100g", {20, 12.5, 0}}, {"gloo-loopback", {50, 0.35, 2}}, {"fake-2core", {20, 6, 2}},
  };
  return all;
}

}  // namespace

void CostModelParams::validate() const {
  if (!std::isfinite(latency_us) || latency_us < 0) {
    throw std::invalid_argument("cost model: latency_us must be finite and >= 0, got " + std::to_string(latency_us));
  }
  if (!std::isfinite(bandwidth_gbps) || bandwidth_gbps <= 0) {
    throw std::invalid_argument("cost model: bandwidth_gbps must be finite and > 0, got " +
                                std::to_string(bandwidth_gbps));
  }
  if (!std::isfinite(overhead_us) || overhead_us < 0) {
    throw std::invalid_argument("cost model: overhead_us must be finite and >= 0, got " + std::to_string(overhead_us));
  }
  if (max_parallel_links < 0) {
    throw std::invalid_argument("cost model: max_parallel_links must be >= 0, got " +
                                std::to_string(max_parallel_links));
  }
}

std::string CostModelParams::to_string() const {
  std::ostringstream out;
  out.precision(4);
  out << "latency " << latency_us << " us, bandwidth " << bandwidth_gbps << " GB/s";
  if (overhead_us > 0) out << ", overhead " << overhead_us << " us per collective";
  if (max_parallel_links > 0) out << ", " << max_parallel_links << " parallel links";
  return out.str();
}

CostModelParams cost_model_preset(const std::string& name) {
  for (const Preset& p : presets()) {
    if (name == p.name) return p.params;
  }
  std::string known;
  for (const auto& n : cost_model_preset_names()) known += (known.empty() ? "" : ", ") + n;
  throw std::invalid_argument("unknown cost model preset '" + name + "' (known: " + known + ")");
}

std::vector<std::string> cost_model_preset_names() {
  std::vector<std::string> names;
  for (const Preset& p : presets()) names.emplace_back(p.name);
  return names;
}

int64_t predict_ns(CollectiveOp op, int64_t bytes_total, int world_size, const CostModelParams& params) {
  params.validate();
  const Terms t = terms(op, bytes_total, world_size, params.max_parallel_links);
  const double ns =
      t.calls * us_to_ns(params.overhead_us) + t.steps * us_to_ns(params.latency_us) + t.volume / params.bandwidth_gbps;
  if (ns >= static_cast<double>(std::numeric_limits<int64_t>::max())) {
    throw std::overflow_error("cost model: predicted time does not fit in int64 nanoseconds");
  }
  return static_cast<int64_t>(std::llround(ns));
}

int64_t total_bytes(CollectiveOp op, int64_t in_numel, int64_t out_numel, int64_t element_size) {
  int64_t numel = 0;
  switch (op) {
    case CollectiveOp::AllGather: numel = out_numel; break;
    case CollectiveOp::ReduceScatter: numel = in_numel; break;
    case CollectiveOp::AllReduce:
    case CollectiveOp::Broadcast: numel = std::max(in_numel, out_numel); break;
    case CollectiveOp::Barrier: return 0;
  }
  if (numel < 0 || element_size < 0) throw std::invalid_argument("total_bytes: negative count or element size");
  if (element_size != 0 && numel > std::numeric_limits<int64_t>::max() / element_size) {
    throw std::overflow_error("total_bytes: " + std::to_string(numel) + " elements of " + std::to_string(element_size) +
                              " bytes do not fit in int64");
  }
  return numel * element_size;
}

double bus_factor(CollectiveOp op, int world_size) {
  if (world_size < 1) throw std::invalid_argument("bus_factor: world_size must be >= 1");
  const double n = world_size;
  switch (op) {
    case CollectiveOp::AllReduce: return 2 * (n - 1) / n;
    case CollectiveOp::AllGather:
    case CollectiveOp::ReduceScatter: return (n - 1) / n;
    case CollectiveOp::Broadcast: return 1;
    case CollectiveOp::Barrier: return 0;
  }
  return 0;
}

namespace {

// Least squares over the columns `use` of rows (a_i) -> 1 (already divided by
// t_i): solves the normal equations by Gaussian elimination with partial
// pivoting. Returns false when they are (near) singular.
bool solve_least_squares(const std::vector<std::array<double, 3>>& rows, const std::vector<int>& use,
                         std::array<double, 3>& x) {
  const size_t k = use.size();
  double m[3][4] = {};
  for (const auto& row : rows) {
    for (size_t i = 0; i < k; ++i) {
      for (size_t j = 0; j < k; ++j) m[i][j] += row[use[i]] * row[use[j]];
      m[i][k] += row[use[i]];
    }
  }
  // Equilibrate: the columns differ by many orders of magnitude (a count of
  // calls vs bytes moved), so scale each to unit norm before eliminating.
  double norm[3] = {};
  for (size_t i = 0; i < k; ++i) {
    if (!(m[i][i] > 0)) return false;  // a column of zeros: the parameter is undetermined
    norm[i] = std::sqrt(m[i][i]);
  }
  for (size_t i = 0; i < k; ++i) {
    for (size_t j = 0; j < k; ++j) m[i][j] /= norm[i] * norm[j];
    m[i][k] /= norm[i];
  }
  for (size_t c = 0; c < k; ++c) {
    size_t pivot = c;
    for (size_t r = c + 1; r < k; ++r) {
      if (std::fabs(m[r][c]) > std::fabs(m[pivot][c])) pivot = r;
    }
    // Unit diagonal to start with: (near) collinear columns leave ~0 here.
    if (std::fabs(m[pivot][c]) <= 1e-10) return false;
    for (size_t j = 0; j <= k; ++j) std::swap(m[c][j], m[pivot][j]);
    for (size_t r = 0; r < k; ++r) {
      if (r == c) continue;
      const double f = m[r][c] / m[c][c];
      for (size_t j = c; j <= k; ++j) m[r][j] -= f * m[c][j];
    }
  }
  x = {0, 0, 0};
  for (size_t i = 0; i < k; ++i) x[use[i]] = m[i][k] / m[i][i] / norm[i];
  return true;
}

}  // namespace

CostModelParams fit_cost_model(const std::vector<CostSample>& samples, int links, bool fit_overhead) {
  if (links < 0) throw std::invalid_argument("fit_cost_model: links must be >= 0");
  // Columns: 0 overhead (ns), 1 latency (ns), 2 ns per byte; weights 1/t^2.
  std::vector<std::array<double, 3>> rows;
  bool moves_data = false;
  for (const CostSample& s : samples) {
    if (s.time_ns <= 0) throw std::invalid_argument("fit_cost_model: sample time must be > 0");
    const Terms t = terms(s.op, s.bytes, s.world_size, links);
    const double inv = 1.0 / static_cast<double>(s.time_ns);
    rows.push_back({t.calls * inv, t.steps * inv, t.volume * inv});
    if (t.volume > 0) moves_data = true;
  }
  if (!moves_data) {
    throw std::invalid_argument(
        "fit_cost_model: the bandwidth is undetermined: no sample moves data over more than one rank");
  }
  // Non-negative least squares by enumeration: the bandwidth column always,
  // overhead and latency each free or pinned to 0; the feasible solution
  // with the smallest residual wins.
  std::vector<std::vector<int>> subsets = {{1, 2}, {2}};
  if (fit_overhead) subsets = {{0, 1, 2}, {1, 2}, {0, 2}, {2}};
  bool found = false;
  std::array<double, 3> best{};
  double best_residual = std::numeric_limits<double>::infinity();
  for (const auto& use : subsets) {
    std::array<double, 3> x{};
    if (!solve_least_squares(rows, use, x)) continue;
    if (x[0] < 0 || x[1] < 0 || !(x[2] > 0)) continue;
    double residual = 0;
    for (const auto& row : rows) {
      const double e = row[0] * x[0] + row[1] * x[1] + row[2] * x[2] - 1;
      residual += e * e;
    }
    // Subsets go from most to fewest free parameters; a smaller one can only
    // win when the larger ones were infeasible.
    if (!found || residual < best_residual * (1 - 1e-9)) {
      found = true;
      best = x;
      best_residual = residual;
    }
  }
  if (!found || !std::isfinite(best[2])) {
    throw std::invalid_argument("fit_cost_model: the measured times do not grow with the size moved");
  }
  CostModelParams params;
  params.overhead_us = ns_to_us(best[0]);
  params.latency_us = ns_to_us(best[1]);
  params.bandwidth_gbps = 1.0 / best[2];
  params.max_parallel_links = links;
  return params;
}

double rms_relative_error(const std::vector<CostSample>& samples, const CostModelParams& params) {
  if (samples.empty()) return 0;
  double sum = 0;
  for (const CostSample& s : samples) {
    if (s.time_ns <= 0) throw std::invalid_argument("rms_relative_error: sample time must be > 0");
    const double predicted = static_cast<double>(predict_ns(s.op, s.bytes, s.world_size, params));
    const double e = (predicted - static_cast<double>(s.time_ns)) / static_cast<double>(s.time_ns);
    sum += e * e;
  }
  return std::sqrt(sum / static_cast<double>(samples.size()));
}

}  // namespace fsdpsim::sim
