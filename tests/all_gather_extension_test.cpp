// All-gather extensions (FullyShardOptions::all_gather_extensions, FSDP2's
// fsdp_pre_all_gather / fsdp_post_all_gather), after PyTorch's
// test_fully_shard_extensions.py: several tensors of several dtypes gathered
// per param and reassembled exactly, a bf16 gather with fp32 compute, an
// in-place post-all-gather reusing its output, uneven outer sizes, an HSDP
// mesh, with mixed precision; what crosses the wire per unit (mocked
// CommHooks, the trace); inputs refused.
//
// Parity is bitwise against an unsharded LibTorch reference that builds each
// step's compute params from the fp32 masters as the extension does (e.g.
// rounded to bf16 and back), computes with the same ops, averages the ranks'
// grads in rank order in fp32 (as the fake backend reduces) and steps SGD.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <any>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "backends/comm_hooks.h"
#include "backends/mesh.h"
#include "backends/observe/trace_recorder.h"
#include "fsdp/all_gather_extension.h"
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

using namespace testnet;  // the shared net (tests/two_block_net.h)

constexpr int kSteps = 2;
constexpr double kLr = 0.1;

// A param's FQN within its unit's module ("lin.weight").
std::string local_name(size_t i) {
  const std::string& name = kParamNames[i];
  return kParamUnit[i] == kRoot ? name : name.substr(name.find('.') + 1);
}

Data make_data(int world) { return testnet::make_data(world, kSteps, /*seed=*/4321); }

// This rank's rows of a full tensor: dim 0 in chunks of ceil(dim0 / world).
at::Tensor rows_of(const at::Tensor& full, int rank, int world) {
  const int64_t dim0 = full.size(0);
  const int64_t per_rank = (dim0 + world - 1) / world;
  const int64_t begin = std::min(dim0, rank * per_rank);
  return full.narrow(0, begin, std::min(per_rank, dim0 - begin));
}

// `full` with zero rows appended up to world * ceil(dim0 / world).
at::Tensor padded(const at::Tensor& full, int world) {
  const int64_t rows = (full.size(0) + world - 1) / world * world;
  std::vector<int64_t> shape = full.sizes().vec();
  shape[0] = rows;
  at::Tensor out = at::zeros(shape, full.options());
  out.narrow(0, 0, full.size(0)).copy_(full);
  return out;
}

// ---------------------------------------------------------------------------
// Extensions. Each rank gets its own objects (they record per rank).

// Gathers the padded shard cast to `wire`; rebuilds in param_dtype, in place
// into its first result from the second gather on. Records what it saw.
class CastGather : public AllGatherExtension {
 public:
  explicit CastGather(at::ScalarType wire) : wire_(wire) {}
  AllGatherInputs pre_all_gather(const at::Tensor& shard, const AllGatherContext& context) override {
    contexts.push_back(context);  // its pointers live as long as the engine: read them now
    mp_param_dtypes.push_back(context.mp_policy->param_dtype);
    padded_shards.push_back(context.padded_shard.clone());  // the engine's storage: the optimiser steps it
    shard_rows.push_back(shard.size(0));
    return {{context.padded_shard.to(wire_)}, {}};
  }
  at::Tensor post_all_gather(const std::vector<at::Tensor>& gathered, const std::any&, at::ScalarType param_dtype,
                             const std::optional<at::Tensor>& out) override {
    param_dtypes.push_back(param_dtype);
    given_out.push_back(out.has_value());
    gathered_shapes.push_back(gathered.at(0).sizes().vec());
    if (out) {
      same_out.push_back(out->unsafeGetTensorImpl() == first_result.unsafeGetTensorImpl());
      return out->copy_(gathered[0]);
    }
    first_result = gathered[0].to(param_dtype, /*non_blocking=*/false, /*copy=*/true);
    return first_result;
  }

  std::vector<AllGatherContext> contexts;
  std::vector<std::optional<at::ScalarType>> mp_param_dtypes;
  std::vector<at::Tensor> padded_shards;
  std::vector<int64_t> shard_rows;
  std::vector<at::ScalarType> param_dtypes;
  std::vector<bool> given_out, same_out;
  std::vector<std::vector<int64_t>> gathered_shapes;
  at::Tensor first_result;

 private:
  at::ScalarType wire_;
};

// Three tensors of three dtypes per param (PyTorch's TwoTensor, plus one):
// the padded shard (fp32), the global row index of each padded row (int64)
// and the shard negated in fp64; metadata: this rank. Rebuilds from the
// first; keeps the first gather's tensors to compare.
class ThreeTensorGather : public AllGatherExtension {
 public:
  AllGatherInputs pre_all_gather(const at::Tensor&, const AllGatherContext& context) override {
    const at::Tensor& shard = context.padded_shard;
    const int64_t rows = shard.size(0);
    at::Tensor row_ids = at::arange(context.shard_rank * rows, (context.shard_rank + 1) * rows, at::kLong);
    return {{shard.clone(), row_ids, shard.to(at::kDouble).neg()}, std::any(context.shard_rank)};
  }
  at::Tensor post_all_gather(const std::vector<at::Tensor>& gathered, const std::any& metadata, at::ScalarType,
                             const std::optional<at::Tensor>& out) override {
    metadata_seen.push_back(std::any_cast<int>(metadata));
    if (first_gathered.empty()) {
      for (const auto& t : gathered) first_gathered.push_back(t.clone());
    }
    if (out) return out->copy_(gathered[0]);
    return gathered[0].clone();
  }

  std::vector<int> metadata_seen;
  std::vector<at::Tensor> first_gathered;
};

// Returns the unpadded shard: refused for an unevenly sharded param.
class UnpaddedGather : public AllGatherExtension {
 public:
  AllGatherInputs pre_all_gather(const at::Tensor& shard, const AllGatherContext&) override { return {{shard}, {}}; }
  at::Tensor post_all_gather(const std::vector<at::Tensor>& gathered, const std::any&, at::ScalarType,
                             const std::optional<at::Tensor>&) override {
    return gathered[0].clone();
  }
};

// post_all_gather returns one row too few.
class ShortPost : public AllGatherExtension {
 public:
  AllGatherInputs pre_all_gather(const at::Tensor&, const AllGatherContext& context) override {
    return {{context.padded_shard}, {}};
  }
  at::Tensor post_all_gather(const std::vector<at::Tensor>&, const std::any&, at::ScalarType,
                             const std::optional<at::Tensor>&) override {
    return at::zeros({kHidden - 1, kIn});
  }
};

// ---------------------------------------------------------------------------
// The reference: unsharded, every rank's forward/backward on the test thread,
// with compute params made from the fp32 masters by `compute_of` (what the
// extension's gather and post_all_gather make of them), inputs cast to
// `param_dtype` (mp_policy) where set.

using ComputeOf = std::function<at::Tensor(size_t param, const at::Tensor& master)>;

struct Reference {
  std::vector<std::vector<at::Tensor>> loss;    // [step][rank]
  std::vector<std::vector<at::Tensor>> params;  // [step][param], fp32, full, after the step
};

Reference run_reference(const Data& data, int world, const ComputeOf& compute_of,
                        std::optional<at::ScalarType> param_dtype = std::nullopt) {
  Reference ref;
  std::vector<at::Tensor> master;
  for (const auto& t : data.init) master.push_back(t.clone().requires_grad_(true));
  torch::optim::SGD sgd(master, kLr);
  for (int s = 0; s < kSteps; ++s) {
    std::vector<std::vector<at::Tensor>> rank_grads(master.size());
    ref.loss.emplace_back();
    for (int r = 0; r < world; ++r) {
      std::vector<at::Tensor> p;
      for (size_t i = 0; i < master.size(); ++i) p.push_back(compute_of(i, master[i].detach()).requires_grad_(true));
      at::Tensor x = param_dtype ? data.x[s][r].to(*param_dtype) : data.x[s][r];
      at::Tensor h = torch::relu(at::linear(x, p[0], p[1]));
      h = torch::relu(at::linear(h, p[2], p[3]));
      at::Tensor loss = loss_of(at::linear(h, p[4], p[5]), data.target[s][r]);
      loss.backward();
      ref.loss[s].push_back(loss.detach());
      for (size_t i = 0; i < master.size(); ++i) rank_grads[i].push_back(p[i].grad());
    }
    for (size_t i = 0; i < master.size(); ++i) {
      at::Tensor sum;  // fp32 (reduce_dtype unset: the params' own), rank order, then the mean
      for (const auto& g : rank_grads[i]) sum = sum.defined() ? sum.add(g.to(at::kFloat)) : g.to(at::kFloat);
      master[i].mutable_grad() = sum.div(world);
    }
    sgd.step();
    ref.params.emplace_back();
    for (const auto& m : master) ref.params[s].push_back(m.detach().clone());
  }
  return ref;
}

// ---------------------------------------------------------------------------
// The engine.

// Which params get an extension (by kParamNames index), made per rank.
using MakeExtension = std::function<std::shared_ptr<AllGatherExtension>(size_t param)>;

struct RunOptions {
  MakeExtension extension;  // null: none; else called for every param (null result: none)
  MixedPrecisionPolicy mp;
  int hsdp_replicas = 0;  // > 0: HybridShard over a replicas x (world / replicas) mesh
  std::shared_ptr<CommHooks> comm_hooks;
};

std::shared_ptr<Net> sharded_net(Engine& engine, sim::RankContext& ctx, const RunOptions& run, const Data& data) {
  auto net = std::make_shared<Net>();
  {
    torch::NoGradGuard no_grad;
    auto params = net->parameters();
    for (size_t i = 0; i < params.size(); ++i) params[i].copy_(data.init[i]);
  }
  ProcessGroupPtr group = ctx.world_group();
  if (run.comm_hooks) group = std::make_shared<HookedProcessGroup>(group, run.comm_hooks);
  FullyShardOptions base;
  base.mp_policy = run.mp;
  if (run.hsdp_replicas > 0) {
    Mesh2D mesh = make_mesh_2d(*group, run.hsdp_replicas, ctx.world_size() / run.hsdp_replicas);
    base.strategy = ShardingStrategy::HybridShard;
    base.shard_group = mesh.shard_group;
    base.replicate_group = mesh.replicate_group;
  } else {
    base.shard_group = group;
  }
  std::vector<FullyShardOptions> options(3, base);
  for (size_t i = 0; run.extension && i < kParamNames.size(); ++i) {
    if (auto extension = run.extension(i)) options[kParamUnit[i]].all_gather_extensions[local_name(i)] = extension;
  }
  engine.fully_shard(net->block0, options[kBlock0]);
  engine.fully_shard(net->block1, options[kBlock1]);
  engine.fully_shard(net, options[kRoot]);
  return net;
}

struct RankRecord {
  std::vector<at::Tensor> loss;
  std::vector<std::vector<at::Tensor>> params;  // [step][param], the shards after the step
};

void train_rank(sim::RankContext& ctx, const Data& data, const RunOptions& run, RankRecord& record) {
  EngineOptions engine_options;
  engine_options.queue_backward_callback = sim::queue_backward_callback;
  Engine engine(engine_options);
  auto net = sharded_net(engine, ctx, run, data);
  torch::optim::SGD sgd(net->parameters(), kLr);
  for (int s = 0; s < kSteps; ++s) {
    sgd.zero_grad();
    at::Tensor loss = loss_of(fsdp::call(net, data.x[s][ctx.rank()]), data.target[s][ctx.rank()]);
    sim::backward(loss);
    record.loss.push_back(loss.detach());
    sgd.step();
    record.params.emplace_back();
    for (const auto& p : net->parameters()) record.params.back().push_back(p.detach().clone());
  }
}

sim::WorldOptions world_options(const WorldParam& param) {
  sim::WorldOptions options;
  options.world_size = param.world_size;
  options.rank_kind = param.rank_kind;
  options.collective_timeout = std::chrono::seconds(20);
  return options;
}

std::vector<RankRecord> train(const sim::WorldOptions& options, const Data& data,
                              const std::function<RunOptions(int rank)>& run_of) {
  std::vector<RankRecord> records(options.world_size);
  std::vector<RunOptions> runs;
  for (int r = 0; r < options.world_size; ++r) runs.push_back(run_of(r));
  sim::World world(options);
  auto result = world.run([&](sim::RankContext& ctx) { train_rank(ctx, data, runs[ctx.rank()], records[ctx.rank()]); });
  EXPECT_TRUE(fsdpsim::testing::RanksSucceeded(result));
  return records;
}

// Every rank's shards after every step are the reference's rows, bitwise
// (shard rank = rank % shard world: HSDP's shard index).
void expect_matches(const std::vector<RankRecord>& records, const Reference& ref, int shard_world) {
  for (size_t r = 0; r < records.size(); ++r) {
    ASSERT_EQ(records[r].params.size(), static_cast<size_t>(kSteps)) << "rank " << r;
    for (int s = 0; s < kSteps; ++s) {
      SCOPED_TRACE("rank " + std::to_string(r) + " step " + std::to_string(s));
      EXPECT_TRUE(torch::equal(records[r].loss[s], ref.loss[s][r]))
          << records[r].loss[s].item<float>() << " vs " << ref.loss[s][r].item<float>();
      for (size_t i = 0; i < kParamNames.size(); ++i) {
        const at::Tensor want = rows_of(ref.params[s][i], static_cast<int>(r) % shard_world, shard_world);
        const at::Tensor& got = records[r].params[s][i];
        EXPECT_TRUE(torch::equal(got, want))
            << kParamNames[i] << " max |diff| " << (got - want).abs().max().item<float>();
      }
    }
  }
}

class AllGatherExtensionTest : public fsdpsim::testing::WorldTest {};

// ---------------------------------------------------------------------------
// Several tensors of several dtypes per param (byte-packed on the wire).

// Bytes each rank puts on the wire per gather of each unit: the weights' three
// tensors (fp32 rows, an int64 per row, fp64 rows), the biases' padded fp32
// shard; the root gathers plain fp32 (no extension there).
int64_t three_tensor_bytes(int64_t in, int world) {
  const int64_t rows = (kHidden + world - 1) / world;
  return rows * in * 4 + rows * 8 + rows * in * 8 + rows * 4;
}

TEST_P(AllGatherExtensionTest, SeveralTensorsOfSeveralDtypesGatherExactlyInOneByteBuffer) {
  using fsdpsim::testing::DtypeIs;
  using fsdpsim::testing::IsAllGather;
  using fsdpsim::testing::LabelIs;
  using fsdpsim::testing::OutputShapeIs;
  const int world = world_size();
  const Data data = make_data(world);
  std::vector<std::map<size_t, std::shared_ptr<ThreeTensorGather>>> extensions(world);
  std::vector<std::shared_ptr<fsdpsim::testing::MockCommHooks>> mocks;
  const int64_t root_rows = (kOut + world - 1) / world;
  for (int r = 0; r < world; ++r) {
    auto mock = std::make_shared<::testing::NiceMock<fsdpsim::testing::MockCommHooks>>();
    EXPECT_CALL(*mock, before(_)).Times(AnyNumber());  // the reduce-scatters
    // Per unit and step: a gather in forward and one in backward (the root's
    // stays gathered), in bytes for the blocks, fp32 elements for the root.
    auto gathers = [&](const char* unit, at::ScalarType dtype, int64_t per_rank) {
      EXPECT_CALL(*mock, before(AllOf(IsAllGather(), LabelIs(HasSubstr(unit)), DtypeIs(dtype),
                                      OutputShapeIs(std::vector<int64_t>{world * per_rank}))))
          .Times(unit == std::string("''") ? kSteps : 2 * kSteps);
    };
    gathers("'block0'", at::kByte, three_tensor_bytes(kIn, world));
    gathers("'block1'", at::kByte, three_tensor_bytes(kHidden, world));
    gathers("''", at::kFloat, root_rows * kHidden + root_rows);
    mocks.push_back(mock);
  }
  const auto records = train(options(), data, [&](int r) {
    RunOptions run;
    run.comm_hooks = mocks[r];
    run.extension = [&, r](size_t i) -> std::shared_ptr<AllGatherExtension> {
      if (i != 0 && i != 2) return nullptr;  // the blocks' weights
      return extensions[r][i] = std::make_shared<ThreeTensorGather>();
    };
    return run;
  });
  // Rebuilding from the fp32 tensor gives the params as gathered: the plain
  // reference.
  expect_matches(records, run_reference(data, world, [](size_t, const at::Tensor& m) { return m.clone(); }), world);
  for (int r = 0; r < world; ++r) {
    for (size_t i : {size_t{0}, size_t{2}}) {
      SCOPED_TRACE("rank " + std::to_string(r) + " " + kParamNames[i]);
      const auto& ext = *extensions[r].at(i);
      ASSERT_EQ(ext.first_gathered.size(), 3u);
      const at::Tensor full = padded(data.init[i], world);  // the first gather: the initial values
      EXPECT_TRUE(torch::equal(ext.first_gathered[0], full));
      EXPECT_TRUE(torch::equal(ext.first_gathered[1], at::arange(full.size(0), at::kLong)));
      EXPECT_TRUE(torch::equal(ext.first_gathered[2], full.to(at::kDouble).neg()));
      EXPECT_EQ(ext.metadata_seen, std::vector<int>(2 * kSteps, r));  // each rank its own metadata back
    }
  }
}

// ---------------------------------------------------------------------------
// A bf16 gather with fp32 compute: half the bytes, bf16-rounded params.

int64_t all_gather_bytes(const observe::TraceRecorder& trace, int rank) {
  int64_t bytes = 0;
  for (const auto& record : trace.events()) {
    if (record.is_collective() && record.rank == rank && record.op == CollectiveOp::AllGather) {
      bytes += record.out_bytes();
    }
  }
  return bytes;
}

TEST_P(AllGatherExtensionTest, Bf16GatherWithFp32ComputeHalvesTheBytes) {
  const int world = world_size();
  const Data data = make_data(world);
  std::vector<int64_t> bytes;
  std::vector<std::vector<std::shared_ptr<CastGather>>> extensions(world);
  for (bool extended : {false, true}) {
    sim::WorldOptions options = this->options();
    auto trace = std::make_shared<observe::TraceRecorder>(world);
    options.trace = trace;
    const auto records = train(options, data, [&](int r) {
      RunOptions run;
      if (extended) {
        run.extension = [&, r](size_t) {
          extensions[r].push_back(std::make_shared<CastGather>(at::kBFloat16));
          return extensions[r].back();
        };
      }
      return run;
    });
    bytes.push_back(all_gather_bytes(*trace, 0));
    if (extended) {
      // The gathered params are the masters rounded to bf16, computed in fp32.
      expect_matches(
          records,
          run_reference(data, world, [](size_t, const at::Tensor& m) { return m.to(at::kBFloat16).to(at::kFloat); }),
          world);
    }
  }
  EXPECT_GT(bytes[0], 0);
  EXPECT_EQ(bytes[1] * 2, bytes[0]);
  for (const auto& ext : extensions[0]) {
    EXPECT_THAT(ext->param_dtypes, ::testing::Each(at::kFloat));  // no mp_policy: the params' own dtype
  }
}

// The reference's rounding matters: fp32 gathers give other numbers, so the
// parity above could not pass with the extension ignored.
TEST(AllGatherExtension, Bf16RoundingChangesTheReference) {
  const Data data = make_data(2);
  const Reference plain = run_reference(data, 2, [](size_t, const at::Tensor& m) { return m.clone(); });
  const Reference rounded =
      run_reference(data, 2, [](size_t, const at::Tensor& m) { return m.to(at::kBFloat16).to(at::kFloat); });
  EXPECT_FALSE(torch::equal(plain.loss[0][0], rounded.loss[0][0]));
  EXPECT_FALSE(torch::equal(plain.params[0][0], rounded.params[0][0]));
}

// ---------------------------------------------------------------------------
// In place: post_all_gather gets its first result back as `out` at every later
// gather; its storage is freed between gathers.

TEST_P(AllGatherExtensionTest, InPlacePostAllGatherReusesItsOutput) {
  const int world = world_size();
  const Data data = make_data(world);
  std::vector<std::vector<std::shared_ptr<CastGather>>> extensions(world);
  const auto records = train(options(), data, [&](int r) {
    RunOptions run;
    run.extension = [&, r](size_t) {
      extensions[r].push_back(std::make_shared<CastGather>(at::kFloat));
      return extensions[r].back();
    };
    return run;
  });
  // An fp32 copy in and out: the plain reference.
  expect_matches(records, run_reference(data, world, [](size_t, const at::Tensor& m) { return m.clone(); }), world);
  for (int r = 0; r < world; ++r) {
    for (size_t i = 0; i < kParamNames.size(); ++i) {
      SCOPED_TRACE("rank " + std::to_string(r) + " " + kParamNames[i]);
      const auto& ext = *extensions[r][i];
      const size_t gathers = kParamUnit[i] == kRoot ? kSteps : 2 * kSteps;  // the root stays gathered for backward
      ASSERT_EQ(ext.given_out.size(), gathers);
      EXPECT_FALSE(ext.given_out[0]);  // the one allocation
      for (size_t g = 1; g < gathers; ++g) EXPECT_TRUE(ext.given_out[g]) << "gather " << g;
      EXPECT_THAT(ext.same_out, ::testing::Each(true));
      // Resharded after the last backward: the output's memory is released.
      EXPECT_EQ(ext.first_result.storage().nbytes(), 0u);
    }
  }
}

// ---------------------------------------------------------------------------
// Uneven outer sizes: the context's outer size, stride and padded shard; an
// unpadded input for an unevenly sharded param is refused on every rank.

TEST_P(AllGatherExtensionTest, UnevenOuterSizesPadToThePaddedShard) {
  const int world = world_size();
  const Data data = make_data(world);
  std::vector<std::shared_ptr<CastGather>> weights(world);
  train(options(), data, [&](int r) {
    RunOptions run;
    run.extension = [&, r](size_t i) -> std::shared_ptr<AllGatherExtension> {
      if (i != 2) return nullptr;  // block1's [7, 7] weight
      return weights[r] = std::make_shared<CastGather>(at::kFloat);
    };
    return run;
  });
  const int64_t rows = (kHidden + world - 1) / world;
  for (int r = 0; r < world; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_FALSE(weights[r]->contexts.empty());
    const AllGatherContext& c = weights[r]->contexts[0];
    EXPECT_EQ(c.fqn, "block1.lin.weight");  // named from the root once it is known
    EXPECT_EQ(c.outer_size, (std::vector<int64_t>{kHidden, kHidden}));
    EXPECT_EQ(c.outer_stride, (std::vector<int64_t>{kHidden, 1}));
    EXPECT_EQ(c.padded_shard_size, (std::vector<int64_t>{rows, kHidden}));
    EXPECT_EQ(c.shard_rank, r);
    EXPECT_EQ(c.shard_world, world);
    EXPECT_EQ(weights[r]->shard_rows[0], rows_of(data.init[2], r, world).size(0));  // unpadded
    EXPECT_TRUE(torch::equal(weights[r]->padded_shards[0], rows_of(padded(data.init[2], world), r, world)));
    EXPECT_EQ(weights[r]->gathered_shapes[0], (std::vector<int64_t>{world * rows, kHidden}));
  }
  sim::World sim_world(options());
  auto result = sim_world.run([&](sim::RankContext& ctx) {
    RankRecord record;
    RunOptions run;
    run.extension = [](size_t i) -> std::shared_ptr<AllGatherExtension> {
      return i == 2 ? std::make_shared<UnpaddedGather>() : nullptr;
    };
    train_rank(ctx, data, run, record);
  });
  // A rank whose shard is short refuses it; one whose shard is whole cannot
  // tell (FSDP2 neither) and is woken from its all-gather by the abort.
  ASSERT_EQ(result.ranks.size(), static_cast<size_t>(world));
  for (int r = 0; r < world; ++r) {
    const auto& rank = result.ranks[r];
    EXPECT_FALSE(rank.ok) << "rank " << r;
    if (rows_of(data.init[2], r, world).size(0) == rows) continue;
    EXPECT_THAT(rank.error, HasSubstr("param 'block1.lin.weight' of unit 'block1'"));
    EXPECT_THAT(rank.error, HasSubstr("padded shard's " + std::to_string(rows) + " rows"));
  }
}

INSTANTIATE_TEST_SUITE_P(All, AllGatherExtensionTest,
                         fsdpsim::testing::WorldParams({sim::RankKind::Threads, sim::RankKind::Fibers}, {2, 3}),
                         fsdpsim::testing::WorldParamName);

// ---------------------------------------------------------------------------
// HSDP on a 2 x 2 mesh with bf16 mixed precision: the extension sees the
// shard axis only; gathers stay on the shard groups, in bf16; the numbers are
// those of plain mixed precision (the extension gathers what it gathers).

class AllGatherExtensionHsdp : public ::testing::TestWithParam<sim::RankKind> {};

TEST_P(AllGatherExtensionHsdp, SeesOnlyTheShardAxisWithMixedPrecision) {
  using fsdpsim::testing::DtypeIs;
  using fsdpsim::testing::GroupSizeIs;
  using fsdpsim::testing::IsAllGather;
  constexpr int kWorld = 4;
  constexpr int kReplicas = 2;
  const Data data = make_data(kWorld);
  MixedPrecisionPolicy mp;
  mp.param_dtype = at::kBFloat16;
  std::vector<std::vector<std::shared_ptr<CastGather>>> extensions(kWorld);
  std::vector<std::shared_ptr<fsdpsim::testing::MockCommHooks>> mocks;
  for (int r = 0; r < kWorld; ++r) {
    auto mock = std::make_shared<::testing::NiceMock<fsdpsim::testing::MockCommHooks>>();
    EXPECT_CALL(*mock, before(_)).Times(AnyNumber());    // the reduce-scatters and all-reduces
    EXPECT_CALL(*mock, before(IsAllGather())).Times(0);  // any other all-gather, e.g. over the world
    EXPECT_CALL(*mock, before(AllOf(IsAllGather(), GroupSizeIs(kWorld / kReplicas), DtypeIs(at::kBFloat16))))
        .Times(5 * kSteps);  // per step: 3 forward, 2 backward (the root stays gathered)
    mocks.push_back(mock);
  }
  WorldParam param{GetParam(), kWorld};
  const auto extended = train(world_options(param), data, [&](int r) {
    RunOptions run;
    run.mp = mp;
    run.hsdp_replicas = kReplicas;
    run.comm_hooks = mocks[r];
    run.extension = [&, r](size_t) {
      extensions[r].push_back(std::make_shared<CastGather>(at::kBFloat16));
      return extensions[r].back();
    };
    return run;
  });
  const auto plain = train(world_options(param), data, [&](int) {
    RunOptions run;
    run.mp = mp;
    run.hsdp_replicas = kReplicas;
    return run;
  });
  for (int r = 0; r < kWorld; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    for (int s = 0; s < kSteps; ++s) {
      for (size_t i = 0; i < kParamNames.size(); ++i) {
        EXPECT_TRUE(torch::equal(extended[r].params[s][i], plain[r].params[s][i])) << kParamNames[i];
      }
    }
    for (const auto& ext : extensions[r]) {
      ASSERT_FALSE(ext->contexts.empty());
      for (const auto& c : ext->contexts) {
        EXPECT_EQ(c.shard_world, kWorld / kReplicas);
        EXPECT_EQ(c.shard_rank, r % (kWorld / kReplicas));
      }
      EXPECT_THAT(ext->mp_param_dtypes, ::testing::Each(std::optional<at::ScalarType>(at::kBFloat16)));
      EXPECT_THAT(ext->param_dtypes, ::testing::Each(at::kBFloat16));  // post_all_gather gets param_dtype
    }
  }
}

INSTANTIATE_TEST_SUITE_P(All, AllGatherExtensionHsdp, ::testing::Values(sim::RankKind::Threads, sim::RankKind::Fibers),
                         [](const ::testing::TestParamInfo<sim::RankKind>& info) {
                           return std::string(info.param == sim::RankKind::Threads ? "threads" : "fibers");
                         });

// ---------------------------------------------------------------------------
// Inputs refused.

// Runs `fn` on each of 2 thread ranks.
sim::WorldResult run_two_ranks(const std::function<void(sim::RankContext&)>& fn) {
  sim::WorldOptions options;
  options.world_size = 2;
  sim::World world(options);
  return world.run(fn);
}

TEST(AllGatherExtension, RefusesKeysThatNameNoParamOfTheUnit) {
  auto result = run_two_ranks([&](sim::RankContext& ctx) {
    Engine engine;
    auto net = std::make_shared<Net>();
    FullyShardOptions block;
    block.shard_group = ctx.world_group();
    engine.fully_shard(net->block0, block);
    FullyShardOptions root = block;
    // block0's param: its unit was sharded without it.
    root.all_gather_extensions["block0.lin.weight"] = std::make_shared<CastGather>(at::kFloat);
    try {
      engine.fully_shard(net, root);
      throw std::logic_error("no error for a nested unit's param");
    } catch (const std::invalid_argument& e) {
      const std::string what = e.what();
      if (what.find("names 'block0.lin.weight', which is not a param this unit manages") == std::string::npos ||
          what.find("'head.weight'") == std::string::npos) {
        throw std::logic_error("unexpected message: " + what);
      }
    }
    FullyShardOptions null_ext = block;
    null_ext.all_gather_extensions["lin.weight"] = nullptr;
    try {
      engine.fully_shard(net->block1, null_ext);
      throw std::logic_error("no error for a null extension");
    } catch (const std::invalid_argument& e) {
      if (std::string(e.what()).find("all_gather_extensions['lin.weight'] is null") == std::string::npos) {
        throw std::logic_error(std::string("unexpected message: ") + e.what());
      }
    }
  });
  EXPECT_TRUE(fsdpsim::testing::RanksSucceeded(result));
}

TEST(AllGatherExtension, RefusesAPostAllGatherOfTheWrongShape) {
  const Data data = make_data(2);
  auto result = run_two_ranks([&](sim::RankContext& ctx) {
    RankRecord record;
    RunOptions run;
    run.extension = [](size_t i) -> std::shared_ptr<AllGatherExtension> {
      return i == 0 ? std::make_shared<ShortPost>() : nullptr;
    };
    train_rank(ctx, data, run, record);
  });
  for (const auto& rank : result.ranks) {
    EXPECT_FALSE(rank.ok);
    EXPECT_THAT(rank.error, HasSubstr("post_all_gather returned shape [6, 5], expected the outer size [7, 5]"));
  }
}

TEST(AllGatherExtension, SummonFullParamsRefusesExtendedUnits) {
  const Data data = make_data(2);
  auto result = run_two_ranks([&](sim::RankContext& ctx) {
    Engine engine;
    RunOptions run;
    run.extension = [](size_t i) -> std::shared_ptr<AllGatherExtension> {
      return i == 0 ? std::make_shared<CastGather>(at::kBFloat16) : nullptr;
    };
    auto net = sharded_net(engine, ctx, run, data);
    try {
      auto full = engine.summon_full_params(net->block0);
      throw std::logic_error("summoned");
    } catch (const std::invalid_argument& e) {
      if (std::string(e.what()).find("has all-gather extensions") == std::string::npos) throw;
    }
  });
  EXPECT_TRUE(fsdpsim::testing::RanksSucceeded(result));
}

}  // namespace
}  // namespace fsdpsim::fsdp
