#pragma once
// Sub-groups the engine asks for: one group per rank (experts sharded over
// themselves), and the two axes of a 2-D replicate x shard mesh (hybrid
// sharding: reduce-scatter within the shard group, all-reduce across
// replicas). All are collective over the parent group.
//
// Thread-safety: call from the parent group's rank, like any collective;
// Mesh2D is a plain value.

#include "backends/process_group.h"

namespace fsdpsim {

struct Mesh2D {
  int replicate_size = 1;
  int shard_size = 1;
  /// Ranks with the same replica index: {r * shard_size + j : j}. Size shard_size.
  ProcessGroupPtr shard_group;
  /// Ranks with the same shard index: {i * shard_size + s : i}. Size replicate_size.
  ProcessGroupPtr replicate_group;
};

/// Splits `group` into a replicate_size x shard_size mesh (row-major: group
/// rank r sits at replica r / shard_size, shard r % shard_size). Throws
/// CommError if the product differs from the group size.
Mesh2D make_mesh_2d(ProcessGroup& group, int replicate_size, int shard_size);

/// A size-1 group holding only this rank.
ProcessGroupPtr make_self_group(ProcessGroup& group);

}  // namespace fsdpsim
