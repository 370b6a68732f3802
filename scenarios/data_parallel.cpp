#include "scenarios/data_parallel.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <chrono>

#include "sim/fiber_autograd.h"

namespace fsdpsim::scenarios {

namespace {

struct MlpImpl : torch::nn::Module {
  MlpImpl(int64_t dim, int64_t mult)
      : in_proj(register_module("in_proj", torch::nn::Linear(dim, mult * dim))),
        out_proj(register_module("out_proj", torch::nn::Linear(mult * dim, dim))) {}
  torch::Tensor forward(const torch::Tensor& x) { return torch::relu(out_proj(torch::relu(in_proj(x)))); }
  torch::nn::Linear in_proj;
  torch::nn::Linear out_proj;
};
TORCH_MODULE(Mlp);

// The global RNG is shared by every rank thread: draw from private generators.
at::Generator generator(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

}  // namespace

std::vector<StepStats> train_data_parallel_mlp(sim::RankContext& ctx, const DataParallelOptions& options,
                                               const std::function<void(int, const StepStats&)>& on_step) {
  Mlp model(options.dim, 4);
  {
    torch::NoGradGuard no_grad;
    auto init = generator(options.seed);
    for (auto& param : model->parameters()) param.copy_(at::randn(param.sizes(), init) * 0.1);
  }
  torch::optim::SGD optimizer(model->parameters(),
                              torch::optim::SGDOptions(options.lr).momentum(options.momentum));
  auto& group = *ctx.world_group();
  std::vector<StepStats> stats;
  for (int step = 0; step < options.steps; ++step) {
    const auto start = std::chrono::steady_clock::now();
    auto data = generator(options.seed * 1000003 + static_cast<uint64_t>(ctx.rank()) * 1009 + step + 1);
    auto input = at::randn({options.batch, options.dim}, data);
    auto target = at::randn({options.batch, options.dim}, data);
    optimizer.zero_grad();
    auto loss = (model->forward(input) - target).pow(2).mean();
    sim::backward(loss);
    std::vector<WorkPtr> pending;
    for (auto& param : model->parameters()) {
      AllReduceOptions average;
      average.reduce_op = ReduceOp::Avg;
      pending.push_back(group.all_reduce(param.grad(), average));
    }
    for (auto& work : pending) work->wait();
    optimizer.step();
    StepStats step_stats;
    step_stats.loss = loss.item<double>();
    step_stats.step_ns =
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
    stats.push_back(step_stats);
    if (on_step) on_step(step, step_stats);
  }
  return stats;
}

}  // namespace fsdpsim::scenarios
