#include "backends/work_completion.h"

#include <iostream>
#include <stdexcept>
#include <string>

namespace fsdpsim {

void WorkCompletion::set_issued(int64_t issue_ns, int64_t start_ns) {
  std::lock_guard<std::mutex> lock(mutex_);
  times_.issue_ns = issue_ns;
  times_.start_ns = start_ns;
}

void WorkCompletion::complete(int64_t end_ns, std::exception_ptr error, const std::function<std::string()>& describe) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (done_) throw std::logic_error("WorkCompletion::complete called twice for " + describe());
    done_ = true;
    error_ = std::move(error);
    times_.end_ns = end_ns;
  }
  // Callbacks registered while these run join the queue and run here too.
  for (;;) {
    std::vector<std::function<void()>> callbacks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (callbacks_.empty()) {
        released_ = true;
        break;
      }
      callbacks.swap(callbacks_);
    }
    for (auto& callback : callbacks) {
      // A throwing callback must not unwind into the completing thread (a
      // transport's worker).
      try {
        callback();
      } catch (const std::exception& e) {
        std::cerr << "fsdpsim: on_completion callback of " << describe() << " threw: " << e.what() << std::endl;
      } catch (...) {
        std::cerr << "fsdpsim: on_completion callback of " << describe() << " threw a non-std exception" << std::endl;
      }
    }
  }
  released_cv_.notify_all();
}

void WorkCompletion::wait() const {
  std::unique_lock<std::mutex> lock(mutex_);
  released_cv_.wait(lock, [&] { return released_; });
  if (error_) std::rethrow_exception(error_);
}

bool WorkCompletion::is_completed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return done_;
}

std::exception_ptr WorkCompletion::error() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return error_;
}

WorkTimes WorkCompletion::times() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return times_;
}

void WorkCompletion::on_completion(std::function<void()> callback) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!released_) {
      callbacks_.push_back(std::move(callback));
      return;
    }
  }
  callback();
}

WorkPtr completed_work(CollectiveDesc desc, int64_t now_ns, std::exception_ptr error) {
  auto completion = std::make_shared<WorkCompletion>();
  completion->set_issued(now_ns, now_ns);
  completion->complete(now_ns, std::move(error), [&desc] { return desc.to_string(); });
  return std::make_shared<CompletionWork>(std::move(desc), std::move(completion));
}

}  // namespace fsdpsim
