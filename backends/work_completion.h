#pragma once
// WorkCompletion: the completion state of one collective, shared by its Work
// handle and whatever finishes it (Gloo's future callback, a test's stub).
// Kept apart from the handle so the finisher never owns its owner, and so a
// collective can complete after its caller dropped the Work.
//
// Beyond the Work contract (process_group.h): callbacks registered before
// completion run once, unlocked, on the completing thread, and wait() returns
// only after they ran, so a caller that waited may rely on their effects; a
// callback registered later runs at once on the registering thread.
//
// Thread-safety: every method may be called from any thread.

#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "backends/process_group.h"

namespace fsdpsim {

class WorkCompletion {
 public:
  /// The collective's result is final: records `end_ns` and `error`, runs the
  /// registered callbacks (a throwing one is reported on stderr and skipped,
  /// naming the collective `describe()` returns), then releases waiters.
  /// Throws std::logic_error if called twice. `describe` runs only on those
  /// error paths, so completing formats nothing.
  void complete(int64_t end_ns, std::exception_ptr error, const std::function<std::string()>& describe);
  /// Issue and start times, set by the backend before completion.
  void set_issued(int64_t issue_ns, int64_t start_ns);

  /// Blocks until released; rethrows the collective's error.
  void wait() const;
  bool is_completed() const;
  std::exception_ptr error() const;
  WorkTimes times() const;
  void on_completion(std::function<void()> callback);

 private:
  mutable std::mutex mutex_;  // guards everything below
  mutable std::condition_variable released_cv_;
  bool done_ = false;      // the result (or error) is final
  bool released_ = false;  // and every callback registered so far has run
  std::exception_ptr error_;
  WorkTimes times_;
  std::vector<std::function<void()>> callbacks_;
};

/// A Work whose state is a shared WorkCompletion.
class CompletionWork final : public Work {
 public:
  CompletionWork(CollectiveDesc desc, std::shared_ptr<WorkCompletion> completion)
      : desc_(std::move(desc)), completion_(std::move(completion)) {}

  void wait() override { completion_->wait(); }
  bool is_completed() const override { return completion_->is_completed(); }
  std::exception_ptr exception() const override { return completion_->error(); }
  const CollectiveDesc& desc() const override { return desc_; }
  WorkTimes times() const override { return completion_->times(); }
  void on_completion(std::function<void()> callback) override { completion_->on_completion(std::move(callback)); }

 private:
  const CollectiveDesc desc_;
  const std::shared_ptr<WorkCompletion> completion_;
};

/// A Work completed at once at `now_ns` (with `error`, if any): a collective
/// that never reached a transport.
WorkPtr completed_work(CollectiveDesc desc, int64_t now_ns, std::exception_ptr error);

}  // namespace fsdpsim
