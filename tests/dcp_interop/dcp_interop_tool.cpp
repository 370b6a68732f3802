// The C++ half of the DCP interop test (dcp_interop.py runs both halves):
//   dcp_interop_tool save DIR WORLD    fake thread ranks save the pattern
//   dcp_interop_tool check DIR WORLD   load at WORLD and into full tensors,
//                                      compare with the pattern bitwise
//   dcp_interop_tool bench DIR WORLD   save/load throughput of 64 MiB (fp32)
//                                      vs one fwrite of as many bytes
// The tensors are those of dcp_interop.py's FSDP2 model (nn.Sequential of
// Linear(3, 5), Linear(5, 1)) plus an int64 and a bf16 tensor; their values
// are a pattern both sides compute exactly (multiples of 0.25 and integers).

#include <ATen/ATen.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <unistd.h>

#include <functional>

#include "fsdp/dcp.h"
#include "sim/world.h"

namespace dcp = fsdpsim::fsdp::dcp;
namespace sim = fsdpsim::sim;

namespace {

struct Spec {
  const char* fqn;
  std::vector<int64_t> shape;
  at::ScalarType dtype;
};

const std::vector<Spec>& specs() {
  static const std::vector<Spec> s = {{"0.weight", {5, 3}, at::kFloat}, {"0.bias", {5}, at::kFloat},
                                      {"1.weight", {1, 5}, at::kFloat}, {"1.bias", {1}, at::kFloat},
                                      {"extra.counts", {7}, at::kLong}, {"extra.half", {6, 2}, at::kBFloat16}};
  return s;
}

// Same as dcp_interop.py's expected().
at::Tensor expected(size_t k, const Spec& s) {
  int64_t n = 1;
  for (int64_t d : s.shape) n *= d;
  const auto pattern = (at::arange(n, at::kLong) * 7 + static_cast<int64_t>(k) * 3) % 19 - 9;
  if (s.dtype == at::kLong) return (pattern * 1000003 + (int64_t{1} << 40)).reshape(s.shape);
  return (pattern.to(at::kFloat) * 0.25).to(s.dtype).reshape(s.shape);
}

// FSDP2's dim-0 split: ceil(rows / world) per rank.
std::vector<dcp::Entry> entries(int rank, int world, bool with_data) {
  std::vector<dcp::Entry> out;
  for (size_t k = 0; k < specs().size(); ++k) {
    const auto& s = specs()[k];
    const at::Tensor full = expected(k, s);
    const int64_t rows = s.shape[0], chunk = (rows + world - 1) / world;
    const int64_t lo = std::min(rows, chunk * rank), len = std::min(rows, lo + chunk) - lo;
    dcp::Chunk c{std::vector<int64_t>(s.shape.size(), 0), full.narrow(0, lo, len).clone()};
    c.offsets[0] = lo;
    if (!with_data) c.tensor.zero_();
    out.push_back({s.fqn, s.dtype, s.shape, {c}});
  }
  return out;
}

int mismatches(const std::vector<dcp::Entry>& loaded, const std::string& where) {
  int bad = 0;
  for (size_t k = 0; k < loaded.size(); ++k) {
    for (const auto& c : loaded[k].chunks) {
      const auto want = expected(k, specs()[k]).narrow(0, c.offsets[0], c.tensor.size(0));
      if (!at::equal(c.tensor, want)) {
        std::fprintf(stderr, "%s: %s rows from %lld differ from the pattern\n", where.c_str(), loaded[k].fqn.c_str(),
                     static_cast<long long>(c.offsets[0]));
        ++bad;
      }
    }
  }
  return bad;
}

sim::World make_world(int world) {
  sim::WorldOptions options;
  options.world_size = world;
  return sim::World(options);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// 4 fp32 tensors of 4 Mi elements (64 MiB), dim-0 shards over `world`.
std::vector<dcp::Entry> bench_entries(int rank, int world, bool with_data) {
  std::vector<dcp::Entry> out;
  for (int k = 0; k < 4; ++k) {
    const int64_t rows = 4096, cols = 1024, chunk = (rows + world - 1) / world;
    const int64_t lo = std::min(rows, chunk * rank), len = std::min(rows, lo + chunk) - lo;
    auto t = with_data ? at::randn({len, cols}) : at::zeros({len, cols});
    out.push_back({"w" + std::to_string(k), at::kFloat, {rows, cols}, {{{lo, 0}, t}}});
  }
  return out;
}

double timed_world(int world, const std::function<void(fsdpsim::sim::RankContext&)>& body) {
  auto w = make_world(world);
  const auto t0 = std::chrono::steady_clock::now();
  w.run(body).throw_if_failed();
  return seconds_since(t0);
}

int bench(const std::string& dir, int world) {
  constexpr double kMiB = 64.0;
  std::vector<char> bytes(64 << 20, 1);
  const std::string raw = dir + ".fwrite";
  auto t0 = std::chrono::steady_clock::now();
  FILE* f = std::fopen(raw.c_str(), "wb");
  std::fwrite(bytes.data(), 1, bytes.size(), f);
  std::fflush(f);
  fsync(fileno(f));
  std::fclose(f);
  const double fwrite_s = seconds_since(t0);
  std::remove(raw.c_str());
  std::vector<std::vector<dcp::Entry>> data;  // made before the clock starts
  for (int r = 0; r < world; ++r) data.push_back(bench_entries(r, world, true));
  for (bool sync : {true, false}) {
    dcp::SaveOptions options;
    options.sync_files = sync;
    const double save_s = timed_world(world, [&](fsdpsim::sim::RankContext& ctx) {
      dcp::save(dir, data[ctx.rank()], dcp::process_group_coordinator(*ctx.world_group()), options);
    });
    std::printf("save (fsync %s): %.0f MiB/s; one fwrite+fsync: %.0f MiB/s (ratio %.2f)\n", sync ? "on" : "off",
                kMiB / save_s, kMiB / fwrite_s, fwrite_s / save_s);
  }
  for (int load_world : {world, world + 1}) {
    std::vector<std::vector<dcp::Entry>> targets;
    for (int r = 0; r < load_world; ++r) targets.push_back(bench_entries(r, load_world, false));
    const double load_s =
        timed_world(load_world, [&](fsdpsim::sim::RankContext& ctx) { dcp::load(dir, targets[ctx.rank()]); });
    std::printf("load at world %d: %.0f MiB/s (%.3f s)\n", load_world, kMiB / load_s, load_s);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s save|check DIR WORLD\n", argv[0]);
    return 2;
  }
  const std::string mode = argv[1], dir = argv[2];
  const int world = std::atoi(argv[3]);
  if (mode == "bench") return bench(dir, world);
  auto w = make_world(world);
  std::atomic<int> bad{0};
  auto result = w.run([&](sim::RankContext& ctx) {
    if (mode == "save") {
      dcp::save(dir, entries(ctx.rank(), world, true), dcp::process_group_coordinator(*ctx.world_group()));
    } else {
      auto e = entries(ctx.rank(), world, false);
      dcp::load(dir, e);
      std::string where = "rank ";
      where += std::to_string(ctx.rank());
      bad += mismatches(e, where);
    }
  });
  result.throw_if_failed();
  if (mode == "check") {
    auto full = entries(0, 1, false);
    dcp::load(dir, full);
    bad += mismatches(full, "full");
  }
  std::printf("%s %s at world %d: %d mismatches\n", mode.c_str(), dir.c_str(), world, bad.load());
  return bad == 0 ? 0 : 1;
}
