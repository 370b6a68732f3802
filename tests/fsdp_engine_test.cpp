// Engine semantics that parity alone does not pin down: event order through
// EngineHooks (GoogleMock), state after forward/backward, misuse errors.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "backends/errors.h"
#include "fsdp/fully_shard.h"
#include "sim/fiber_autograd.h"
#include "sim/world.h"

namespace fsdpsim::fsdp {
namespace {

using ::testing::HasSubstr;

struct Block : torch::nn::Module {
  Block(int64_t in, int64_t out) : lin(register_module("lin", torch::nn::Linear(in, out))) {}
  torch::Tensor forward(const torch::Tensor& x) { return torch::relu(lin(x)); }
  torch::nn::Linear lin;
};

// Root with three blocks: L0..L2 units, the root owns `head`.
struct Stack : torch::nn::Module {
  Stack() {
    for (int i = 0; i < 3; ++i) blocks.push_back(register_module("block" + std::to_string(i), std::make_shared<Block>(6, 6)));
    head = register_module("head", torch::nn::Linear(6, 5));
  }
  torch::Tensor forward(torch::Tensor x) {
    for (auto& block : blocks) x = fsdp::call(block, x);
    return head(x);
  }
  std::vector<std::shared_ptr<Block>> blocks;
  torch::nn::Linear head{nullptr};
};

class RecordingHooks : public EngineHooks {
 public:
  void on_unshard(const std::string& unit, TrainingState) override { events.push_back("U " + name(unit)); }
  void on_reshard(const std::string& unit, TrainingState) override { events.push_back("R " + name(unit)); }
  void on_pre_backward(const std::string&, TrainingState) override {}
  void on_post_backward(const std::string& unit, TrainingState) override { events.push_back("PB " + name(unit)); }
  void on_final_callback(const std::string&, TrainingState) override { events.push_back("final"); }
  static std::string name(const std::string& unit) { return unit.empty() ? "root" : unit; }
  std::vector<std::string> events;
};

sim::WorldOptions threads(int world_size) {
  sim::WorldOptions options;
  options.world_size = world_size;
  return options;
}

std::shared_ptr<Stack> make_stack(Engine& engine, const ProcessGroupPtr& group, ShardingStrategy strategy) {
  torch::manual_seed(0);
  auto model = std::make_shared<Stack>();
  FullyShardOptions options;
  options.shard_group = group;
  options.strategy = strategy;
  for (auto& block : model->blocks) engine.fully_shard(block, options);
  engine.fully_shard(model, options);
  return model;
}

TEST(FsdpEngine, ImplicitOrderAndStateAfterForwardAndBackward) {
  sim::World world(threads(2));
  std::vector<std::vector<std::string>> events(2);
  std::mutex init;
  auto result = world.run([&](sim::RankContext& ctx) {
    auto hooks = std::make_shared<RecordingHooks>();
    EngineOptions engine_options;
    engine_options.hooks = {hooks};
    engine_options.queue_backward_callback = sim::queue_backward_callback;
    Engine engine(engine_options);
    std::shared_ptr<Stack> model;
    {
      std::lock_guard<std::mutex> lock(init);  // torch::manual_seed is process-global
      model = make_stack(engine, ctx.world_group(), ShardingStrategy::FullShard);
    }
    auto x = torch::ones({2, 6}) * (ctx.rank() + 1);
    auto out = fsdp::call(model, x);
    // After forward: root gathered, the blocks sharded again.
    EXPECT_TRUE(engine.root()->is_unsharded());
    EXPECT_EQ(model->head->weight.sizes(), (std::vector<int64_t>{5, 6}));
    EXPECT_EQ(model->blocks[0]->lin->weight.sizes(), (std::vector<int64_t>{3, 6}));
    sim::backward(out.sum());
    for (const Unit* unit : engine.units()) EXPECT_FALSE(unit->is_unsharded()) << unit->fqn();
    // head: 5 rows over 2 ranks pad to 3 per rank; rank 1 owns the last 2.
    EXPECT_EQ(model->head->weight.grad().sizes(), (std::vector<int64_t>{ctx.rank() == 0 ? 3 : 2, 6}));
    EXPECT_EQ(model->blocks[2]->lin->bias.grad().sizes(), (std::vector<int64_t>{3}));
    events[ctx.rank()] = hooks->events;
  });
  ASSERT_TRUE(result.ok()) << result.error_report();
  const std::vector<std::string> expected = {
      "U root", "U block0", "R block0", "U block1", "R block1", "U block2", "R block2",  // forward
      "U block2", "R block2", "PB block2", "U block1", "R block1", "PB block1", "U block0", "R block0",
      "PB block0", "R root", "PB root", "final"};
  EXPECT_EQ(events[0], expected);
  EXPECT_EQ(events[1], expected);
}

}  // namespace
}  // namespace fsdpsim::fsdp
