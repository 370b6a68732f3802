#pragma once
// Distributed checkpoints in the on-disk format of torch.distributed.checkpoint
// (DCP, torch 2.15's FileSystemWriter/FileSystemReader), so that Python's
// dcp.load reads what we save and we load what dcp.save wrote:
//
//   DIR/__<rank>_0.distcp  each rank's chunks, one after another, each the
//                          bytes of torch.save(chunk) (a zip, as DCP writes)
//   DIR/.metadata          rank 0: a Python pickle of dcp's Metadata (every
//                          fqn's dtype, global shape and chunks; where each
//                          chunk's bytes are)
//   DIR/.fsdpsim_checksums.json  ours, outside DCP's format (DCP has no
//                          checksums): a CRC-32 per chunk, verified on load
//                          when present; Python ignores it
//
//   std::vector<dcp::Entry> entries = {{"0.weight", at::kFloat, {5, 3}, {{{2, 0}, my_rows}}}};
//   dcp::save(dir, entries, dcp::process_group_coordinator(*ctx.world_group()));
//   dcp::load(dir, entries);   // fills each chunk's tensor in place
//
// The API knows nothing of modules: an entry is one tensor's name, dtype,
// global shape and this rank's chunks (offsets + a tensor of the chunk's
// sizes); fsdp state dicts turn into entries. Loading reshards: a chunk is
// filled from whichever saved chunks overlap it, so a checkpoint of world 2
// loads at world 3, or into one full tensor (offsets all 0).
//
// Atomicity: rank 0 first removes an older .metadata in DIR; each rank
// writes its file under a temporary name, fsyncs and renames it; rank 0
// writes the checksums and then .metadata (temporary + rename) only after
// every rank reported its file written. A save killed at any point leaves no
// .metadata, and load refuses a directory without one.
//
// Thread-safety: save is collective (every rank of the coordinator calls it,
// each from its own thread or fiber); load touches only files and the
// entries' tensors, so ranks may load concurrently.

#include <ATen/Tensor.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace fsdpsim {
class ProcessGroup;
}

namespace fsdpsim::fsdp::dcp {

/// A rectangular piece of a tensor: it starts at `offsets` (one per dim) and
/// has `tensor`'s sizes. Save reads the tensor; load writes into it in place.
struct Chunk {
  std::vector<int64_t> offsets;
  at::Tensor tensor;
};

/// One tensor of the state dict: its fully-qualified name (the DCP key),
/// dtype, global shape and the chunks this rank holds (none is fine).
struct Entry {
  std::string fqn;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> global_shape;
  std::vector<Chunk> chunks;
};

/// How save's ranks meet. Every rank calls both functions in the same order.
struct Coordinator {
  int rank = 0;
  int world_size = 1;
  /// Each rank passes its bytes; rank 0 gets every rank's, in rank order;
  /// other ranks get an empty vector.
  std::function<std::vector<std::string>(const std::string&)> gather_to_rank0;
  /// Rank 0's bytes, returned on every rank (the argument is ignored elsewhere).
  std::function<std::string(const std::string&)> broadcast_from_rank0;
};

/// One process alone (world 1).
Coordinator single_process();
/// Over a process group's collectives (all-gather and broadcast of bytes).
/// The group must outlive the coordinator.
Coordinator process_group_coordinator(ProcessGroup& group);

struct SaveOptions {
  /// fsync each file and the directory before the rename that publishes it
  /// (DCP's FileSystemWriter sync_files=True).
  bool sync_files = true;
  /// Write .fsdpsim_checksums.json (a CRC-32 per chunk) next to .metadata.
  bool write_checksums = true;
};

struct SaveStats {
  int64_t bytes_written = 0;  // this rank's data file
  int64_t chunks_written = 0;
};

/// Writes this rank's chunks and, on rank 0, the metadata. Collective; every
/// rank returns or every rank throws the same error (a rank that fails to
/// write reports it to rank 0, which then writes no .metadata). Throws
/// std::invalid_argument for bad entries (a chunk outside its global shape,
/// a dtype unlike the entry's, duplicate fqns) and std::runtime_error when
/// ranks disagree on an fqn's dtype/shape or the chunks do not tile it.
SaveStats save(const std::filesystem::path& dir, const std::vector<Entry>& entries, const Coordinator& coordinator,
               const SaveOptions& options = {});

struct LoadOptions {
  /// Verify each chunk's CRC-32 against .fsdpsim_checksums.json when the
  /// checkpoint has one (ours do; Python's do not).
  bool verify_checksums = true;
};

struct LoadStats {
  int64_t bytes_read = 0;
  int64_t chunks_read = 0;
};

/// Fills every entry's chunks from the checkpoint in DIR, whatever the saved
/// chunking. Throws std::runtime_error naming the file/fqn when .metadata is
/// missing (no complete save), an fqn is absent or has another dtype or
/// global shape, a chunk is not fully covered, a file is truncated, a
/// checksum does not match or a stored tensor does not parse.
LoadStats load(const std::filesystem::path& dir, std::vector<Entry>& entries, const LoadOptions& options = {});

/// What .metadata says about one tensor.
struct SavedTensor {
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> global_shape;
  struct SavedChunk {
    std::vector<int64_t> offsets, sizes;
    std::string file;  // relative to DIR
    int64_t offset = 0, length = 0;
  };
  std::vector<SavedChunk> chunks;
};

/// Parses DIR/.metadata (ours or Python's). Non-tensor entries (DCP's
/// BytesStorageMetadata) are listed in `bytes_entries` and not loadable here.
struct CheckpointMetadata {
  std::map<std::string, SavedTensor> tensors;
  std::vector<std::string> bytes_entries;
  std::string save_id;
  std::string version;
};
CheckpointMetadata read_metadata(const std::filesystem::path& dir);

}  // namespace fsdpsim::fsdp::dcp
