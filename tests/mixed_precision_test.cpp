// Mixed precision (FullyShardOptions::mp_policy, FSDP2's MixedPrecisionPolicy):
// parity against an unsharded LibTorch reference that does the same casts by
// hand, the dtypes and sizes of the collectives, and policies refused.
//
// Parity is bitwise: the reference casts the fp32 master params to
// param_dtype (the engine casts each shard before gathering: the same
// elementwise rounding), computes with the same ops on the same values, sums
// the ranks' grads in rank order in reduce_dtype and divides as the fake
// backend does, then casts to fp32 and steps SGD on fp32 masters.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "backends/comm_hooks.h"
#include "backends/mesh.h"
#include "backends/observe/trace_recorder.h"
#include "fsdp/fully_shard.h"
#include "sim/fiber_autograd.h"
#include "sim/testing/collective_matchers.h"
#include "sim/testing/mock_hooks.h"
#include "sim/testing/world_fixture.h"
#include "sim/world.h"
#include "tests/two_block_net.h"

namespace fsdpsim::fsdp {
namespace {

using fsdpsim::testing::WorldParam;
using ::testing::_;
using ::testing::AllOf;
using ::testing::AnyNumber;
using ::testing::HasSubstr;
using ::testing::Not;

using namespace testnet;  // the shared net (tests/two_block_net.h)

constexpr int kSteps = 2;
constexpr double kLr = 0.1;

struct PolicyCase {
  std::string name;
  MixedPrecisionPolicy units[3];  // root, block0, block1
  bool no_shard = false;          // NoShard: a shard group of one (the cast without a gather)
};

MixedPrecisionPolicy policy(std::optional<at::ScalarType> param, std::optional<at::ScalarType> reduce = std::nullopt,
                            std::optional<at::ScalarType> output = std::nullopt, bool cast_inputs = true) {
  MixedPrecisionPolicy p;
  p.param_dtype = param;
  p.reduce_dtype = reduce;
  p.output_dtype = output;
  p.cast_forward_inputs = cast_inputs;
  return p;
}

PolicyCase same_everywhere(std::string name, const MixedPrecisionPolicy& p) { return {std::move(name), {p, p, p}}; }

std::vector<PolicyCase> policy_cases() {
  const auto bf16 = at::kBFloat16;
  const auto fp16 = at::kHalf;
  const auto fp32 = at::kFloat;
  std::vector<PolicyCase> cases = {
      same_everywhere("bf16", policy(bf16)),  // reduce_dtype unset: fp32 (FSDP2 2.15)
      same_everywhere("bf16_reduce_fp32", policy(bf16, fp32)),
      same_everywhere("bf16_reduce_bf16", policy(bf16, bf16)),
      same_everywhere("fp16", policy(fp16)),
      same_everywhere("fp16_reduce_fp16", policy(fp16, fp16)),  // FSDP2's divide before and after the sum
      // block0 hands fp32 to block1, which casts it back to bf16; the root
      // returns fp32 (output_dtype everywhere would feed the root's bf16 head
      // fp32: the root casts its own inputs only, as FSDP2's does).
      {"bf16_output_fp32", {policy(bf16, std::nullopt, fp32), policy(bf16, std::nullopt, fp32), policy(bf16)}},
      // A child whose policy differs from its parent's: block1 computes in
      // fp32 (casts its bf16 input up) and hands the root bf16 back.
      {"child_fp32_in_bf16", {policy(bf16), policy(bf16), policy(fp32, std::nullopt, bf16)}},
      // The root does not cast its input: block0 casts it on the way in (were
      // only the root to cast, block0's bf16 linear would refuse fp32 x).
      {"root_keeps_inputs", {policy(bf16, std::nullopt, std::nullopt, false), policy(bf16), policy(bf16)}},
  };
  PolicyCase no_shard = same_everywhere("bf16_reduce_bf16_no_shard", policy(bf16, bf16));
  no_shard.no_shard = true;
  cases.push_back(no_shard);
  return cases;
}

// gtest prints a failing case's parameters: name the case, not its bytes.
void PrintTo(const PolicyCase& c, std::ostream* out) { *out << c.name; }

Data make_data(int world, int batches = kSteps) { return testnet::make_data(world, batches, /*seed=*/1234); }

at::Tensor cast(const at::Tensor& t, std::optional<at::ScalarType> dtype) {
  return dtype && t.is_floating_point() && t.scalar_type() != *dtype ? t.to(*dtype) : t;
}

// What each rank saw: per step its loss, its shards' grads (after backward)
// and params (after the step), kParamNames order.
struct RankRecord {
  std::vector<at::Tensor> loss;
  std::vector<at::ScalarType> out_dtype;
  std::vector<std::vector<at::Tensor>> grads, params;
};

// ---------------------------------------------------------------------------
// The reference: unsharded, every rank's forward/backward on the test thread.

struct Reference {
  std::vector<std::vector<at::Tensor>> loss;           // [step][rank]
  std::vector<std::vector<at::Tensor>> grads, params;  // [step][param], fp32, full
};

// The casts the engine makes, by hand: each unit casts its inputs to its
// param_dtype (cast_forward_inputs), computes with its params in param_dtype
// and casts its outputs to output_dtype.
at::Tensor reference_forward(const std::vector<at::Tensor>& p, const at::Tensor& x, const PolicyCase& c) {
  auto in = [&](const at::Tensor& t, UnitIndex u) {
    return c.units[u].cast_forward_inputs ? cast(t, c.units[u].param_dtype) : t;
  };
  at::Tensor h = in(x, kRoot);
  h = cast(torch::relu(at::linear(in(h, kBlock0), p[0], p[1])), c.units[kBlock0].output_dtype);
  h = cast(torch::relu(at::linear(in(h, kBlock1), p[2], p[3])), c.units[kBlock1].output_dtype);
  return cast(at::linear(h, p[4], p[5]), c.units[kRoot].output_dtype);
}

// The mean over ranks as the engine reduces: in reduce_dtype (unset: fp32),
// summed in rank order; fp16 divides by 2^k before the sum and the rest after
// (FSDP2's rule, world 2: 2 then 1; world 3: 2 then 1.5).
at::Tensor reference_mean(const std::vector<at::Tensor>& grads, const MixedPrecisionPolicy& mp) {
  const at::ScalarType dtype = mp.reduce_dtype.value_or(at::kFloat);
  const int64_t n = static_cast<int64_t>(grads.size());
  int64_t before = 1;
  if (dtype == at::kHalf) {
    while (n % before == 0 && n / before > before) before *= 2;
  }
  at::Tensor sum;
  for (const auto& g : grads) {
    at::Tensor term = g.to(dtype);
    if (before != 1) term = term.div(static_cast<double>(before));
    sum = sum.defined() ? sum.add(term) : term;
  }
  if (dtype == at::kHalf) {
    const double after = static_cast<double>(n) / static_cast<double>(before);
    if (after != 1.0) sum = sum.div(after);
  } else {
    sum = sum.div(n);
  }
  return sum.to(at::kFloat);
}

Reference run_reference(const Data& data, const PolicyCase& c, int world) {
  Reference ref;
  std::vector<at::Tensor> master;
  for (const auto& t : data.init) master.push_back(t.clone().requires_grad_(true));
  torch::optim::SGD sgd(master, kLr);
  for (int s = 0; s < kSteps; ++s) {
    std::vector<std::vector<at::Tensor>> rank_grads(master.size());
    ref.loss.emplace_back();
    for (int r = 0; r < world; ++r) {
      std::vector<at::Tensor> compute;
      for (size_t i = 0; i < master.size(); ++i) {
        const auto& dtype = c.units[kParamUnit[i]].param_dtype;
        compute.push_back(cast(master[i].detach(), dtype).detach().requires_grad_(true));
      }
      at::Tensor loss = loss_of(reference_forward(compute, data.x[s][r], c), data.target[s][r]);
      loss.backward();
      ref.loss[s].push_back(loss.detach());
      for (size_t i = 0; i < master.size(); ++i) rank_grads[i].push_back(compute[i].grad());
    }
    ref.grads.emplace_back();
    for (size_t i = 0; i < master.size(); ++i) {
      at::Tensor mean = reference_mean(rank_grads[i], c.units[kParamUnit[i]]);
      master[i].mutable_grad() = mean;
      ref.grads[s].push_back(mean);
    }
    sgd.step();
    ref.params.emplace_back();
    for (const auto& m : master) ref.params[s].push_back(m.detach().clone());
  }
  return ref;
}

// ---------------------------------------------------------------------------
// The engine.

sim::WorldOptions world_options(const WorldParam& param) {
  sim::WorldOptions options;
  options.world_size = param.world_size;
  options.rank_kind = param.rank_kind;
  options.collective_timeout = std::chrono::seconds(20);
  return options;
}

std::shared_ptr<Net> sharded_net(Engine& engine, const ProcessGroupPtr& group, const PolicyCase& c,
                                 const std::vector<at::Tensor>& init) {
  auto net = std::make_shared<Net>();
  {
    torch::NoGradGuard no_grad;
    auto params = net->parameters();
    for (size_t i = 0; i < params.size(); ++i) params[i].copy_(init[i]);
  }
  FullyShardOptions options;
  if (c.no_shard) {
    options.strategy = ShardingStrategy::NoShard;
    options.shard_group = make_self_group(*group);
    options.replicate_group = group;
  } else {
    options.shard_group = group;
  }
  auto with = [&](UnitIndex u) {
    FullyShardOptions o = options;
    o.mp_policy = c.units[u];
    return o;
  };
  engine.fully_shard(net->block0, with(kBlock0));
  engine.fully_shard(net->block1, with(kBlock1));
  engine.fully_shard(net, with(kRoot));
  return net;
}

void train_rank(sim::RankContext& ctx, const Data& data, const PolicyCase& c, RankRecord& record) {
  EngineOptions engine_options;
  engine_options.queue_backward_callback = sim::queue_backward_callback;
  Engine engine(engine_options);
  auto net = sharded_net(engine, ctx.world_group(), c, data.init);
  torch::optim::SGD sgd(net->parameters(), kLr);
  for (int s = 0; s < kSteps; ++s) {
    sgd.zero_grad();
    at::Tensor out = fsdp::call(net, data.x[s][ctx.rank()]);
    record.out_dtype.push_back(out.scalar_type());
    at::Tensor loss = loss_of(out, data.target[s][ctx.rank()]);
    sim::backward(loss);
    record.loss.push_back(loss.detach());
    record.grads.emplace_back();
    for (const auto& p : net->parameters()) record.grads.back().push_back(p.grad().clone());
    sgd.step();
    record.params.emplace_back();
    for (const auto& p : net->parameters()) record.params.back().push_back(p.detach().clone());
  }
}

// This rank's rows of a full tensor: dim 0 in chunks of ceil(dim0 / world).
at::Tensor rows_of(const at::Tensor& full, int rank, int world) {
  const int64_t dim0 = full.size(0);
  const int64_t per_rank = (dim0 + world - 1) / world;
  const int64_t begin = std::min(dim0, rank * per_rank);
  return full.narrow(0, begin, std::min(per_rank, dim0 - begin));
}

class MixedPrecisionParity : public ::testing::TestWithParam<std::tuple<WorldParam, PolicyCase>> {};

TEST_P(MixedPrecisionParity, MatchesAnUnshardedReferenceDoingTheSameCastsBitwise) {
  const auto& [param, c] = GetParam();
  const int world = param.world_size;
  const Data data = make_data(world);
  const Reference ref = run_reference(data, c, world);
  std::vector<RankRecord> records(world);
  sim::World sim_world(world_options(param));
  auto result = sim_world.run([&](sim::RankContext& ctx) { train_rank(ctx, data, c, records[ctx.rank()]); });
  ASSERT_TRUE(fsdpsim::testing::RanksSucceeded(result));

  const int shard_world = c.no_shard ? 1 : world;
  const at::ScalarType expected_out =
      c.units[kRoot].output_dtype.value_or(c.units[kRoot].param_dtype.value_or(at::kFloat));
  for (int r = 0; r < world; ++r) {
    for (int s = 0; s < kSteps; ++s) {
      SCOPED_TRACE("rank " + std::to_string(r) + " step " + std::to_string(s));
      EXPECT_EQ(records[r].out_dtype[s], expected_out);
      EXPECT_TRUE(torch::equal(records[r].loss[s], ref.loss[s][r]))
          << records[r].loss[s].item<float>() << " vs " << ref.loss[s][r].item<float>();
      for (size_t i = 0; i < kParamNames.size(); ++i) {
        SCOPED_TRACE(kParamNames[i]);
        const at::Tensor& grad = records[r].grads[s][i];
        const at::Tensor& value = records[r].params[s][i];
        // The optimiser's copy and its grads stay fp32.
        EXPECT_EQ(grad.scalar_type(), at::kFloat);
        EXPECT_EQ(value.scalar_type(), at::kFloat);
        const int shard_rank = c.no_shard ? 0 : r;
        const at::Tensor want_grad = rows_of(ref.grads[s][i], shard_rank, shard_world);
        EXPECT_TRUE(torch::equal(grad, want_grad)) << "max |diff| " << (grad - want_grad).abs().max().item<float>();
        EXPECT_TRUE(torch::equal(value, rows_of(ref.params[s][i], shard_rank, shard_world)));
      }
    }
  }
}

std::vector<std::tuple<WorldParam, PolicyCase>> parity_params() {
  std::vector<std::tuple<WorldParam, PolicyCase>> out;
  for (auto kind : {sim::RankKind::Threads, sim::RankKind::Fibers}) {
    for (int world : {2, 3}) {
      for (const auto& c : policy_cases()) out.emplace_back(WorldParam{kind, world}, c);
    }
  }
  return out;
}

std::string parity_name(const ::testing::TestParamInfo<std::tuple<WorldParam, PolicyCase>>& info) {
  const auto& [param, c] = info.param;
  return std::string(param.rank_kind == sim::RankKind::Threads ? "threads" : "fibers") +
         std::to_string(param.world_size) + "_" + c.name;
}

INSTANTIATE_TEST_SUITE_P(All, MixedPrecisionParity, ::testing::ValuesIn(parity_params()), parity_name);

// The reference's casts matter: computing in fp32 gives other numbers, so
// the parity above could not pass with the policy ignored.
TEST(MixedPrecision, Bf16ComputeDiffersFromFp32) {
  const Data data = make_data(2);
  const Reference fp32 = run_reference(data, same_everywhere("fp32", policy(std::nullopt)), 2);
  const Reference bf16 = run_reference(data, same_everywhere("bf16", policy(at::kBFloat16)), 2);
  EXPECT_FALSE(torch::equal(fp32.loss[0][0], bf16.loss[0][0]));
  EXPECT_FALSE(torch::equal(fp32.grads[0][0], bf16.grads[0][0]));
}

// ---------------------------------------------------------------------------
// Accumulation without gradient sync under mixed precision. FSDP2 (torch
// 2.15) keeps the unsharded grads of backwards run without sync in the
// grad's reduction dtype (FSDPParam.unsharded_grad_dtype: reduce_dtype, unset
// the params' own dtype, set as the unsharded param's grad_dtype): each
// backward's grad is cast to it, then added to the sum in it. With bf16
// compute and fp32 reduction the sum is fp32 (no bf16 rounding per
// micro-batch); with fp32 compute and bf16 reduction each grad is rounded to
// bf16 before the bf16 addition. The reference below does exactly these casts
// and additions, so the comparison is bitwise.

constexpr int kUnsyncedMicro = 2;  // micro-batches without sync, then one with

struct AccumCase {
  WorldParam world;
  PolicyCase policy;
  bool keep_gathered = false;  // set_reshard_after_backward(false) while accumulating
};

void PrintTo(const AccumCase& c, std::ostream* out) {
  *out << c.policy.name << " world " << c.world.world_size << (c.keep_gathered ? " kept gathered" : "");
}

// One optimiser step of kUnsyncedMicro + 1 micro-batches (micro-batch m of
// rank r: data.x[m][r]): per rank the grads summed as FSDP2 sums them, the
// mean over ranks as the engine reduces it, then SGD on the fp32 masters.
// `sum_dtype` replaces the accumulation dtype (FSDP2's: reduce_dtype, unset
// fp32) to show that it matters.
Reference accumulated_reference(const Data& data, const PolicyCase& c, int world,
                                std::optional<at::ScalarType> sum_dtype = std::nullopt) {
  Reference ref;
  std::vector<at::Tensor> master;
  for (const auto& t : data.init) master.push_back(t.clone().requires_grad_(true));
  std::vector<std::vector<at::Tensor>> rank_sums(master.size());
  ref.loss.emplace_back();
  for (int r = 0; r < world; ++r) {
    std::vector<at::Tensor> sum(master.size());
    for (int m = 0; m <= kUnsyncedMicro; ++m) {
      std::vector<at::Tensor> compute;
      for (size_t i = 0; i < master.size(); ++i) {
        compute.push_back(cast(master[i].detach(), c.units[kParamUnit[i]].param_dtype).requires_grad_(true));
      }
      loss_of(reference_forward(compute, data.x[m][r], c), data.target[m][r]).backward();
      for (size_t i = 0; i < master.size(); ++i) {
        const at::ScalarType dtype = sum_dtype.value_or(c.units[kParamUnit[i]].reduce_dtype.value_or(at::kFloat));
        const at::Tensor grad = compute[i].grad().to(dtype);
        sum[i] = sum[i].defined() ? sum[i].add(grad) : grad;
      }
    }
    for (size_t i = 0; i < master.size(); ++i) rank_sums[i].push_back(sum[i]);
  }
  torch::optim::SGD sgd(master, kLr);
  ref.grads.emplace_back();
  for (size_t i = 0; i < master.size(); ++i) {
    master[i].mutable_grad() = reference_mean(rank_sums[i], c.units[kParamUnit[i]]);
    ref.grads[0].push_back(master[i].grad().clone());
  }
  sgd.step();
  ref.params.emplace_back();
  for (const auto& m : master) ref.params[0].push_back(m.detach().clone());
  return ref;
}

class MixedPrecisionAccumulation : public ::testing::TestWithParam<AccumCase> {};

TEST_P(MixedPrecisionAccumulation, UnsyncedGradsAccumulateInTheReductionDtype) {
  const AccumCase& c = GetParam();
  const int world = c.world.world_size;
  const Data data = make_data(world, kUnsyncedMicro + 1);
  const Reference ref = accumulated_reference(data, c.policy, world);
  std::vector<RankRecord> records(world);
  sim::World sim_world(world_options(c.world));
  auto result = sim_world.run([&](sim::RankContext& ctx) {
    EngineOptions engine_options;
    engine_options.queue_backward_callback = sim::queue_backward_callback;
    Engine engine(engine_options);
    auto net = sharded_net(engine, ctx.world_group(), c.policy, data.init);
    torch::optim::SGD sgd(net->parameters(), kLr);
    for (int m = 0; m <= kUnsyncedMicro; ++m) {
      const bool sync = m == kUnsyncedMicro;
      engine.set_requires_gradient_sync(sync);
      engine.set_reshard_after_backward(sync || !c.keep_gathered);
      sim::backward(loss_of(fsdp::call(net, data.x[m][ctx.rank()]), data.target[m][ctx.rank()]));
    }
    RankRecord& record = records[ctx.rank()];
    record.grads.emplace_back();
    for (const auto& p : net->parameters()) record.grads.back().push_back(p.grad().clone());
    sgd.step();
    record.params.emplace_back();
    for (const auto& p : net->parameters()) record.params.back().push_back(p.detach().clone());
  });
  ASSERT_TRUE(fsdpsim::testing::RanksSucceeded(result));
  for (int r = 0; r < world; ++r) {
    for (size_t i = 0; i < kParamNames.size(); ++i) {
      SCOPED_TRACE("rank " + std::to_string(r) + " " + kParamNames[i]);
      const at::Tensor& grad = records[r].grads[0][i];
      const at::Tensor want = rows_of(ref.grads[0][i], r, world);
      EXPECT_EQ(grad.scalar_type(), at::kFloat);
      EXPECT_TRUE(torch::equal(grad, want)) << "max |diff| " << (grad - want).abs().max().item<float>();
      EXPECT_TRUE(torch::equal(records[r].params[0][i], rows_of(ref.params[0][i], r, world)));
    }
  }
}

std::vector<AccumCase> accumulation_params() {
  const auto bf16 = at::kBFloat16;
  const std::vector<PolicyCase> policies = {
      same_everywhere("bf16", policy(bf16)),  // reduce_dtype unset: fp32, the params' own
      same_everywhere("bf16_reduce_fp32", policy(bf16, at::kFloat)),
      same_everywhere("bf16_reduce_bf16", policy(bf16, bf16)),          // sums in bf16, as it computes
      same_everywhere("fp32_reduce_bf16", policy(std::nullopt, bf16)),  // each fp32 grad rounded, then added
  };
  std::vector<AccumCase> out;
  for (const auto& p : policies) {
    out.push_back({{sim::RankKind::Threads, 2}, p, false});
    out.push_back({{sim::RankKind::Fibers, 3}, p, false});
    out.push_back({{sim::RankKind::Threads, 3}, p, true});
  }
  return out;
}

std::string accumulation_name(const ::testing::TestParamInfo<AccumCase>& info) {
  const AccumCase& c = info.param;
  return std::string(c.world.rank_kind == sim::RankKind::Threads ? "threads" : "fibers") +
         std::to_string(c.world.world_size) + "_" + c.policy.name + (c.keep_gathered ? "_kept" : "");
}

INSTANTIATE_TEST_SUITE_P(All, MixedPrecisionAccumulation, ::testing::ValuesIn(accumulation_params()),
                         accumulation_name);

// The accumulation dtype matters: summed in the compute dtype (bf16; fp32
// then rounded once) the grads differ, so the parity above could not pass
// with the engine accumulating as it computes.
TEST(MixedPrecisionAccumulationReference, TheAccumulationDtypeChangesTheGrads) {
  const Data data = make_data(2, kUnsyncedMicro + 1);
  const PolicyCase wider = same_everywhere("", policy(at::kBFloat16, at::kFloat));
  const PolicyCase narrower = same_everywhere("", policy(std::nullopt, at::kBFloat16));
  for (size_t i : {0, 2, 4}) {  // the weights
    SCOPED_TRACE(kParamNames[i]);
    EXPECT_FALSE(torch::equal(accumulated_reference(data, wider, 2).grads[0][i],
                              accumulated_reference(data, wider, 2, at::kBFloat16).grads[0][i]));
    EXPECT_FALSE(torch::equal(accumulated_reference(data, narrower, 2).grads[0][i],
                              accumulated_reference(data, narrower, 2, at::kFloat).grads[0][i]));
  }
}

// ---------------------------------------------------------------------------
// Collectives: dtypes, sizes, reduce ops.

class MixedPrecisionCollectives : public fsdpsim::testing::WorldTest {};

// One step of Net with `mp` on every unit; each rank's collectives through a
// MockCommHooks set up by `expect`, and the world's trace.
void one_step(const sim::WorldOptions& options, const MixedPrecisionPolicy& mp,
              const std::function<void(fsdpsim::testing::MockCommHooks&)>& expect) {
  const Data data = make_data(options.world_size);
  std::vector<std::shared_ptr<fsdpsim::testing::MockCommHooks>> mocks;
  for (int r = 0; r < options.world_size; ++r) {
    mocks.push_back(std::make_shared<::testing::NiceMock<fsdpsim::testing::MockCommHooks>>());
    expect(*mocks.back());
  }
  sim::World world(options);
  auto result = world.run([&](sim::RankContext& ctx) {
    auto group = std::make_shared<HookedProcessGroup>(ctx.world_group(), mocks[ctx.rank()]);
    EngineOptions engine_options;
    engine_options.queue_backward_callback = sim::queue_backward_callback;
    Engine engine(engine_options);
    auto net = sharded_net(engine, group, same_everywhere("", mp), data.init);
    sim::backward(loss_of(fsdp::call(net, data.x[0][ctx.rank()]), data.target[0][ctx.rank()]));
  });
  EXPECT_TRUE(fsdpsim::testing::RanksSucceeded(result));
}

// Elements each rank gathers per step: root (kept) + block0 + block1 in
// forward, block1 + block0 again in backward; padded to ceil(dim0 / W) rows.
int64_t gathered_numel_per_step(int world) {
  auto padded = [world](int64_t dim0, int64_t row) { return (dim0 + world - 1) / world * world * row; };
  const int64_t block0 = padded(kHidden, kIn) + padded(kHidden, 1);
  const int64_t block1 = padded(kHidden, kHidden) + padded(kHidden, 1);
  const int64_t root = padded(kOut, kHidden) + padded(kOut, 1);
  return root + 2 * (block0 + block1);
}

int64_t all_gather_bytes(const observe::TraceRecorder& trace, int rank) {
  int64_t bytes = 0;
  for (const auto& record : trace.events()) {
    if (record.is_collective() && record.rank == rank && record.op == CollectiveOp::AllGather) {
      bytes += record.out_bytes();
    }
  }
  return bytes;
}

TEST_P(MixedPrecisionCollectives, GatherInParamDtypeReduceInReduceDtype) {
  using fsdpsim::testing::DtypeIs;
  using fsdpsim::testing::IsAllGather;
  using fsdpsim::testing::IsReduceScatter;
  using fsdpsim::testing::ReduceOpIs;
  struct Expected {
    MixedPrecisionPolicy mp;
    at::ScalarType gather, reduce;
  };
  const std::vector<Expected> cases = {{policy(std::nullopt), at::kFloat, at::kFloat},
                                       {policy(at::kBFloat16), at::kBFloat16, at::kFloat},
                                       {policy(at::kBFloat16, at::kBFloat16), at::kBFloat16, at::kBFloat16},
                                       {policy(at::kHalf, at::kFloat), at::kHalf, at::kFloat}};
  std::vector<int64_t> bytes;
  for (const auto& e : cases) {
    SCOPED_TRACE(std::string("gather ") + c10::toString(e.gather) + ", reduce " + c10::toString(e.reduce));
    sim::WorldOptions options = this->options();
    options.trace = std::make_shared<observe::TraceRecorder>(world_size());
    one_step(options, e.mp, [&](fsdpsim::testing::MockCommHooks& mock) {
      EXPECT_CALL(mock, before(_)).Times(AnyNumber());
      EXPECT_CALL(mock, before(AllOf(IsAllGather(), DtypeIs(e.gather)))).Times(5);  // root, 0, 1, then 1, 0
      EXPECT_CALL(mock, before(AllOf(IsAllGather(), Not(DtypeIs(e.gather))))).Times(0);
      EXPECT_CALL(mock, before(AllOf(IsReduceScatter(), DtypeIs(e.reduce), ReduceOpIs(ReduceOp::Avg)))).Times(3);
      EXPECT_CALL(mock, before(AllOf(IsReduceScatter(), Not(DtypeIs(e.reduce))))).Times(0);
    });
    for (int r = 0; r < world_size(); ++r) {
      EXPECT_EQ(all_gather_bytes(*options.trace, r),
                gathered_numel_per_step(world_size()) * static_cast<int64_t>(c10::elementSize(e.gather)))
          << "rank " << r;
    }
    bytes.push_back(all_gather_bytes(*options.trace, 0));
  }
  EXPECT_EQ(bytes[1] * 2, bytes[0]);  // bf16 gathers half the fp32 bytes
}

// FSDP2's fp16 reduction: sum with every grad divided by the largest power of
// two p with p * p < W that divides W, the sum then divided by W / p.
TEST_P(MixedPrecisionCollectives, Fp16ReductionDividesBeforeAndAfterTheSum) {
  using fsdpsim::testing::DtypeIs;
  using fsdpsim::testing::IsReduceScatter;
  using fsdpsim::testing::ReduceOpIs;
  const double before = 2.0;  // W = 2: 2, then 1; W = 3: 2, then 1.5 (W = 8 would be 4, then 2)
  const double after = world_size() / before;
  one_step(options(), policy(at::kHalf, at::kHalf), [&](fsdpsim::testing::MockCommHooks& mock) {
    EXPECT_CALL(mock, before(_)).Times(AnyNumber());
    EXPECT_CALL(mock, before(AllOf(IsReduceScatter(), DtypeIs(at::kHalf), ReduceOpIs(ReduceOp::Sum),
                                   ::testing::Field(&CollectiveDesc::predivide_factor, before),
                                   ::testing::Field(&CollectiveDesc::postdivide_factor, after))))
        .Times(3);
  });
}

INSTANTIATE_TEST_SUITE_P(All, MixedPrecisionCollectives,
                         fsdpsim::testing::WorldParams({sim::RankKind::Threads, sim::RankKind::Fibers}, {2, 3}),
                         fsdpsim::testing::WorldParamName);

// ---------------------------------------------------------------------------
// Memory: gathered params in bf16 take half the bytes.

TEST(MixedPrecision, UnshardedBytesAreThoseOfParamDtype) {
  std::vector<int64_t> peak(2);
  int k = 0;
  for (auto param_dtype : {std::optional<at::ScalarType>{}, std::optional<at::ScalarType>{at::kBFloat16}}) {
    sim::World world(world_options({sim::RankKind::Threads, 2}));
    const Data data = make_data(2);
    auto result = world.run([&](sim::RankContext& ctx) {
      EngineOptions engine_options;
      engine_options.queue_backward_callback = sim::queue_backward_callback;
      Engine engine(engine_options);
      auto net = sharded_net(engine, ctx.world_group(), same_everywhere("", policy(param_dtype)), data.init);
      engine.unshard_all();
      if (ctx.rank() == 0) peak[k] = engine.unsharded_bytes();
      engine.reshard_all();
      EXPECT_EQ(engine.unsharded_bytes(), 0);
    });
    ASSERT_TRUE(fsdpsim::testing::RanksSucceeded(result));
    ++k;
  }
  const int64_t numel = kHidden * kIn + kHidden + kHidden * kHidden + kHidden + kOut * kHidden + kOut;
  EXPECT_EQ(peak[0], numel * 4);
  EXPECT_EQ(peak[1], numel * 2);
}

// ---------------------------------------------------------------------------
// Bad policies.

TEST(MixedPrecisionErrors, NonFloatingDtypesAreRefusedNamingTheFieldAndTheFix) {
  sim::World world(world_options({sim::RankKind::Threads, 1}));
  auto result = world.run([&](sim::RankContext& ctx) {
    Engine engine;
    auto expect_refused = [&](const MixedPrecisionPolicy& mp, const std::string& field, const std::string& dtype) {
      auto linear = torch::nn::Linear(4, 4);
      FullyShardOptions options;
      options.shard_group = ctx.world_group();
      options.mp_policy = mp;
      try {
        engine.fully_shard(linear.ptr(), options);
        ADD_FAILURE() << field << " " << dtype << " accepted";
      } catch (const std::invalid_argument& e) {
        EXPECT_THAT(e.what(), HasSubstr("mp_policy." + field + " is " + dtype));
        EXPECT_THAT(e.what(), HasSubstr("not a floating-point dtype"));
        EXPECT_THAT(e.what(), HasSubstr("at::kBFloat16"));
      }
    };
    expect_refused(policy(at::kLong), "param_dtype", "Long");
    expect_refused(policy(at::kBFloat16, at::kInt), "reduce_dtype", "Int");
    expect_refused(policy(at::kBFloat16, std::nullopt, at::kBool), "output_dtype", "Bool");
    expect_refused(policy(at::kComplexFloat), "param_dtype", "ComplexFloat");
  });
  EXPECT_TRUE(fsdpsim::testing::RanksSucceeded(result));
}

}  // namespace
}  // namespace fsdpsim::fsdp
