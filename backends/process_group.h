#pragma once
// The narrow communication interface the FSDP engine sees. Implementations:
// the in-memory fake (sim/fake_process_group.h), real Gloo
// (backends/gloo/gloo_process_group.h) and decorators (hooks, tracing).
//
// Ordering contract (as in c10d): every rank of a group calls the same
// collectives in the same order. Each call gets the next per-group sequence
// number (1, 2, ...), so "group G seq N" names one collective on every rank.
// Every call is asynchronous and returns a Work. The implementation holds a
// reference to the call's tensors until the Work completes, so the caller may
// drop its own handles at once (the engine lets go of a reduce-scatter input
// as soon as it is issued); it must not modify or read them until wait()
// returns.
//
// Thread-safety: one ProcessGroup object belongs to one rank; calls on it come
// from that rank's thread or fiber only. Work objects may be waited on from
// that rank only; on_completion callbacks may run on any rank's thread.

#include <ATen/Tensor.h>

#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace fsdpsim {

enum class CollectiveOp { AllGather, ReduceScatter, AllReduce, Broadcast, Barrier };
enum class ReduceOp { Sum, Avg, Min, Max };

/// "all_gather", "reduce_scatter", ... (the names traces and reports use).
const char* to_string(CollectiveOp op);
const char* to_string(ReduceOp op);
/// Inverse of to_string; throws std::invalid_argument on unknown names.
CollectiveOp collective_op_from_string(const std::string& name);

struct ReduceScatterOptions {
  ReduceOp reduce_op = ReduceOp::Sum;
  /// Each input is divided by this before the sum (FSDP's gradient
  /// pre-divide factor, keeps low-precision sums in range). Sum only.
  double predivide_factor = 1.0;
  /// The sum is divided by this afterwards. Sum only.
  double postdivide_factor = 1.0;
};

struct AllReduceOptions {
  ReduceOp reduce_op = ReduceOp::Sum;
};

struct BroadcastOptions {
  /// Source rank, as a rank of this group.
  int root = 0;
};

/// What one rank asked for in one collective: enough to match the same
/// collective across ranks and to explain a mismatch.
struct CollectiveDesc {
  std::string group;
  int group_rank = 0;
  int group_size = 0;
  uint64_t seq = 0;
  CollectiveOp op = CollectiveOp::Barrier;
  at::ScalarType dtype = at::ScalarType::Float;
  std::vector<int64_t> input_shape;
  std::vector<int64_t> output_shape;
  ReduceOp reduce_op = ReduceOp::Sum;
  int root = 0;
  double predivide_factor = 1.0;
  double postdivide_factor = 1.0;
  /// What the caller issued it for (backends/collective_label.h); "" if unlabelled.
  std::string label;

  int64_t input_numel() const;
  int64_t output_numel() const;
  /// Same op, dtype, shapes, reduce op, root, factors and label (ignores the rank).
  bool matches(const CollectiveDesc& other) const;
  /// "all_gather float in [4] out [8]" (plus reduce op / root where they apply).
  std::string call_string() const;
  /// call_string() plus " for <label>" when labelled: what mismatch reports show.
  std::string labelled_call_string() const;
  /// "group world seq 3 rank 1: all_gather float in [4] out [8]".
  std::string to_string() const;
};

/// Timestamps of one collective on one rank, in nanoseconds of the group's
/// clock (see backends/clock.h). 0 means "not yet".
struct WorkTimes {
  int64_t issue_ns = 0;  ///< the call was made
  int64_t start_ns = 0;  ///< every rank had arrived / the transport started
  int64_t end_ns = 0;    ///< this rank's part finished
};

/// Handle to one in-flight collective on one rank (c10d's Work, narrowed).
class Work {
 public:
  virtual ~Work() = default;
  /// Blocks until this rank's part is done; rethrows the collective's error.
  virtual void wait() = 0;
  virtual bool is_completed() const = 0;
  /// The error the collective failed with, or nullptr.
  virtual std::exception_ptr exception() const = 0;
  virtual const CollectiveDesc& desc() const = 0;
  virtual WorkTimes times() const = 0;
  /// Runs `callback` once when the work completes or fails (at once if it
  /// already has). It may run on another rank's thread: keep it short and
  /// thread-safe, and never block in it.
  virtual void on_completion(std::function<void()> callback) = 0;
};
using WorkPtr = std::shared_ptr<Work>;

class ProcessGroup;
using ProcessGroupPtr = std::shared_ptr<ProcessGroup>;

class ProcessGroup {
 public:
  virtual ~ProcessGroup() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// Unique within a world ("world", "world/split1.0", ...).
  virtual const std::string& name() const = 0;
  /// Ranks of the root world that make up this group, by group rank.
  virtual const std::vector<int>& global_ranks() const = 0;
  /// Number of collectives this rank has issued on this group.
  virtual uint64_t sequence_number() const = 0;

  // Every collective returns its Work [[nodiscard]]: a dropped one can no
  // longer be waited on, so its error would go unseen. Wait on it or keep it.

  /// output (size() * input.numel() elements, contiguous) receives every
  /// rank's input in rank order. `input` may be this rank's chunk of `output`.
  [[nodiscard]] virtual WorkPtr all_gather_into_tensor(const at::Tensor& output, const at::Tensor& input) = 0;
  /// input (size() * output.numel() elements) is reduced element-wise over
  /// ranks; this rank receives chunk rank() of the result.
  [[nodiscard]] virtual WorkPtr reduce_scatter_tensor(const at::Tensor& output, const at::Tensor& input,
                                                      const ReduceScatterOptions& options) = 0;
  /// In place.
  [[nodiscard]] virtual WorkPtr all_reduce(const at::Tensor& tensor, const AllReduceOptions& options) = 0;
  /// In place: every rank receives options.root's tensor.
  [[nodiscard]] virtual WorkPtr broadcast(const at::Tensor& tensor, const BroadcastOptions& options) = 0;
  [[nodiscard]] virtual WorkPtr barrier() = 0;

  /// Collective over this group: every rank passes the same partition (lists
  /// of this group's ranks, disjoint). Returns the new group holding this
  /// rank (its ranks ordered as listed), or nullptr if this rank is in none.
  virtual ProcessGroupPtr split(const std::vector<std::vector<int>>& partition) = 0;
};

/// Checks a partition for split(): ranks in range, disjoint, no empty list.
/// Throws CommError naming the group.
void check_partition(const ProcessGroup& group, const std::vector<std::vector<int>>& partition);

}  // namespace fsdpsim
