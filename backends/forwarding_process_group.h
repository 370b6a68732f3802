#pragma once
// Base of process-group decorators (hooks, traces, flight recorder): it
// forwards everything to the wrapped group and routes each collective
// through one virtual, call(desc, issue), with the CollectiveDesc from the
// local checks; split() wraps the subgroup with the same decorator. A
// decorator then writes only what it adds.
//
// Thread-safety: as ProcessGroup: one object per rank.

#include <functional>

#include "backends/clock.h"
#include "backends/process_group.h"

namespace fsdpsim {

class ForwardingProcessGroup : public ProcessGroup {
 public:
  int rank() const final { return inner_->rank(); }
  int size() const final { return inner_->size(); }
  const std::string& name() const final { return inner_->name(); }
  const std::vector<int>& global_ranks() const final { return inner_->global_ranks(); }
  uint64_t sequence_number() const final { return inner_->sequence_number(); }

  [[nodiscard]] WorkPtr all_gather_into_tensor(const at::Tensor& output, const at::Tensor& input) final;
  [[nodiscard]] WorkPtr reduce_scatter_tensor(const at::Tensor& output, const at::Tensor& input,
                                              const ReduceScatterOptions& options) final;
  [[nodiscard]] WorkPtr all_reduce(const at::Tensor& tensor, const AllReduceOptions& options) final;
  [[nodiscard]] WorkPtr broadcast(const at::Tensor& tensor, const BroadcastOptions& options) final;
  [[nodiscard]] WorkPtr barrier() final;
  /// The subgroup, wrapped by wrap() (nullptr when this rank is in none).
  ProcessGroupPtr split(const std::vector<std::vector<int>>& partition) override;

  ProcessGroup& inner() { return *inner_; }

 protected:
  /// `what` names the decorator in the error for a null `inner`.
  ForwardingProcessGroup(ProcessGroupPtr inner, const char* what);

  /// One collective: `desc` is the call (its seq the next one of inner);
  /// `issue` runs it on the wrapped group.
  [[nodiscard]] virtual WorkPtr call(const CollectiveDesc& desc, const std::function<WorkPtr()>& issue) = 0;
  /// The same decorator around `sub`, a subgroup of the wrapped group.
  virtual ProcessGroupPtr wrap(ProcessGroupPtr sub) = 0;

  const ProcessGroupPtr& wrapped() const { return inner_; }

 private:
  ProcessGroupPtr inner_;
};

}  // namespace fsdpsim
