#include "sim/fiber_scheduler.h"

#include "backends/collective_label.h"

namespace fsdpsim::sim {

namespace detail {
RankContext*& current_rank_slot() {
  thread_local RankContext* rank = nullptr;
  return rank;
}
thread_local RankScheduler* t_scheduler = nullptr;
}  // namespace detail

RankScheduler::RankScheduler(SchedulePolicy policy, uint64_t seed, SimClock* clock)
    : policy_(policy),
      clock_(clock),
      random_(seed),
      ready_(policy == SchedulePolicy::SeededRandom),
      installed_(boost::fibers::context::active()) {
  detail::t_scheduler = this;
}

RankScheduler::~RankScheduler() {
  if (detail::t_scheduler == this) detail::t_scheduler = nullptr;
}

RankFiberProperties& RankScheduler::state_of(boost::fibers::context* context) noexcept {
  if (context->get_properties() == nullptr) context->set_properties(new_properties(context));
  return properties(context);
}

RankScheduler* RankScheduler::current() { return detail::t_scheduler; }

void RankScheduler::awakened(boost::fibers::context* context, RankFiberProperties&) noexcept {
  ready_.push_back(context);
}

boost::fibers::context* RankScheduler::pick_next() noexcept {
  if (ready_.empty()) return nullptr;
  size_t index = 0;
  if (policy_ == SchedulePolicy::SeededRandom && ready_.size() > 1) {
    index = static_cast<size_t>(random_() % ready_.size());
  }
  boost::fibers::context* next = ready_.take(index);
  // The dispatcher runs no user code: leave the installed state alone.
  if (!next->is_context(boost::fibers::type::dispatcher_context)) switch_state(next);
  return next;
}

void RankScheduler::switch_state(boost::fibers::context* next) noexcept {
  if (next == installed_) return;
  if (clock_ != nullptr && detail::current_rank_slot() != nullptr) {
    clock_->on_switch_out(detail::current_rank_slot()->rank());
  }
  if (installed_ != nullptr) {
    auto& from = state_of(installed_);
    from.torch_state.emplace();  // captures the current thread-locals
    from.rank = detail::current_rank_slot();
    from.collective_label = std::move(collective_label_slot());
  }
  auto& to = state_of(next);
  collective_label_slot() = std::move(to.collective_label);
  at::ThreadLocalState::setThreadLocalState(to.torch_state ? *to.torch_state : initial_state_);
  detail::current_rank_slot() = to.rank;
  installed_ = next;
  if (clock_ != nullptr && to.rank != nullptr) clock_->on_switch_in(to.rank->rank());
}

bool RankScheduler::has_ready_fibers() const noexcept { return !ready_.empty(); }

void RankScheduler::suspend_until(std::chrono::steady_clock::time_point const& deadline) noexcept {
  std::unique_lock<std::mutex> lock(mutex_);
  if (deadline == (std::chrono::steady_clock::time_point::max)()) {
    wakeup_.wait(lock, [this] { return notified_; });
  } else {
    wakeup_.wait_until(lock, deadline, [this] { return notified_; });
  }
  notified_ = false;
}

void RankScheduler::notify() noexcept {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    notified_ = true;
  }
  wakeup_.notify_all();
}

}  // namespace fsdpsim::sim
