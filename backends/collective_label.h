#pragma once
// What a collective is for ("reduce-scatter of fsdp unit 'block1'"): set by
// the caller around its call and carried in the call's CollectiveDesc, so
// that ranks issuing same-shaped collectives for different purposes under
// one sequence number are caught (the fake backend, CheckedProcessGroup) and
// mismatch reports say what each rank was doing. Unlabelled calls carry "".
//
// Thread-safety: the label is thread-local; the fiber scheduler saves and
// restores it per fiber (collective_label_slot), so fiber ranks each see
// their own.

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

/// The thread-local slot itself, for a fiber scheduler to save and restore
/// per fiber when it switches (a fiber that blocks inside its label scope
/// must not lend the label to the fibers that run meanwhile).
std::string& collective_label_slot();

}  // namespace fsdpsim
