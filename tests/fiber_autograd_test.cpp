// run_graph_backward against LibTorch's own engine on the same graphs (bitwise),
// queue_backward_callback on both executors, and backward passes of many fiber
// ranks that each block on collectives inside their backward.
//
// Why bitwise: both executors run the same node kernels on the same inputs in
// the same order (run_graph_backward mirrors the engine's ready queue), so
// every gradient, and every sum of gradients meeting at one node input, is
// computed by the same float operations in the same order.

#include <gtest/gtest.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/torch.h>

#include <boost/fiber/all.hpp>

#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "backends/errors.h"
#include "sim/fiber_autograd.h"
#include "sim/world.h"

namespace fsdpsim::sim {
namespace {

using Backward = std::function<void(const at::Tensor&, const at::Tensor&)>;
using Grads = std::vector<torch::Tensor>;

const Backward kEngine = [](const at::Tensor& root, const at::Tensor& grad) { root.backward(grad); };
const Backward kGraphWalk = [](const at::Tensor& root, const at::Tensor& grad) { run_graph_backward(root, grad); };

// Same dtype, shape and bits (+0.0 and -0.0 differ; torch::equal alone would
// call them equal).
::testing::AssertionResult bitwise_equal(const torch::Tensor& expected, const torch::Tensor& actual) {
  if (expected.defined() != actual.defined()) {
    return ::testing::AssertionFailure() << "defined: expected " << expected.defined() << ", got " << actual.defined();
  }
  if (!expected.defined()) return ::testing::AssertionSuccess();
  if (expected.scalar_type() != actual.scalar_type() || !expected.sizes().equals(actual.sizes())) {
    return ::testing::AssertionFailure() << "expected " << expected.scalar_type() << expected.sizes() << ", got "
                                         << actual.scalar_type() << actual.sizes();
  }
  const auto as_bits = [](const torch::Tensor& t) {
    auto c = t.contiguous();
    switch (c.scalar_type()) {
      case torch::kFloat: return c.view(torch::kInt32);
      case torch::kDouble: return c.view(torch::kInt64);
      default: return c;
    }
  };
  if (!torch::equal(as_bits(expected), as_bits(actual))) {
    return ::testing::AssertionFailure() << "values differ; max abs diff "
                                         << (expected - actual).abs().max().item<double>();
  }
  return ::testing::AssertionSuccess();
}

// Runs `scenario` (which builds its graph from scratch, seeded) once with each
// executor and compares what it returns, tensor by tensor, bitwise.
void expect_parity(const std::function<Grads(const Backward&)>& scenario) {
  const Grads expected = scenario(kEngine);
  const Grads actual = scenario(kGraphWalk);
  ASSERT_EQ(expected.size(), actual.size());
  for (size_t i = 0; i < expected.size(); ++i) EXPECT_TRUE(bitwise_equal(expected[i], actual[i])) << "tensor " << i;
}

Grads param_grads(const torch::nn::Module& module) {
  Grads grads;
  for (const auto& p : module.parameters()) grads.push_back(p.grad());
  return grads;
}

torch::nn::Sequential make_mlp() {
  torch::manual_seed(0);
  return torch::nn::Sequential(torch::nn::Linear(6, 8), torch::nn::ReLU(), torch::nn::Linear(8, 5), torch::nn::ReLU(),
                               torch::nn::Linear(5, 3));
}

class FiberAutograd : public ::testing::Test {
 protected:
  void SetUp() override { at::set_num_threads(1); }
};

TEST_F(FiberAutograd, MlpMatchesEngine) {
  expect_parity([](const Backward& backward) {
    auto mlp = make_mlp();
    auto x = torch::randn({7, 6});
    backward(mlp->forward(x).pow(2).mean(), {});
    return param_grads(*mlp);
  });
}

TEST_F(FiberAutograd, SharedWeightMatchesEngine) {
  // Three gradient contributions meet at w's AccumulateGrad input: the order
  // they are summed in shows in the bits.
  expect_parity([](const Backward& backward) {
    torch::manual_seed(1);
    auto w = torch::randn({4, 4}, torch::requires_grad());
    auto x = torch::randn({3, 4});
    auto h = x.mm(w).tanh().mm(w).sigmoid().mm(w);
    backward((h * h).sum() + w.sum() * 0.1, {});
    return Grads{w.grad()};
  });
}

TEST_F(FiberAutograd, MergingBranchesMatchEngine) {
  expect_parity([](const Backward& backward) {
    torch::manual_seed(2);
    auto w1 = torch::randn({5}, torch::requires_grad());
    auto w2 = torch::randn({5}, torch::requires_grad());
    auto x = torch::randn({5});
    auto a = x * w1;
    auto b = a.sin() * w2;
    auto c = a.cos();
    auto d = (b * c + a.exp() + c.pow(3)).sum();
    backward(d, {});
    return Grads{w1.grad(), w2.grad()};
  });
}

TEST_F(FiberAutograd, UnusedOutputsMatchEngine) {
  expect_parity([](const Backward& backward) {
    torch::manual_seed(3);
    auto w = torch::randn({6, 4}, torch::requires_grad());
    auto parts = (w * 2).chunk(3);              // parts[1] never used: undefined grad into SplitBackward
    auto mx = torch::max(parts[2], /*dim=*/1);  // indices output unused
    backward(parts[0].sum() + std::get<0>(mx).pow(2).sum(), {});
    return Grads{w.grad()};
  });
}

TEST_F(FiberAutograd, NonLeafHookScalingMatchesEngine) {
  expect_parity([](const Backward& backward) {
    auto mlp = make_mlp();
    auto x = torch::randn({7, 6});
    auto h = mlp[0]->as<torch::nn::Linear>()->forward(x);
    h.register_hook([](torch::Tensor g) { return g * 3.0; });
    auto y =
        mlp[4]->as<torch::nn::Linear>()->forward(torch::relu(mlp[2]->as<torch::nn::Linear>()->forward(torch::relu(h))));
    backward(y.sum(), {});
    return param_grads(*mlp);
  });
}

TEST_F(FiberAutograd, LeafHookMatchesEngine) {
  expect_parity([](const Backward& backward) {
    auto mlp = make_mlp();
    auto& first = mlp[0]->as<torch::nn::Linear>()->weight;
    first.register_hook([](torch::Tensor g) { return g * 0.5 + 1.0; });
    backward(mlp->forward(torch::randn({7, 6})).sum(), {});
    return param_grads(*mlp);
  });
}

TEST_F(FiberAutograd, RetainGradMatchesEngine) {
  expect_parity([](const Backward& backward) {
    auto mlp = make_mlp();
    auto h = mlp[0]->as<torch::nn::Linear>()->forward(torch::randn({7, 6}));
    h.retain_grad();
    auto r = torch::relu(h);
    r.retain_grad();
    auto y = mlp[4]->as<torch::nn::Linear>()->forward(torch::relu(mlp[2]->as<torch::nn::Linear>()->forward(r)));
    backward(y.pow(2).sum(), {});
    Grads grads = param_grads(*mlp);
    grads.push_back(h.grad());
    grads.push_back(r.grad());
    EXPECT_TRUE(h.grad().defined());
    return grads;
  });
}

TEST_F(FiberAutograd, FrozenParamsGetNoGrad) {
  expect_parity([](const Backward& backward) {
    auto mlp = make_mlp();
    mlp[0]->as<torch::nn::Linear>()->weight.requires_grad_(false);
    mlp[2]->as<torch::nn::Linear>()->bias.requires_grad_(false);
    backward(mlp->forward(torch::randn({7, 6})).sum(), {});
    Grads grads = param_grads(*mlp);
    EXPECT_FALSE(grads[0].defined());
    EXPECT_FALSE(grads[3].defined());
    EXPECT_TRUE(grads[1].defined());
    return grads;
  });
}

TEST_F(FiberAutograd, GradsAccumulateOverTwoPasses) {
  expect_parity([](const Backward& backward) {
    auto mlp = make_mlp();
    backward(mlp->forward(torch::randn({7, 6})).pow(2).sum(), {});
    Grads first;
    for (const auto& g : param_grads(*mlp)) first.push_back(g.clone());
    backward(mlp->forward(torch::randn({7, 6})).sin().sum(), {});
    Grads grads = param_grads(*mlp);
    EXPECT_FALSE(torch::equal(first[0], grads[0]));
    grads.insert(grads.end(), first.begin(), first.end());
    return grads;
  });
}

TEST_F(FiberAutograd, NonScalarRootWithGradMatchesEngine) {
  expect_parity([](const Backward& backward) {
    auto mlp = make_mlp();
    auto y = mlp->forward(torch::randn({7, 6}));
    backward(y, torch::randn({7, 3}));
    return param_grads(*mlp);
  });
  // A grad the root broadcasts to is summed down to the root's shape.
  expect_parity([](const Backward& backward) {
    auto mlp = make_mlp();
    auto y = mlp->forward(torch::randn({7, 6}));
    backward(y, torch::randn({2, 7, 3}));
    return param_grads(*mlp);
  });
}

TEST_F(FiberAutograd, LeafRootMatchesEngine) {
  expect_parity([](const Backward& backward) {
    auto w = torch::ones({3}, torch::requires_grad());
    backward(w, torch::full({3}, 2.0));
    return Grads{w.grad()};
  });
}

TEST_F(FiberAutograd, NodeAndHookOrderMatchesEngine) {
  // Hooks on leaves run inside AccumulateGrad (all share sequence_nr
  // UINT64_MAX), hooks on activations before their grad_fn: the recorded
  // sequence is the executor's node order.
  const auto order = [](const Backward& backward) {
    std::vector<std::string> seen;
    auto mlp = make_mlp();
    const auto params = mlp->named_parameters();
    for (const auto& item : params) {
      const std::string name = item.key();
      item.value().register_hook([&seen, name](torch::Tensor) { seen.push_back(name); });
    }
    auto x = torch::randn({7, 6});
    auto h0 = mlp[0]->as<torch::nn::Linear>()->forward(x);
    auto h1 = mlp[2]->as<torch::nn::Linear>()->forward(torch::relu(h0));
    auto y = mlp[4]->as<torch::nn::Linear>()->forward(torch::relu(h1)) + h1.sum() * h0.mean();
    h0.register_hook([&seen](torch::Tensor) { seen.push_back("h0"); });
    h1.register_hook([&seen](torch::Tensor) { seen.push_back("h1"); });
    backward(y.sum(), {});
    return seen;
  };
  const auto expected = order(kEngine);
  EXPECT_EQ(expected.size(), 8u);
  EXPECT_EQ(expected, order(kGraphWalk));
}

// A Node whose backward the test scripts, for outputs the generated nodes
// never produce (wrong shapes, other dtypes, undefined grads).
struct ScriptedNode : torch::autograd::Node {
  std::function<torch::autograd::variable_list(torch::autograd::variable_list&&)> body;
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    return body(std::move(grads));
  }
  std::string name() const override { return "ScriptedNode"; }
};

// A fresh tensor of `shape` whose grad_fn is a ScriptedNode feeding a and b.
torch::Tensor scripted(std::vector<int64_t> shape, const torch::Tensor& a, const torch::Tensor& b,
                       std::function<torch::autograd::variable_list(torch::autograd::variable_list&&)> body) {
  auto node = c10::make_intrusive<ScriptedNode>();
  node->body = std::move(body);
  node->set_next_edges(torch::autograd::collect_next_edges(a, b));
  auto out = torch::zeros(shape);
  torch::autograd::create_gradient_edge(out, node);
  return out;
}

TEST_F(FiberAutograd, NodeOutputsAreCastAndReducedLikeEngine) {
  expect_parity([](const Backward& backward) {
    auto a = torch::ones({2, 3}, torch::requires_grad());
    auto b = torch::ones({3}, torch::requires_grad());
    auto out = scripted({1}, a * 1.5, b, [](torch::autograd::variable_list&&) {
      return torch::autograd::variable_list{torch::full({2, 3}, 0.1, torch::kDouble),           // cast to float
                                            torch::arange(12, torch::kFloat).reshape({4, 3})};  // summed to [3]
    });
    backward(out.sum(), {});
    return Grads{a.grad(), b.grad()};
  });
}

TEST_F(FiberAutograd, UndefinedGradsFlowAsUndefined) {
  // Every input of the MulBackward node is undefined: the engine still runs it (and
  // its hooks), and nothing reaches a's .grad.
  std::vector<std::vector<bool>> hook_calls;
  expect_parity([&](const Backward& backward) {
    hook_calls.emplace_back();
    auto a = torch::ones({2, 3}, torch::requires_grad());
    auto b = torch::ones({3}, torch::requires_grad());
    auto scaled = a * 2.0;
    scaled.register_hook([&](torch::Tensor g) { hook_calls.back().push_back(g.defined()); });
    auto out = scripted({1}, scaled, b, [](torch::autograd::variable_list&&) {
      return torch::autograd::variable_list{torch::Tensor(), torch::ones({3})};
    });
    backward(out.sum(), {});
    EXPECT_FALSE(a.grad().defined());
    return Grads{a.grad(), b.grad()};
  });
  ASSERT_EQ(hook_calls.size(), 2u);
  EXPECT_EQ(hook_calls[0], hook_calls[1]);
}

TEST_F(FiberAutograd, WrongShapeFromNodeFailsNamingIt) {
  auto a = torch::ones({2, 3}, torch::requires_grad());
  auto out = scripted({1}, a, torch::ones({3}, torch::requires_grad()), [](torch::autograd::variable_list&&) {
    return torch::autograd::variable_list{torch::ones({4, 5}), torch::Tensor()};
  });
  try {
    run_graph_backward(out.sum());
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("ScriptedNode"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("invalid gradient at index 0"), std::string::npos) << e.what();
  }
}

TEST_F(FiberAutograd, SecondPassThroughFreedGraphFails) {
  for (const Backward& backward : {kEngine, kGraphWalk}) {
    auto w = torch::randn({3}, torch::requires_grad());
    auto loss = (w * w.exp()).sum();
    backward(loss, {});
    try {
      backward(loss, {});
      ADD_FAILURE() << "second backward through a freed graph succeeded";
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find("second time"), std::string::npos) << e.what();
    }
  }
}

TEST_F(FiberAutograd, RootWithoutGradPathFails) {
  EXPECT_THROW(run_graph_backward(torch::ones({1})), c10::Error);
  auto w = torch::ones({3}, torch::requires_grad());
  EXPECT_THROW(run_graph_backward(w * 2), c10::Error);  // non-scalar root needs an explicit grad
}

TEST_F(FiberAutograd, HookErrorsNameTheNode) {
  auto w = torch::ones({3}, torch::requires_grad());
  auto h = w * w;  // grad_fn MulBackward0
  h.register_hook([](torch::Tensor) -> torch::Tensor { throw std::runtime_error("boom"); });
  try {
    run_graph_backward(h.sum());
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("boom"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("MulBackward0"), std::string::npos) << e.what();
  }

  // The comm layer's errors keep their type (World tells aborted ranks apart).
  auto h2 = w * w;
  h2.register_hook([](torch::Tensor) -> torch::Tensor { throw WorldAbortedError("aborted"); });
  try {
    run_graph_backward(h2.sum());
    FAIL() << "expected an error";
  } catch (const WorldAbortedError& e) {
    EXPECT_NE(std::string(e.what()).find("MulBackward0"), std::string::npos) << e.what();
  }

  auto h3 = w.exp();
  h3.register_hook([](torch::Tensor) -> torch::Tensor {
    TORCH_CHECK(false, "bad grad");
    return {};
  });
  try {
    run_graph_backward(h3.sum());
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("ExpBackward0"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(torch::GradMode::is_enabled());
  EXPECT_FALSE(in_backward_pass());
}

TEST_F(FiberAutograd, CallbackRunsOnceAfterAllNodes) {
  for (const Backward& backward : {kEngine, kGraphWalk}) {
    auto mlp = make_mlp();
    int runs = 0;
    bool grads_ready = false;
    auto y = mlp->forward(torch::randn({7, 6}));
    y.register_hook([&](torch::Tensor) {
      // The first node of the pass: nothing has reached any leaf yet.
      queue_backward_callback([&] {
        ++runs;
        grads_ready = true;
        for (const auto& p : mlp->parameters()) grads_ready = grads_ready && p.grad().defined();
        EXPECT_FALSE(torch::GradMode::is_enabled());
      });
    });
    backward(y.sum(), {});
    EXPECT_EQ(runs, 1);
    EXPECT_TRUE(grads_ready);
  }
}

TEST_F(FiberAutograd, CallbacksMayQueueCallbacks) {
  for (const Backward& backward : {kEngine, kGraphWalk}) {
    std::vector<std::string> log;
    auto w = torch::ones({3}, torch::requires_grad());
    auto h = w * 2;
    h.register_hook([&](torch::Tensor) {
      queue_backward_callback([&] {
        log.push_back("first");
        queue_backward_callback([&] { log.push_back("nested"); });
      });
      queue_backward_callback([&] { log.push_back("second"); });
    });
    backward(h.sum(), {});
    EXPECT_EQ(log, (std::vector<std::string>{"first", "second", "nested"}));
  }
}

TEST_F(FiberAutograd, CallbackOutsideBackwardThrows) {
  EXPECT_FALSE(in_backward_pass());
  EXPECT_THROW(queue_backward_callback([] {}), std::logic_error);
  // A failed pass drops its callbacks and leaves no pass behind.
  int runs = 0;
  auto w = torch::ones({3}, torch::requires_grad());
  auto h = w * 2;
  h.register_hook([&](torch::Tensor) -> torch::Tensor {
    queue_backward_callback([&] { ++runs; });
    throw std::runtime_error("fail after queueing");
  });
  EXPECT_THROW(run_graph_backward(h.sum()), std::runtime_error);
  EXPECT_EQ(runs, 0);
  EXPECT_THROW(queue_backward_callback([] {}), std::logic_error);
}

TEST_F(FiberAutograd, BackwardOutsideWorldUsesEngine) {
  // Outside a World sim::backward is Tensor::backward: hooks see the
  // engine's graph task, which run_graph_backward never sets.
  auto engine_task_seen = [](const std::function<void(const at::Tensor&)>& run) {
    bool seen = false;
    auto w = torch::ones({3}, torch::requires_grad());
    auto h = w * 2;
    h.register_hook([&](torch::Tensor) { seen = torch::autograd::get_current_graph_task_nodes_in_graph() != nullptr; });
    run(h.sum());
    return seen;
  };
  EXPECT_TRUE(engine_task_seen([](const at::Tensor& root) { backward(root); }));
  EXPECT_FALSE(engine_task_seen([](const at::Tensor& root) { run_graph_backward(root); }));
}

// --- Ranks blocking inside backward -------------------------------------
//
// Every value below is a small dyadic rational (weights in steps of 1/4,
// inputs in steps of 1/2, loss weights in {-1/2, 0, 1/2}), so every gradient
// and every cross-rank sum of gradients is exact in float32: a sum over ranks
// gives the same bits in any order, whatever order the comm backend adds in.
// Everything after the sum runs the same kernels on the same bits as the
// sequential reference, so every comparison is bitwise.

struct TinyNet {
  torch::nn::Linear fc1{4, 8};
  torch::nn::Linear fc2{8, 3};
  std::vector<torch::Tensor> params() const { return {fc1->weight, fc1->bias, fc2->weight, fc2->bias}; }
};

torch::Tensor pattern(std::vector<int64_t> shape, int64_t mul, int64_t add, int64_t mod, double step) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  return torch::arange(numel, torch::kFloat).mul(mul).add(add).remainder(mod).sub(mod / 2).mul(step).reshape(shape);
}

TinyNet make_tiny_net() {
  TinyNet net;
  torch::NoGradGuard no_grad;
  net.fc1->weight.copy_(pattern({8, 4}, 5, 1, 9, 0.25));
  net.fc1->bias.copy_(pattern({8}, 1, 0, 3, 0.5));
  net.fc2->weight.copy_(pattern({3, 8}, 7, 2, 5, 0.5));
  net.fc2->bias.copy_(pattern({3}, 1, 1, 4, 0.25));
  return net;
}

torch::Tensor rank_input(int rank) { return pattern({2, 4}, 7, 3 * rank, 11, 0.5); }
torch::Tensor loss_weights() { return pattern({2, 3}, 1, 0, 3, 0.5); }

// One rank's step: forward on its input, the hidden activation's grad and
// fc2.weight's grad replaced by what `exchange` makes of them, backward.
struct StepHooks {
  std::function<torch::Tensor(const torch::Tensor&)> hidden;
  std::function<torch::Tensor(const torch::Tensor&)> weight;
};

torch::Tensor tiny_loss(TinyNet& net, int rank, const StepHooks& hooks) {
  auto h = net.fc1->forward(rank_input(rank));
  if (hooks.hidden) h.register_hook(hooks.hidden);
  if (hooks.weight) net.fc2->weight.register_hook(hooks.weight);
  return (net.fc2->forward(torch::relu(h)) * loss_weights()).sum();
}

// Rank r's grads computed one rank at a time on LibTorch's engine, the two
// cross-rank sums done in rank order in between.
std::vector<Grads> sequential_reference(int world_size) {
  torch::Tensor hidden_sum = torch::zeros({2, 8});
  torch::Tensor weight_sum = torch::zeros({3, 8});
  for (int r = 0; r < world_size; ++r) {
    TinyNet net = make_tiny_net();
    StepHooks capture{[&](const torch::Tensor& g) {
                        hidden_sum += g;
                        return torch::Tensor();
                      },
                      [&](const torch::Tensor& g) {
                        weight_sum += g;
                        return torch::Tensor();
                      }};
    tiny_loss(net, r, capture).backward();
  }
  std::vector<Grads> reference;
  for (int r = 0; r < world_size; ++r) {
    TinyNet net = make_tiny_net();
    StepHooks replace{[&](const torch::Tensor&) { return hidden_sum.clone(); },
                      [&](const torch::Tensor&) { return weight_sum.clone(); }};
    tiny_loss(net, r, replace).backward();
    Grads grads;
    for (const auto& p : net.params()) grads.push_back(p.grad().clone());
    reference.push_back(std::move(grads));
  }
  return reference;
}

// Each rank blocks twice inside its backward (an all-reduce in a non-leaf
// hook, another in a leaf hook) and checks its callback ran after all nodes.
void expect_ranks_match_reference(RankKind kind, int world_size, SchedulePolicy schedule = SchedulePolicy::RoundRobin) {
  const std::vector<Grads> reference = sequential_reference(world_size);
  std::vector<Grads> got(world_size);
  std::vector<int> callback_runs(world_size, 0);
  std::vector<int> grads_at_callback(world_size, 0);

  WorldOptions options;
  options.world_size = world_size;
  options.rank_kind = kind;
  options.schedule = schedule;
  options.seed = 7;
  World world(options);
  const WorldResult result = world.run([&](RankContext& ctx) {
    const int r = ctx.rank();
    TinyNet net = make_tiny_net();
    const auto all_reduce = [&ctx](const torch::Tensor& g) {
      auto sum = g.clone();
      ctx.world_group()->all_reduce(sum, {ReduceOp::Sum})->wait();
      return sum;
    };
    StepHooks hooks{[&](const torch::Tensor& g) {
                      queue_backward_callback([&] {
                        ++callback_runs[r];
                        for (const auto& p : net.params()) grads_at_callback[r] += p.grad().defined() ? 1 : 0;
                      });
                      return all_reduce(g);
                    },
                    all_reduce};
    backward(tiny_loss(net, r, hooks));
    for (const auto& p : net.params()) got[r].push_back(p.grad().clone());
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
  for (int r = 0; r < world_size; ++r) {
    EXPECT_EQ(callback_runs[r], 1) << "rank " << r;
    EXPECT_EQ(grads_at_callback[r], 4) << "rank " << r;
    ASSERT_EQ(got[r].size(), 4u) << "rank " << r;
    for (size_t i = 0; i < 4; ++i) {
      EXPECT_TRUE(bitwise_equal(reference[r][i], got[r][i])) << "rank " << r << " param " << i;
    }
  }
}

TEST_F(FiberAutograd, FiberRanksBlockInsideBackward) { expect_ranks_match_reference(RankKind::Fibers, 256); }

TEST_F(FiberAutograd, FiberRanksBlockInsideBackwardRandomSchedule) {
  expect_ranks_match_reference(RankKind::Fibers, 64, SchedulePolicy::SeededRandom);
}

TEST_F(FiberAutograd, ThreadRanksBlockInsideBackward) { expect_ranks_match_reference(RankKind::Threads, 4); }

TEST_F(FiberAutograd, PlainFibersBlockInsideBackward) {
  // No World: 64 Boost fibers on this thread meet at a fiber barrier in both
  // hooks and sum their grads in rank order (a hand-made all-reduce).
  constexpr int kFibers = 64;
  const std::vector<Grads> reference = sequential_reference(kFibers);
  std::vector<Grads> got(kFibers);
  std::vector<torch::Tensor> hidden(kFibers), weight(kFibers);
  boost::fibers::barrier barrier(kFibers);
  const auto exchange = [&](std::vector<torch::Tensor>& slots, int r, const torch::Tensor& g) {
    slots[r] = g;
    barrier.wait();
    auto sum = torch::zeros_like(g);
    for (const auto& s : slots) sum += s;
    barrier.wait();  // nobody overwrites a slot before everyone has summed
    return sum;
  };
  std::vector<boost::fibers::fiber> fibers;
  for (int r = 0; r < kFibers; ++r) {
    fibers.emplace_back(std::allocator_arg, boost::fibers::fixedsize_stack(512 * 1024), [&, r] {
      TinyNet net = make_tiny_net();
      auto loss = tiny_loss(net, r,
                            {[&](const torch::Tensor& g) { return exchange(hidden, r, g); },
                             [&](const torch::Tensor& g) { return exchange(weight, r, g); }});
      // Forward passes all run with grad mode on before any fiber's backward
      // turns it off (these raw fibers share the thread's grad mode).
      barrier.wait();
      run_graph_backward(loss);
      for (const auto& p : net.params()) got[r].push_back(p.grad().clone());
    });
  }
  for (auto& f : fibers) f.join();
  torch::GradMode::set_enabled(true);
  for (int r = 0; r < kFibers; ++r) {
    ASSERT_EQ(got[r].size(), 4u) << "fiber " << r;
    for (size_t i = 0; i < 4; ++i) {
      EXPECT_TRUE(bitwise_equal(reference[r][i], got[r][i])) << "fiber " << r << " param " << i;
    }
  }
}

}  // namespace
}  // namespace fsdpsim::sim
