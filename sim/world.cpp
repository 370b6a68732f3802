#include "sim/world.h"

#include <ATen/Parallel.h>
#include <pthread.h>
#include <boost/fiber/all.hpp>

#include <condition_variable>
#include <cstring>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "backends/gloo/gloo_process_group.h"
#include "backends/observe/flight_recorder.h"
#include "backends/observe/observed_process_group.h"
#include "backends/observe/trace_recorder.h"
#include "sim/fake_process_group.h"
#include "sim/fiber_scheduler.h"
#include "sim/fiber_stacks.h"

namespace fsdpsim::sim {

const char* to_string(RankKind kind) { return kind == RankKind::Threads ? "threads" : "fibers"; }
const char* to_string(SchedulePolicy policy) {
  return policy == SchedulePolicy::RoundRobin ? "round-robin" : "seeded-random";
}
const char* to_string(CommBackend backend) { return backend == CommBackend::Fake ? "fake" : "gloo"; }

namespace {

void validate_played_ranks(const WorldOptions& o) {
  const auto& played_ranks = o.played_ranks;
  const int world_size = o.world_size;
  if (played_ranks.empty()) return;
  if (o.backend != CommBackend::Fake) {
    throw std::invalid_argument("played_ranks (representative ranks) need the fake backend: Gloo runs every rank");
  }
  std::vector<char> seen(world_size, 0);
  for (int r : played_ranks) {
    if (r < 0 || r >= world_size) {
      throw std::invalid_argument("played_ranks: rank " + std::to_string(r) + " is outside the world [0, " +
                                  std::to_string(world_size) + ")");
    }
    if (seen[r]) throw std::invalid_argument("played_ranks: rank " + std::to_string(r) + " is listed twice");
    seen[r] = 1;
  }
}

}  // namespace

void WorldOptions::validate() const {
  if (world_size < 1) throw std::invalid_argument("world_size must be >= 1, got " + std::to_string(world_size));
  if (backend == CommBackend::Gloo && rank_kind == RankKind::Fibers) {
    throw std::invalid_argument("Gloo ranks run as threads or processes, not fibers (Gloo blocks its OS thread)");
  }
  if (backend == CommBackend::Gloo && world_size > 64) {
    throw std::invalid_argument("Gloo thread ranks open world_size^2 sockets; world_size " +
                                std::to_string(world_size) + " is over the limit of 64");
  }
  if (rank_kind == RankKind::Threads && ranks_run() > 8192) {
    throw std::invalid_argument("thread ranks are limited to 8192, got " + std::to_string(ranks_run()));
  }
  validate_played_ranks(*this);
  if (collective_timeout.count() <= 0) throw std::invalid_argument("collective_timeout must be positive");
  if (heartbeat && heartbeat_interval.count() <= 0) {
    throw std::invalid_argument("heartbeat_interval must be positive, got " +
                                std::to_string(heartbeat_interval.count()) + " ms");
  }
  if (simulated_time && (rank_kind != RankKind::Fibers || backend != CommBackend::Fake)) {
    throw std::invalid_argument("simulated_time needs fiber ranks on the fake backend");
  }
  if (simulated_time) cost_model.validate();
  if (!(compute_scale >= 0.0)) throw std::invalid_argument("compute_scale must be >= 0");
  if (fixed_compute_ns < 0) throw std::invalid_argument("fixed_compute_ns must be >= 0");
  if (compute_time == ComputeTime::OpCosts && (!simulated_time || !op_costs)) {
    throw std::invalid_argument(
        "compute_time OpCosts needs simulated_time and an op cost table (WorldOptions::op_costs, recorded by a data "
        "run "
        "with record_op_costs)");
  }
  if (record_op_costs && (!simulated_time || compute_time != ComputeTime::Measured)) {
    throw std::invalid_argument(
        "record_op_costs measures compute on the simulated clock: it needs simulated_time with ComputeTime::Measured");
  }
  if (fiber_stack_bytes < 64 * 1024) throw std::invalid_argument("fiber_stack_bytes must be >= 64 KiB");
  if (thread_stack_bytes < 256 * 1024) throw std::invalid_argument("thread_stack_bytes must be >= 256 KiB");
}

bool WorldResult::ok() const {
  for (const auto& rank : ranks) {
    if (!rank.ok) return false;
  }
  return true;
}

std::string WorldResult::error_report() const {
  std::ostringstream out;
  for (const auto& rank : ranks) {
    if (!rank.ok) out << "rank " << rank.rank << ": " << rank.error << "\n";
  }
  return out.str();
}

void WorldResult::throw_if_failed() const {
  if (!ok()) throw std::runtime_error("world failed:\n" + error_report());
}

RankContext* current_rank() { return detail::current_rank_slot(); }

void sleep_for(std::chrono::nanoseconds duration) {
  RankContext* rank = current_rank();
  if (rank != nullptr && rank->sim_clock() != nullptr) {
    // Simulated: the rank's clock moves on, the others get to run, no real wait.
    BackendScope not_compute(rank->sim_clock(), rank->rank());
    rank->sim_clock()->advance(rank->rank(), duration.count());
    boost::this_fiber::yield();
    return;
  }
  boost::this_fiber::sleep_for(duration);
}

void yield() { boost::this_fiber::yield(); }

World::World(WorldOptions options) : options_(std::move(options)) { options_.validate(); }

World::~World() = default;

namespace {

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

// Runs one rank's function; never throws.
class RankRunner {
 public:
  RankRunner(int rank, const WorldOptions& options, const Clock* clock, SimClock* sim_clock, FakeWorldState* fake_state,
             const std::function<ProcessGroupPtr(int)>& make_group, const std::function<void(RankContext&)>& rank_main,
             RankOutcome& outcome)
      : rank_(rank),
        options_(options),
        clock_(clock),
        sim_clock_(sim_clock),
        fake_state_(fake_state),
        make_group_(make_group),
        rank_main_(rank_main),
        outcome_(outcome) {}

  // Pooled stacks: the canary below this rank's stack was overwritten.
  void stack_overflowed(size_t stack_bytes) {
    outcome_.ok = false;
    outcome_.error = "fiber stack overflow: rank " + std::to_string(rank_) + " used more than its " +
                     std::to_string(stack_bytes >> 10) +
                     " KiB stack (and may have corrupted its neighbour's): raise WorldOptions::fiber_stack_bytes";
    if (fake_state_ != nullptr) fake_state_->abort(outcome_.error);
  }

  void operator()() {
    // Reports name the rank played (traces and the flight recorder do too).
    outcome_.rank = options_.played_ranks.empty() ? rank_ : options_.played_ranks[rank_];
    std::string error;
    try {
      const bool played = !options_.played_ranks.empty();
      RankContext context(rank_, options_.ranks_run(), options_.rank_kind, make_group_(rank_), clock_, sim_clock_,
                          played ? options_.played_ranks[rank_] : -1, played ? options_.world_size : -1);
      detail::current_rank_slot() = &context;
      if (sim_clock_) sim_clock_->on_switch_in(rank_);
      rank_main_(context);
    } catch (const std::exception& e) {
      error = e.what();
    } catch (...) {
      error = "unknown exception";
    }
    detail::current_rank_slot() = nullptr;
    outcome_.ok = error.empty();
    outcome_.error = error;
    if (fake_state_ != nullptr) {
      if (!outcome_.ok) fake_state_->abort("rank " + std::to_string(rank_) + " failed: " + first_line(error));
      fake_state_->rank_exited(rank_, !outcome_.ok, error);
    }
  }

 private:
  int rank_;
  const WorldOptions& options_;
  const Clock* clock_;
  SimClock* sim_clock_;
  FakeWorldState* fake_state_;
  const std::function<ProcessGroupPtr(int)>& make_group_;
  const std::function<void(RankContext&)>& rank_main_;
  RankOutcome& outcome_;
};

// Ranks [first, n) never started: they fail with `error`, and the world
// aborts so the started ranks do not wait for them.
void fail_unstarted(WorldResult& result, int first, const std::string& error, FakeWorldState* fake_state) {
  for (int q = first; q < static_cast<int>(result.ranks.size()); ++q) result.ranks[q] = RankOutcome{q, false, error};
  if (fake_state) fake_state->abort(error);
}

void* run_runner(void* arg) {
  at::set_num_threads(1);  // one intra-op thread per rank: ranks already fill the cores
  (*static_cast<RankRunner*>(arg))();
  return nullptr;
}

// One thread per rank with the given stack; a rank that cannot start fails
// itself and the ranks after it.
void run_on_threads(const std::vector<std::unique_ptr<RankRunner>>& runners, size_t stack_bytes, WorldResult& result,
                    FakeWorldState* fake_state) {
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, stack_bytes);
  std::vector<pthread_t> threads;
  threads.reserve(runners.size());
  for (size_t r = 0; r < runners.size(); ++r) {
    pthread_t thread;
    int rc = pthread_create(&thread, &attr, &run_runner, runners[r].get());
    if (rc != 0) {
      fail_unstarted(result, static_cast<int>(r),
                     "could not start rank thread " + std::to_string(r) + ": " + std::strerror(rc), fake_state);
      break;
    }
    threads.push_back(thread);
  }
  pthread_attr_destroy(&attr);
  for (auto& thread : threads) pthread_join(thread, nullptr);
}

// Each rank's group under one observing decorator feeding the trace (when
// set), then the flight recorder (when set), recorded under the rank's played
// global rank; `make_group` unchanged without either.
std::function<ProcessGroupPtr(int)> observed(std::function<ProcessGroupPtr(int)> make_group,
                                             const std::shared_ptr<observe::TraceRecorder>& trace,
                                             const std::shared_ptr<observe::FlightRecorder>& flight, const Clock& clock,
                                             const std::vector<int>& played) {
  std::vector<observe::SinkPtr> sinks;
  if (trace) sinks.push_back(trace);
  if (flight) sinks.push_back(flight);
  if (sinks.empty()) return make_group;
  return [inner = std::move(make_group), sinks, &clock, &played](int rank) -> ProcessGroupPtr {
    const int global = played.empty() ? rank : played[rank];
    return std::make_shared<observe::ObservedProcessGroup>(inner(rank), sinks, global, clock);
  };
}

// All fibers on one fresh OS thread: the caller's thread keeps its own
// scheduler, and one thread makes the interleaving deterministic.
void run_on_fibers(const std::vector<std::unique_ptr<RankRunner>>& runners, const WorldOptions& options,
                   SimClock* sim_clock, FakeWorldState* fake_state, WorldResult& result) {
  const int n = options.ranks_run();
  // Nothing may escape the host thread (std::terminate): a fiber that
  // cannot get its stack fails its rank and the ranks after it.
  std::thread host([&] {
    at::set_num_threads(1);
    std::unique_ptr<FiberStackPool> pool;  // outlives the fibers
    std::vector<boost::fibers::fiber> fibers;
    // Before the scheduler: it hands every fiber the thread-local state of now, callback included.
    std::optional<detail::OpCostHook> op_costs;
    if (sim_clock != nullptr && (options.record_op_costs || options.compute_time == ComputeTime::OpCosts)) {
      op_costs.emplace(*sim_clock, n, options.record_op_costs.get(),
                       options.compute_time == ComputeTime::OpCosts ? options.op_costs.get() : nullptr);
    }
    try {
      boost::fibers::use_scheduling_algorithm<RankScheduler>(options.schedule, options.seed, sim_clock);
      fibers.reserve(n);
      if (options.fiber_stacks == FiberStacks::Pooled) {
        pool = std::make_unique<FiberStackPool>(n, options.fiber_stack_bytes);
      }
      for (int r = 0; r < n; ++r) {
        auto body = [runner = runners[r].get(), stacks = pool.get(), r] {
          (*runner)();
          if (stacks != nullptr && !stacks->canary_intact(r)) runner->stack_overflowed(stacks->stack_bytes());
          if (auto* scheduler = RankScheduler::current()) scheduler->fiber_finishing();
        };
        if (pool) {
          fibers.emplace_back(std::allocator_arg, FiberStackPool::Allocator(*pool, r), body);
        } else {
          fibers.emplace_back(std::allocator_arg, boost::fibers::protected_fixedsize_stack(options.fiber_stack_bytes),
                              body);
        }
      }
    } catch (const std::exception& e) {
      const int started = static_cast<int>(fibers.size());
      fail_unstarted(result, started, "could not start rank fiber " + std::to_string(started) + ": " + e.what(),
                     fake_state);
    }
    for (auto& fiber : fibers) fiber.join();
    if (pool) {
      result.fiber_stack_deepest_bytes = static_cast<int64_t>(pool->deepest_stack_bytes());
      result.fiber_stack_resident_bytes = static_cast<int64_t>(pool->resident_bytes());
    }
  });
  host.join();
}

// WorldOptions::heartbeat's thread: reports where each rank is every
// interval until destroyed (the run ended).
class Heartbeat {
 public:
  Heartbeat(const WorldOptions& options, const FakeWorldState* fake_state) {
    if (!options.heartbeat) return;
    thread_ = std::thread([this, report = options.heartbeat, interval = options.heartbeat_interval, fake_state] {
      std::unique_lock<std::mutex> lock(mutex_);
      while (!stop_cv_.wait_for(lock, interval, [this] { return stopping_; })) {
        lock.unlock();
        report(fake_state != nullptr ? fake_state->where_ranks_are() : "not known (the fake backend reports it)");
        lock.lock();
      }
    });
  }
  ~Heartbeat() {
    if (!thread_.joinable()) return;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    stop_cv_.notify_all();
    thread_.join();
  }
  Heartbeat(const Heartbeat&) = delete;
  Heartbeat& operator=(const Heartbeat&) = delete;

 private:
  std::mutex mutex_;
  std::condition_variable stop_cv_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace

WorldResult World::run(const std::function<void(RankContext&)>& rank_main) {
  const int n = options_.ranks_run();
  WorldResult result;
  result.ranks.resize(n);

  std::function<ProcessGroupPtr(int)> make_group;
  c10::intrusive_ptr<c10d::Store> master_store;
  fake_state_.reset();
  sim_clock_.reset();
  const Clock* clock = &SteadyClock::instance();
  if (options_.simulated_time) {
    sim_clock_ =
        std::make_shared<SimClock>(n, options_.compute_time, options_.compute_scale, options_.fixed_compute_ns);
    clock = sim_clock_.get();
  }
  if (options_.backend == CommBackend::Fake) {
    fake_state_ = std::make_shared<FakeWorldState>(n, options_.rank_kind == RankKind::Fibers,
                                                   options_.collective_timeout, *clock);
    if (sim_clock_) fake_state_->use_simulated_time(sim_clock_.get(), options_.cost_model);
    if (!options_.played_ranks.empty()) fake_state_->play(options_.played_ranks, options_.world_size);
    make_group = [this](int rank) { return fake_state_->world_group(rank); };
  } else {
    master_store = make_tcp_store("127.0.0.1", 0, n, /*is_master=*/true, options_.collective_timeout);
    const int port = tcp_store_port(master_store);
    make_group = [this, port](int rank) {
      GlooOptions gloo;
      gloo.store =
          make_tcp_store("127.0.0.1", port, options_.world_size, /*is_master=*/false, options_.collective_timeout);
      gloo.rank = rank;
      gloo.size = options_.world_size;
      gloo.timeout = options_.collective_timeout;
      gloo.check_collectives = options_.gloo_check_collectives;
      return make_gloo_process_group(gloo);
    };
  }
  std::shared_ptr<observe::FlightRecorder> flight;
  if (options_.flight_recorder_entries > 0) {
    flight = std::make_shared<observe::FlightRecorder>(options_.world_size, options_.flight_recorder_entries);
  }
  make_group = observed(std::move(make_group), options_.trace, flight, *clock, options_.played_ranks);

  std::vector<std::unique_ptr<RankRunner>> runners;
  runners.reserve(n);
  for (int r = 0; r < n; ++r) {
    runners.push_back(std::make_unique<RankRunner>(r, options_, clock, sim_clock_.get(), fake_state_.get(), make_group,
                                                   rank_main, result.ranks[r]));
  }

  {
    const Heartbeat heartbeat(options_, fake_state_.get());
    if (options_.rank_kind == RankKind::Threads) {
      run_on_threads(runners, options_.thread_stack_bytes, result, fake_state_.get());
    } else {
      run_on_fibers(runners, options_, sim_clock_.get(), fake_state_.get(), result);
    }
  }
  if (flight && !result.ok()) result.flight_recorder = flight->dump();
  return result;
}

}  // namespace fsdpsim::sim
