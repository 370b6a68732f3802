#include "backends/mesh.h"

#include "backends/errors.h"

namespace fsdpsim {

Mesh2D make_mesh_2d(ProcessGroup& group, int replicate_size, int shard_size) {
  if (replicate_size < 1 || shard_size < 1 || replicate_size * shard_size != group.size()) {
    throw CommError("mesh " + std::to_string(replicate_size) + " x " + std::to_string(shard_size) +
                    " does not fit group " + group.name() + " of size " + std::to_string(group.size()));
  }
  std::vector<std::vector<int>> shard_partition(replicate_size);
  std::vector<std::vector<int>> replicate_partition(shard_size);
  for (int r = 0; r < group.size(); ++r) {
    shard_partition[r / shard_size].push_back(r);
    replicate_partition[r % shard_size].push_back(r);
  }
  Mesh2D mesh;
  mesh.replicate_size = replicate_size;
  mesh.shard_size = shard_size;
  mesh.shard_group = group.split(shard_partition);
  mesh.replicate_group = group.split(replicate_partition);
  return mesh;
}

ProcessGroupPtr make_self_group(ProcessGroup& group) {
  std::vector<std::vector<int>> partition(group.size());
  for (int r = 0; r < group.size(); ++r) partition[r] = {r};
  return group.split(partition);
}

}  // namespace fsdpsim
