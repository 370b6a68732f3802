#pragma once
// What a collective is for ("reduce-scatter of fsdp unit 'block1'"): set by
// the caller around its call and carried in the call's CollectiveDesc, so
// that ranks issuing same-shaped collectives for different purposes under
// one sequence number are caught (the fake backend, CheckedProcessGroup) and
// mismatch reports say what each rank was doing. Unlabelled calls carry "".
//
// Thread-safety: the label is thread-local. A collective call reads it on
// entry, before it can block, so a fiber that sets it around its own call
// reads its own label (no fiber switch can happen in between).

#include <string>

namespace fsdpsim {

class ScopedCollectiveLabel {
 public:
  explicit ScopedCollectiveLabel(std::string label);
  ~ScopedCollectiveLabel();
  ScopedCollectiveLabel(const ScopedCollectiveLabel&) = delete;
  ScopedCollectiveLabel& operator=(const ScopedCollectiveLabel&) = delete;

 private:
  std::string previous_;
};

/// The innermost label set on this thread, or "".
const std::string& current_collective_label();

}  // namespace fsdpsim
