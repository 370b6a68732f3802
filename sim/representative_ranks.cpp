#include "sim/representative_ranks.h"

#include <algorithm>
#include <set>
#include <sstream>
#include <stdexcept>

namespace fsdpsim::sim {

int64_t shard_rows(int64_t dim0, int rank, int world_size) {
  const int64_t chunk = (dim0 + world_size - 1) / world_size;
  return std::clamp<int64_t>(dim0 - rank * chunk, 0, chunk);
}

std::vector<int> shard_class_ranks(const std::vector<int64_t>& dim0s, int world_size) {
  if (world_size < 1) throw std::invalid_argument("shard_class_ranks: world_size must be >= 1");
  std::set<int64_t> ranks{0, world_size - 1};
  const auto add = [&](int64_t r) {
    if (r >= 0 && r < world_size) ranks.insert(r);
  };
  for (int64_t d : dim0s) {
    d = std::max<int64_t>(d, 1);
    const int64_t chunk = (d + world_size - 1) / world_size;
    const int64_t full = d / chunk;                   // ranks [0, full) hold a full chunk
    const int64_t holding = (d + chunk - 1) / chunk;  // ranks [0, holding) hold rows
    add(full - 1);
    add(full);  // partial (d % chunk != 0) or the first empty one
    add(holding);
  }
  return {ranks.begin(), ranks.end()};
}

std::vector<int> parse_rank_list(const std::string& list, int world_size, const std::string& flag) {
  std::vector<int> ranks;
  std::set<int> seen;
  std::stringstream in(list);
  std::string item;
  while (std::getline(in, item, ',')) {
    size_t used = 0;
    long long r = -1;
    try {
      r = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (item.empty() || used != item.size() || item[0] == '+' || item[0] == ' ') {
      throw std::invalid_argument(flag + ": '" + item +
                                  "' is not a rank (expected auto or comma-separated ranks, e.g. 0,5,7)");
    }
    if (r < 0 || r >= world_size) {
      throw std::invalid_argument(flag + ": rank " + item + " is outside the world [0, " + std::to_string(world_size) +
                                  ") of --world-size");
    }
    if (!seen.insert(static_cast<int>(r)).second) {
      throw std::invalid_argument(flag + ": rank " + item + " is listed twice; list each rank once");
    }
    ranks.push_back(static_cast<int>(r));
  }
  if (ranks.empty() || list.back() == ',') {
    throw std::invalid_argument(flag + ": '" + list + "' lists no ranks (expected auto or e.g. 0,5,7)");
  }
  return ranks;
}

}  // namespace fsdpsim::sim
