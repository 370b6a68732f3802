#include "fsdp/dcp.h"

#include "backends/process_group.h"
#include "fsdp/pickle_io.h"
#include "fsdp/torch_save.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>

namespace fsdpsim::fsdp::dcp {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr const char* kMetadataFile = ".metadata";
constexpr const char* kChecksumFile = ".fsdpsim_checksums.json";
constexpr const char* kMetadataModule = "torch.distributed.checkpoint.metadata";
constexpr const char* kDcpVersion = "1.0.0";  // filesystem.py CURRENT_DCP_VERSION of torch 2.15

// ---- dtypes: at::ScalarType <-> the torch attribute Python pickles -------

struct DtypeName {
  at::ScalarType type;
  const char* name;
};
constexpr std::array<DtypeName, 14> kDtypes = {{{at::kFloat, "float32"},
                                                {at::kDouble, "float64"},
                                                {at::kHalf, "float16"},
                                                {at::kBFloat16, "bfloat16"},
                                                {at::kLong, "int64"},
                                                {at::kInt, "int32"},
                                                {at::kShort, "int16"},
                                                {at::kChar, "int8"},
                                                {at::kByte, "uint8"},
                                                {at::kBool, "bool"},
                                                {at::kComplexFloat, "complex64"},
                                                {at::kComplexDouble, "complex128"},
                                                {at::kFloat8_e4m3fn, "float8_e4m3fn"},
                                                {at::kFloat8_e5m2, "float8_e5m2"}}};

const char* dtype_name(at::ScalarType type) {
  for (const auto& d : kDtypes)
    if (d.type == type) return d.name;
  throw std::invalid_argument(std::string("dcp: dtype ") + c10::toString(type) +
                              " has no torch.distributed.checkpoint name here");
}

at::ScalarType dtype_from_name(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return d.type;
  throw std::runtime_error("dcp: .metadata names dtype torch." + name + ", which this reader does not know");
}

std::string shape_str(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

int64_t volume(const std::vector<int64_t>& sizes) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  return n;
}

// ---- CRC-32 (IEEE, zlib's), slicing by 8 ------------------------------

struct CrcTables {
  uint32_t t[8][256];
  CrcTables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xff];
  }
};

uint32_t crc32(const char* data, size_t n) {
  static const CrcTables tables;
  const auto& t = tables.t;
  uint32_t c = 0xFFFFFFFFu;
  const auto* p = reinterpret_cast<const unsigned char*>(data);
  for (; n >= 8; n -= 8, p += 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= c;
    c = t[7][lo & 0xff] ^ t[6][(lo >> 8) & 0xff] ^ t[5][(lo >> 16) & 0xff] ^ t[4][lo >> 24] ^ t[3][hi & 0xff] ^
        t[2][(hi >> 8) & 0xff] ^ t[1][(hi >> 16) & 0xff] ^ t[0][hi >> 24];
  }
  for (; n > 0; --n, ++p) c = t[0][(c ^ *p) & 0xff] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

// ---- files ----------------------------------------------------------------

[[noreturn]] void throw_errno(const std::string& what, const fs::path& path) {
  throw std::runtime_error("dcp: " + what + " " + path.string() + ": " + std::strerror(errno));
}

class OutFile {
 public:
  explicit OutFile(const fs::path& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) throw_errno("cannot create", path);
  }
  OutFile(const OutFile&) = delete;
  OutFile& operator=(const OutFile&) = delete;
  ~OutFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  void write(const char* data, size_t n) {
    while (n > 0) {
      const ssize_t w = ::write(fd_, data, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) throw_errno("cannot write", path_);
      data += w;
      n -= static_cast<size_t>(w);
      written_ += w;
    }
  }
  void close(bool sync) {
    if (sync && ::fsync(fd_) != 0) throw_errno("cannot fsync", path_);
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) throw_errno("cannot close", path_);
  }
  int64_t written() const { return written_; }

 private:
  fs::path path_;
  int fd_ = -1;
  int64_t written_ = 0;
};

void sync_dir(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw_errno("cannot open directory", dir);
  ::fsync(fd);
  ::close(fd);
}

// Writes `bytes` to dir/name via a temporary name and a rename.
void publish_file(const fs::path& dir, const std::string& name, const std::string& bytes, bool sync) {
  const fs::path tmp = dir / (name + ".tmp");
  OutFile out(tmp);
  out.write(bytes.data(), bytes.size());
  out.close(sync);
  fs::rename(tmp, dir / name);
  if (sync) sync_dir(dir);
}

std::string read_whole(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_errno("cannot open", path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string random_id() {
  std::random_device rd;
  std::uniform_int_distribution<uint32_t> d;
  char buf[40];
  std::snprintf(buf, sizeof buf, "%08x-%04x-%04x-%04x-%08x%04x", d(rd), d(rd) & 0xffff, (d(rd) & 0x0fff) | 0x4000,
                (d(rd) & 0x3fff) | 0x8000, d(rd), d(rd) & 0xffff);
  return buf;
}

// ---- .metadata: writing (the objects Python's pickler would emit) ---------

// One saved chunk as rank 0 assembles the metadata.
struct ItemRecord {
  std::string fqn;
  std::vector<int64_t> offsets, sizes;
  std::string file;
  int64_t offset = 0, length = 0;
  uint32_t crc = 0;
};

struct TensorRecord {
  std::string fqn;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> shape;
  std::vector<size_t> items;  // indices into the item list, in chunk order
};

// cls() with no arguments, as pickle's NEWOBJ of a dataclass; the caller
// then pushes the state and calls build().
void new_object(pickle::Writer& w, const char* module, const char* cls) {
  w.global(module, cls).empty_tuple().newobj();
}

void torch_size(pickle::Writer& w, const std::vector<int64_t>& v) {
  w.global("torch", "Size").int_tuple(v).tuple1().reduce();
}

std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> strides(shape.size(), 1);
  for (size_t i = shape.size(); i-- > 1;) strides[i - 1] = strides[i] * std::max<int64_t>(shape[i], 1);
  return strides;
}

// TensorProperties pickles its __getstate__ tuple: (dtype, layout,
// requires_grad, _MEM_FORMAT_ENCODING, pin_memory, strides).
void tensor_properties(pickle::Writer& w, const TensorRecord& t) {
  new_object(w, kMetadataModule, "TensorProperties");
  w.mark().global("torch", dtype_name(t.dtype));
  w.global("torch.serialization", "_get_layout").string("torch.strided").tuple1().reduce();
  w.boolean(false);
  w.global(kMetadataModule, "_MEM_FORMAT_ENCODING").integer(0).tuple1().reduce();  // TORCH_CONTIGUOUS_FORMAT
  w.boolean(false).int_tuple(contiguous_strides(t.shape)).tuple_from_mark().build();
}

void tensor_storage_metadata(pickle::Writer& w, const TensorRecord& t, const std::vector<ItemRecord>& items) {
  new_object(w, kMetadataModule, "TensorStorageMetadata");
  w.empty_dict().mark().string("properties");
  tensor_properties(w, t);
  w.string("size");
  torch_size(w, t.shape);
  w.string("chunks").empty_list().mark();
  for (size_t i : t.items) {
    new_object(w, kMetadataModule, "ChunkStorageMetadata");
    w.empty_dict().mark().string("offsets");
    torch_size(w, items[i].offsets);
    w.string("sizes");
    torch_size(w, items[i].sizes);
    w.setitems().build();
  }
  w.appends().setitems().build();
}

void storage_data(pickle::Writer& w, const std::vector<TensorRecord>& tensors, const std::vector<ItemRecord>& items) {
  w.empty_dict().mark();
  for (const auto& t : tensors) {
    for (size_t index = 0; index < t.items.size(); ++index) {
      const ItemRecord& item = items[t.items[index]];
      new_object(w, kMetadataModule, "MetadataIndex");
      w.empty_dict().mark().string("fqn").string(item.fqn).string("offset");
      torch_size(w, item.offsets);
      w.string("index").integer(static_cast<int64_t>(index)).setitems().build();
      new_object(w, "torch.distributed.checkpoint.filesystem", "_StorageInfo");
      w.empty_dict().mark().string("relative_path").string(item.file).string("offset").integer(item.offset);
      w.string("length").integer(item.length).setitems().build();
    }
  }
  w.setitems();
}

std::string metadata_pickle(const std::vector<TensorRecord>& tensors, const std::vector<ItemRecord>& items,
                            const fs::path& dir, const std::string& save_id) {
  pickle::Writer w;
  new_object(w, kMetadataModule, "Metadata");
  w.empty_dict().mark().string("state_dict_metadata").empty_dict().mark();
  for (const auto& t : tensors) {
    w.string(t.fqn);
    tensor_storage_metadata(w, t, items);
  }
  w.setitems();
  // DefaultSavePlanner's planner_data: each flat key's path in the state dict.
  w.string("planner_data").empty_dict().mark();
  for (const auto& t : tensors) w.string(t.fqn).string(t.fqn).tuple1();
  w.setitems().string("storage_data");
  storage_data(w, tensors, items);
  w.string("storage_meta");
  new_object(w, kMetadataModule, "StorageMeta");
  w.empty_dict().mark().string("checkpoint_id").string(dir.string()).string("save_id").string(save_id);
  w.string("load_id").none().string("modules").empty_list().setitems().build();
  w.string("version").string(kDcpVersion).setitems().build();
  return w.finish();
}

// ---- .metadata: reading -----------------------------------------------------

std::vector<int64_t> parse_size(const pickle::Value& v, const std::string& what) {
  if (v.qualified_name() != "torch.Size" || v.kind != pickle::Value::Kind::Object)
    throw std::runtime_error("dcp: " + what + " is " + v.describe() + ", expected torch.Size");
  const auto& args = v.args->as_sequence(what);
  if (args.size() != 1)
    throw std::runtime_error("dcp: " + what + ": torch.Size with " + std::to_string(args.size()) + " arguments");
  std::vector<int64_t> out;
  for (const auto& x : args[0]->as_sequence(what)) out.push_back(x->as_int(what));
  return out;
}

const pickle::Value& object_state(const pickle::Value& v, const std::string& cls, const std::string& what) {
  if (v.kind != pickle::Value::Kind::Object || v.qualified_name() != cls || !v.state)
    throw std::runtime_error("dcp: " + what + " is " + v.describe() + ", expected a " + cls);
  return *v.state;
}

SavedTensor parse_tensor_metadata(const pickle::Value& v, const std::string& fqn) {
  const auto& state = object_state(v, std::string(kMetadataModule) + ".TensorStorageMetadata", "entry " + fqn);
  const auto& props = state.at("properties", fqn);
  if (props.kind != pickle::Value::Kind::Object || !props.state)
    throw std::runtime_error("dcp: " + fqn + ": properties is " + props.describe());
  const auto& fields = props.state->as_sequence(fqn + " properties");
  if (fields.empty() || fields[0]->kind != pickle::Value::Kind::Global || fields[0]->text != "torch")
    throw std::runtime_error("dcp: " + fqn + ": properties carry no torch dtype");
  SavedTensor t;
  t.dtype = dtype_from_name(fields[0]->name);
  t.global_shape = parse_size(state.at("size", fqn), fqn + " size");
  for (const auto& c : state.at("chunks", fqn).as_sequence(fqn + " chunks")) {
    const auto& cs = object_state(*c, std::string(kMetadataModule) + ".ChunkStorageMetadata", fqn + " chunk");
    SavedTensor::SavedChunk chunk;
    chunk.offsets = parse_size(cs.at("offsets", fqn), fqn + " chunk offsets");
    chunk.sizes = parse_size(cs.at("sizes", fqn), fqn + " chunk sizes");
    t.chunks.push_back(std::move(chunk));
  }
  return t;
}

// storage_data: MetadataIndex(fqn, offset) -> _StorageInfo(relative_path, offset, length).
void attach_storage(CheckpointMetadata& meta, const pickle::Value& storage) {
  if (storage.kind != pickle::Value::Kind::Dict) throw std::runtime_error("dcp: storage_data is " + storage.describe());
  for (const auto& [key, info] : storage.entries) {
    const auto& k = object_state(*key, std::string(kMetadataModule) + ".MetadataIndex", "a storage_data key");
    const std::string& fqn = k.at("fqn", "MetadataIndex").as_string("MetadataIndex.fqn");
    const auto& i = object_state(*info, "torch.distributed.checkpoint.filesystem._StorageInfo", "storage of " + fqn);
    auto transforms = i.find("transform_descriptors");
    if (transforms && transforms->kind != pickle::Value::Kind::None && !transforms->as_sequence(fqn).empty())
      throw std::runtime_error("dcp: " + fqn +
                               " is stored with transforms (e.g. compression), which this reader does not apply");
    auto it = meta.tensors.find(fqn);
    if (it == meta.tensors.end()) continue;  // a bytes entry
    const auto offsets = parse_size(k.at("offset", fqn), fqn + " storage offset");
    bool found = false;
    for (auto& c : it->second.chunks) {
      if (c.offsets != offsets) continue;
      c.file = i.at("relative_path", fqn).as_string(fqn + " relative_path");
      c.offset = i.at("offset", fqn).as_int(fqn + " offset");
      c.length = i.at("length", fqn).as_int(fqn + " length");
      found = true;
    }
    if (!found)
      throw std::runtime_error("dcp: storage_data names chunk " + shape_str(offsets) + " of " + fqn +
                               ", which its metadata lacks");
  }
}

// ---- checksums sidecar ------------------------------------------------------

struct Checksums {
  std::map<std::string, int64_t> file_sizes;
  std::map<std::pair<std::string, int64_t>, std::pair<int64_t, uint32_t>> items;  // (file, offset) -> (length, crc)
};

std::string checksums_json(const std::vector<ItemRecord>& items, const std::map<std::string, int64_t>& file_sizes,
                           const std::string& save_id) {
  json files = json::object();
  for (const auto& [file, size] : file_sizes) files[file] = {{"size", size}, {"chunks", json::array()}};
  for (const auto& item : items)
    files[item.file]["chunks"].push_back(
        {{"fqn", item.fqn}, {"offset", item.offset}, {"length", item.length}, {"crc32", item.crc}});
  json doc = {{"format", "fsdpsim-dcp-checksums"}, {"version", 1}, {"save_id", save_id}, {"files", files}};
  return doc.dump(1);
}

std::optional<Checksums> read_checksums(const fs::path& dir, const std::string& save_id) {
  const fs::path path = dir / kChecksumFile;
  if (!fs::exists(path)) return std::nullopt;
  Checksums sums;
  try {
    const json doc = json::parse(read_whole(path));
    if (doc.at("save_id").get<std::string>() != save_id)
      throw std::runtime_error("it belongs to save " + doc.at("save_id").get<std::string>() + ", .metadata to " +
                               save_id);
    for (const auto& [file, f] : doc.at("files").items()) {
      sums.file_sizes[file] = f.at("size").get<int64_t>();
      for (const auto& c : f.at("chunks"))
        sums.items[{file, c.at("offset").get<int64_t>()}] = {c.at("length").get<int64_t>(),
                                                             c.at("crc32").get<uint32_t>()};
    }
  } catch (const std::exception& e) {
    throw std::runtime_error("dcp: " + path.string() + " is unreadable: " + e.what() +
                             " (delete it to load without checksum verification)");
  }
  return sums;
}

// ---- save ---------------------------------------------------------------

std::string data_file_name(int rank) { return "__" + std::to_string(rank) + "_0.distcp"; }

void check_entries(const std::vector<Entry>& entries) {
  std::map<std::string, int> seen;
  for (const auto& e : entries) {
    if (seen[e.fqn]++) throw std::invalid_argument("dcp::save: fqn '" + e.fqn + "' appears twice");
    dtype_name(e.dtype);
    for (const auto& c : e.chunks) {
      const std::string where = "dcp::save: " + e.fqn + " chunk at " + shape_str(c.offsets);
      if (!c.tensor.defined()) throw std::invalid_argument(where + " has no tensor");
      if (c.tensor.scalar_type() != e.dtype)
        throw std::invalid_argument(where + " is " + c10::toString(c.tensor.scalar_type()) + ", the entry says " +
                                    c10::toString(e.dtype));
      const auto sizes = c.tensor.sizes().vec();
      if (c.offsets.size() != e.global_shape.size() || sizes.size() != e.global_shape.size())
        throw std::invalid_argument(where + " has " + std::to_string(sizes.size()) + " dims, global shape " +
                                    shape_str(e.global_shape));
      for (size_t d = 0; d < sizes.size(); ++d)
        if (c.offsets[d] < 0 || c.offsets[d] + sizes[d] > e.global_shape[d])
          throw std::invalid_argument(where + " sizes " + shape_str(sizes) + " reach outside global shape " +
                                      shape_str(e.global_shape));
    }
  }
}

// torch.save of the chunk alone (a view would save its whole storage).
std::vector<char> serialize_chunk(const at::Tensor& tensor) {
  at::Tensor t = tensor.detach().cpu();
  if (!t.is_contiguous() || t.storage_offset() != 0 || t.storage().nbytes() != t.nbytes())
    t = t.clone(at::MemoryFormat::Contiguous);
  return torch::jit::pickle_save(t);
}

// Writes this rank's file (temporary + rename); returns its report for rank 0.
json write_rank_file(const fs::path& dir, int rank, const std::vector<Entry>& entries, const SaveOptions& options,
                     SaveStats& stats) {
  check_entries(entries);
  const std::string name = data_file_name(rank);
  json report = {{"file", name}, {"entries", json::array()}, {"items", json::array()}};
  const fs::path tmp = dir / (name + ".tmp");
  OutFile out(tmp);
  for (const auto& e : entries) {
    report["entries"].push_back({{"fqn", e.fqn}, {"dtype", dtype_name(e.dtype)}, {"shape", e.global_shape}});
    for (const auto& c : e.chunks) {
      if (c.tensor.numel() == 0) continue;  // DCP needs no bytes for an empty chunk
      const auto bytes = serialize_chunk(c.tensor);
      const int64_t offset = out.written();
      out.write(bytes.data(), bytes.size());
      report["items"].push_back({{"fqn", e.fqn},
                                 {"offsets", c.offsets},
                                 {"sizes", c.tensor.sizes().vec()},
                                 {"offset", offset},
                                 {"length", static_cast<int64_t>(bytes.size())},
                                 {"crc32", crc32(bytes.data(), bytes.size())}});
      ++stats.chunks_written;
    }
  }
  stats.bytes_written = out.written();
  report["size"] = out.written();
  out.close(options.sync_files);
  fs::rename(tmp, dir / name);
  if (options.sync_files) sync_dir(dir);
  return report;
}

bool boxes_overlap(const ItemRecord& a, const ItemRecord& b) {
  for (size_t d = 0; d < a.offsets.size(); ++d)
    if (a.offsets[d] >= b.offsets[d] + b.sizes[d] || b.offsets[d] >= a.offsets[d] + a.sizes[d]) return false;
  return true;
}

// Adds one rank's chunk to its tensor: an identical chunk from an earlier
// rank (a replica) is kept once, a partial overlap is an error.
void add_item(TensorRecord& t, std::vector<ItemRecord>& items, ItemRecord item, int rank) {
  for (size_t i : t.items) {
    if (items[i].offsets == item.offsets && items[i].sizes == item.sizes) return;
    if (boxes_overlap(items[i], item))
      throw std::runtime_error("rank " + std::to_string(rank) + "'s chunk " + shape_str(item.offsets) + "+" +
                               shape_str(item.sizes) + " of " + t.fqn + " overlaps chunk " +
                               shape_str(items[i].offsets) + "+" + shape_str(items[i].sizes));
  }
  t.items.push_back(items.size());
  items.push_back(std::move(item));
}

// Rank 0: every rank's report -> the tensors and their chunks, checked.
void assemble(const std::vector<json>& reports, std::vector<TensorRecord>& tensors, std::vector<ItemRecord>& items) {
  std::map<std::string, size_t> index;
  for (size_t r = 0; r < reports.size(); ++r) {
    for (const auto& e : reports[r].at("entries")) {
      const auto fqn = e.at("fqn").get<std::string>();
      const auto dtype = dtype_from_name(e.at("dtype").get<std::string>());
      const auto shape = e.at("shape").get<std::vector<int64_t>>();
      auto [it, fresh] = index.emplace(fqn, tensors.size());
      if (fresh) tensors.push_back({fqn, dtype, shape, {}});
      const auto& t = tensors[it->second];
      if (t.dtype != dtype || t.shape != shape)
        throw std::runtime_error("ranks disagree on " + fqn + ": " + c10::toString(t.dtype) + " " + shape_str(t.shape) +
                                 " vs rank " + std::to_string(r) + "'s " + c10::toString(dtype) + " " +
                                 shape_str(shape));
    }
    for (const auto& i : reports[r].at("items")) {
      ItemRecord item{i.at("fqn").get<std::string>(),
                      i.at("offsets").get<std::vector<int64_t>>(),
                      i.at("sizes").get<std::vector<int64_t>>(),
                      reports[r].at("file").get<std::string>(),
                      i.at("offset").get<int64_t>(),
                      i.at("length").get<int64_t>(),
                      i.at("crc32").get<uint32_t>()};
      TensorRecord& t = tensors[index.at(item.fqn)];  // before item is moved from
      add_item(t, items, std::move(item), static_cast<int>(r));
    }
  }
  for (const auto& t : tensors) {  // DCP's save refuses chunks that do not tile the tensor
    int64_t covered = 0;
    for (size_t i : t.items) covered += volume(items[i].sizes);
    if (covered != volume(t.shape))
      throw std::runtime_error("the chunks of " + t.fqn + " cover " + std::to_string(covered) + " of its " +
                               std::to_string(volume(t.shape)) + " elements (global shape " + shape_str(t.shape) + ")");
  }
}

// Rank 0, after every rank's file is in place: checksums, then .metadata.
void write_metadata(const fs::path& dir, const std::vector<std::string>& blobs, const SaveOptions& options) {
  std::vector<json> reports;
  std::string errors;
  for (size_t r = 0; r < blobs.size(); ++r) {
    reports.push_back(json::parse(blobs[r]));
    if (reports.back().contains("error"))
      errors += "rank " + std::to_string(r) + ": " + reports.back()["error"].get<std::string>() + "; ";
  }
  if (!errors.empty()) throw std::runtime_error(errors.substr(0, errors.size() - 2));
  std::vector<TensorRecord> tensors;
  std::vector<ItemRecord> items;
  assemble(reports, tensors, items);
  const std::string save_id = random_id();
  if (options.write_checksums) {
    std::map<std::string, int64_t> sizes;
    for (const auto& r : reports) sizes[r.at("file").get<std::string>()] = r.at("size").get<int64_t>();
    publish_file(dir, kChecksumFile, checksums_json(items, sizes, save_id), options.sync_files);
  }
  publish_file(dir, kMetadataFile, metadata_pickle(tensors, items, dir, save_id), options.sync_files);
}

// Runs `step` on every rank; rank 0's outcome is broadcast, so that all
// ranks return or all throw.
void rank0_step(const Coordinator& c, const std::function<void()>& step) {
  std::string error;
  if (c.rank == 0) {
    try {
      step();
    } catch (const std::exception& e) {
      error = e.what();
      if (error.empty()) error = "unknown error";
    }
  }
  error = c.broadcast_from_rank0(error);
  if (!error.empty()) throw std::runtime_error(error);
}

}  // namespace

SaveStats save(const fs::path& dir, const std::vector<Entry>& entries, const Coordinator& coordinator,
               const SaveOptions& options) {
  const std::string where = "dcp::save to " + dir.string() + ": ";
  if (!coordinator.gather_to_rank0 || !coordinator.broadcast_from_rank0)
    throw std::invalid_argument(where +
                                "the coordinator has no gather/broadcast (use single_process() or "
                                "process_group_coordinator(group))");
  try {
    rank0_step(coordinator, [&] {  // an older checkpoint here stops being one first
      fs::create_directories(dir);
      fs::remove(dir / kMetadataFile);
      fs::remove(dir / kChecksumFile);
    });
  } catch (const std::exception& e) {
    throw std::runtime_error(where + e.what());
  }
  SaveStats stats;
  json report;
  try {
    fs::create_directories(dir);
    report = write_rank_file(dir, coordinator.rank, entries, options, stats);
  } catch (const std::exception& e) {
    report = {{"error", e.what()}};
  }
  const auto blobs = coordinator.gather_to_rank0(report.dump());
  try {
    rank0_step(coordinator, [&] { write_metadata(dir, blobs, options); });
  } catch (const std::exception& e) {
    throw std::runtime_error(where + e.what() + " (no .metadata written: the directory holds no checkpoint)");
  }
  return stats;
}

// ---- load ------------------------------------------------------------------

CheckpointMetadata read_metadata(const fs::path& dir) {
  const fs::path path = dir / kMetadataFile;
  if (!fs::exists(path))
    throw std::runtime_error("dcp: no " + path.string() +
                             ": not a checkpoint, or its save did not finish (rank 0 writes .metadata last)");
  CheckpointMetadata meta;
  try {
    const auto root = pickle::loads(read_whole(path));
    const auto& state = object_state(*root, std::string(kMetadataModule) + ".Metadata", ".metadata");
    const auto& sdm = state.at("state_dict_metadata", "Metadata");
    if (sdm.kind != pickle::Value::Kind::Dict) throw std::runtime_error("state_dict_metadata is " + sdm.describe());
    for (const auto& [key, value] : sdm.entries) {
      const std::string& fqn = key->as_string("a state_dict_metadata key");
      if (value->qualified_name() == std::string(kMetadataModule) + ".BytesStorageMetadata")
        meta.bytes_entries.push_back(fqn);
      else
        meta.tensors.emplace(fqn, parse_tensor_metadata(*value, fqn));
    }
    attach_storage(meta, state.at("storage_data", "Metadata"));
    if (auto sm = state.find("storage_meta"); sm && sm->kind == pickle::Value::Kind::Object && sm->state)
      if (auto id = sm->state->find("save_id"); id && id->kind == pickle::Value::Kind::String) meta.save_id = id->text;
    if (auto v = state.find("version"); v && v->kind == pickle::Value::Kind::String) meta.version = v->text;
  } catch (const std::exception& e) {
    throw std::runtime_error("dcp: " + path.string() + " is not a readable DCP metadata file: " + e.what());
  }
  for (const auto& [fqn, t] : meta.tensors)
    for (const auto& c : t.chunks)
      if (c.file.empty())
        throw std::runtime_error("dcp: " + path.string() + ": chunk " + shape_str(c.offsets) + " of " + fqn +
                                 " has no storage entry");
  return meta;
}

namespace {

// Reads saved chunks, checking sizes and checksums; one open file per name.
class ChunkReader {
 public:
  ChunkReader(fs::path dir, std::optional<Checksums> sums) : dir_(std::move(dir)), sums_(std::move(sums)) {}

  at::Tensor read(const std::string& fqn, const SavedTensor& t, const SavedTensor::SavedChunk& c, LoadStats& stats) {
    const std::string where =
        "dcp::load: " + fqn + " chunk " + shape_str(c.offsets) + " in " + (dir_ / c.file).string();
    std::vector<char> bytes(static_cast<size_t>(c.length));
    File& f = file(c.file, where);
    if (c.offset < 0 || c.length < 0 || c.offset + c.length > f.size)
      throw std::runtime_error(where + ": the file is truncated (it has " + std::to_string(f.size) +
                               " bytes, the chunk is at [" + std::to_string(c.offset) + ", " +
                               std::to_string(c.offset + c.length) + "))");
    f.in.seekg(c.offset);
    if (!f.in.read(bytes.data(), c.length)) throw std::runtime_error(where + ": read failed");
    if (sums_) {
      auto it = sums_->items.find({c.file, c.offset});
      if (it == sums_->items.end() || it->second.first != c.length)
        throw std::runtime_error(where + ": not in " + kChecksumFile + " (the checkpoint's files are mixed up)");
      if (crc32(bytes.data(), bytes.size()) != it->second.second)
        throw std::runtime_error(where + ": checksum mismatch (the file is corrupt)");
    }
    c10::IValue value = torch_save::load_bytes(bytes.data(), bytes.size(), where);
    if (!value.isTensor()) throw std::runtime_error(where + ": holds a " + value.tagKind() + ", not a tensor");
    at::Tensor tensor = std::move(value).toTensor();
    if (tensor.sizes().vec() != c.sizes || tensor.scalar_type() != t.dtype)
      throw std::runtime_error(where + ": holds " + c10::toString(tensor.scalar_type()) + " " +
                               shape_str(tensor.sizes().vec()) + ", .metadata says " + c10::toString(t.dtype) + " " +
                               shape_str(c.sizes));
    stats.bytes_read += c.length;
    ++stats.chunks_read;
    return tensor;
  }

 private:
  struct File {
    std::ifstream in;
    int64_t size = 0;
  };
  File& file(const std::string& name, const std::string& where) {
    auto it = files_.find(name);
    if (it != files_.end()) return it->second;
    File f;
    const fs::path path = dir_ / name;
    f.in.open(path, std::ios::binary);
    if (!f.in) throw std::runtime_error(where + ": the file is missing or unreadable");
    f.size = static_cast<int64_t>(fs::file_size(path));
    if (sums_ && sums_->file_sizes.count(name) && sums_->file_sizes.at(name) != f.size)
      throw std::runtime_error(where + ": the file has " + std::to_string(f.size) + " bytes, " + kChecksumFile +
                               " says " + std::to_string(sums_->file_sizes.at(name)) + " (truncated or overwritten)");
    return files_.emplace(name, std::move(f)).first->second;
  }

  fs::path dir_;
  std::optional<Checksums> sums_;
  std::map<std::string, File> files_;
};

void check_target(const Entry& e, const SavedTensor& t) {
  const std::string where = "dcp::load: " + e.fqn;
  if (t.dtype != e.dtype || t.global_shape != e.global_shape)
    throw std::runtime_error(where + ": the checkpoint has " + c10::toString(t.dtype) + " " +
                             shape_str(t.global_shape) + ", the entry asks for " + c10::toString(e.dtype) + " " +
                             shape_str(e.global_shape));
  for (const auto& c : e.chunks) {
    if (!c.tensor.defined() || c.tensor.scalar_type() != e.dtype || c.offsets.size() != e.global_shape.size() ||
        c.tensor.dim() != static_cast<int64_t>(e.global_shape.size()))
      throw std::invalid_argument(where + ": chunk at " + shape_str(c.offsets) + " is not a " + c10::toString(e.dtype) +
                                  " tensor of " + std::to_string(e.global_shape.size()) + " dims");
    for (size_t d = 0; d < c.offsets.size(); ++d)
      if (c.offsets[d] < 0 || c.offsets[d] + c.tensor.size(static_cast<int64_t>(d)) > e.global_shape[d])
        throw std::invalid_argument(where + ": chunk at " + shape_str(c.offsets) + " reaches outside " +
                                    shape_str(e.global_shape));
  }
}

// Copies the overlap of saved chunk `sc` (data `src`) into local chunk `dst`;
// returns the elements copied.
int64_t copy_overlap(const SavedTensor::SavedChunk& sc, const at::Tensor& src, const Chunk& dst) {
  at::Tensor from = src, to = dst.tensor;
  int64_t n = 1;
  for (size_t d = 0; d < sc.offsets.size(); ++d) {
    const int64_t lo = std::max(sc.offsets[d], dst.offsets[d]);
    const int64_t hi = std::min(sc.offsets[d] + sc.sizes[d], dst.offsets[d] + dst.tensor.size(static_cast<int64_t>(d)));
    if (hi <= lo) return 0;
    from = from.narrow(static_cast<int64_t>(d), lo - sc.offsets[d], hi - lo);
    to = to.narrow(static_cast<int64_t>(d), lo - dst.offsets[d], hi - lo);
    n *= hi - lo;
  }
  to.copy_(from);
  return n;
}

bool overlaps(const SavedTensor::SavedChunk& sc, const Chunk& dst) {
  for (size_t d = 0; d < sc.offsets.size(); ++d)
    if (sc.offsets[d] >= dst.offsets[d] + dst.tensor.size(static_cast<int64_t>(d)) ||
        dst.offsets[d] >= sc.offsets[d] + sc.sizes[d])
      return false;
  return true;
}

void load_entry(Entry& e, const SavedTensor& t, ChunkReader& reader, LoadStats& stats) {
  check_target(e, t);
  std::vector<int64_t> covered(e.chunks.size(), 0);
  for (const auto& sc : t.chunks) {
    if (volume(sc.sizes) == 0) continue;  // DCP stores empty shards too
    at::Tensor data;                      // read once, copied into every local chunk it overlaps
    for (size_t i = 0; i < e.chunks.size(); ++i) {
      if (e.chunks[i].tensor.numel() == 0 || !overlaps(sc, e.chunks[i])) continue;
      if (!data.defined()) data = reader.read(e.fqn, t, sc, stats);
      covered[i] += copy_overlap(sc, data, e.chunks[i]);
    }
  }
  for (size_t i = 0; i < e.chunks.size(); ++i)
    if (covered[i] != e.chunks[i].tensor.numel())
      throw std::runtime_error("dcp::load: the checkpoint covers " + std::to_string(covered[i]) + " of the " +
                               std::to_string(e.chunks[i].tensor.numel()) + " elements of " + e.fqn + " chunk at " +
                               shape_str(e.chunks[i].offsets));
}

}  // namespace

LoadStats load(const fs::path& dir, std::vector<Entry>& entries, const LoadOptions& options) {
  const CheckpointMetadata meta = read_metadata(dir);
  std::optional<Checksums> sums;
  if (options.verify_checksums) sums = read_checksums(dir, meta.save_id);
  ChunkReader reader(dir, std::move(sums));
  LoadStats stats;
  at::NoGradGuard no_grad;  // chunks may be views of parameters
  for (auto& e : entries) {
    auto it = meta.tensors.find(e.fqn);
    if (it == meta.tensors.end()) {
      std::string known;
      for (const auto& [fqn, t] : meta.tensors) known += (known.empty() ? "" : ", ") + fqn;
      throw std::runtime_error("dcp::load: " + e.fqn + " is not in the checkpoint " + dir.string() +
                               " (it has: " + known + ")");
    }
    load_entry(e, it->second, reader, stats);
  }
  return stats;
}

// ---- coordinators --------------------------------------------------------

Coordinator single_process() {
  Coordinator c;
  c.gather_to_rank0 = [](const std::string& bytes) { return std::vector<std::string>{bytes}; };
  c.broadcast_from_rank0 = [](const std::string& bytes) { return bytes; };
  return c;
}

Coordinator process_group_coordinator(ProcessGroup& group) {
  Coordinator c;
  c.rank = group.rank();
  c.world_size = group.size();
  c.gather_to_rank0 = [&group](const std::string& bytes) {
    const int world = group.size();
    auto length = at::full({1}, static_cast<int64_t>(bytes.size()), at::kLong);
    auto lengths = at::empty({world}, at::kLong);
    group.all_gather_into_tensor(lengths, length)->wait();
    const int64_t longest = lengths.max().item<int64_t>();
    auto mine = at::zeros({std::max<int64_t>(longest, 1)}, at::kByte);
    std::memcpy(mine.data_ptr(), bytes.data(), bytes.size());
    auto all = at::empty({world * mine.numel()}, at::kByte);
    group.all_gather_into_tensor(all, mine)->wait();
    std::vector<std::string> out;
    if (group.rank() != 0) return out;
    for (int r = 0; r < world; ++r)
      out.emplace_back(static_cast<const char*>(all.data_ptr()) + r * mine.numel(), lengths[r].item<int64_t>());
    return out;
  };
  c.broadcast_from_rank0 = [&group](const std::string& bytes) {
    auto length = at::full({1}, static_cast<int64_t>(bytes.size()), at::kLong);
    group.broadcast(length, {})->wait();
    auto buffer = at::zeros({std::max<int64_t>(length.item<int64_t>(), 1)}, at::kByte);
    if (group.rank() == 0) std::memcpy(buffer.data_ptr(), bytes.data(), bytes.size());
    group.broadcast(buffer, {})->wait();
    return std::string(static_cast<const char*>(buffer.data_ptr()), length.item<int64_t>());
  };
  return c;
}

}  // namespace fsdpsim::fsdp::dcp
