#pragma once
// Reads what Python's torch.save writes (its zip format: `data.pkl` plus one
// `data/<key>` record per storage) without LibTorch's unpickler, which reads
// collections.OrderedDict (what Module.state_dict() returns) as None. The
// pickle goes through fsdp/pickle_io.h; each torch._utils._rebuild_tensor_v2
// call becomes a tensor of its storage's dtype, copied out of the record;
// dicts, lists, tuples and scalars become IValues. Anything else (a class
// instance, a quantised tensor, a tensor that reaches past its storage) is an
// error naming it.
// Thread-safety: no shared state; each call reads on its own.

#include <ATen/core/ivalue.h>

#include <cstddef>
#include <string>

namespace fsdpsim::fsdp::torch_save {

/// The object in the torch.save file at `path`.
c10::IValue load_file(const std::string& path);

/// The object in a torch.save archive held in memory; `what` names it in
/// errors.
c10::IValue load_bytes(const void* data, size_t size, const std::string& what);

}  // namespace fsdpsim::fsdp::torch_save
