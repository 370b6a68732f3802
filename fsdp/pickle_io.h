#pragma once
// A minimal Python pickle reader and writer, for the `.metadata` file of
// torch.distributed.checkpoint (fsdp/dcp.h) and torch.save's data.pkl
// (fsdp/torch_save.h). Not a general pickle library:
// the reader knows the opcodes that Python's pickle (protocols 2-5) emits for
// plain data and for objects (GLOBAL/STACK_GLOBAL + NEWOBJ/REDUCE + BUILD) and
// torch.save's persistent ids (BINPERSID), and builds a tree of `Value`s
// without running anything (a class stays a name; collections.OrderedDict, a
// dict filled by SETITEMS, becomes a Dict);
// any other opcode is an error naming it and its byte offset. The writer
// emits protocol 2 opcodes, unframed and without memo, which every Python 3
// pickle.load accepts.
//
// No LibTorch include: this compiles fast and knows nothing of tensors.
// Thread-safety: no shared state; a Writer belongs to one thread.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace fsdpsim::fsdp::pickle {

struct Value;
using ValuePtr = std::shared_ptr<Value>;

/// One node of an unpickled object tree. Lists and dicts are shared (the
/// memo refers to them) and filled in place as the pickle runs.
struct Value {
  enum class Kind { None, Bool, Int, Float, String, Bytes, Tuple, List, Dict, Global, Object, PersistentId };
  Kind kind = Kind::None;
  bool boolean = false;
  int64_t integer = 0;
  double floating = 0;
  std::string text;                                    // String, Bytes; Global: module
  std::string name;                                    // Global: attribute name
  std::vector<ValuePtr> items;                         // Tuple, List
  std::vector<std::pair<ValuePtr, ValuePtr>> entries;  // Dict, in insertion order
  ValuePtr cls;                                        // Object: the Global called
  ValuePtr args;                                       // Object: its argument tuple; PersistentId: the id
  ValuePtr state;  // Object, Dict (an OrderedDict's attributes): BUILD's state (null if none)

  /// "module.name" of a Global, or of an Object's class; "" otherwise.
  std::string qualified_name() const;
  /// Dict lookup by string key (nullptr if absent); throws if not a dict.
  ValuePtr find(std::string_view key) const;
  /// Like find, but throws std::runtime_error naming `what` if absent.
  const Value& at(std::string_view key, std::string_view what) const;
  int64_t as_int(std::string_view what) const;
  const std::string& as_string(std::string_view what) const;
  /// Items of a Tuple or List.
  const std::vector<ValuePtr>& as_sequence(std::string_view what) const;
  /// A short description for error messages ("dict", "int 3", "torch.Size(...)").
  std::string describe() const;
};

/// Parses a whole pickle. Throws std::runtime_error on truncation, an
/// unsupported opcode (named, with its offset) or a malformed stream.
ValuePtr loads(std::string_view bytes);

/// Emits pickle opcodes in order; the caller builds the structure as Python's
/// pickler would (e.g. global + empty_tuple + newobj, then dict + build).
class Writer {
 public:
  Writer();  // PROTO 2
  Writer& none();
  Writer& boolean(bool value);
  Writer& integer(int64_t value);
  Writer& string(std::string_view value);  // a Python str (UTF-8)
  Writer& global(std::string_view module, std::string_view name);
  Writer& mark();
  Writer& tuple_from_mark();  // TUPLE
  Writer& empty_tuple();
  Writer& tuple1();
  Writer& tuple2();
  Writer& tuple3();
  /// A tuple of ints: (v0, v1, ...).
  Writer& int_tuple(const std::vector<int64_t>& values);
  Writer& empty_list();
  Writer& appends();  // APPENDS (items since mark)
  Writer& empty_dict();
  Writer& setitems();  // SETITEMS (pairs since mark)
  Writer& reduce();    // callable, args -> callable(*args)
  Writer& newobj();    // cls, args -> cls.__new__(cls, *args)
  Writer& build();     // obj, state -> obj.__setstate__(state) or __dict__ update
  /// Appends STOP and returns the bytes; the writer is then spent.
  std::string finish();

 private:
  std::string out_;
};

}  // namespace fsdpsim::fsdp::pickle
