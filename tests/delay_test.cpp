// Delayed collectives keep exact parity (reference section 5): sleeps before
// each reduce-scatter, before and after each all-gather is issued, on every
// rank or on one, a straggler rank slow at every collective, a sleep in the
// engine's reshard (before the gathered params are freed), and sleeps after
// the loss and before the optimiser step. Each delay alone and all together,
// on thread ranks (real sleeps of a few ms) and fiber ranks (100-250 ms of
// simulated time, which cost no real time), on mlp_stack, nested_wrapped and
// transformer, FullShard and ShardGradOp, worlds 2-4; tolerance 0 throughout.

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "fsdp/fully_shard.h"
#include "scenarios/parity.h"
#include "sim/delay_hooks.h"
#include "sim/world.h"

namespace fsdpsim::scenarios {
namespace {

using std::chrono::milliseconds;
using std::chrono::nanoseconds;

/// Sleeps before the engine frees a unit's gathered params (on_reshard is
/// emitted before the free, so the free waits for the sleep).
class SleepBeforeFree final : public fsdp::NoEngineHooks {
 public:
  SleepBeforeFree(nanoseconds delay, std::atomic<int64_t>& sleeps, std::atomic<int64_t>& slept_ns)
      : delay_(delay), sleeps_(sleeps), slept_ns_(slept_ns) {}
  void on_reshard(const std::string&, fsdp::TrainingState) override {
    sleeps_.fetch_add(1);
    slept_ns_.fetch_add(delay_.count());
    sim::sleep_for(delay_);
  }

 private:
  nanoseconds delay_;
  std::atomic<int64_t>& sleeps_;
  std::atomic<int64_t>& slept_ns_;
};

enum class Delay {
  ReduceScatter,    ///< before each reduce-scatter, every rank
  AllGatherBefore,  ///< before each all-gather is issued, every rank
  AllGatherAfter,   ///< after each all-gather is issued, every rank
  CommOnOneRank,    ///< the three above, on rank 0 only
  Straggler,        ///< the last rank sleeps before every collective
  Reshard,          ///< before each free of gathered params, every rank
  AfterLoss,        ///< after the loss, every rank
  BeforeStep,       ///< before the optimiser step, every rank
  EngineOnOneRank,  ///< reshard, after-loss and before-step on rank 0 only
  Everything,       ///< all of the above at once
};

const char* name_of(Delay delay) {
  switch (delay) {
    case Delay::ReduceScatter: return "reduce_scatter";
    case Delay::AllGatherBefore: return "all_gather_before";
    case Delay::AllGatherAfter: return "all_gather_after";
    case Delay::CommOnOneRank: return "comm_on_rank0";
    case Delay::Straggler: return "straggler";
    case Delay::Reshard: return "reshard";
    case Delay::AfterLoss: return "after_loss";
    case Delay::BeforeStep: return "before_step";
    case Delay::EngineOnOneRank: return "engine_on_rank0";
    case Delay::Everything: return "everything";
  }
  return "?";
}

/// The delays of one case; the lengths depend on the rank kind.
struct DelayPlan {
  sim::DelayOptions comm;
  nanoseconds reshard{0};
  nanoseconds after_loss{0};
  nanoseconds before_step{0};
  int engine_rank = -1;  ///< reshard/after-loss/before-step on this rank only; -1: every rank

  bool engine_here(int rank) const { return engine_rank < 0 || engine_rank == rank; }
  std::string describe() const {
    auto ms = [](nanoseconds d) { return std::to_string(d.count() / 1000000) + "ms"; };
    std::string text = comm.describe();
    if (reshard.count() > 0) text += ", reshard " + ms(reshard);
    if (after_loss.count() > 0) text += ", after loss " + ms(after_loss);
    if (before_step.count() > 0) text += ", before step " + ms(before_step);
    if (engine_rank >= 0) text += " (engine delays on rank " + std::to_string(engine_rank) + ")";
    return text;
  }
};

DelayPlan plan_for(Delay delay, sim::RankKind kind, int world_size) {
  // Threads: real sleeps, kept short so the file stays fast. Fibers: the
  // reference's 100-250 ms, simulated.
  const bool fibers = kind == sim::RankKind::Fibers;
  const nanoseconds comm = fibers ? milliseconds(100) : milliseconds(2);
  const nanoseconds straggler = fibers ? milliseconds(150) : milliseconds(3);
  const nanoseconds reshard = fibers ? milliseconds(100) : milliseconds(2);
  const nanoseconds after_loss = fibers ? milliseconds(200) : milliseconds(10);
  const nanoseconds before_step = fibers ? milliseconds(250) : milliseconds(20);
  DelayPlan plan;
  auto all_comm = [&] {
    plan.comm.before_reduce_scatter = comm;
    plan.comm.before_all_gather = comm;
    plan.comm.after_all_gather = comm;
  };
  auto all_engine = [&] {
    plan.reshard = reshard;
    plan.after_loss = after_loss;
    plan.before_step = before_step;
  };
  switch (delay) {
    case Delay::ReduceScatter: plan.comm.before_reduce_scatter = comm; break;
    case Delay::AllGatherBefore: plan.comm.before_all_gather = comm; break;
    case Delay::AllGatherAfter: plan.comm.after_all_gather = comm; break;
    case Delay::CommOnOneRank:
      all_comm();
      plan.comm.only_rank = 0;
      break;
    case Delay::Straggler:
      plan.comm.straggler_rank = world_size - 1;
      plan.comm.straggler_delay = straggler;
      break;
    case Delay::Reshard: plan.reshard = reshard; break;
    case Delay::AfterLoss: plan.after_loss = after_loss; break;
    case Delay::BeforeStep: plan.before_step = before_step; break;
    case Delay::EngineOnOneRank:
      all_engine();
      plan.engine_rank = 0;
      break;
    case Delay::Everything:
      all_comm();
      all_engine();
      plan.comm.straggler_rank = world_size - 1;
      plan.comm.straggler_delay = straggler;
      break;
  }
  return plan;
}

/// Sleeps the plan injected, counted per kind so a case can check that its
/// delays really ran.
struct SleepCounts {
  std::atomic<int64_t> comm{0};
  std::atomic<int64_t> reshard{0};
  std::atomic<int64_t> points{0};
  std::atomic<int64_t> nanoseconds{0};
};

ParityConfig with_delays(ParityConfig config, const DelayPlan& plan, SleepCounts& counts,
                         std::vector<std::shared_ptr<sim::DelayHooks>>& comm_hooks, std::mutex& mutex) {
  config.comm_hooks = [plan, &comm_hooks, &mutex](int rank) -> std::shared_ptr<CommHooks> {
    auto hooks = std::make_shared<sim::DelayHooks>(plan.comm, rank);
    std::lock_guard<std::mutex> lock(mutex);
    comm_hooks.push_back(hooks);
    return hooks;
  };
  if (plan.reshard.count() > 0) {
    config.engine_hooks = [plan, &counts](int rank) -> std::shared_ptr<fsdp::EngineHooks> {
      if (!plan.engine_here(rank)) return nullptr;
      return std::make_shared<SleepBeforeFree>(plan.reshard, counts.reshard, counts.nanoseconds);
    };
  }
  if (plan.after_loss.count() > 0 || plan.before_step.count() > 0) {
    config.delay = [plan, &counts](int rank, const char* point) {
      if (!plan.engine_here(rank)) return;
      const nanoseconds delay = std::string(point) == "after_loss" ? plan.after_loss : plan.before_step;
      if (delay.count() == 0) return;
      counts.points.fetch_add(1);
      counts.nanoseconds.fetch_add(delay.count());
      sim::sleep_for(delay);
    };
  }
  return config;
}

struct Setting {
  const char* scenario;
  fsdp::ShardingStrategy strategy;
  int world_size;
};

// Three scenarios x two strategies, each at a world size of 2, 3 or 4.
const Setting kSettings[] = {
    {"mlp_stack", fsdp::ShardingStrategy::FullShard, 2},
    {"mlp_stack", fsdp::ShardingStrategy::ShardGradOp, 3},
    {"nested_wrapped", fsdp::ShardingStrategy::FullShard, 3},
    {"nested_wrapped", fsdp::ShardingStrategy::ShardGradOp, 4},
    {"transformer", fsdp::ShardingStrategy::FullShard, 4},
    {"transformer", fsdp::ShardingStrategy::ShardGradOp, 2},
};

class DelayParity : public ::testing::TestWithParam<std::tuple<Delay, sim::RankKind>> {};

TEST_P(DelayParity, ExactParityUnderDelays) {
  const auto [delay, kind] = GetParam();
  for (const Setting& setting : kSettings) {
    ParityConfig config;
    config.scenario.name = setting.scenario;
    config.strategy = setting.strategy;
    config.world.world_size = setting.world_size;
    config.world.rank_kind = kind;
    config.world.simulated_time = kind == sim::RankKind::Fibers;
    config.steps = 3;
    const DelayPlan plan = plan_for(delay, kind, setting.world_size);
    SleepCounts counts;
    std::vector<std::shared_ptr<sim::DelayHooks>> comm_hooks;
    std::mutex mutex;
    const ParityReport report = run_parity(with_delays(config, plan, counts, comm_hooks, mutex));
    for (const auto& hooks : comm_hooks) {
      counts.comm.fetch_add(hooks->sleeps());
      counts.nanoseconds.fetch_add(hooks->slept().count());
    }
    SCOPED_TRACE(std::string(name_of(delay)) + " delays (" + plan.describe() + "): " + config.describe());
    EXPECT_TRUE(report.ok()) << report.summary();
    EXPECT_TRUE(report.config.tolerance.exact());

    // The delays ran where the plan put them.
    const bool comm = plan.comm.before_reduce_scatter.count() > 0 || plan.comm.before_all_gather.count() > 0 ||
                      plan.comm.after_all_gather.count() > 0 || plan.comm.straggler_delay.count() > 0;
    EXPECT_EQ(counts.comm.load() > 0, comm);
    EXPECT_EQ(counts.reshard.load() > 0, plan.reshard.count() > 0);
    EXPECT_EQ(counts.points.load() > 0, plan.after_loss.count() > 0 || plan.before_step.count() > 0);
    if (plan.after_loss.count() > 0 && plan.before_step.count() > 0) {
      const int ranks = plan.engine_rank < 0 ? setting.world_size : 1;
      EXPECT_EQ(counts.points.load(), 2 * config.steps * ranks);
    }
    if (config.world.simulated_time) {
      // Simulated: the sleeps (seconds of them) cost no real time.
      const double slept = static_cast<double>(counts.nanoseconds.load()) / 1e9;
      EXPECT_GT(slept, 0.0);
      EXPECT_LT(report.seconds_sharded, slept) << "slept " << slept << " s (simulated)";
    }
  }
}

std::string case_name(const ::testing::TestParamInfo<std::tuple<Delay, sim::RankKind>>& info) {
  return std::string(name_of(std::get<0>(info.param))) + "_" + sim::to_string(std::get<1>(info.param));
}

INSTANTIATE_TEST_SUITE_P(
    Delays, DelayParity,
    ::testing::Combine(::testing::Values(Delay::ReduceScatter, Delay::AllGatherBefore, Delay::AllGatherAfter,
                                         Delay::CommOnOneRank, Delay::Straggler, Delay::Reshard, Delay::AfterLoss,
                                         Delay::BeforeStep, Delay::EngineOnOneRank, Delay::Everything),
                       ::testing::Values(sim::RankKind::Threads, sim::RankKind::Fibers)),
    case_name);

// The hooks themselves: which collectives sleep, on which rank.
TEST(DelayHooks, SleepsWhereTheOptionsSay) {
  sim::DelayOptions options;
  options.before_reduce_scatter = milliseconds(1);
  options.after_all_gather = milliseconds(2);
  options.only_rank = 1;
  options.straggler_rank = 0;
  options.straggler_delay = milliseconds(3);
  sim::DelayHooks rank0(options, 0);
  sim::DelayHooks rank1(options, 1);
  CollectiveDesc gather;
  gather.op = CollectiveOp::AllGather;
  CollectiveDesc scatter;
  scatter.op = CollectiveOp::ReduceScatter;
  CollectiveDesc reduce;
  reduce.op = CollectiveOp::AllReduce;
  for (auto* hooks : {&rank0, &rank1}) {
    for (const auto& desc : {gather, scatter, reduce}) {
      hooks->before(desc);
      hooks->after(desc, nullptr);
    }
  }
  // Rank 0 straggles at all three; rank 1 sleeps before the reduce-scatter and after the all-gather.
  EXPECT_EQ(rank0.sleeps(), 3);
  EXPECT_EQ(rank0.slept(), milliseconds(9));
  EXPECT_EQ(rank1.sleeps(), 2);
  EXPECT_EQ(rank1.slept(), milliseconds(3));
  EXPECT_EQ(options.describe(), "rs 1ms, ag after 2ms, on rank 1, straggler 0 3ms");
  EXPECT_EQ(sim::DelayOptions{}.describe(), "no delays");
  sim::DelayOptions negative;
  negative.before_all_gather = milliseconds(-1);
  EXPECT_THROW(sim::DelayHooks(negative, 0), std::invalid_argument);
}

}  // namespace
}  // namespace fsdpsim::scenarios
