// The prefetch orders PyTorch's FSDP tests assert (reference section 4),
// checked event by event twice per run: from a trace (TraceRecorder +
// scenarios::TraceEngineHooks, each rank's engine events) and by a
// GoogleMock StrictMock per rank with the events in one Sequence. Every case
// runs on thread ranks and on fiber ranks, world 2.
//
// Notation (the reference's, our unit names): "U x" all-gather issued,
// "R x" gathered params freed, "PB x" reduce-scatter issued, "final" the
// end-of-backward callback, "P x>y" unit x chose y to prefetch ("none": no
// target). A case compares the kinds it lists; the others may occur any
// number of times. Where the reference lists U/PB only, the case states our
// full sequence (with R) and checks that its U/PB projection is the
// reference's literal sequence.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <ostream>
#include <set>
#include <string>
#include <vector>

#include "backends/observe/trace_recorder.h"
#include "fsdp/fully_shard.h"
#include "scenarios/engine_trace.h"
#include "sim/fiber_autograd.h"
#include "sim/testing/mock_hooks.h"
#include "sim/world.h"

namespace fsdpsim::fsdp {
namespace {

using ::testing::_;
using ::testing::AnyNumber;
using Events = std::vector<std::string>;
using Kinds = std::set<std::string>;

const Kinds kUnshardReshardPostBackward = {"U", "R", "PB", "final"};
const Kinds kUnshardPostBackward = {"U", "PB"};
const Kinds kPrefetchDecisions = {"P"};

std::string kind_of(const std::string& event) { return event.substr(0, event.find(' ')); }

Events only(const Events& events, const Kinds& kinds) {
  Events kept;
  for (const auto& event : events) {
    if (kinds.count(kind_of(event))) kept.push_back(event);
  }
  return kept;
}

Events concat(std::initializer_list<Events> parts) {
  Events all;
  for (const auto& part : parts) all.insert(all.end(), part.begin(), part.end());
  return all;
}

// Unit names as the events spell them: "root" for the root ("" to the hooks,
// "<root>" in traces), "none" for no prefetch target.
std::string fqn_of(const std::string& name) { return name == "root" || name == "none" ? "" : name; }

using fsdpsim::testing::MockEngineHooks;
using StrictHooks = ::testing::StrictMock<MockEngineHooks>;

// The compared kinds of `expected` in one Sequence; every other kind any
// number of times. Uses an explicit Sequence (not InSequence, whose state is
// per OS thread and would be shared by the fiber ranks of one thread).
void expect_sequence(StrictHooks& mock, const Events& expected, const Kinds& kinds) {
  if (!kinds.count("U")) EXPECT_CALL(mock, on_unshard(_, _)).Times(AnyNumber());
  if (!kinds.count("R")) EXPECT_CALL(mock, on_reshard(_, _)).Times(AnyNumber());
  if (!kinds.count("PB")) EXPECT_CALL(mock, on_post_backward(_, _)).Times(AnyNumber());
  if (!kinds.count("final")) EXPECT_CALL(mock, on_final_callback(_, _)).Times(AnyNumber());
  if (!kinds.count("P")) EXPECT_CALL(mock, on_prefetch(_, _, _)).Times(AnyNumber());
  EXPECT_CALL(mock, on_pre_backward(_, _)).Times(AnyNumber());
  ::testing::Sequence sequence;
  for (const auto& event : only(expected, kinds)) {
    const std::string kind = kind_of(event);
    const std::string rest = event.size() > kind.size() ? event.substr(kind.size() + 1) : "";
    if (kind == "U") {
      EXPECT_CALL(mock, on_unshard(fqn_of(rest), _)).InSequence(sequence);
    } else if (kind == "R") {
      EXPECT_CALL(mock, on_reshard(fqn_of(rest), _)).InSequence(sequence);
    } else if (kind == "PB") {
      EXPECT_CALL(mock, on_post_backward(fqn_of(rest), _)).InSequence(sequence);
    } else if (kind == "final") {
      EXPECT_CALL(mock, on_final_callback("", _)).InSequence(sequence);
    } else if (kind == "P") {
      const size_t arrow = rest.find('>');
      EXPECT_CALL(mock, on_prefetch(fqn_of(rest.substr(0, arrow)), fqn_of(rest.substr(arrow + 1)), _))
          .InSequence(sequence);
    } else {
      ADD_FAILURE() << "bad expected event '" << event << "'";
    }
  }
}

// One rank's engine events from a trace, in the notation above.
Events traced_events(const observe::TraceRecorder& recorder, int rank, const Kinds& kinds) {
  Events events;
  for (const auto& event : recorder.events()) {
    if (event.rank != rank || event.is_collective()) continue;
    const std::string unit = event.name == "<root>" ? "root" : event.name;
    std::string text;
    if (event.kind == "unshard") {
      text = "U " + unit;
    } else if (event.kind == "reshard") {
      text = "R " + unit;
    } else if (event.kind == "post_backward") {
      text = "PB " + unit;
    } else if (event.kind == "final_callback") {
      text = "final";
    } else if (event.kind == "prefetch") {
      // detail: "<state> -> <target or none>"
      const size_t arrow = event.detail.find("-> ");
      text = "P " + unit + ">" + (arrow == std::string::npos ? "?" : event.detail.substr(arrow + 3));
    } else {
      continue;  // pre_backward
    }
    if (kinds.count(kind_of(text))) events.push_back(text);
  }
  return events;
}

// Every parameter drawn from a private generator: the same model on every
// rank and in the reference, without the process-global RNG.
void init_params(torch::nn::Module& module, uint64_t seed) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  torch::NoGradGuard no_grad;
  for (auto& param : module.parameters()) param.copy_(at::randn(param.sizes(), generator) * 0.5);
}

at::Tensor draw(std::vector<int64_t> shape, uint64_t seed) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, generator);
}

constexpr int64_t kDim = 8;

// Root-owned in_proj (so every layer's input needs grad, as after the
// reference Transformer's embedding), named Linear layers as units, root-owned
// out_proj. The root's own input needs no grad: its post-backward runs in the
// final callback.
struct Chain : torch::nn::Module {
  explicit Chain(const std::vector<std::string>& names) {
    in_proj = register_module("in_proj", torch::nn::Linear(kDim, kDim));
    for (const auto& name : names) layers.push_back(register_module(name, torch::nn::Linear(kDim, kDim)));
    out_proj = register_module("out_proj", torch::nn::Linear(kDim, kDim));
  }
  at::Tensor forward(at::Tensor x) {
    x = in_proj(x);
    for (auto& layer : layers) x = torch::relu(fsdp::call(layer, x));
    return out_proj(x);
  }
  torch::nn::Linear in_proj{nullptr};
  std::vector<torch::nn::Linear> layers;
  torch::nn::Linear out_proj{nullptr};
};

// Six encoder and six decoder layers (LibTorch's, d_model 16, 2 heads, ff 8,
// no dropout), each a unit, every decoder layer reading the encoder's output.
struct EncoderDecoder : torch::nn::Module {
  static constexpr int64_t kModel = 16;
  EncoderDecoder() {
    in_proj = register_module("in_proj", torch::nn::Linear(kModel, kModel));
    for (int i = 0; i < 6; ++i) {
      encoders.push_back(
          register_module("enc" + std::to_string(i),
                          torch::nn::TransformerEncoderLayer(
                              torch::nn::TransformerEncoderLayerOptions(kModel, 2).dim_feedforward(8).dropout(0.0))));
    }
    for (int i = 0; i < 6; ++i) {
      decoders.push_back(
          register_module("dec" + std::to_string(i),
                          torch::nn::TransformerDecoderLayer(
                              torch::nn::TransformerDecoderLayerOptions(kModel, 2).dim_feedforward(8).dropout(0.0))));
    }
    out_proj = register_module("out_proj", torch::nn::Linear(kModel, kModel));
  }
  at::Tensor forward(at::Tensor src, at::Tensor tgt) {
    at::Tensor memory = in_proj(src);
    for (auto& layer : encoders) memory = fsdp::call(layer, memory);
    at::Tensor x = in_proj(tgt);
    for (auto& layer : decoders) x = fsdp::call(layer, x, memory);
    return out_proj(x);
  }
  torch::nn::Linear in_proj{nullptr};
  std::vector<torch::nn::TransformerEncoderLayer> encoders;
  std::vector<torch::nn::TransformerDecoderLayer> decoders;
  torch::nn::Linear out_proj{nullptr};
};

// A model ready to shard: its units (children, in fully_shard order), the
// units by name for explicit prefetch lists, and one forward's loss.
struct Built {
  std::shared_ptr<torch::nn::Module> root;
  std::vector<std::shared_ptr<torch::nn::Module>> units;
  std::map<std::string, std::shared_ptr<torch::nn::Module>> by_name;
  std::function<at::Tensor(int rank, int pass)> loss;
};

Built make_chain(const std::vector<std::string>& names) {
  auto model = std::make_shared<Chain>(names);
  init_params(*model, 7);
  Built built;
  built.root = model;
  for (size_t i = 0; i < names.size(); ++i) {
    built.units.push_back(model->layers[i].ptr());
    built.by_name[names[i]] = model->layers[i].ptr();
  }
  built.loss = [model](int rank, int pass) { return fsdp::call(model, draw({4, kDim}, 100 + 10 * rank + pass)).sum(); };
  return built;
}

std::vector<std::string> layer_names(int n, const std::string& prefix = "L") {
  std::vector<std::string> names;
  for (int i = 0; i < n; ++i) names.push_back(prefix + std::to_string(i));
  return names;
}

Built make_encoder_decoder() {
  auto model = std::make_shared<EncoderDecoder>();
  init_params(*model, 11);
  Built built;
  built.root = model;
  for (auto& layer : model->encoders) built.units.push_back(layer.ptr());
  for (auto& layer : model->decoders) built.units.push_back(layer.ptr());
  built.loss = [model](int rank, int pass) {
    const uint64_t seed = 200 + 10 * rank + pass;
    return fsdp::call(model, draw({6, 2, EncoderDecoder::kModel}, seed), draw({4, 2, EncoderDecoder::kModel}, seed + 1))
        .sum();
  };
  return built;
}

struct OrderRun {
  std::function<Built()> build;
  ShardingStrategy strategy = ShardingStrategy::FullShard;
  BackwardPrefetch backward_prefetch = BackwardPrefetch::BackwardPre;
  int max_prefetches_in_flight = 2;
  /// Explicit prefetch lists, set after sharding.
  std::function<void(Engine&, Built&)> configure;
  /// Forwards before the one backward (their losses summed).
  int forwards = 1;
  Kinds kinds = kUnshardReshardPostBackward;
  /// The whole run's events of the compared kinds.
  Events expected;
};

constexpr int kWorld = 2;

void expect_order(const OrderRun& run, sim::RankKind kind) {
  auto recorder = std::make_shared<observe::TraceRecorder>(kWorld);
  sim::WorldOptions options;
  options.world_size = kWorld;
  options.rank_kind = kind;
  options.trace = recorder;
  sim::World world(options);
  auto result = world.run([&](sim::RankContext& ctx) {
    auto mock = std::make_shared<StrictHooks>();
    expect_sequence(*mock, run.expected, run.kinds);
    EngineOptions engine_options;
    engine_options.hooks = {std::make_shared<scenarios::TraceEngineHooks>(recorder, ctx.rank()), mock};
    engine_options.queue_backward_callback = sim::queue_backward_callback;
    engine_options.backward_prefetch = run.backward_prefetch;
    engine_options.max_prefetches_in_flight = run.max_prefetches_in_flight;
    Engine engine(engine_options);
    Built built = run.build();
    FullyShardOptions shard;
    shard.shard_group = ctx.world_group();
    shard.strategy = run.strategy;
    for (const auto& unit : built.units) engine.fully_shard(unit, shard);
    engine.fully_shard(built.root, shard);
    if (run.configure) run.configure(engine, built);

    at::Tensor loss = built.loss(ctx.rank(), 0);
    for (int pass = 1; pass < run.forwards; ++pass) loss = loss + built.loss(ctx.rank(), pass);
    sim::backward(loss);

    for (const Unit* unit : engine.units())
      EXPECT_FALSE(unit->is_unsharded()) << "rank " << ctx.rank() << " " << unit->fqn();
    EXPECT_EQ(engine.unsharded_bytes(), 0) << "rank " << ctx.rank();
    EXPECT_TRUE(::testing::Mock::VerifyAndClearExpectations(mock.get())) << "rank " << ctx.rank();
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
  const Events expected = only(run.expected, run.kinds);
  for (int rank = 0; rank < kWorld; ++rank) {
    EXPECT_EQ(traced_events(*recorder, rank, run.kinds), expected) << "rank " << rank << " (trace)";
  }
}

class PrefetchOrder : public ::testing::TestWithParam<sim::RankKind> {};

}  // namespace
}  // namespace fsdpsim::fsdp

namespace fsdpsim::sim {
// Readable parameters in gtest's messages.
static void PrintTo(RankKind kind, std::ostream* out) { *out << to_string(kind); }
}  // namespace fsdpsim::sim

namespace fsdpsim::fsdp {
namespace {

// ---------------------------------------------------------------------------
// Implicit prefetch, 3 layers + root.

const Events kForward3 = {"U root", "U L0", "R L0", "U L1", "R L1", "U L2", "R L2"};
const Events kBackward3 = {"U L2",  "U L1", "R L2",  "PB L2",  "U L0",   "R L1",
                           "PB L1", "R L0", "PB L0", "R root", "PB root"};

TEST_P(PrefetchOrder, ImplicitThreeLayers) {
  // Reference: forward U root, U L0, U L1, U L2; backward each unshard one
  // slot early.
  EXPECT_EQ(only(kForward3, kUnshardPostBackward), (Events{"U root", "U L0", "U L1", "U L2"}));
  EXPECT_EQ(only(kBackward3, kUnshardPostBackward),
            (Events{"U L2", "U L1", "PB L2", "U L0", "PB L1", "PB L0", "PB root"}));
  OrderRun run;
  run.build = [] { return make_chain(layer_names(3)); };
  run.expected = concat({kForward3, kBackward3, {"final"}});
  expect_order(run, GetParam());
  // And the reference's own kinds alone.
  run.kinds = kUnshardPostBackward;
  expect_order(run, GetParam());
}

TEST_P(PrefetchOrder, ImplicitThreeLayersDecisions) {
  // BACKWARD_PRE: the root picks the last layer, each layer the one before it.
  OrderRun run;
  run.build = [] { return make_chain(layer_names(3)); };
  run.kinds = {"U", "R", "PB", "P"};
  run.expected = concat({kForward3,
                         {"P root>L2", "U L2", "P L2>L1", "U L1", "R L2", "PB L2", "P L1>L0", "U L0", "R L1", "PB L1",
                          "P L0>none", "R L0", "PB L0", "R root", "PB root"}});
  expect_order(run, GetParam());
}

TEST_P(PrefetchOrder, NoReshardAfterForwardMeansNoBackwardUnshards) {
  OrderRun run;
  run.build = [] { return make_chain(layer_names(3)); };
  run.strategy = ShardingStrategy::ShardGradOp;
  const Events forward = {"U root", "U L0", "U L1", "U L2"};
  const Events backward = {"R L2", "PB L2", "R L1", "PB L1", "R L0", "PB L0", "R root", "PB root"};
  // Reference: the implicit backward with every unshard removed.
  EXPECT_EQ(only(backward, kUnshardPostBackward), (Events{"PB L2", "PB L1", "PB L0", "PB root"}));
  run.expected = concat({forward, backward, {"final"}});
  expect_order(run, GetParam());
}

TEST_P(PrefetchOrder, TwoForwardsThenOneBackward) {
  // Reference: the forward unshards repeat (the root stays gathered), the
  // backward pattern runs twice, the root's post-backward once at the end.
  // Each layer's param is one autograd leaf in both forwards, so its
  // AccumulateGrad runs once, after both passes: the first pattern's
  // post-backwards find no grads yet (PyTorch records the post-backward
  // call all the same), and the second pattern's layers must prefetch the
  // layer before them in the first forward although its first post-backward
  // already ran.
  const Events again = {"U L0", "R L0", "U L1", "R L1", "U L2", "R L2"};
  const Events pattern = {"U L2", "U L1", "R L2", "PB L2", "U L0", "R L1", "PB L1", "R L0", "PB L0"};
  EXPECT_EQ(only(concat({kForward3, again}), kUnshardPostBackward),
            (Events{"U root", "U L0", "U L1", "U L2", "U L0", "U L1", "U L2"}));
  EXPECT_EQ(only(concat({pattern, pattern, {"R root", "PB root"}}), kUnshardPostBackward),
            (Events{"U L2", "U L1", "PB L2", "U L0", "PB L1", "PB L0",  //
                    "U L2", "U L1", "PB L2", "U L0", "PB L1", "PB L0", "PB root"}));
  OrderRun run;
  run.build = [] { return make_chain(layer_names(3)); };
  run.forwards = 2;
  run.expected = concat({kForward3, again, pattern, pattern, {"R root", "PB root", "final"}});
  expect_order(run, GetParam());
}

// ---------------------------------------------------------------------------
// Explicit prefetch, 4 layers.

// The implicit backward of 4 layers + root (also what explicit backward
// prefetch with k = 1 gives).
const Events kBackward4 = {"U L3", "U L2", "R L3",  "PB L3", "U L1",  "R L2",   "PB L2",
                           "U L0", "R L1", "PB L1", "R L0",  "PB L0", "R root", "PB root"};

void set_forward_prefetch(Engine& engine, Built& built, int n, int k) {
  for (int i = 0; i + k < n; ++i) {
    std::vector<std::shared_ptr<torch::nn::Module>> targets;
    for (int j = 1; j <= k; ++j) targets.push_back(built.by_name.at("L" + std::to_string(i + j)));
    engine.set_forward_prefetch(built.by_name.at("L" + std::to_string(i)), targets);
  }
}

void set_backward_prefetch(Engine& engine, Built& built, int n, int k) {
  for (int i = k; i < n; ++i) {
    std::vector<std::shared_ptr<torch::nn::Module>> targets;
    for (int j = 1; j <= k; ++j) targets.push_back(built.by_name.at("L" + std::to_string(i - j)));
    engine.set_backward_prefetch(built.by_name.at("L" + std::to_string(i)), targets);
  }
}

TEST_P(PrefetchOrder, ExplicitForwardPrefetchOneAhead) {
  OrderRun run;
  run.build = [] { return make_chain(layer_names(4)); };
  run.configure = [](Engine& engine, Built& built) { set_forward_prefetch(engine, built, 4, 1); };
  const Events forward = {"U root", "U L0", "U L1", "R L0", "U L2", "R L1", "U L3", "R L2", "R L3"};
  run.expected = concat({forward, kBackward4, {"final"}});
  expect_order(run, GetParam());
}

TEST_P(PrefetchOrder, ExplicitForwardPrefetchTwoAhead) {
  OrderRun run;
  run.build = [] { return make_chain(layer_names(4)); };
  run.configure = [](Engine& engine, Built& built) { set_forward_prefetch(engine, built, 4, 2); };
  const Events forward = {"U root", "U L0", "U L1", "U L2", "R L0", "U L3", "R L1", "R L2", "R L3"};
  run.expected = concat({forward, kBackward4, {"final"}});
  expect_order(run, GetParam());
}

const Events kForward4 = {"U root", "U L0", "R L0", "U L1", "R L1", "U L2", "R L2", "U L3", "R L3"};

TEST_P(PrefetchOrder, ExplicitBackwardPrefetchTwoBack) {
  // L3 prefetches L2 and L1, L2 prefetches L1 and L0; L1 and L0 keep the
  // implicit choice; the root prefetches L3 implicitly. When L3 decides,
  // three gathers are out (L3's own, L2, L1): only two of them are ahead of
  // the unit being computed, within the default max_prefetches_in_flight.
  OrderRun run;
  run.build = [] { return make_chain(layer_names(4)); };
  run.configure = [](Engine& engine, Built& built) { set_backward_prefetch(engine, built, 4, 2); };
  const Events backward = {"U L3",  "U L2", "U L1",  "R L3", "PB L3", "U L0",   "R L2",
                           "PB L2", "R L1", "PB L1", "R L0", "PB L0", "R root", "PB root"};
  run.expected = concat({kForward4, backward, {"final"}});
  expect_order(run, GetParam());
}

TEST_P(PrefetchOrder, ExplicitBackwardPrefetchOneBackEqualsImplicit) {
  OrderRun run;
  run.build = [] { return make_chain(layer_names(4)); };
  run.configure = [](Engine& engine, Built& built) { set_backward_prefetch(engine, built, 4, 1); };
  run.expected = concat({kForward4, kBackward4, {"final"}});
  expect_order(run, GetParam());
  run.configure = nullptr;
  expect_order(run, GetParam());
}

TEST_P(PrefetchOrder, MaxPrefetchesInFlightOneLimitsExplicitBackwardPrefetch) {
  // Rule (engine.cpp): a prefetch is skipped while max_prefetches_in_flight
  // gathers issued as prefetches are not yet used by their unit; a unit's
  // own prefetched gather counts as used when its backward begins, before it
  // decides its own prefetches (as in forward).
  //   root: P L3 -> U L3 (1 in flight)
  //   L3:   its own gather in use (0); P L2 -> U L2 (1); P L1 skipped (1 >= 1)
  //   L2:   in use (0); P L1 -> U L1 (1); P L0 skipped
  //   L1:   in use (0); P L0 -> U L0 (1)
  //   L0:   in use (0); nothing left
  OrderRun run;
  run.build = [] { return make_chain(layer_names(4)); };
  run.max_prefetches_in_flight = 1;
  run.configure = [](Engine& engine, Built& built) { set_backward_prefetch(engine, built, 4, 2); };
  run.kinds = {"U", "R", "PB", "P", "final"};
  const Events backward = {"P root>L3", "U L3",    "P L3>L2", "U L2",   "P L3>L1", "R L3", "PB L3", "P L2>L1",
                           "U L1",      "P L2>L0", "R L2",    "PB L2",  "P L1>L0", "U L0", "R L1",  "PB L1",
                           "P L0>none", "R L0",    "PB L0",   "R root", "PB root", "final"};
  run.expected = concat({kForward4, backward});
  expect_order(run, GetParam());
}

// ---------------------------------------------------------------------------
// Classic backward prefetch policies on 6 encoder + 6 decoder layers.

const Events kBackwardPreDecisions = {"P root>dec5", "P dec5>dec4", "P dec4>dec3", "P dec3>dec2", "P dec2>dec1",
                                      "P dec1>dec0", "P dec0>enc5", "P enc5>enc4", "P enc4>enc3", "P enc3>enc2",
                                      "P enc2>enc1", "P enc1>enc0", "P enc0>none"};
const Events kBackwardPostDecisions = {"P dec5>dec4", "P dec4>dec3", "P dec3>dec2", "P dec2>dec1", "P dec1>dec0",
                                       "P dec0>enc5", "P enc5>enc4", "P enc4>enc3", "P enc3>enc2", "P enc2>enc1",
                                       "P enc1>enc0", "P enc0>none", "P root>none"};

Events targets_of(const Events& decisions) {
  Events targets;
  for (const auto& decision : decisions) targets.push_back(decision.substr(decision.find('>') + 1));
  return targets;
}

void expect_policy_decisions(const std::function<Built()>& build, sim::RankKind kind) {
  // Reference: BACKWARD_PRE 13 prefetches dec5..dec0, enc5..enc0, none;
  // BACKWARD_POST dec4..dec0, enc5..enc0, none, none; no prefetch: none.
  EXPECT_EQ(targets_of(kBackwardPreDecisions), (Events{"dec5", "dec4", "dec3", "dec2", "dec1", "dec0", "enc5", "enc4",
                                                       "enc3", "enc2", "enc1", "enc0", "none"}));
  EXPECT_EQ(targets_of(kBackwardPostDecisions), (Events{"dec4", "dec3", "dec2", "dec1", "dec0", "enc5", "enc4", "enc3",
                                                        "enc2", "enc1", "enc0", "none", "none"}));
  OrderRun run;
  run.build = build;
  run.kinds = kPrefetchDecisions;
  {
    SCOPED_TRACE("backward_pre");
    run.backward_prefetch = BackwardPrefetch::BackwardPre;
    run.expected = kBackwardPreDecisions;
    expect_order(run, kind);
  }
  {
    SCOPED_TRACE("backward_post");
    run.backward_prefetch = BackwardPrefetch::BackwardPost;
    run.expected = kBackwardPostDecisions;
    expect_order(run, kind);
  }
  {
    SCOPED_TRACE("none");
    run.backward_prefetch = BackwardPrefetch::None;
    run.expected = {};
    expect_order(run, kind);
  }
}

std::vector<std::string> encoder_decoder_names() {
  auto names = layer_names(6, "enc");
  for (const auto& name : layer_names(6, "dec")) names.push_back(name);
  return names;
}

TEST_P(PrefetchOrder, BackwardPolicyDecisionsOnTwelveLinearLayers) {
  expect_policy_decisions([] { return make_chain(encoder_decoder_names()); }, GetParam());
}

TEST_P(PrefetchOrder, BackwardPolicyDecisionsOnEncoderDecoderTransformer) {
  expect_policy_decisions(make_encoder_decoder, GetParam());
}

TEST_P(PrefetchOrder, BackwardPolicyUnshardsOnTwelveLinearLayers) {
  // The gathers behind the decisions: BACKWARD_POST gathers the next unit
  // right after this unit's reduce-scatter; no prefetch gathers each unit
  // when its backward begins. (Both gather dec5 first, from its own
  // pre-backward: the root keeps its params, so nothing is gathered before.)
  const auto names = encoder_decoder_names();
  OrderRun run;
  run.build = [names] { return make_chain(names); };
  run.kinds = {"U", "PB"};
  Events forward = {"U root"};
  for (const auto& name : names) forward.push_back("U " + name);
  Events post = {"U dec5"};
  Events none;
  for (auto it = names.rbegin(); it != names.rend(); ++it) {
    auto next = std::next(it);
    post.push_back("PB " + *it);
    if (next != names.rend()) post.push_back("U " + *next);
    none.push_back("U " + *it);
    none.push_back("PB " + *it);
  }
  post.push_back("PB root");
  none.push_back("PB root");
  {
    SCOPED_TRACE("backward_post");
    run.backward_prefetch = BackwardPrefetch::BackwardPost;
    run.expected = concat({forward, post});
    expect_order(run, GetParam());
  }
  {
    SCOPED_TRACE("none");
    run.backward_prefetch = BackwardPrefetch::None;
    run.expected = concat({forward, none});
    expect_order(run, GetParam());
  }
}

// ---------------------------------------------------------------------------
// A prefetch target that turns out unused.

// in_proj (root) -> L0 -> lin1 (lin2 never called) -> out_proj (root).
struct SkipsLin2 : torch::nn::Module {
  SkipsLin2() {
    in_proj = register_module("in_proj", torch::nn::Linear(kDim, kDim));
    l0 = register_module("L0", torch::nn::Linear(kDim, kDim));
    lin1 = register_module("lin1", torch::nn::Linear(kDim, kDim));
    lin2 = register_module("lin2", torch::nn::Linear(kDim, kDim));
    out_proj = register_module("out_proj", torch::nn::Linear(kDim, kDim));
  }
  at::Tensor forward(at::Tensor x) {
    x = torch::relu(fsdp::call(l0, in_proj(x)));
    x = torch::relu(fsdp::call(lin1, x));
    return out_proj(x);
  }
  torch::nn::Linear in_proj{nullptr}, l0{nullptr}, lin1{nullptr}, lin2{nullptr}, out_proj{nullptr};
};

at::Tensor skip_input(int rank, int step) { return draw({4, kDim}, 300 + 10 * rank + step); }

enum class Misprefetch { None, Forward, Backward, Both };

void expect_unused_target_keeps_parity(sim::RankKind kind, Misprefetch where) {
  constexpr int kSteps = 2;
  constexpr double kLr = 0.1;
  // Reference: plain autograd, the grads of both ranks' inputs averaged
  // (summed in rank order, divided by the world: the reduce-scatter's
  // arithmetic), plain SGD.
  at::set_num_threads(1);
  auto reference = std::make_shared<SkipsLin2>();
  init_params(*reference, 5);
  std::vector<std::vector<at::Tensor>> reference_grads;  // [step][param]
  std::vector<std::vector<at::Tensor>> reference_params;
  {
    auto params = reference->parameters();
    torch::optim::SGD sgd(params, torch::optim::SGDOptions(kLr));
    for (int step = 0; step < kSteps; ++step) {
      std::vector<at::Tensor> mean(params.size());
      for (int r = 0; r < kWorld; ++r) {
        for (auto& p : params) p.mutable_grad() = at::Tensor();
        reference->forward(skip_input(r, step)).sum().backward();
        for (size_t i = 0; i < params.size(); ++i) {
          if (!params[i].grad().defined()) continue;
          if (r == 0) {
            mean[i] = params[i].grad().clone();
          } else {
            mean[i].add_(params[i].grad());
          }
        }
      }
      for (size_t i = 0; i < params.size(); ++i) {
        if (mean[i].defined()) mean[i].div_(kWorld);
        params[i].mutable_grad() = mean[i].defined() ? mean[i].clone() : at::Tensor();
      }
      reference_grads.push_back(mean);
      sgd.step();
      std::vector<at::Tensor> after;
      for (auto& p : params) after.push_back(p.detach().clone());
      reference_params.push_back(after);
    }
  }

  auto recorder = std::make_shared<observe::TraceRecorder>(kWorld);
  sim::WorldOptions options;
  options.world_size = kWorld;
  options.rank_kind = kind;
  sim::World world(options);
  auto result = world.run([&](sim::RankContext& ctx) {
    EngineOptions engine_options;
    engine_options.hooks = {std::make_shared<scenarios::TraceEngineHooks>(recorder, ctx.rank())};
    engine_options.queue_backward_callback = sim::queue_backward_callback;
    Engine engine(engine_options);
    auto model = std::make_shared<SkipsLin2>();
    init_params(*model, 5);
    FullyShardOptions shard;
    shard.shard_group = ctx.world_group();
    for (auto unit : {model->l0.ptr(), model->lin1.ptr(), model->lin2.ptr()}) engine.fully_shard(unit, shard);
    engine.fully_shard(model, shard);
    if (where == Misprefetch::Forward || where == Misprefetch::Both)
      engine.set_forward_prefetch(model->l0.ptr(), {model->lin2.ptr(), model->lin1.ptr()});
    if (where == Misprefetch::Backward || where == Misprefetch::Both)
      engine.set_backward_prefetch(model->lin1.ptr(), {model->lin2.ptr(), model->l0.ptr()});
    auto params = model->parameters();
    torch::optim::SGD sgd(params, torch::optim::SGDOptions(kLr));
    for (int step = 0; step < kSteps; ++step) {
      for (auto& p : params) p.mutable_grad() = at::Tensor();
      sim::backward(fsdp::call(model, skip_input(ctx.rank(), step)).sum());
      for (const Unit* unit : engine.units()) {
        EXPECT_FALSE(unit->is_unsharded()) << "rank " << ctx.rank() << " step " << step << " " << unit->fqn();
      }
      EXPECT_EQ(engine.unsharded_bytes(), 0) << "rank " << ctx.rank() << " step " << step;
      for (size_t i = 0; i < params.size(); ++i) {
        const at::Tensor& expected = reference_grads[step][i];
        const at::Tensor& grad = params[i].grad();
        ASSERT_EQ(grad.defined(), expected.defined()) << "param " << i << " rank " << ctx.rank() << " step " << step;
        if (!expected.defined()) continue;
        const int64_t rows = (expected.size(0) + kWorld - 1) / kWorld;
        const int64_t begin = std::min<int64_t>(ctx.rank() * rows, expected.size(0));
        const int64_t mine = std::min<int64_t>(rows, expected.size(0) - begin);
        EXPECT_TRUE(torch::equal(grad, expected.narrow(0, begin, mine)))
            << "max diff " << (grad - expected.narrow(0, begin, mine)).abs().max().item<double>() << " grad of param "
            << i << " rank " << ctx.rank() << " step " << step;
      }
      sgd.step();
      for (size_t i = 0; i < params.size(); ++i) {
        const at::Tensor& expected = reference_params[step][i];
        const int64_t rows = (expected.size(0) + kWorld - 1) / kWorld;
        const int64_t begin = std::min<int64_t>(ctx.rank() * rows, expected.size(0));
        const int64_t mine = std::min<int64_t>(rows, expected.size(0) - begin);
        EXPECT_TRUE(torch::equal(params[i], expected.narrow(0, begin, mine)))
            << "param " << i << " after step " << step << " rank " << ctx.rank();
      }
    }
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
  // The mistargeted gather really happened (once per step), and lin2 was
  // freed again without a reduce-scatter.
  const Events events = traced_events(*recorder, 0, {"U", "PB"});
  EXPECT_EQ(std::count(events.begin(), events.end(), "U lin2"), where == Misprefetch::None ? 0 : kSteps)
      << ::testing::PrintToString(events);
  EXPECT_EQ(std::count(events.begin(), events.end(), "PB lin2"), 0);
}

TEST_P(PrefetchOrder, UnusedModuleWithoutPrefetchKeepsParity) {
  expect_unused_target_keeps_parity(GetParam(), Misprefetch::None);
}

TEST_P(PrefetchOrder, UnusedForwardPrefetchTargetKeepsParity) {
  expect_unused_target_keeps_parity(GetParam(), Misprefetch::Forward);
}

TEST_P(PrefetchOrder, UnusedBackwardPrefetchTargetKeepsParity) {
  expect_unused_target_keeps_parity(GetParam(), Misprefetch::Backward);
}

TEST_P(PrefetchOrder, UnusedPrefetchTargetInBothDirectionsKeepsParity) {
  expect_unused_target_keeps_parity(GetParam(), Misprefetch::Both);
}

INSTANTIATE_TEST_SUITE_P(Ranks, PrefetchOrder, ::testing::Values(sim::RankKind::Threads, sim::RankKind::Fibers),
                         [](const ::testing::TestParamInfo<sim::RankKind>& info) {
                           return std::string(sim::to_string(info.param));
                         });

}  // namespace
}  // namespace fsdpsim::fsdp
