// The C++ half of the DCP interop test (dcp_interop.py runs both halves):
//   dcp_interop_tool save DIR WORLD    fake thread ranks save the pattern
//   dcp_interop_tool check DIR WORLD   load at WORLD and into full tensors,
//                                      compare with the pattern bitwise
// (Checkpoint throughput is section 6 of `fsdpsim bench engine`.)
// The tensors are those of dcp_interop.py's FSDP2 model (nn.Sequential of
// Linear(3, 5), Linear(5, 1)) plus an int64 and a bf16 tensor; their values
// are a pattern both sides compute exactly (multiples of 0.25 and integers).

#include <ATen/ATen.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

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

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc == 4 ? argv[1] : "";
  if (mode != "save" && mode != "check") {
    std::fprintf(stderr, "usage: %s save|check DIR WORLD\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[2];
  const int world = std::atoi(argv[3]);
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
