#include "sim/meta_kernels.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <tuple>
#include <vector>

namespace fsdpsim::sim {

namespace {

at::Tensor relu_meta(const at::Tensor& self) { return at::empty_like(self); }
at::Tensor& relu_meta_(at::Tensor& self) { return self; }

at::Tensor index_select_meta(const at::Tensor& self, int64_t dim, const at::Tensor& index) {
  TORCH_CHECK(index.dim() <= 1, "index_select(): Index is supposed to be a vector");
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
              "index_select(): Expected dtype int32 or int64 for index");
  std::vector<int64_t> sizes = self.sizes().vec();
  if (self.dim() > 0) sizes[static_cast<size_t>(at::maybe_wrap_dim(dim, self.dim()))] = index.numel();
  return at::empty(sizes, self.options());
}

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Per-channel statistics: channel dim 1 (the input's dim 0 when 1-D).
int64_t channels(const at::Tensor& input) { return input.dim() > 1 ? input.size(1) : input.size(0); }

Tensor3 native_batch_norm_meta(const at::Tensor& input, const std::optional<at::Tensor>& /*weight*/,
                               const std::optional<at::Tensor>& /*bias*/,
                               const std::optional<at::Tensor>& /*running_mean*/,
                               const std::optional<at::Tensor>& /*running_var*/, bool training, double /*momentum*/,
                               double /*eps*/) {
  // CPU's kernel keeps the statistics in the input's dtype (fp32 for fp32); reduced-precision inputs get fp32.
  const auto stats_dtype = at::isReducedFloatingType(input.scalar_type()) ? at::kFloat : input.scalar_type();
  const int64_t c = training ? channels(input) : 0;
  return {at::empty_like(input), at::empty({c}, input.options().dtype(stats_dtype)),
          at::empty({c}, input.options().dtype(stats_dtype))};
}

Tensor3 native_batch_norm_backward_meta(const at::Tensor& grad_out, const at::Tensor& input,
                                        const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& /*running_mean*/,
                                        const std::optional<at::Tensor>& /*running_var*/,
                                        const std::optional<at::Tensor>& /*save_mean*/,
                                        const std::optional<at::Tensor>& /*save_invstd*/, bool /*train*/,
                                        double /*eps*/, std::array<bool, 3> mask) {
  const auto param_options = weight && weight->defined() ? weight->options() : input.options();
  const int64_t c = channels(input);
  return {mask[0] ? at::empty_like(input, grad_out.options()) : at::Tensor(),
          mask[1] ? at::empty({c}, param_options) : at::Tensor(),
          mask[2] ? at::empty({c}, param_options) : at::Tensor()};
}

at::Tensor embedding_dense_backward_meta(const at::Tensor& grad_output, const at::Tensor& /*indices*/,
                                         c10::SymInt num_weights, c10::SymInt /*padding_idx*/,
                                         bool /*scale_grad_by_freq*/) {
  return at::empty({num_weights.expect_int(), grad_output.size(-1)}, grad_output.options());
}

at::Tensor mse_loss_backward_meta(const at::Tensor& grad_output, const at::Tensor& self, const at::Tensor& /*target*/,
                                  int64_t /*reduction*/) {
  return at::empty_like(self, grad_output.options());
}

// Values are unknown on meta: two tensors are equal when they are the same
// view of the same storage (LibTorch's multi-head attention asks whether
// query, key and value are one tensor: self-attention passes one). Tensors
// that are different but hold equal values would compare unequal.
bool equal_meta(const at::Tensor& a, const at::Tensor& b) {
  return a.is_same(b) || (a.is_alias_of(b) && a.sizes() == b.sizes() && a.strides() == b.strides() &&
                          a.storage_offset() == b.storage_offset() && a.dtype() == b.dtype());
}

Tensor3 native_layer_norm_backward_meta(const at::Tensor& grad_out, const at::Tensor& input,
                                        c10::SymIntArrayRef /*normalized_shape*/, const at::Tensor& /*mean*/,
                                        const at::Tensor& /*rstd*/, const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias, std::array<bool, 3> mask) {
  const bool has_weight = weight && weight->defined();
  const bool has_bias = bias && bias->defined();
  return {mask[0] ? at::empty_like(input, grad_out.options()) : at::Tensor(),
          mask[1] && has_weight ? at::empty_like(*weight) : at::Tensor(),
          mask[2] && has_bias ? at::empty_like(*bias) : at::Tensor()};
}

}  // namespace

void register_meta_kernels() {
  static std::once_flag once;
  static std::unique_ptr<torch::Library> library;
  std::call_once(once, [] {
    library =
        std::make_unique<torch::Library>(torch::Library::IMPL, "aten", c10::DispatchKey::Meta, __FILE__, __LINE__);
    library->impl("relu", TORCH_FN(relu_meta));
    library->impl("relu_", TORCH_FN(relu_meta_));
    library->impl("index_select", TORCH_FN(index_select_meta));
    library->impl("native_batch_norm", TORCH_FN(native_batch_norm_meta));
    library->impl("native_batch_norm_backward", TORCH_FN(native_batch_norm_backward_meta));
    library->impl("embedding_dense_backward", TORCH_FN(embedding_dense_backward_meta));
    library->impl("mse_loss_backward", TORCH_FN(mse_loss_backward_meta));
    library->impl("equal", TORCH_FN(equal_meta));
    library->impl("native_layer_norm_backward", TORCH_FN(native_layer_norm_backward_meta));
  });
}

}  // namespace fsdpsim::sim
