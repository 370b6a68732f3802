#include "sim/fake_process_group.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <boost/fiber/condition_variable.hpp>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include "backends/collective_checks.h"
#include "backends/errors.h"

namespace fsdpsim::sim {

namespace {

// One std::mutex guards the world: it is only held for bookkeeping, never
// across a wait, so fibers on one thread never contend for it. Waiting goes
// through Signal: a futex-based std::condition_variable for thread ranks
// (Boost.Fiber's spinlocks spin badly with many OS threads on few cores) and
// a fiber-aware condition variable for fiber ranks (a std:: wait would stall
// every fiber of the thread).
using Mutex = std::mutex;
using Lock = std::unique_lock<Mutex>;

class Signal {
 public:
  explicit Signal(bool fibers) : fibers_(fibers) {}
  void wait(Lock& lock) {
    if (fibers_) {
      fiber_cv_.wait(lock);
    } else {
      thread_cv_.wait(lock);
    }
  }
  /// False when the deadline passed.
  bool wait_until(Lock& lock, std::chrono::steady_clock::time_point deadline) {
    if (fibers_) return fiber_cv_.wait_until(lock, deadline) == boost::fibers::cv_status::no_timeout;
    return thread_cv_.wait_until(lock, deadline) == std::cv_status::no_timeout;
  }
  void notify_all() {
    if (fibers_) {
      fiber_cv_.notify_all();
    } else {
      thread_cv_.notify_all();
    }
  }

 private:
  const bool fibers_;
  std::condition_variable thread_cv_;
  boost::fibers::condition_variable_any fiber_cv_;
};
using Callbacks = std::vector<std::function<void()>>;

void run_callbacks(Callbacks& callbacks) {
  for (auto& callback : callbacks) callback();
  callbacks.clear();
}

// Elements reduced per block: the block accumulator stays in L1 and the
// inner loop over one source vectorises.
constexpr int64_t kReduceBlock = 2048;

template <typename T, ReduceOp Op>
inline T combine(T a, T b) {
  using Math = at::opmath_type<T>;
  const Math x = static_cast<Math>(a);
  const Math y = static_cast<Math>(b);
  if constexpr (Op == ReduceOp::Sum || Op == ReduceOp::Avg) {
    return static_cast<T>(x + y);
  } else {
    if constexpr (std::is_floating_point_v<Math>) {
      if (std::isnan(x) || std::isnan(y)) return static_cast<T>(std::nan(""));
    }
    if constexpr (Op == ReduceOp::Min) return static_cast<T>(y < x ? y : x);
    return static_cast<T>(y > x ? y : x);
  }
}

// dst[i] = src_0[i] op src_1[i] op ... in rank order, each step rounded to T.
// dst may alias one source at the same positions: every source element is
// read before dst[i] is written (through the block accumulator).
template <typename T, ReduceOp Op>
void reduce_blocks(T* out, const std::vector<const char*>& sources, int64_t count, double predivide) {
  using Math = at::opmath_type<T>;
  const Math divisor = static_cast<Math>(predivide);
  const bool divide = predivide != 1.0;
  T block[kReduceBlock];
  for (int64_t begin = 0; begin < count; begin += kReduceBlock) {
    const int64_t n = std::min(kReduceBlock, count - begin);
    const auto* first = reinterpret_cast<const T*>(sources[0]) + begin;
    for (int64_t i = 0; i < n; ++i)
      block[i] = divide ? static_cast<T>(static_cast<Math>(first[i]) / divisor) : first[i];
    for (size_t k = 1; k < sources.size(); ++k) {
      const auto* src = reinterpret_cast<const T*>(sources[k]) + begin;
      if (divide) {
        for (int64_t i = 0; i < n; ++i) {
          block[i] = combine<T, Op>(block[i], static_cast<T>(static_cast<Math>(src[i]) / divisor));
        }
      } else {
        for (int64_t i = 0; i < n; ++i) block[i] = combine<T, Op>(block[i], src[i]);
      }
    }
    std::memcpy(out + begin, block, n * sizeof(T));
  }
}

void reduce_into(void* dst, const std::vector<const char*>& sources, int64_t count, at::ScalarType dtype, ReduceOp op,
                 double predivide) {
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fake_reduce", [&] {
    auto* out = static_cast<scalar_t*>(dst);
    switch (op) {
      case ReduceOp::Sum:
      case ReduceOp::Avg: reduce_blocks<scalar_t, ReduceOp::Sum>(out, sources, count, predivide); break;
      case ReduceOp::Min: reduce_blocks<scalar_t, ReduceOp::Min>(out, sources, count, predivide); break;
      case ReduceOp::Max: reduce_blocks<scalar_t, ReduceOp::Max>(out, sources, count, predivide); break;
    }
  });
}

// acc[i] = (first ? src[i] : acc[i] op src[i]), src pre-divided as in
// reduce_blocks: folding the inputs in rank order one by one gives the same
// bits as reduce_blocks over all of them (each step rounded to T).
template <typename T, ReduceOp Op>
void fold_elements(T* acc, const T* src, int64_t count, double predivide, bool first) {
  using Math = at::opmath_type<T>;
  const Math divisor = static_cast<Math>(predivide);
  const bool divide = predivide != 1.0;
  for (int64_t i = 0; i < count; ++i) {
    const T value = divide ? static_cast<T>(static_cast<Math>(src[i]) / divisor) : src[i];
    acc[i] = first ? value : combine<T, Op>(acc[i], value);
  }
}

void fold_into(void* acc, const void* src, int64_t count, at::ScalarType dtype, ReduceOp op, double predivide,
               bool first) {
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fake_fold", [&] {
    auto* out = static_cast<scalar_t*>(acc);
    const auto* in = static_cast<const scalar_t*>(src);
    switch (op) {
      case ReduceOp::Sum:
      case ReduceOp::Avg: fold_elements<scalar_t, ReduceOp::Sum>(out, in, count, predivide, first); break;
      case ReduceOp::Min: fold_elements<scalar_t, ReduceOp::Min>(out, in, count, predivide, first); break;
      case ReduceOp::Max: fold_elements<scalar_t, ReduceOp::Max>(out, in, count, predivide, first); break;
    }
  });
}

const char* byte_ptr(const at::Tensor& t) { return static_cast<const char*>(t.data_ptr()); }
char* mutable_byte_ptr(const at::Tensor& t) { return static_cast<char*>(t.data_ptr()); }

bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || a.is_meta() || b.is_meta()) return false;  // meta: no bytes to overlap
  const char* a0 = byte_ptr(a);
  const char* b0 = byte_ptr(b);
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

}  // namespace

enum class CollectiveState { Gathering, Ready, Done, Failed };

struct Arrival {
  CollectiveDesc desc;
  at::Tensor input;
  at::Tensor output;
  int64_t issue_ns = 0;
  std::chrono::steady_clock::time_point deadline;
  Callbacks callbacks;
};

struct PendingCollective {
  const std::string* group_name = nullptr;  // the FakeGroupState's name: lives as long as the world
  uint64_t seq = 0;
  std::vector<int> global_ranks;
  std::vector<std::optional<Arrival>> arrivals;
  int arrived = 0;
  int first = -1;
  CollectiveState state = CollectiveState::Gathering;
  std::exception_ptr error;
  // Data movement: tasks [phase_ends[p-1], phase_ends[p]) form phase p; a
  // phase starts only when the one before finished (all-reduce reads every
  // input in phase 0 and writes them in phase 1).
  std::vector<size_t> phase_ends;
  size_t phase = 0;
  size_t next_task = 0;
  size_t tasks_done = 0;
  int64_t chunk_elements = 0;
  at::Tensor scratch;
  int64_t start_ns = 0;
  int64_t end_ns = 0;
  // The staged path (fiber worlds' all-gathers and reduce-scatters): each
  // input is folded into `staging` as its rank arrives, in rank order
  // (all-gather: copied to its place; reduce-scatter: reduced into the
  // running result), and released; a reduce-scatter's outputs are written
  // when the last rank arrives, an all-gather's output when its own rank
  // waits (or polls, issues again, exits). So a collective holds one rank's
  // worth of bytes beside the ranks' own buffers, and a world of N ranks
  // never has every rank's all-gather output written at once.
  bool staged = false;
  at::Tensor staging;
  int folded = 0;             // arrivals [0, folded) are in `staging`
  std::vector<char> written;  // all-gather, by group rank: output written, the rank's part done
  int written_count = 0;
  // Data-free (every rank passed meta tensors): validated and timed, no data moves.
  bool data_free = false;
  explicit PendingCollective(bool fibers) : cv(fibers) {}
  Signal cv;

  const CollectiveDesc& first_desc() const { return arrivals[first]->desc; }
  std::vector<int> missing_global_ranks() const {
    std::vector<int> missing;
    for (size_t r = 0; r < arrivals.size(); ++r) {
      if (!arrivals[r]) missing.push_back(global_ranks[r]);
    }
    return missing;
  }
  std::string header() const { return "group " + *group_name + " seq " + std::to_string(seq); }
};

class FakeGroupState {
 public:
  FakeGroupState(std::string name, std::vector<int> global_ranks)
      : name(std::move(name)), global_ranks(std::move(global_ranks)) {}
  const std::string name;
  const std::vector<int> global_ranks;  // this world's ranks, by member index
  // Representative ranks (FakeWorldState::play). The world group: member i
  // plays group rank played[i]. Any group: the global ranks it reports, by
  // group rank (the played world's [0, N), a subgroup's played ranks).
  // Empty: none played, global_ranks reported.
  std::vector<int> played;
  std::vector<int> shown_ranks;
  const std::vector<int>& reported() const { return shown_ranks.empty() ? global_ranks : shown_ranks; }
  std::map<uint64_t, std::shared_ptr<PendingCollective>> gathering;
  std::map<int, std::vector<std::vector<int>>> splits;  // split index -> partition
};

// Where a rank is. The collective's text is built only when a report asks:
// every issue and wait of every rank updates this.
struct RankWhere {
  enum class Kind { Running, Waiting, Exited, Failed } kind = Kind::Running;
  const std::string* group = nullptr;  // the last collective's group name (FakeGroupState::name); null: none yet
  CollectiveOp op = CollectiveOp::Barrier;
  uint64_t seq = 0;
  bool collective_failed = false;
  std::string error;

  void set(Kind now, const std::string& group_name, CollectiveOp last_op, uint64_t last_seq, bool failed = false) {
    kind = now;
    group = &group_name;
    op = last_op;
    seq = last_seq;
    collective_failed = failed;
    error.clear();
  }
  // "all_gather group world seq 3" ("" before the first collective).
  std::string collective() const {
    if (group == nullptr) return "";
    return std::string(to_string(op)) + " group " + *group + " seq " + std::to_string(seq) +
           (collective_failed ? " (failed)" : "");
  }
  std::string describe() const {
    const std::string collective = this->collective();
    switch (kind) {
      case Kind::Running:
        return collective.empty() ? "running, no collective issued yet" : "running, last issued " + collective;
      case Kind::Waiting: return "waiting in " + collective;
      case Kind::Exited: return "exited normally";
      case Kind::Failed: return "failed: " + error.substr(0, error.find('\n'));
    }
    return "";
  }
};

struct FakeWorldState::Impl {
  mutable Mutex mutex;
  // Thread worlds: ready collectives for the progress thread.
  std::deque<std::shared_ptr<PendingCollective>> ready;
  std::condition_variable progress_cv;
  bool stopping = false;
  // Set when the world was destroyed on the progress thread itself (a
  // callback it ran dropped the last reference): the thread must then stop
  // without touching the world again. Impl outlives the world for it.
  bool world_destroyed = false;
  std::thread progress;
  std::map<std::string, std::shared_ptr<FakeGroupState>> groups;
  bool aborted = false;
  std::string abort_reason;
  std::vector<RankWhere> where;
  std::vector<bool> exited;
  int exited_count = 0;  // lets an arrival skip the O(group size) scan below while every rank runs
  // Representative ranks (FakeWorldState::play): the global rank each rank
  // plays, which error texts name. Empty: every rank plays itself.
  std::vector<int> played;
  int shown(int rank) const { return played.empty() ? rank : played[rank]; }
  std::vector<int> shown(std::vector<int> ranks) const {
    for (int& r : ranks) r = shown(r);
    return ranks;
  }
  // Per global rank: its staged all-gathers (with its group rank) whose
  // output it may not have waited for yet.
  std::vector<std::vector<std::pair<std::shared_ptr<PendingCollective>, int>>> unwritten;

  std::shared_ptr<FakeGroupState> group_locked(const std::string& name, const std::vector<int>& ranks) {
    auto& slot = groups[name];
    if (!slot) slot = std::make_shared<FakeGroupState>(name, ranks);
    return slot;
  }

  std::string where_locked() const {
    std::map<std::string, std::vector<int>> by_state;
    for (size_t r = 0; r < where.size(); ++r) by_state[where[r].describe()].push_back(shown(static_cast<int>(r)));
    std::ostringstream out;
    bool first = true;
    for (const auto& [state, ranks] : by_state) {
      out << (first ? "" : "; ") << ranks_text(ranks) << ": " << state;
      first = false;
    }
    return out.str();
  }

  // Marks `pending` failed and returns the callbacks to run once unlocked.
  Callbacks fail_locked(PendingCollective& pending, std::exception_ptr error) {
    Callbacks callbacks;
    if (pending.state == CollectiveState::Done || pending.state == CollectiveState::Failed) return callbacks;
    pending.state = CollectiveState::Failed;
    pending.error = std::move(error);
    for (auto& arrival : pending.arrivals) {
      if (!arrival) continue;
      for (auto& cb : arrival->callbacks) callbacks.push_back(std::move(cb));
      arrival->callbacks.clear();
    }
    pending.cv.notify_all();
    return callbacks;
  }

  Callbacks complete_locked(PendingCollective& pending, int64_t now_ns) {
    Callbacks callbacks;
    pending.state = CollectiveState::Done;
    if (pending.end_ns == 0) pending.end_ns = now_ns;  // simulated time planned it already
    for (auto& arrival : pending.arrivals) {
      for (auto& cb : arrival->callbacks) callbacks.push_back(std::move(cb));
      arrival->callbacks.clear();
      // The data moved: the buffers are their ranks' again (a collective
      // lives until every rank dropped its Work; its ranks' buffers need not).
      arrival->input = at::Tensor();
      arrival->output = at::Tensor();
    }
    pending.scratch = at::Tensor();
    pending.cv.notify_all();
    return callbacks;
  }

  // Staged path (see PendingCollective). Folds the arrivals that are next in
  // rank order into `staging` and drops the backend's reference to their inputs.
  void fold_arrivals_locked(PendingCollective& p) {
    const int n = static_cast<int>(p.arrivals.size());
    while (p.folded < n && p.arrivals[p.folded]) {
      Arrival& a = *p.arrivals[p.folded];
      const int64_t count = a.input.numel();
      if (p.folded == 0) {
        p.staging = a.desc.op == CollectiveOp::AllGather ? at::empty({n * count}, a.input.options())
                                                         : at::empty({count}, a.input.options());
      }
      if (count > 0) {
        if (a.desc.op == CollectiveOp::AllGather) {
          std::memcpy(mutable_byte_ptr(p.staging) + p.folded * a.input.nbytes(), byte_ptr(a.input), a.input.nbytes());
        } else {
          fold_into(p.staging.data_ptr(), a.input.data_ptr(), count, a.desc.dtype, a.desc.reduce_op,
                    a.desc.predivide_factor, p.folded == 0);
        }
      }
      a.input = at::Tensor();
      ++p.folded;
    }
  }

  // Writes group rank t's all-gather output from `staging`; its part is then
  // done (its callbacks are returned), and the collective once every part is.
  Callbacks write_output_locked(PendingCollective& p, int t, int64_t now_ns) {
    Callbacks callbacks;
    if (p.state != CollectiveState::Ready || p.written[t]) return callbacks;
    Arrival& a = *p.arrivals[t];
    if (p.staging.nbytes() > 0) std::memcpy(mutable_byte_ptr(a.output), byte_ptr(p.staging), p.staging.nbytes());
    p.written[t] = 1;
    a.output = at::Tensor();               // the rank's to free now, not when the last rank is done
    if (p.end_ns == 0) p.end_ns = now_ns;  // real time: data landed first now
    callbacks = std::move(a.callbacks);
    a.callbacks.clear();
    if (++p.written_count == static_cast<int>(p.arrivals.size())) {
      p.state = CollectiveState::Done;
      p.staging = at::Tensor();
      p.cv.notify_all();
    }
    return callbacks;
  }

  // The staged collective `p` just became ready: a reduce-scatter writes
  // every (small) output and completes; an all-gather waits for its ranks,
  // except those that exited (nobody else would write theirs).
  Callbacks start_staged_locked(PendingCollective& p, int64_t now_ns) {
    const int n = static_cast<int>(p.arrivals.size());
    fold_arrivals_locked(p);
    p.state = CollectiveState::Ready;
    if (p.first_desc().op == CollectiveOp::AllGather) {
      p.written.assign(n, 0);
      p.cv.notify_all();  // waiting ranks write their outputs
      Callbacks callbacks;
      for (int t = 0; t < n; ++t) {
        if (!exited[p.global_ranks[t]]) continue;
        auto more = write_output_locked(p, t, now_ns);
        callbacks.insert(callbacks.end(), more.begin(), more.end());
      }
      return callbacks;
    }
    const CollectiveDesc& desc = p.first_desc();
    try {
      for (int t = 0; t < n; ++t) {
        const at::Tensor& out = p.arrivals[t]->output;
        if (out.numel() == 0) continue;
        std::memcpy(out.data_ptr(), byte_ptr(p.staging) + t * out.nbytes(), out.nbytes());
        if (desc.reduce_op == ReduceOp::Avg) out.div_(n);
        if (desc.postdivide_factor != 1.0) out.div_(desc.postdivide_factor);
      }
    } catch (const std::exception& e) {
      return fail_locked(p, std::make_exception_ptr(CommError(p.header() + " " + to_string(desc.op) +
                                                              ": data movement failed: " + e.what())));
    }
    p.staging = at::Tensor();
    return complete_locked(p, now_ns);
  }

  // Writes the outputs of `global`'s ready staged all-gathers that it has
  // not waited on; forgets those that ended.
  Callbacks flush_rank_locked(int global, int64_t now_ns) {
    Callbacks callbacks;
    auto& list = unwritten[global];
    for (auto it = list.begin(); it != list.end();) {
      PendingCollective& p = *it->first;
      if (p.state == CollectiveState::Ready) {
        auto more = write_output_locked(p, it->second, now_ns);
        callbacks.insert(callbacks.end(), more.begin(), more.end());
      }
      it = p.state == CollectiveState::Gathering ? std::next(it) : list.erase(it);
    }
    return callbacks;
  }

  // The collective can never complete: a member rank ended without calling it.
  std::optional<std::string> exited_member_locked(const PendingCollective& pending) const {
    if (exited_count == 0) return std::nullopt;
    for (size_t r = 0; r < pending.arrivals.size(); ++r) {
      int global = pending.global_ranks[r];
      if (!pending.arrivals[r] && exited[global]) {
        return "rank " + std::to_string(shown(global)) + " " + where[global].describe() +
               " without calling this collective";
      }
    }
    return std::nullopt;
  }
};

FakeWorldState::FakeWorldState(int world_size, bool fibers, std::chrono::milliseconds timeout, const Clock& clock)
    : world_size_(world_size), fibers_(fibers), timeout_(timeout), clock_(clock), impl_(std::make_shared<Impl>()) {
  impl_->where.resize(world_size);
  impl_->exited.assign(world_size, false);
  impl_->unwritten.resize(world_size);
  if (!fibers_) impl_->progress = std::thread([this, impl = impl_] { progress_loop(*impl); });
}

FakeWorldState::~FakeWorldState() {
  const bool on_progress_thread = impl_->progress.joinable() && impl_->progress.get_id() == std::this_thread::get_id();
  {
    Lock lock(impl_->mutex);
    impl_->stopping = true;
    impl_->world_destroyed = on_progress_thread;
  }
  impl_->progress_cv.notify_all();
  if (!impl_->progress.joinable()) return;
  // The last reference may go away in a callback the progress thread runs:
  // it cannot join itself, and it holds its own reference to Impl.
  if (on_progress_thread) {
    impl_->progress.detach();
  } else {
    impl_->progress.join();
  }
}

void FakeWorldState::use_simulated_time(SimClock* clock, const CostModelParams& cost_model) {
  cost_model.validate();
  sim_clock_ = clock;
  cost_model_ = cost_model;
}

bool FakeWorldState::aborted() const {
  Lock lock(impl_->mutex);
  return impl_->aborted;
}

std::string FakeWorldState::where_ranks_are() const {
  Lock lock(impl_->mutex);
  return impl_->where_locked();
}

void FakeWorldState::abort(const std::string& reason) {
  Callbacks callbacks;
  {
    Lock lock(impl_->mutex);
    if (impl_->aborted) return;
    impl_->aborted = true;
    impl_->abort_reason = reason;
    for (auto& [name, group] : impl_->groups) {
      for (auto& [seq, pending] : group->gathering) {
        auto error = std::make_exception_ptr(WorldAbortedError(
            pending->header() + " " + to_string(pending->first_desc().op) + ": world aborted: " + reason));
        auto more = impl_->fail_locked(*pending, error);
        callbacks.insert(callbacks.end(), more.begin(), more.end());
      }
    }
  }
  run_callbacks(callbacks);
}

void FakeWorldState::rank_exited(int global_rank, bool failed, const std::string& error) {
  Callbacks callbacks;
  {
    Lock lock(impl_->mutex);
    if (!impl_->exited[global_rank]) ++impl_->exited_count;
    impl_->exited[global_rank] = true;
    if (!impl_->unwritten[global_rank].empty()) callbacks = impl_->flush_rank_locked(global_rank, clock_.now_ns());
    auto& where = impl_->where[global_rank];
    where.kind = failed ? RankWhere::Kind::Failed : RankWhere::Kind::Exited;
    where.error = error;
    for (auto& [name, group] : impl_->groups) {
      for (auto& [seq, pending] : group->gathering) {
        if (auto why = impl_->exited_member_locked(*pending)) {
          auto err = std::make_exception_ptr(CommError(pending->header() + " " + to_string(pending->first_desc().op) +
                                                       ": can never complete: " + *why +
                                                       "; where each rank is: " + impl_->where_locked()));
          auto more = impl_->fail_locked(*pending, err);
          callbacks.insert(callbacks.end(), more.begin(), more.end());
        }
      }
    }
  }
  run_callbacks(callbacks);
}

// ---------------------------------------------------------------------------

class FakeWork final : public Work {
 public:
  FakeWork(std::shared_ptr<FakeWorldState> world, std::shared_ptr<PendingCollective> pending, int group_rank)
      : world_(std::move(world)),
        pending_(std::move(pending)),
        group_rank_(group_rank),
        desc_(pending_->arrivals[group_rank_]->desc) {}

  void wait() override;
  bool is_completed() const override {
    Callbacks callbacks;
    bool done = false;
    {
      Lock lock(world_->impl_->mutex);
      PendingCollective& p = *pending_;
      // A staged all-gather's output is written when its rank looks for it.
      if (p.staged && p.state == CollectiveState::Ready) {
        callbacks = world_->impl_->write_output_locked(p, group_rank_, world_->clock().now_ns());
      }
      done = p.state == CollectiveState::Done || p.state == CollectiveState::Failed ||
             (!p.written.empty() && p.written[group_rank_]);
    }
    run_callbacks(callbacks);
    return done;
  }
  std::exception_ptr exception() const override {
    Lock lock(world_->impl_->mutex);
    return pending_->error;
  }
  const CollectiveDesc& desc() const override { return desc_; }
  WorkTimes times() const override {
    Lock lock(world_->impl_->mutex);
    WorkTimes times;
    times.issue_ns = pending_->arrivals[group_rank_]->issue_ns;
    times.start_ns = pending_->start_ns;
    times.end_ns = pending_->end_ns;
    return times;
  }
  void on_completion(std::function<void()> callback) override {
    {
      Lock lock(world_->impl_->mutex);
      if (pending_->state != CollectiveState::Done && pending_->state != CollectiveState::Failed) {
        pending_->arrivals[group_rank_]->callbacks.push_back(std::move(callback));
        return;
      }
    }
    callback();
  }

 private:
  std::shared_ptr<FakeWorldState> world_;
  std::shared_ptr<PendingCollective> pending_;
  int group_rank_;
  const CollectiveDesc& desc_;  // the arrival's: kept (never reassigned) while pending_ lives
};

namespace {

// Runs data-movement task `task` of a ready collective. Reads arrivals only
// (fixed once the collective is ready), so it runs without the world lock.
void run_task(PendingCollective& p, size_t task) {
  const auto& a = p.arrivals;
  const int n = static_cast<int>(a.size());
  const CollectiveDesc& desc = p.first_desc();
  switch (desc.op) {
    case CollectiveOp::AllGather: {
      const auto& out = a[task]->output;
      const size_t bytes = a[task]->input.nbytes();
      if (bytes == 0) return;
      char* base = mutable_byte_ptr(out);
      for (int k = 0; k < n; ++k) {
        const char* src = byte_ptr(a[k]->input);
        char* dst = base + k * bytes;
        if (src != dst) std::memcpy(dst, src, bytes);
      }
      return;
    }
    case CollectiveOp::Broadcast: {
      if (static_cast<int>(task) == desc.root || a[task]->output.numel() == 0) return;
      std::memcpy(mutable_byte_ptr(a[task]->output), byte_ptr(a[desc.root]->input), a[task]->output.nbytes());
      return;
    }
    case CollectiveOp::ReduceScatter: {
      const auto& out = a[task]->output;
      const int64_t count = out.numel();
      if (count == 0) return;
      const size_t offset = task * out.nbytes();
      std::vector<const char*> sources(n);
      for (int k = 0; k < n; ++k) sources[k] = byte_ptr(a[k]->input) + offset;
      reduce_into(out.data_ptr(), sources, count, desc.dtype, desc.reduce_op, desc.predivide_factor);
      if (desc.reduce_op == ReduceOp::Avg) out.div_(n);
      if (desc.postdivide_factor != 1.0) out.div_(desc.postdivide_factor);
      return;
    }
    case CollectiveOp::AllReduce: {
      const size_t chunks = p.phase_ends[0];
      if (task < chunks) {
        const int64_t numel = p.scratch.numel();
        const int64_t begin = static_cast<int64_t>(task) * p.chunk_elements;
        const int64_t count = std::min(p.chunk_elements, numel - begin);
        if (count <= 0) return;
        const size_t offset = begin * p.scratch.element_size();
        std::vector<const char*> sources(n);
        for (int k = 0; k < n; ++k) sources[k] = byte_ptr(a[k]->input) + offset;
        reduce_into(mutable_byte_ptr(p.scratch) + offset, sources, count, desc.dtype, desc.reduce_op, 1.0);
        if (desc.reduce_op == ReduceOp::Avg) p.scratch.narrow(0, begin, count).div_(n);
      } else {
        const auto& out = a[task - chunks]->output;
        if (out.numel() > 0) std::memcpy(mutable_byte_ptr(out), byte_ptr(p.scratch), out.nbytes());
      }
      return;
    }
    case CollectiveOp::Barrier: return;
  }
}

// Claims and runs one open task of `p` (lock held on entry and on return).
// Returns false when no task is open.
bool help_locked(FakeWorldState& world, FakeWorldState::Impl& impl, PendingCollective& p, Lock& lock,
                 Callbacks& callbacks) {
  if (p.staged || p.state != CollectiveState::Ready || p.next_task >= p.phase_ends[p.phase]) return false;
  const size_t task = p.next_task++;
  lock.unlock();
  std::exception_ptr task_error;
  try {
    run_task(p, task);
  } catch (const std::exception& e) {
    task_error = std::make_exception_ptr(
        CommError(p.header() + " " + to_string(p.first_desc().op) + ": data movement failed: " + e.what()));
  }
  lock.lock();
  Callbacks more;
  if (task_error) {
    more = impl.fail_locked(p, task_error);
  } else if (++p.tasks_done == p.phase_ends[p.phase]) {
    ++p.phase;
    if (p.phase == p.phase_ends.size()) {
      more = impl.complete_locked(p, world.clock().now_ns());
    } else {
      p.cv.notify_all();  // the next phase's tasks are open
    }
  }
  callbacks.insert(callbacks.end(), std::make_move_iterator(more.begin()), std::make_move_iterator(more.end()));
  return true;
}

}  // namespace

// `impl` (not impl_) only: after a callback, `this` may be gone.
void FakeWorldState::progress_loop(Impl& impl) {
  Lock lock(impl.mutex);
  while (true) {
    impl.progress_cv.wait(lock, [&impl] { return impl.stopping || !impl.ready.empty(); });
    if (impl.world_destroyed || impl.ready.empty()) return;
    std::shared_ptr<PendingCollective> pending = std::move(impl.ready.front());
    impl.ready.pop_front();
    Callbacks callbacks;
    while (help_locked(*this, impl, *pending, lock, callbacks)) {}
    if (!callbacks.empty()) {
      lock.unlock();
      run_callbacks(callbacks);
      lock.lock();
      if (impl.world_destroyed) return;
    }
  }
}

void FakeWork::wait() {
  auto& impl = *world_->impl_;
  PendingCollective& p = *pending_;
  const int global_rank = p.global_ranks[group_rank_];
  BackendScope not_compute(world_->sim_clock_, global_rank);
  Callbacks callbacks;
  Lock lock(impl.mutex);
  impl.where[global_rank].set(RankWhere::Kind::Waiting, *p.group_name, desc_.op, p.seq);
  const auto deadline = p.arrivals[group_rank_]->deadline;
  std::exception_ptr error;
  while (true) {
    if (p.state == CollectiveState::Done) break;
    if (p.state == CollectiveState::Failed) {
      error = p.error;
      break;
    }
    if (p.staged && p.state == CollectiveState::Ready) {
      auto more = impl.write_output_locked(p, group_rank_, world_->clock().now_ns());
      callbacks.insert(callbacks.end(), more.begin(), more.end());
      if (p.written[group_rank_]) break;  // this rank's part is done
    }
    if (help_locked(*world_, impl, p, lock, callbacks)) continue;
    if (p.state != CollectiveState::Gathering) {
      p.cv.wait(lock);  // other ranks are finishing the last tasks
      continue;
    }
    if (!p.cv.wait_until(lock, deadline) && p.state == CollectiveState::Gathering) {
      std::ostringstream msg;
      msg << p.header() << " " << to_string(desc_.op) << ": timed out after " << world_->timeout().count()
          << " ms waiting for ranks " << rank_set_string(impl.shown(p.missing_global_ranks())) << " ("
          << p.first_desc().labelled_call_string() << "); where each rank is: " << impl.where_locked();
      callbacks = impl.fail_locked(p, std::make_exception_ptr(CollectiveTimeoutError(msg.str())));
    }
  }
  impl.where[global_rank].set(RankWhere::Kind::Running, *p.group_name, desc_.op, p.seq, error != nullptr);
  if (!error && world_->sim_clock_ != nullptr) world_->sim_clock_->wait_until(global_rank, p.end_ns);
  lock.unlock();
  run_callbacks(callbacks);
  if (error) std::rethrow_exception(error);
}

// ---------------------------------------------------------------------------

class FakeProcessGroup final : public ProcessGroup {
 public:
  FakeProcessGroup(std::shared_ptr<FakeWorldState> world, std::shared_ptr<FakeGroupState> group, int rank)
      : world_(std::move(world)), group_(std::move(group)), rank_(rank) {}

  // Rank and size as played (representative ranks); members(): the ranks present.
  int rank() const override { return played() ? group_->played[rank_] : rank_; }
  int size() const override { return static_cast<int>(group_->reported().size()); }
  const std::string& name() const override { return group_->name; }
  const std::vector<int>& global_ranks() const override { return group_->reported(); }
  uint64_t sequence_number() const override { return seq_; }

  WorkPtr all_gather_into_tensor(const at::Tensor& output, const at::Tensor& input) override {
    auto desc = check_all_gather(*this, output, input);
    if (overlaps(input, output) && byte_ptr(input) != byte_ptr(output) + static_cast<size_t>(rank()) * input.nbytes()) {
      fail_local(desc, "input overlaps output but is not this rank's chunk of it");
    }
    return issue(std::move(desc), input, output);
  }
  WorkPtr reduce_scatter_tensor(const at::Tensor& output, const at::Tensor& input,
                                const ReduceScatterOptions& options) override {
    auto desc = check_reduce_scatter(*this, output, input, options);
    if (overlaps(input, output) &&
        byte_ptr(output) != byte_ptr(input) + static_cast<size_t>(rank()) * output.nbytes()) {
      fail_local(desc, "output overlaps input but is not this rank's chunk of it");
    }
    return issue(std::move(desc), input, output);
  }
  WorkPtr all_reduce(const at::Tensor& tensor, const AllReduceOptions& options) override {
    return issue(check_all_reduce(*this, tensor, options), tensor, tensor);
  }
  WorkPtr broadcast(const at::Tensor& tensor, const BroadcastOptions& options) override {
    return issue(check_broadcast(*this, tensor, options), tensor, tensor);
  }
  WorkPtr barrier() override { return issue(describe_barrier(*this), at::Tensor(), at::Tensor()); }

  ProcessGroupPtr split(const std::vector<std::vector<int>>& partition) override;

 private:
  bool played() const { return !group_->played.empty(); }
  int members() const { return static_cast<int>(group_->global_ranks.size()); }
  int member_index(int r) const;
  [[noreturn]] void fail_local(const CollectiveDesc& desc, const std::string& what) {
    throw CommError(desc.to_string() + ": " + what);
  }
  WorkPtr issue(CollectiveDesc desc, const at::Tensor& input, const at::Tensor& output);
  void setup_tasks_locked(PendingCollective& pending);
  Callbacks start_locked(const std::shared_ptr<PendingCollective>& pending);

  std::shared_ptr<FakeWorldState> world_;
  std::shared_ptr<FakeGroupState> group_;
  int rank_;
  uint64_t seq_ = 0;
  int splits_ = 0;
};

void FakeProcessGroup::setup_tasks_locked(PendingCollective& p) {
  const int n = members();
  const CollectiveDesc& desc = p.first_desc();
  if (p.data_free) {
    p.phase_ends.clear();  // meta tensors: shapes were checked, there is nothing to move
    return;
  }
  switch (desc.op) {
    case CollectiveOp::AllGather:
    case CollectiveOp::ReduceScatter:
    case CollectiveOp::Broadcast: p.phase_ends = {static_cast<size_t>(n)}; break;
    case CollectiveOp::AllReduce: {
      const int64_t numel = desc.input_numel();
      // Enough chunks for every waiting rank to help; none smaller than a block.
      const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(n, (numel + kReduceBlock - 1) / kReduceBlock));
      p.chunk_elements = (numel + chunks - 1) / chunks;
      p.scratch = at::empty({numel}, p.arrivals[p.first]->input.options());
      p.phase_ends = {static_cast<size_t>(chunks), static_cast<size_t>(chunks + n)};
      break;
    }
    case CollectiveOp::Barrier: p.phase_ends.clear(); break;
  }
}

// Every rank of a mismatched collective fails with this: who called what
// under the one sequence number, who has not called yet, where each rank is.
static CollectiveMismatchError mismatch_error(const PendingCollective& p, const FakeWorldState::Impl& impl) {
  std::map<std::string, std::vector<int>> by_call;
  for (size_t r = 0; r < p.arrivals.size(); ++r) {
    if (p.arrivals[r]) by_call[p.arrivals[r]->desc.labelled_call_string()].push_back(impl.shown(p.global_ranks[r]));
  }
  std::ostringstream msg;
  msg << "collective mismatch in " << p.header() << ":";
  for (const auto& [call, ranks] : by_call) msg << " " << ranks_text(ranks) << " called " << call << ";";
  auto missing = impl.shown(p.missing_global_ranks());
  if (!missing.empty()) msg << " ranks " << rank_set_string(missing) << " have not called it yet;";
  msg << " where each rank is: " << impl.where_locked();
  return CollectiveMismatchError(msg.str());
}

// The last rank arrived: plans the collective's (simulated) times and starts
// its data movement.
Callbacks FakeProcessGroup::start_locked(const std::shared_ptr<PendingCollective>& pending) {
  auto& impl = *world_->impl_;
  PendingCollective& p = *pending;
  p.state = CollectiveState::Ready;
  p.start_ns = world_->clock().now_ns();
  if (world_->sim_clock_ != nullptr) {
    // Starts when the last rank arrived (in simulated time), lasts the modelled time.
    p.start_ns = 0;
    for (const auto& a : p.arrivals) p.start_ns = std::max(p.start_ns, a->issue_ns);
    const CollectiveDesc& d = p.first_desc();
    const int64_t bytes = total_bytes(d.op, d.input_numel(), d.output_numel(), c10::elementSize(d.dtype));
    // At the group's (played) size: absent ranks arrived with their representatives.
    p.end_ns = p.start_ns + predict_ns(d.op, bytes, size(), world_->cost_model_);
  }
  if (p.staged) return impl.start_staged_locked(p, world_->clock().now_ns());
  setup_tasks_locked(p);
  if (p.phase_ends.empty()) return impl.complete_locked(p, p.start_ns);
  p.cv.notify_all();
  if (impl.progress.joinable()) {
    impl.ready.push_back(pending);
    impl.progress_cv.notify_one();
  }
  return {};
}

// Whether a call is data-free (meta tensors); CPU or meta only, not mixed.
static bool is_data_free_call(const CollectiveDesc& desc, const at::Tensor& input, const at::Tensor& output) {
  const bool meta = input.defined() ? input.is_meta() : output.defined() && output.is_meta();
  for (const at::Tensor* t : {&input, &output}) {
    if (t->defined() && !t->device().is_cpu() && !t->is_meta()) {
      throw CommError(desc.to_string() +
                      ": the fake backend moves CPU tensors only (meta tensors: data-free, nothing moves), got " +
                      t->device().str());
    }
    if (t->defined() && t->is_meta() != meta) {
      throw CommError(desc.to_string() + ": input and output must both be meta (data-free) or both CPU tensors");
    }
  }
  return meta;
}

// Same call, but some ranks hold data and others meta tensors: nothing could be moved consistently.
static CollectiveMismatchError data_free_mismatch_error(const PendingCollective& p, const FakeWorldState::Impl& impl,
                                                        int global_rank, bool meta) {
  return CollectiveMismatchError(
      "collective mismatch in " + p.header() + ": rank " + std::to_string(impl.shown(global_rank)) + " passed " +
      (meta ? "meta" : "CPU") + " tensors, rank " + std::to_string(impl.shown(p.global_ranks[p.first])) + " " +
      (p.data_free ? "meta" : "CPU") + " ones (data-free and data ranks cannot share a collective)");
}

WorkPtr FakeProcessGroup::issue(CollectiveDesc desc, const at::Tensor& input, const at::Tensor& output) {
  const bool meta = is_data_free_call(desc, input, output);
  if (played() && !meta && desc.op != CollectiveOp::Barrier) {
    fail_local(desc,
               "representative ranks stand in for absent ranks whose data does not exist: collectives must be "
               "data-free (meta tensors; TrainConfig::data_free / --data-free)");
  }
  auto& impl = *world_->impl_;
  const int global_rank = group_->global_ranks[rank_];
  BackendScope not_compute(world_->sim_clock_, global_rank);
  Callbacks callbacks;
  std::shared_ptr<PendingCollective> pending;
  std::exception_ptr failed_now;
  {
    Lock lock(impl.mutex);
    if (impl.aborted) {
      throw WorldAbortedError(desc.to_string() + ": world aborted: " + impl.abort_reason);
    }
    seq_ = desc.seq;
    if (!impl.unwritten[global_rank].empty()) callbacks = impl.flush_rank_locked(global_rank, world_->clock().now_ns());
    impl.where[global_rank].set(RankWhere::Kind::Running, group_->name, desc.op, desc.seq);

    auto& slot = group_->gathering[desc.seq];
    if (!slot) {
      slot = std::make_shared<PendingCollective>(world_->fibers());
      slot->group_name = &group_->name;
      slot->seq = desc.seq;
      slot->global_ranks = group_->global_ranks;
      slot->arrivals.resize(members());
      // Data-free collectives move nothing: never staged.
      slot->staged =
          world_->fibers() && !meta && (desc.op == CollectiveOp::AllGather || desc.op == CollectiveOp::ReduceScatter);
    }
    pending = slot;
    PendingCollective& p = *pending;
    const bool was_failed = p.state == CollectiveState::Failed;
    const bool data_free_mismatch = !was_failed && p.first >= 0 && meta != p.data_free;
    const bool mismatch = !was_failed && p.first >= 0 && (!desc.matches(p.first_desc()) || data_free_mismatch);

    p.arrivals[rank_] = Arrival{std::move(desc), input, output, world_->clock().now_ns(),
                                std::chrono::steady_clock::now() + world_->timeout()};
    const CollectiveDesc& arrived = p.arrivals[rank_]->desc;  // `desc` moved into it
    ++p.arrived;
    if (p.first < 0) p.data_free = meta;
    if (p.first < 0) p.first = rank_;
    if (p.arrived == members()) group_->gathering.erase(arrived.seq);

    Callbacks more;
    if (data_free_mismatch) {
      more = impl.fail_locked(p, std::make_exception_ptr(data_free_mismatch_error(p, impl, global_rank, meta)));
    } else if (mismatch) {
      more = impl.fail_locked(p, std::make_exception_ptr(mismatch_error(p, impl)));
    } else if (!was_failed) {
      if (p.staged) {
        impl.fold_arrivals_locked(p);
        if (p.first_desc().op == CollectiveOp::AllGather) impl.unwritten[global_rank].emplace_back(pending, rank_);
      }
      if (p.arrived == members()) {
        more = start_locked(pending);
      } else if (auto why = impl.exited_member_locked(p)) {
        more = impl.fail_locked(p, std::make_exception_ptr(CommError(p.header() + " " + to_string(arrived.op) +
                                                                     ": can never complete: " + *why +
                                                                     "; where each rank is: " + impl.where_locked())));
      }
    }
    callbacks.insert(callbacks.end(), std::make_move_iterator(more.begin()), std::make_move_iterator(more.end()));
    if (p.state == CollectiveState::Failed) failed_now = p.error;
  }
  run_callbacks(callbacks);
  // This rank fails at once too, with the error the others see.
  if (failed_now) std::rethrow_exception(failed_now);
  return std::make_shared<FakeWork>(world_, pending, rank_);
}

ProcessGroupPtr FakeProcessGroup::split(const std::vector<std::vector<int>>& partition) {
  check_partition(*this, partition);
  const int index = splits_++;
  std::shared_ptr<FakeGroupState> sub;
  {
    auto& impl = *world_->impl_;
    Lock lock(impl.mutex);
    auto [it, inserted] = group_->splits.emplace(index, partition);
    if (!inserted && it->second != partition) {
      throw CommError("split " + std::to_string(index) + " of group " + group_->name + ": rank " +
                      std::to_string(rank()) + " passed a different partition than an earlier rank");
    }
    for (size_t g = 0; g < partition.size(); ++g) {
      const auto& ranks = partition[g];
      if (std::find(ranks.begin(), ranks.end(), rank()) == ranks.end()) continue;
      std::vector<int> global, shown;
      for (int r : ranks) {
        global.push_back(group_->global_ranks[member_index(r)]);
        shown.push_back(group_->reported()[r]);
      }
      sub = impl.group_locked(group_->name + "/split" + std::to_string(index) + "." + std::to_string(g), global);
      if (!group_->shown_ranks.empty()) sub->shown_ranks = std::move(shown);
    }
  }
  if (!sub) return nullptr;
  const auto& members = sub->global_ranks;
  const int sub_rank =
      static_cast<int>(std::find(members.begin(), members.end(), group_->global_ranks[rank_]) - members.begin());
  return std::make_shared<FakeProcessGroup>(world_, std::move(sub), sub_rank);
}

// Group rank r's member index. Representative ranks: a subgroup holds present
// ranks only (one rank's self group is fine; a 2-D mesh's rows are not).
int FakeProcessGroup::member_index(int r) const {
  if (!played()) return r;
  const auto& played = group_->played;
  const auto it = std::find(played.begin(), played.end(), r);
  if (it == played.end()) {
    throw CommError("split of group " + group_->name + ": rank " + std::to_string(rank()) + "'s subgroup holds rank " +
                    std::to_string(r) +
                    ", which no representative plays; representative ranks play a 1-D world (subgroups of present "
                    "ranks only: no 2-D mesh or HSDP)");
  }
  return static_cast<int>(it - played.begin());
}

void FakeWorldState::play(std::vector<int> played_ranks, int played_world_size) {
  if (static_cast<int>(played_ranks.size()) != world_size_) {
    throw std::invalid_argument("FakeWorldState::play: " + std::to_string(played_ranks.size()) +
                                " played ranks for a world of " + std::to_string(world_size_) + " ranks");
  }
  {
    Lock lock(impl_->mutex);
    impl_->played = played_ranks;
  }
  played_ranks_ = std::move(played_ranks);
  played_world_size_ = played_world_size;
}

ProcessGroupPtr FakeWorldState::world_group(int rank) {
  std::shared_ptr<FakeGroupState> group;
  {
    Lock lock(impl_->mutex);
    const bool created = impl_->groups.count("world") == 0;
    std::vector<int> ranks(world_size_);
    for (int r = 0; r < world_size_; ++r) ranks[r] = r;
    group = impl_->group_locked("world", ranks);
    if (created && !played_ranks_.empty()) {
      group->played = played_ranks_;
      group->shown_ranks.resize(played_world_size_);
      for (int r = 0; r < played_world_size_; ++r) group->shown_ranks[r] = r;
    }
  }
  return std::make_shared<FakeProcessGroup>(shared_from_this(), std::move(group), rank);
}

}  // namespace fsdpsim::sim
