#pragma once
// Cross-rank validation for backends that cannot tell that ranks called
// different collectives under one sequence number (Gloo mixes the data, fails
// deep inside its transport, or hangs). Before each collective the ranks
// all-gather a fingerprint of it (sequence number, op, dtype, shapes, reduce
// op, root, factors, label) over a side group; when the fingerprints differ
// every rank throws CollectiveMismatchError with what each rank called, as
// the fake backend does (PyTorch's TORCH_DISTRIBUTED_DEBUG=DETAIL wrapper
// works the same way). Cost: one small blocking all-gather per collective,
// so a call returns only once every rank of the group has issued it. A
// failed check never issues the collective: the call returns a Work that
// failed with the error, as any failed collective does.
//
// Thread-safety: as ProcessGroup: one object per rank, called from that
// rank's thread only.

#include "backends/forwarding_process_group.h"

namespace fsdpsim {

class CheckedProcessGroup final : public ForwardingProcessGroup {
 public:
  /// `side` spans the same ranks as `inner` and carries only fingerprints.
  CheckedProcessGroup(ProcessGroupPtr inner, ProcessGroupPtr side);

  ProcessGroupPtr split(const std::vector<std::vector<int>>& partition) override;

 private:
  WorkPtr call(const CollectiveDesc& desc, const std::function<WorkPtr()>& issue) override;
  ProcessGroupPtr wrap(ProcessGroupPtr sub) override;
  /// Exchanges the fingerprints; throws CommError when they differ or a rank
  /// does not arrive (the call then returns a Work that failed with it).
  void check(const CollectiveDesc& desc);
  /// Throws CollectiveMismatchError listing each rank's call.
  [[noreturn]] void report_mismatch(const CollectiveDesc& desc);

  ProcessGroupPtr side_;
};

}  // namespace fsdpsim
