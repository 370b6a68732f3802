#include "tools/bench_checkpoint.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <iostream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include "fsdp/dcp.h"
#include "sim/world.h"
#include "tools/format_util.h"

namespace fsdpsim::tools {
namespace {

namespace dcp = fsdp::dcp;
namespace fs = std::filesystem;

constexpr int64_t kCols = 1024;
constexpr int kTensors = 4;
constexpr double kMiB = 1024.0 * 1024.0;

/// Rank `rank`'s dim-0 chunk of each tensor over `world` ranks (FSDP's
/// ceil(rows / world) split): views of `full`, or zeros to load into.
std::vector<dcp::Entry> shard_entries(const std::vector<at::Tensor>& full, int rank, int world, bool with_data) {
  std::vector<dcp::Entry> out;
  for (size_t k = 0; k < full.size(); ++k) {
    const int64_t rows = full[k].size(0), chunk = (rows + world - 1) / world;
    const int64_t begin = std::min(rows, chunk * rank), length = std::min(rows, begin + chunk) - begin;
    at::Tensor rows_of = full[k].narrow(0, begin, length);
    out.push_back({"w" + std::to_string(k),
                   at::kFloat,
                   full[k].sizes().vec(),
                   {dcp::Chunk{{begin, 0}, with_data ? rows_of : at::zeros_like(rows_of)}}});
  }
  return out;
}

double timed_world(int world, const std::function<void(sim::RankContext&)>& body) {
  sim::WorldOptions options;
  options.world_size = world;
  options.collective_timeout = std::chrono::seconds(120);
  sim::World ranks(options);
  const int64_t started = steady_now_ns();
  ranks.run(body).throw_if_failed();
  return seconds_since(started);
}

/// One fwrite of `bytes` to a new file, fflush and fsync (the file, not its directory).
double timed_fwrite(const fs::path& file, const std::vector<char>& bytes) {
  const int64_t started = steady_now_ns();
  FILE* out = std::fopen(file.c_str(), "wb");
  if (out == nullptr) throw std::runtime_error("cannot create " + file.string() + ": " + std::strerror(errno));
  const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), out) == bytes.size() && std::fflush(out) == 0 &&
                  ::fsync(::fileno(out)) == 0;
  const int error = errno;
  std::fclose(out);
  const double seconds = seconds_since(started);
  fs::remove(file);
  if (!ok) throw std::runtime_error("writing " + file.string() + " failed: " + std::strerror(error));
  return seconds;
}

int64_t bytes_under(const fs::path& dir) {
  int64_t total = 0;
  for (const auto& item : fs::directory_iterator(dir)) {
    if (item.is_regular_file()) total += static_cast<int64_t>(item.file_size());
  }
  return total;
}

struct Timings {
  std::vector<double> save, fwrite, load, reshard_load;
  int64_t on_disk = 0;
  bool loads_equal = true;
};

/// Loads the checkpoint at `world` into zeros and checks every chunk against `full`.
double timed_load(const fs::path& dir, const std::vector<at::Tensor>& full, int world, bool& equal) {
  std::vector<std::vector<dcp::Entry>> targets;
  for (int r = 0; r < world; ++r) targets.push_back(shard_entries(full, r, world, false));
  const double seconds = timed_world(world, [&](sim::RankContext& ctx) { dcp::load(dir, targets[ctx.rank()]); });
  for (const auto& rank : targets) {
    for (size_t k = 0; k < rank.size(); ++k) {
      const dcp::Chunk& chunk = rank[k].chunks[0];
      equal = equal && at::equal(chunk.tensor, full[k].narrow(0, chunk.offsets[0], chunk.tensor.size(0)));
    }
  }
  return seconds;
}

// Saves alternate with the fwrite, plain loads with resharding ones.
Timings measure(const CheckpointBenchOptions& options, const fs::path& dir, const std::vector<at::Tensor>& full) {
  std::vector<char> bytes;  // the payload, one buffer, made before any clock
  for (const auto& tensor : full) {
    const char* data = static_cast<const char*>(tensor.const_data_ptr());
    bytes.insert(bytes.end(), data, data + tensor.nbytes());
  }
  std::vector<std::vector<dcp::Entry>> saved;
  for (int r = 0; r < options.save_world; ++r) saved.push_back(shard_entries(full, r, options.save_world, true));
  const fs::path checkpoint = dir / "checkpoint", raw = dir / "fwrite.bin";
  Timings t;
  for (int i = 0; i < options.repeats; ++i) {
    auto save = [&] {
      t.save.push_back(timed_world(options.save_world, [&](sim::RankContext& ctx) {
        dcp::save(checkpoint, saved[ctx.rank()], dcp::process_group_coordinator(*ctx.world_group()));
      }));
    };
    if (i % 2 == 0) save();
    t.fwrite.push_back(timed_fwrite(raw, bytes));
    if (i % 2 == 1) save();
  }
  t.on_disk = bytes_under(checkpoint);
  for (int i = 0; i < options.repeats; ++i) {
    if (i % 2 == 0) t.load.push_back(timed_load(checkpoint, full, options.save_world, t.loads_equal));
    t.reshard_load.push_back(timed_load(checkpoint, full, options.reshard_world, t.loads_equal));
    if (i % 2 == 1) t.load.push_back(timed_load(checkpoint, full, options.save_world, t.loads_equal));
  }
  return t;
}

void print(const CheckpointBenchOptions& options, double payload, const Timings& t) {
  const double save_s = median(t.save), fwrite_s = median(t.fwrite);
  const double load_s = median(t.load), reshard_s = median(t.reshard_load);
  auto row = [&](const std::string& what, double seconds, const std::string& extra) {
    std::cout << fmt::format("  {:<36} {:8.1f} MiB/s  {:8.3f} s{}\n", what, payload / kMiB / seconds, seconds, extra);
  };
  row(fmt::format("dcp::save (world {})", options.save_world), save_s,
      fmt::format("  (on disk {}: data, .metadata, checksums)", human_bytes(static_cast<double>(t.on_disk))));
  row("one fwrite + fsync (one file)", fwrite_s, "");
  row(fmt::format("dcp::load (world {}, saved layout)", options.save_world), load_s, "");
  row(fmt::format("resharding dcp::load (world {})", options.reshard_world), reshard_s, "");
  std::cout << fmt::format("ratio dcp save/fwrite+fsync throughput: {:.2f} (world {}, {})\n", fwrite_s / save_s,
                           options.save_world, human_bytes(payload))
            << fmt::format("ratio resharding/plain load time: {:.2f} (world {} -> {})\n", reshard_s / load_s,
                           options.save_world, options.reshard_world)
            << (t.loads_equal ? "  every load gave back the saved values bitwise\n"
                              : "  LOADED VALUES DIFFER from the saved ones\n");
}

}  // namespace

bool section_checkpoint(const CheckpointBenchOptions& options) {
  const int64_t started = steady_now_ns();
  const double payload = static_cast<double>(kTensors * options.rows * kCols * 4);
  std::cout << "\n== 6. distributed checkpoint (fsdp::dcp) vs the file system: " << human_bytes(payload)
            << " of fp32 ==\n"
            << fmt::format("  {} tensors [{}, {}] in dim-0 shards; dcp::save at world {} (fsync on, CRC-32 sidecar)\n",
                           kTensors, options.rows, kCols, options.save_world)
            << "  alternating with one fwrite + fsync of the same payload bytes to one file; loads into zeros,\n"
            << "  reading the files just written (page cache), at the saved layout and resharded; MiB/s of\n"
            << "  payload, medians of " << options.repeats << ".\n";
  const bool own_dir = options.dir.empty();
  const fs::path dir =
      own_dir ? fs::temp_directory_path() / ("fsdpsim_bench_checkpoint_" + std::to_string(::getpid())) : options.dir;
  bool ok = true;
  try {
    fs::create_directories(dir);
    at::manual_seed(7);
    std::vector<at::Tensor> full;
    for (int k = 0; k < kTensors; ++k) full.push_back(at::randn({options.rows, kCols}));
    const Timings timings = measure(options, dir, full);
    print(options, payload, timings);
    ok = timings.loads_equal;
  } catch (const std::exception& e) {
    std::cout << "  FAILED: " << e.what() << "\n";
    ok = false;
  }
  std::error_code ignored;
  fs::remove_all(own_dir ? dir : dir / "checkpoint", ignored);
  std::cout << fmt::format("(section 6 took {:.2f} s)\n", seconds_since(started)) << std::endl;
  return ok;
}

}  // namespace fsdpsim::tools
