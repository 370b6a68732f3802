#include "backends/checked_process_group.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <sstream>

#include "backends/collective_checks.h"
#include "backends/errors.h"
#include "backends/work_completion.h"

namespace fsdpsim {
namespace {

// FNV-1a: the same value in every process (std::hash need not be).
int64_t fingerprint(const CollectiveDesc& desc) {
  uint64_t hash = 1469598103934665603ULL;
  for (unsigned char c : desc.labelled_call_string()) {
    hash ^= c;
    hash *= 1099511628211ULL;
  }
  return static_cast<int64_t>(hash);
}

// Bytes of each rank's call text in a mismatch report.
constexpr int64_t kTextBytes = 512;

}  // namespace

CheckedProcessGroup::CheckedProcessGroup(ProcessGroupPtr inner, ProcessGroupPtr side)
    : ForwardingProcessGroup(std::move(inner), "CheckedProcessGroup"), side_(std::move(side)) {
  if (!side_ || side_->size() != wrapped()->size() || side_->rank() != wrapped()->rank()) {
    throw CommError("CheckedProcessGroup for group " + wrapped()->name() +
                    ": the side group is null or spans other ranks");
  }
}

WorkPtr CheckedProcessGroup::call(const CollectiveDesc& desc, const std::function<WorkPtr()>& issue) {
  try {
    check(desc);
  } catch (const CommError&) {
    // Never issued; completed with the error (the ProcessGroup contract:
    // calls return a Work, wait() throws).
    return completed_work(desc, steady_now_ns(), std::current_exception());
  }
  return issue();
}

void CheckedProcessGroup::check(const CollectiveDesc& desc) {
  at::Tensor mine = at::empty({2}, at::kLong);
  mine[0] = static_cast<int64_t>(desc.seq);
  mine[1] = fingerprint(desc);
  at::Tensor all = at::empty({2 * size()}, at::kLong);
  try {
    side_->all_gather_into_tensor(all, mine)->wait();
  } catch (const CollectiveTimeoutError& e) {  // keep the type: callers tell timeouts apart
    throw CollectiveTimeoutError(desc.to_string() + " failed: not every rank reached it: " + e.what());
  } catch (const CommError& e) {
    throw CommError(desc.to_string() + " failed: its cross-rank check failed: " + e.what());
  }
  if (!at::equal(all.view({size(), 2}), mine.view({1, 2}).expand({size(), 2}))) report_mismatch(desc);
}

void CheckedProcessGroup::report_mismatch(const CollectiveDesc& desc) {
  const std::string text = desc.labelled_call_string();
  at::Tensor mine = at::zeros({kTextBytes}, at::kByte);
  std::memcpy(mine.data_ptr(), text.data(), std::min<size_t>(text.size(), kTextBytes - 1));
  at::Tensor all = at::empty({size() * kTextBytes}, at::kByte);
  side_->all_gather_into_tensor(all, mine)->wait();
  std::map<std::string, std::vector<int>> by_call;
  for (int r = 0; r < size(); ++r) {
    const char* call = reinterpret_cast<const char*>(all.data_ptr<uint8_t>() + r * kTextBytes);
    by_call[std::string(call, strnlen(call, kTextBytes))].push_back(global_ranks()[static_cast<size_t>(r)]);
  }
  std::ostringstream msg;
  msg << "collective mismatch in group " << name() << " seq " << desc.seq << " (seen by rank " << rank() << "):";
  for (const auto& [call, ranks] : by_call) msg << " " << ranks_text(ranks) << " called " << call << ";";
  throw CollectiveMismatchError(msg.str());
}

ProcessGroupPtr CheckedProcessGroup::split(const std::vector<std::vector<int>>& partition) {
  ProcessGroupPtr sub = wrapped()->split(partition);
  ProcessGroupPtr side = side_->split(partition);
  if (!sub) return nullptr;
  return std::make_shared<CheckedProcessGroup>(std::move(sub), std::move(side));
}

ProcessGroupPtr CheckedProcessGroup::wrap(ProcessGroupPtr sub) {
  throw CommError("CheckedProcessGroup::wrap: subgroups come from split(), which splits the side group too");
}

}  // namespace fsdpsim
