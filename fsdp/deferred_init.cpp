#include "fsdp/deferred_init.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/EmptyTensor.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <cmath>
#include <string>
#include <unordered_set>

namespace fsdpsim::fsdp {
namespace {

uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// FNV-1a: the same on every build, unlike std::hash.
uint64_t hash_name(const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ULL;
  return h;
}

}  // namespace

ShardInitFn seeded_uniform_rows(uint64_t seed, double bound) {
  return [seed, bound](const ShardInit& init) {
    at::NoGradGuard no_grad;
    const int64_t rows = init.shard.size(0);
    if (rows == 0) return;
    const int64_t row_numel = init.shard.numel() / rows;
    const double b = bound > 0.0 ? bound : 1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(row_numel, 1)));
    const uint64_t param_seed = mix(seed ^ hash_name(init.fqn));
    at::Tensor flat = init.shard.view({rows, row_numel});
    for (int64_t r = 0; r < rows; ++r) {
      at::Generator gen =
          at::make_generator<at::CPUGeneratorImpl>(mix(param_seed + static_cast<uint64_t>(init.row_begin + r)));
      at::Tensor values = at::rand({row_numel}, gen, at::TensorOptions().dtype(init.shard.scalar_type()));
      flat[r].copy_(values * (2 * b) - b);
    }
  };
}

void init_full(torch::nn::Module& module, const ShardInitFn& init) {
  at::NoGradGuard no_grad;
  std::unordered_set<const c10::TensorImpl*> seen;
  for (const auto& item : module.named_parameters()) {
    const at::Tensor& param = item.value();
    if (!seen.insert(param.unsafeGetTensorImpl()).second) continue;
    init(ShardInit{item.key(), param.sizes().vec(), 0, param.detach()});
  }
}

void move_to_meta(torch::nn::Module& module) {
  // LibTorch's set_data refuses a CPU -> meta move (different dispatch key
  // sets); shallow_copy_from is what set_data does after that check.
  auto to_meta = [](const at::Tensor& tensor) {
    if (!tensor.defined() || tensor.is_meta()) return;
    if (tensor.grad().defined()) tensor.mutable_grad().reset();
    const at::Tensor meta(at::detail::empty_meta(tensor.sizes(), tensor.options().device(at::kMeta)));
    tensor.unsafeGetTensorImpl()->shallow_copy_from(meta.getIntrusivePtr());
  };
  for (const auto& param : module.parameters()) to_meta(param);
  for (const auto& buffer : module.buffers()) to_meta(buffer);
}

}  // namespace fsdpsim::fsdp
