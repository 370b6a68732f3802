// Deferred initialisation (fsdp/deferred_init.h, Engine::materialize): a
// model built on the meta device, fully_shard'ed, then materialised shard by
// shard, equals bitwise the same model built whole, initialised with the same
// function and seed, then sharded -- its shards, its buffers, and its
// training (losses and shards after SGD steps) -- on thread and fiber ranks
// at odd worlds. A counting CPU allocator shows that no rank ever allocates
// a full param on that path (and that the eager path does, so the counter
// sees what it should).

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/CPUAllocator.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "fsdp/deferred_init.h"
#include "fsdp/fully_shard.h"
#include "sim/fiber_autograd.h"
#include "sim/world.h"

namespace fsdpsim::fsdp {
namespace {

// A block whose params and buffer are created on `device` (kMeta: shapes only).
class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(int64_t dim, int64_t hidden, at::Device device) {
    const auto options = at::TensorOptions().device(device);
    w1 = register_parameter("w1", torch::empty({hidden, dim}, options));
    b1 = register_parameter("b1", torch::empty({hidden}, options));
    w2 = register_parameter("w2", torch::empty({dim, hidden}, options));
    scale = register_buffer("scale", torch::empty({dim}, options));
  }
  at::Tensor forward(const at::Tensor& x) {
    return torch::nn::functional::linear(torch::relu(torch::nn::functional::linear(x, w1, b1)), w2) * scale;
  }
  at::Tensor w1, b1, w2, scale;
};
TORCH_MODULE(Block);

class ModelImpl : public torch::nn::Module {
 public:
  ModelImpl(int64_t dim, int64_t hidden, int blocks, at::Device device) {
    for (int i = 0; i < blocks; ++i) {
      this->blocks.push_back(register_module(std::to_string(i), Block(dim, hidden, device)));
    }
    head = register_parameter("head", torch::empty({5, dim}, at::TensorOptions().device(device)));
  }
  at::Tensor forward(at::Tensor x) {
    for (auto& block : blocks) x = torch::tanh(fsdp::call(block, x));
    return torch::nn::functional::linear(x, head);
  }
  std::vector<Block> blocks;
  at::Tensor head;
};
TORCH_MODULE(Model);

constexpr uint64_t kSeed = 11;

// Buffers: 0.5 + U(0, 1) from a generator seeded by the FQN's length and
// the seed (whole buffers, so no row splitting is needed).
void init_buffer(const std::string& fqn, const at::Tensor& buffer) {
  at::NoGradGuard no_grad;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(kSeed * 1000 + fqn.size() * 7 + fqn.back());
  buffer.copy_(at::rand(buffer.sizes(), gen) + 0.5);
}

std::shared_ptr<ModelImpl> shard(Engine& engine, const std::shared_ptr<ModelImpl>& model,
                                 const ProcessGroupPtr& group) {
  FullyShardOptions options;
  options.shard_group = group;
  for (auto& block : model->blocks) engine.fully_shard(block.ptr(), options);
  engine.fully_shard(model, options);
  return model;
}

// Built whole on the CPU, initialised, then sharded.
std::shared_ptr<ModelImpl> eager_model(Engine& engine, const ProcessGroupPtr& group, int64_t dim, int64_t hidden) {
  auto model = Model(dim, hidden, 3, at::kCPU).ptr();
  init_full(*model, seeded_uniform_rows(kSeed));
  for (const auto& item : model->named_buffers()) init_buffer(item.key(), item.value());
  return shard(engine, model, group);
}

// Built on meta, sharded (shapes only), materialised shard by shard.
std::shared_ptr<ModelImpl> deferred_model(Engine& engine, const ProcessGroupPtr& group, int64_t dim, int64_t hidden) {
  auto model = shard(engine, Model(dim, hidden, 3, at::kMeta).ptr(), group);
  MaterializeOptions options;
  options.init_param = seeded_uniform_rows(kSeed);
  options.init_buffer = init_buffer;
  engine.materialize(model, options);
  return model;
}

EngineOptions engine_options() {
  EngineOptions options;
  options.queue_backward_callback = sim::queue_backward_callback;
  return options;
}

void expect_same_tensors(const torch::nn::Module& a, const torch::nn::Module& b) {
  auto pa = a.named_parameters();
  auto pb = b.named_parameters();
  ASSERT_EQ(pa.keys(), pb.keys());
  for (const auto& item : pa) {
    const at::Tensor& other = pb[item.key()];
    EXPECT_FALSE(other.is_meta()) << item.key();
    EXPECT_TRUE(torch::equal(item.value(), other)) << item.key();
  }
  for (const auto& item : a.named_buffers()) {
    EXPECT_TRUE(torch::equal(item.value(), b.named_buffers()[item.key()])) << item.key();
  }
}

class DeferredInit : public ::testing::TestWithParam<std::pair<sim::RankKind, int>> {};

TEST_P(DeferredInit, MetaBuiltShardsAndTrainingEqualTheEagerBuiltModelsBitwise) {
  sim::WorldOptions world;
  world.rank_kind = GetParam().first;
  world.world_size = GetParam().second;
  sim::World(world)
      .run([](sim::RankContext& ctx) {
        Engine eager_engine(engine_options()), deferred_engine(engine_options());
        // hidden 7 and head 5 rows: uneven shards, and empty ones at world 5+.
        auto eager = eager_model(eager_engine, ctx.world_group(), 6, 7);
        auto deferred = deferred_model(deferred_engine, ctx.world_group(), 6, 7);
        expect_same_tensors(*eager, *deferred);
        torch::optim::SGD eager_sgd(eager->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
        torch::optim::SGD deferred_sgd(deferred->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
        for (int step = 0; step < 3; ++step) {
          auto gen = at::make_generator<at::CPUGeneratorImpl>(100 * step + ctx.rank());
          at::Tensor x = at::randn({4, 6}, gen);
          at::Tensor eager_loss = fsdp::call(eager, x).pow(2).mean();
          at::Tensor deferred_loss = fsdp::call(deferred, x).pow(2).mean();
          EXPECT_TRUE(torch::equal(eager_loss, deferred_loss)) << "step " << step;
          sim::backward(eager_loss);
          sim::backward(deferred_loss);
          eager_sgd.step();
          deferred_sgd.step();
          eager_sgd.zero_grad();
          deferred_sgd.zero_grad();
        }
        expect_same_tensors(*eager, *deferred);
      })
      .throw_if_failed();
}

INSTANTIATE_TEST_SUITE_P(Ranks, DeferredInit,
                         ::testing::Values(std::make_pair(sim::RankKind::Threads, 3),
                                           std::make_pair(sim::RankKind::Fibers, 5),
                                           std::make_pair(sim::RankKind::Threads, 8)),
                         [](const auto& info) {
                           return std::string(sim::to_string(info.param.first)) + "_" +
                                  std::to_string(info.param.second);
                         });

// The engine's shards are the eager model's rows: compare one against the
// full init directly, not only against another sharded model.
TEST(DeferredInitRows, ShardIsTheFullInitsRows) {
  sim::WorldOptions world;
  world.world_size = 3;
  sim::World(world)
      .run([](sim::RankContext& ctx) {
        Engine engine(engine_options());
        auto deferred = deferred_model(engine, ctx.world_group(), 6, 7);
        auto full = Model(6, 7, 3, at::kCPU).ptr();
        init_full(*full, seeded_uniform_rows(kSeed));
        const at::Tensor& w1 = full->blocks[1]->w1;  // 7 rows: 3, 3, 1
        const int64_t begin = 3 * ctx.rank();
        const int64_t rows = std::min<int64_t>(3, 7 - begin);
        EXPECT_TRUE(torch::equal(deferred->blocks[1]->w1, w1.narrow(0, begin, rows)));
      })
      .throw_if_failed();
}

// Counts the CPU allocations made by the calling thread while enabled.
class CountingAllocator final : public c10::Allocator {
 public:
  explicit CountingAllocator(c10::Allocator* inner) : inner_(inner) {}
  c10::DataPtr allocate(size_t n) override {
    if (counting) {
      largest = std::max(largest, n);
      total += n;
    }
    return inner_->allocate(n);
  }
  c10::DeleterFnPtr raw_deleter() const override { return inner_->raw_deleter(); }
  void copy_data(void* dest, const void* src, std::size_t count) const override { inner_->copy_data(dest, src, count); }
  static thread_local bool counting;
  static thread_local size_t largest;
  static thread_local size_t total;

 private:
  c10::Allocator* inner_;
};
thread_local bool CountingAllocator::counting = false;
thread_local size_t CountingAllocator::largest = 0;
thread_local size_t CountingAllocator::total = 0;

// Installs the counter as LibTorch's CPU allocator for its lifetime.
class InstallCounting {
 public:
  InstallCounting() : inner_(c10::GetCPUAllocator()), counting_(inner_) { c10::SetCPUAllocator(&counting_); }
  ~InstallCounting() { c10::SetCPUAllocator(inner_); }

 private:
  c10::Allocator* inner_;
  CountingAllocator counting_;
};

struct Allocations {
  size_t largest = 0;
  size_t total = 0;
};
template <typename Body>
Allocations count_allocations(Body body) {
  CountingAllocator::counting = true;
  CountingAllocator::largest = 0;
  CountingAllocator::total = 0;
  body();
  CountingAllocator::counting = false;
  return {CountingAllocator::largest, CountingAllocator::total};
}

TEST(DeferredInitMemory, NoRankAllocatesAFullParam) {
  constexpr int kWorld = 4;
  constexpr int64_t kDim = 256, kHidden = 1024;  // w1, w2: 1 MiB each in full, 256 KiB shards
  const size_t full_param_bytes = kDim * kHidden * sizeof(float);
  const size_t shard_bytes = full_param_bytes / kWorld;
  InstallCounting install;
  std::vector<Allocations> deferred(kWorld), eager(kWorld);
  std::vector<size_t> held(kWorld);
  sim::WorldOptions world;
  world.world_size = kWorld;
  sim::World(world)
      .run([&](sim::RankContext& ctx) {
        Engine deferred_engine(engine_options()), eager_engine(engine_options());
        std::shared_ptr<ModelImpl> model;
        deferred[ctx.rank()] =
            count_allocations([&] { model = deferred_model(deferred_engine, ctx.world_group(), kDim, kHidden); });
        for (const auto& p : model->parameters()) held[ctx.rank()] += p.nbytes();
        eager[ctx.rank()] = count_allocations([&] { eager_model(eager_engine, ctx.world_group(), kDim, kHidden); });
      })
      .throw_if_failed();
  size_t model_bytes = 0;
  for (const auto& p : Model(kDim, kHidden, 3, at::kMeta)->parameters()) model_bytes += p.nbytes();
  for (int r = 0; r < kWorld; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    // The largest allocation is one shard (the padded w1/w2 shard), never a full param.
    EXPECT_EQ(deferred[r].largest, shard_bytes);
    EXPECT_LT(deferred[r].largest, full_param_bytes);
    EXPECT_GE(eager[r].largest, full_param_bytes);  // the counter sees full params when they exist
    // What a rank holds is a quarter of the model (the head's 5 rows: 2, 2, 1, 0).
    EXPECT_LE(held[r], model_bytes / kWorld + 2 * kDim * sizeof(float));
    std::cout << "rank " << r << ": deferred largest " << deferred[r].largest << " B, total " << deferred[r].total
              << " B; eager largest " << eager[r].largest << " B, total " << eager[r].total << " B; holds " << held[r]
              << " of " << model_bytes << " B\n";
  }
}

TEST(DeferredInitErrors, ForwardBeforeMaterializeAndMissingInitAreRefused) {
  sim::WorldOptions world;
  world.world_size = 3;
  sim::World(world)
      .run([](sim::RankContext& ctx) {
        {
          Engine engine(engine_options());
          auto model = shard(engine, Model(6, 7, 3, at::kMeta).ptr(), ctx.world_group());
          try {
            fsdp::call(model, torch::ones({2, 6}));
            ADD_FAILURE() << "forward on meta params ran";
          } catch (const std::runtime_error& e) {
            EXPECT_NE(std::string(e.what()).find("param 'head'"), std::string::npos) << e.what();
            EXPECT_NE(std::string(e.what()).find("still on the meta device"), std::string::npos) << e.what();
            EXPECT_NE(std::string(e.what()).find("engine.materialize"), std::string::npos) << e.what();
          }
          EXPECT_THROW(engine.materialize(model, MaterializeOptions{}), std::invalid_argument);
          MaterializeOptions params_only;
          params_only.init_param = seeded_uniform_rows(kSeed);
          EXPECT_THROW(engine.materialize(model, params_only), std::invalid_argument);  // meta buffers, no init_buffer
          // Params are materialised now, the buffers not: the forward names a buffer.
          try {
            fsdp::call(model, torch::ones({2, 6}));
            ADD_FAILURE() << "forward on meta buffers ran";
          } catch (const std::runtime_error& e) {
            EXPECT_NE(std::string(e.what()).find("buffer '0.scale'"), std::string::npos) << e.what();
          }
        }
        {
          Engine engine(engine_options());
          auto model = Model(6, 7, 3, at::kMeta).ptr();
          FullyShardOptions options;
          options.shard_group = ctx.world_group();
          engine.fully_shard(model->blocks[0].ptr(), options);  // the rest in no unit
          MaterializeOptions full;
          full.init_param = seeded_uniform_rows(kSeed);
          full.init_buffer = init_buffer;
          EXPECT_THROW(engine.materialize(model, full), std::invalid_argument);
        }
      })
      .throw_if_failed();
}

}  // namespace
}  // namespace fsdpsim::fsdp
