#pragma once
// Meta-device kernels LibTorch's C++ library lacks. PyTorch registers many
// of its meta kernels from Python (torch/_meta_registrations.py); without
// Python, ops such as relu and index_select have none, so a data-free run
// (tensors on the meta device) would fail in them. These compute the
// output's shape and dtype only, as the Python ones do. One reads values:
// `equal` on meta answers whether both are the same view of one storage
// (what LibTorch's multi-head attention asks to pick its self-attention
// path); different tensors with equal values compare unequal.
//
// Thread-safety: register_meta_kernels() may be called from any thread, any
// number of times; it registers once.

namespace fsdpsim::sim {

/// Registers the kernels (once per process). The data-free trainer calls it;
/// call it before running your own model on meta tensors.
void register_meta_kernels();

}  // namespace fsdpsim::sim
