#pragma once
// The net the mixed-precision and all-gather-extension tests train beside an
// unsharded reference: units block0 (5 -> 7), block1 (7 -> 7) and the root
// owning head (7 -> 3). Dim 7 is one that 2, 3 and 4 ranks do not divide, so
// shards are padded. Also its per-step data and loss.
//
// Thread-safety: make_data() uses its own generator; each Net belongs to one
// rank.

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "fsdp/fully_shard.h"

namespace fsdpsim::testnet {

constexpr int64_t kIn = 5;
constexpr int64_t kHidden = 7;
constexpr int64_t kOut = 3;
constexpr int64_t kBatch = 4;

struct Block : torch::nn::Module {
  Block(int64_t in, int64_t out) : lin(register_module("lin", torch::nn::Linear(in, out))) {}
  torch::Tensor forward(const torch::Tensor& x) { return torch::relu(lin(x)); }
  torch::nn::Linear lin;
};

// Units block0, block1 and the root (owning head).
struct Net : torch::nn::Module {
  Net()
      : block0(register_module("block0", std::make_shared<Block>(kIn, kHidden))),
        block1(register_module("block1", std::make_shared<Block>(kHidden, kHidden))),
        head(register_module("head", torch::nn::Linear(kHidden, kOut))) {}
  torch::Tensor forward(const torch::Tensor& x) { return head(fsdp::call(block1, fsdp::call(block0, x))); }
  std::shared_ptr<Block> block0;
  std::shared_ptr<Block> block1;
  torch::nn::Linear head{nullptr};
};

// Params in Net::named_parameters() order, and the unit each belongs to.
inline const std::vector<std::string> kParamNames = {"block0.lin.weight", "block0.lin.bias", "block1.lin.weight",
                                                     "block1.lin.bias",   "head.weight",     "head.bias"};
enum UnitIndex { kRoot = 0, kBlock0 = 1, kBlock1 = 2 };
inline constexpr UnitIndex kParamUnit[] = {kBlock0, kBlock0, kBlock1, kBlock1, kRoot, kRoot};

struct Data {
  std::vector<at::Tensor> init;                    // fp32 params, kParamNames order
  std::vector<std::vector<at::Tensor>> x, target;  // [step][rank]
};

// Initial params (randn * 0.5) and `steps` batches per rank, from `seed`.
inline Data make_data(int world, int steps, uint64_t seed) {
  Data data;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const std::vector<std::vector<int64_t>> shapes = {{kHidden, kIn}, {kHidden},       {kHidden, kHidden},
                                                    {kHidden},      {kOut, kHidden}, {kOut}};
  for (const auto& shape : shapes) data.init.push_back(at::randn(shape, gen) * 0.5);
  for (int s = 0; s < steps; ++s) {
    data.x.emplace_back();
    data.target.emplace_back();
    for (int r = 0; r < world; ++r) {
      data.x[s].push_back(at::randn({kBatch, kIn}, gen));
      data.target[s].push_back(at::randn({kBatch, kOut}, gen));
    }
  }
  return data;
}

// Mean squared error in fp32 whatever the output's dtype.
inline at::Tensor loss_of(const at::Tensor& out, const at::Tensor& target) {
  return out.to(at::kFloat).sub(target).pow(2).mean();
}

}  // namespace fsdpsim::testnet
