#include "fsdp/torch_save.h"

#include <ATen/ATen.h>
#include <caffe2/serialize/in_memory_adapter.h>
#include <caffe2/serialize/inline_container.h>

#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>
#include <string_view>
#include <utility>
#include <vector>

#include "fsdp/pickle_io.h"

namespace fsdpsim::fsdp::torch_save {
namespace {

using pickle::Value;

// torch.FloatStorage, torch.BFloat16Storage, ...: c10's dtype name + "Storage".
at::ScalarType storage_dtype(const Value& cls, const std::string& what) {
  if (cls.kind == Value::Kind::Global && cls.text == "torch") {
    for (int i = 0; i < static_cast<int>(at::ScalarType::NumOptions); ++i) {
      const auto type = static_cast<at::ScalarType>(i);
      if (cls.name == std::string(c10::toString(type)) + "Storage") return type;
    }
  }
  throw std::runtime_error(what + ": unknown storage type " + cls.describe());
}

std::vector<int64_t> int_list(const Value& v, const std::string& what) {
  std::vector<int64_t> out;
  for (const auto& item : v.as_sequence(what)) out.push_back(item->as_int(what));
  return out;
}

std::string shape_str(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

// One archive: its records, and each storage read once (tied weights share
// one storage record).
class Archive {
 public:
  Archive(std::unique_ptr<caffe2::serialize::PyTorchStreamReader> reader, std::string what)
      : reader_(std::move(reader)), what_(std::move(what)) {}

  c10::IValue object() {
    if (!reader_->hasRecord("data.pkl")) throw std::runtime_error(what_ + ": no data.pkl (not a torch.save archive)");
    auto [data, size] = reader_->getRecord("data.pkl");
    pickle::ValuePtr root;
    try {
      root = pickle::loads(std::string_view(static_cast<const char*>(data.get()), size));
    } catch (const std::runtime_error& e) {
      throw std::runtime_error(what_ + ": data.pkl: " + e.what());
    }
    return convert(*root);
  }

 private:
  c10::IValue convert(const Value& v) {
    switch (v.kind) {
      case Value::Kind::None: return {};
      case Value::Kind::Bool: return v.boolean;
      case Value::Kind::Int: return v.integer;
      case Value::Kind::Float: return v.floating;
      case Value::Kind::String:
      case Value::Kind::Bytes: return v.text;
      case Value::Kind::Tuple: {
        std::vector<c10::IValue> items;
        for (const auto& item : v.items) items.push_back(convert(*item));
        return c10::ivalue::Tuple::create(std::move(items));
      }
      case Value::Kind::List: {
        c10::impl::GenericList list(c10::AnyType::get());
        for (const auto& item : v.items) list.push_back(convert(*item));
        return list;
      }
      case Value::Kind::Dict: {
        c10::impl::GenericDict dict(c10::AnyType::get(), c10::AnyType::get());
        for (const auto& [key, value] : v.entries) dict.insert_or_assign(convert(*key), convert(*value));
        return dict;
      }
      case Value::Kind::Object: return object_value(v);
      default: throw std::runtime_error(what_ + ": holds a " + v.describe() + " outside a tensor");
    }
  }

  c10::IValue object_value(const Value& v) {
    const std::string cls = v.qualified_name();
    if (cls == "torch._utils._rebuild_tensor_v2") return rebuild_tensor(v.args->items);
    if (cls == "torch._utils._rebuild_parameter" && !v.args->items.empty()) return convert(*v.args->items[0]);
    throw std::runtime_error(what_ + ": holds a " + cls +
                             " object; this reader builds tensors, dicts, lists, tuples and scalars only");
  }

  // _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
  // backward_hooks[, metadata]): a view of the storage, copied out.
  at::Tensor rebuild_tensor(const std::vector<pickle::ValuePtr>& args) {
    const std::string where = what_ + ": a tensor";
    if (args.size() < 4 || args[0]->kind != Value::Kind::PersistentId)
      throw std::runtime_error(where + " rebuilt from unexpected arguments");
    const at::Tensor& base = storage(*args[0]->args);
    const int64_t offset = args[1]->as_int(where);
    const auto sizes = int_list(*args[2], where);
    const auto strides = int_list(*args[3], where);
    int64_t last = offset;  // the last element the view touches
    bool empty = false;
    for (size_t d = 0; d < sizes.size() && d < strides.size(); ++d) {
      if (sizes[d] < 0 || strides[d] < 0) throw std::runtime_error(where + " has a negative size or stride");
      empty = empty || sizes[d] == 0;
      last += (sizes[d] - 1) * strides[d];
    }
    if (sizes.size() != strides.size() || offset < 0 || (!empty && last >= base.numel()))
      throw std::runtime_error(where + " of size " + shape_str(sizes) + ", stride " + shape_str(strides) + ", offset " +
                               std::to_string(offset) + " reaches past its storage of " + std::to_string(base.numel()) +
                               " elements (a corrupt file)");
    if (empty) return at::empty(sizes, base.options());
    return base.as_strided(sizes, strides, offset).clone(at::MemoryFormat::Contiguous);
  }

  // ('storage', torch.<Dtype>Storage, key, location, numel) -> data/<key>.
  const at::Tensor& storage(const Value& id) {
    const auto& fields = id.as_sequence(what_ + ": a storage id");
    if (fields.size() < 5 || fields[0]->kind != Value::Kind::String || fields[0]->text != "storage")
      throw std::runtime_error(what_ + ": a persistent id that is not a storage (" + id.describe() + ")");
    const std::string& key = fields[2]->as_string(what_ + ": a storage key");
    if (auto it = storages_.find(key); it != storages_.end()) return it->second;
    const at::ScalarType dtype = storage_dtype(*fields[1], what_);
    const int64_t numel = fields[4]->as_int(what_ + ": a storage size");
    const std::string record = "data/" + key;
    if (!reader_->hasRecord(record)) throw std::runtime_error(what_ + ": the record " + record + " is missing");
    auto [data, bytes] = reader_->getRecord(record);
    const auto want = static_cast<size_t>(numel) * c10::elementSize(dtype);
    if (numel < 0 || bytes < want)
      throw std::runtime_error(what_ + ": the record " + record + " has " + std::to_string(bytes) + " bytes, " +
                               std::to_string(numel) + " " + c10::toString(dtype) + " elements need " +
                               std::to_string(want) + " (truncated)");
    at::Tensor values = at::empty({numel}, at::TensorOptions().dtype(dtype));
    if (want > 0) std::memcpy(values.data_ptr(), data.get(), want);
    return storages_.emplace(key, std::move(values)).first->second;
  }

  std::unique_ptr<caffe2::serialize::PyTorchStreamReader> reader_;
  std::string what_;
  std::map<std::string, at::Tensor> storages_;
};

template <typename Open>
c10::IValue load(const std::string& what, Open open) {
  std::unique_ptr<caffe2::serialize::PyTorchStreamReader> reader;
  try {
    reader = open();
  } catch (const c10::Error& e) {
    throw std::runtime_error(what + ": not a torch.save zip archive (" + e.what_without_backtrace() +
                             "); files saved with _use_new_zipfile_serialization=False are not read");
  }
  try {
    return Archive(std::move(reader), what).object();
  } catch (const c10::Error& e) {
    throw std::runtime_error(what + ": not a readable torch.save archive: " + e.what_without_backtrace());
  }
}

}  // namespace

c10::IValue load_file(const std::string& path) {
  return load(path, [&] { return std::make_unique<caffe2::serialize::PyTorchStreamReader>(path); });
}

c10::IValue load_bytes(const void* data, size_t size, const std::string& what) {
  return load(what, [&] {
    auto adapter = std::make_shared<caffe2::serialize::MemoryReadAdapter>(data, static_cast<off_t>(size));
    return std::make_unique<caffe2::serialize::PyTorchStreamReader>(adapter);
  });
}

}  // namespace fsdpsim::fsdp::torch_save
