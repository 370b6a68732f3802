#pragma once
// Section 6 of `fsdpsim bench engine`: distributed checkpoint throughput
// (fsdp::dcp, torch.distributed.checkpoint's format) against the file system
// itself, measured side by side in one run:
//   - save at world `save_world` (fsync on, checksums on) vs one fwrite +
//     fsync of the same payload bytes to one file, alternating, medians: both
//     in MiB/s of payload and their ratio (save / fwrite throughput);
//   - load at the saved layout (world `save_world`) in MiB/s, and a
//     resharding load at world `reshard_world` as a ratio of time to it;
//     loads read files the page cache still holds (just written).
// Every load is checked to give back the saved values bitwise.
//
// Thread-safety: call from one thread; it runs its own sim::Worlds.

#include <cstdint>
#include <filesystem>

namespace fsdpsim::tools {

struct CheckpointBenchOptions {
  /// Four fp32 tensors of [rows, 1024], dim-0 shards over the ranks
  /// (4096 rows: 64 MiB).
  int64_t rows = 4096;
  int save_world = 2;
  int reshard_world = 3;
  /// Each timed measurement this many times, alternating; medians.
  int repeats = 3;
  /// Where the checkpoint and the fwrite file go (removed after); empty: a
  /// fresh directory under std::filesystem::temp_directory_path().
  std::filesystem::path dir;
};

/// Prints the section (its header, the rows and two "ratio ..." lines the
/// benchmark report picks up). Returns false when a measurement failed or a
/// load gave back other values (the reason printed); never throws.
bool section_checkpoint(const CheckpointBenchOptions& options);

}  // namespace fsdpsim::tools
