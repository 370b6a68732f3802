#pragma once
// Which global ranks of a 1-D FSDP world a data-free run must execute, so
// that representative ranks (WorldOptions::played_ranks) stand in for all
// of them. FSDP2 shards each param on dim 0 in chunks of ceil(dim0 / N):
// ranks below dim0 / chunk hold a full chunk, the next one the remainder,
// the rest nothing (padding only). Ranks with the same shard sizes for every
// param run the same code on the same shapes; the class boundaries are few.
//
// Thread-safety: pure functions.

#include <cstdint>
#include <string>
#include <vector>

namespace fsdpsim::sim {

/// The rows of dim 0 that global rank `rank` of `world_size` holds.
int64_t shard_rows(int64_t dim0, int rank, int world_size);

/// For each param's dim 0 (0-dim params count as 1): the first rank, the
/// last full rank, the partial rank, the first empty rank, and 0 and
/// world_size - 1; sorted, distinct. Every distinct tuple of shard sizes
/// over the params is held by one of them.
std::vector<int> shard_class_ranks(const std::vector<int64_t>& dim0s, int world_size);

/// "0,5,7" -> {0, 5, 7}; throws std::invalid_argument naming `flag` for a
/// malformed, repeated or out-of-range rank (world [0, world_size)).
std::vector<int> parse_rank_list(const std::string& list, int world_size, const std::string& flag);

}  // namespace fsdpsim::sim
