#include "fsdp/pickle_io.h"

#include <cstdio>
#include <cstring>
#include <map>
#include <stdexcept>

namespace fsdpsim::fsdp::pickle {
namespace {

ValuePtr make(Value::Kind kind) {
  auto value = std::make_shared<Value>();
  value->kind = kind;
  return value;
}

ValuePtr make_int(int64_t v) {
  auto value = make(Value::Kind::Int);
  value->integer = v;
  return value;
}

ValuePtr make_text(Value::Kind kind, std::string text) {
  auto value = make(kind);
  value->text = std::move(text);
  return value;
}

// The unpickler's machine: a stack with marks and a memo. Each opcode is one
// case of step(); nothing is executed, objects stay (class, args, state).
class Reader {
 public:
  explicit Reader(std::string_view bytes) : in_(bytes) {}

  ValuePtr run() {
    while (true) {
      if (pos_ >= in_.size()) fail("the pickle ends without STOP (truncated)");
      const size_t at = pos_;
      const auto op = static_cast<unsigned char>(in_[pos_++]);
      if (op == '.') break;
      if (!step(op)) {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02x", op);
        fail_at(at, std::string("unsupported pickle opcode ") + hex +
                        " (this reader knows the opcodes of plain data, objects and torch.save's persistent ids)");
      }
    }
    if (stack_.size() != 1 || !marks_.empty())
      fail("malformed pickle: STOP with a stack of " + std::to_string(stack_.size()));
    return stack_.back();
  }

 private:
  [[noreturn]] void fail(const std::string& why) const { fail_at(pos_, why); }
  [[noreturn]] static void fail_at(size_t at, const std::string& why) {
    throw std::runtime_error("pickle: " + why + " at byte " + std::to_string(at));
  }

  std::string_view take(size_t n) {
    if (n > in_.size() - pos_) fail("truncated pickle (needs " + std::to_string(n) + " more bytes)");
    auto out = in_.substr(pos_, n);
    pos_ += n;
    return out;
  }
  uint64_t unsigned_le(size_t n) {
    auto bytes = take(n);
    uint64_t v = 0;
    for (size_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
    return v;
  }
  std::string line() {
    const size_t end = in_.find('\n', pos_);
    if (end == std::string_view::npos) fail("truncated pickle (no newline)");
    std::string out(in_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return out;
  }

  ValuePtr pop() {
    if (stack_.empty() || (!marks_.empty() && stack_.size() <= marks_.back()))
      fail("malformed pickle: stack underflow");
    auto v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  ValuePtr& top() {
    if (stack_.empty()) fail("malformed pickle: empty stack");
    return stack_.back();
  }
  std::vector<ValuePtr> pop_mark() {
    if (marks_.empty()) fail("malformed pickle: no MARK");
    const size_t start = marks_.back();
    marks_.pop_back();
    std::vector<ValuePtr> items(stack_.begin() + static_cast<std::ptrdiff_t>(start), stack_.end());
    stack_.resize(start);
    return items;
  }
  void push(ValuePtr v) { stack_.push_back(std::move(v)); }

  ValuePtr tuple(std::vector<ValuePtr> items) {
    auto t = make(Value::Kind::Tuple);
    t->items = std::move(items);
    return t;
  }
  ValuePtr global(std::string module, std::string name) {
    auto g = make_text(Value::Kind::Global, std::move(module));
    g->name = std::move(name);
    return g;
  }
  ValuePtr object(ValuePtr cls, ValuePtr args) {
    auto o = make(Value::Kind::Object);
    o->cls = std::move(cls);
    o->args = std::move(args);
    return o;
  }
  ValuePtr memo_get(uint64_t key) {
    auto it = memo_.find(key);
    if (it == memo_.end()) fail("malformed pickle: memo key " + std::to_string(key) + " unset");
    return it->second;
  }
  void add_items(const ValuePtr& target, std::vector<ValuePtr> items) {
    if (target->kind == Value::Kind::List) {
      for (auto& item : items) target->items.push_back(std::move(item));
    } else if (target->kind == Value::Kind::Dict) {
      if (items.size() % 2 != 0) fail("malformed pickle: odd SETITEMS");
      for (size_t i = 0; i < items.size(); i += 2) target->entries.emplace_back(items[i], items[i + 1]);
    } else {
      fail("malformed pickle: adding items to " + target->describe());
    }
  }

  bool step_scalar(unsigned char op);
  bool step_container(unsigned char op);
  bool step(unsigned char op) { return step_scalar(op) || step_container(op); }

  std::string_view in_;
  size_t pos_ = 0;
  std::vector<ValuePtr> stack_;
  std::vector<size_t> marks_;
  std::map<uint64_t, ValuePtr> memo_;
};

bool Reader::step_scalar(unsigned char op) {
  switch (op) {
    case 0x80: take(1); return true;  // PROTO
    case 0x95: take(8); return true;  // FRAME (frames are contiguous: ignore)
    case 'N': push(make(Value::Kind::None)); return true;
    case 0x88:    // NEWTRUE
    case 0x89: {  // NEWFALSE
      auto b = make(Value::Kind::Bool);
      b->boolean = op == 0x88;
      push(b);
      return true;
    }
    case 'K': push(make_int(static_cast<int64_t>(unsigned_le(1)))); return true;  // BININT1
    case 'M': push(make_int(static_cast<int64_t>(unsigned_le(2)))); return true;  // BININT2
    case 'J': push(make_int(static_cast<int32_t>(unsigned_le(4)))); return true;  // BININT
    case 0x8a: {                                                                  // LONG1
      const auto n = unsigned_le(1);
      if (n > 8) fail("integer of " + std::to_string(n) + " bytes does not fit int64");
      uint64_t v = n == 0 ? 0 : unsigned_le(n);
      if (n > 0 && n < 8 && (v >> (8 * n - 1)) != 0) v |= ~uint64_t{0} << (8 * n);  // sign-extend
      push(make_int(static_cast<int64_t>(v)));
      return true;
    }
    case 'G': {  // BINFLOAT, big-endian double
      uint64_t bits = 0;
      for (char c : take(8)) bits = (bits << 8) | static_cast<unsigned char>(c);
      auto f = make(Value::Kind::Float);
      std::memcpy(&f->floating, &bits, sizeof bits);
      push(f);
      return true;
    }
    case 0x8c:
      push(make_text(Value::Kind::String, std::string(take(unsigned_le(1)))));
      return true;                                                                                   // SHORT_BINUNICODE
    case 'X': push(make_text(Value::Kind::String, std::string(take(unsigned_le(4))))); return true;  // BINUNICODE
    case 0x8d: push(make_text(Value::Kind::String, std::string(take(unsigned_le(8))))); return true;  // BINUNICODE8
    case 'C': push(make_text(Value::Kind::Bytes, std::string(take(unsigned_le(1))))); return true;    // SHORT_BINBYTES
    case 'B': push(make_text(Value::Kind::Bytes, std::string(take(unsigned_le(4))))); return true;    // BINBYTES
    case 'c': {                                                                                       // GLOBAL
      auto module = line();
      push(global(std::move(module), line()));
      return true;
    }
    case 0x93: {  // STACK_GLOBAL
      auto name = pop();
      auto module = pop();
      if (module->kind != Value::Kind::String || name->kind != Value::Kind::String) fail("STACK_GLOBAL of non-strings");
      push(global(module->text, name->text));
      return true;
    }
    case 0x94: memo_[memo_.size()] = top(); return true;    // MEMOIZE
    case 'q': memo_[unsigned_le(1)] = top(); return true;   // BINPUT
    case 'r': memo_[unsigned_le(4)] = top(); return true;   // LONG_BINPUT
    case 'h': push(memo_get(unsigned_le(1))); return true;  // BINGET
    case 'j': push(memo_get(unsigned_le(4))); return true;  // LONG_BINGET
    default: return false;
  }
}

bool Reader::step_container(unsigned char op) {
  switch (op) {
    case '(': marks_.push_back(stack_.size()); return true;  // MARK
    case ')': push(tuple({})); return true;                  // EMPTY_TUPLE
    case 0x85: push(tuple({pop()})); return true;            // TUPLE1
    case 0x86: {                                             // TUPLE2
      auto b = pop();
      push(tuple({pop(), b}));
      return true;
    }
    case 0x87: {  // TUPLE3
      auto c = pop();
      auto b = pop();
      push(tuple({pop(), b, c}));
      return true;
    }
    case 't': push(tuple(pop_mark())); return true;        // TUPLE
    case ']': push(make(Value::Kind::List)); return true;  // EMPTY_LIST
    case '}': push(make(Value::Kind::Dict)); return true;  // EMPTY_DICT
    case 'l':                                              // LIST
    case 'd': {                                            // DICT
      auto items = pop_mark();
      auto c = make(op == 'l' ? Value::Kind::List : Value::Kind::Dict);
      add_items(c, std::move(items));
      push(c);
      return true;
    }
    case 'a': {  // APPEND
      auto item = pop();
      add_items(top(), {item});
      return true;
    }
    case 's': {  // SETITEM
      auto v = pop();
      auto k = pop();
      add_items(top(), {k, v});
      return true;
    }
    case 'e':    // APPENDS
    case 'u': {  // SETITEMS
      auto items = pop_mark();
      add_items(top(), std::move(items));
      return true;
    }
    case 'R':     // REDUCE
    case 0x81: {  // NEWOBJ
      auto args = pop();
      auto cls = pop();
      if (args->kind != Value::Kind::Tuple) fail("REDUCE/NEWOBJ with arguments " + args->describe());
      // An empty OrderedDict whose items SETITEMS adds (Module.state_dict()).
      const bool ordered_dict = cls->qualified_name() == "collections.OrderedDict" && args->items.empty();
      push(ordered_dict ? make(Value::Kind::Dict) : object(cls, args));
      return true;
    }
    case 'b': {  // BUILD
      auto state = pop();
      auto& obj = top();
      if (obj->kind != Value::Kind::Object && obj->kind != Value::Kind::Dict) fail("BUILD on " + obj->describe());
      obj->state = std::move(state);
      return true;
    }
    case 'Q': {  // BINPERSID: torch.save's reference to a storage record
      auto id = make(Value::Kind::PersistentId);
      id->args = pop();
      push(id);
      return true;
    }
    default: return false;
  }
}

void put_le(std::string& out, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

}  // namespace

std::string Value::qualified_name() const {
  if (kind == Kind::Global) return text + "." + name;
  if (kind == Kind::Object && cls) return cls->qualified_name();
  return "";
}

ValuePtr Value::find(std::string_view key) const {
  if (kind != Kind::Dict) throw std::runtime_error("pickle: expected a dict, found " + describe());
  for (const auto& [k, v] : entries)
    if (k->kind == Kind::String && k->text == key) return v;
  return nullptr;
}

const Value& Value::at(std::string_view key, std::string_view what) const {
  auto v = find(key);
  if (!v) throw std::runtime_error("pickle: " + std::string(what) + " has no '" + std::string(key) + "'");
  return *v;
}

int64_t Value::as_int(std::string_view what) const {
  if (kind == Kind::Int) return integer;
  if (kind == Kind::Bool) return boolean ? 1 : 0;
  throw std::runtime_error("pickle: " + std::string(what) + " is " + describe() + ", expected an int");
}

const std::string& Value::as_string(std::string_view what) const {
  if (kind != Kind::String)
    throw std::runtime_error("pickle: " + std::string(what) + " is " + describe() + ", expected a str");
  return text;
}

const std::vector<ValuePtr>& Value::as_sequence(std::string_view what) const {
  if (kind != Kind::Tuple && kind != Kind::List)
    throw std::runtime_error("pickle: " + std::string(what) + " is " + describe() + ", expected a tuple or list");
  return items;
}

std::string Value::describe() const {
  switch (kind) {
    case Kind::None: return "None";
    case Kind::Bool: return boolean ? "True" : "False";
    case Kind::Int: return "int " + std::to_string(integer);
    case Kind::Float: return "float";
    case Kind::String: return "str '" + text + "'";
    case Kind::Bytes: return "bytes";
    case Kind::Tuple: return "tuple of " + std::to_string(items.size());
    case Kind::List: return "list of " + std::to_string(items.size());
    case Kind::Dict: return "dict of " + std::to_string(entries.size());
    case Kind::Global: return "global " + qualified_name();
    case Kind::Object: return qualified_name() + "(...)";
    case Kind::PersistentId: return "persistent id";
  }
  return "?";
}

ValuePtr loads(std::string_view bytes) { return Reader(bytes).run(); }

Writer::Writer() { out_ = "\x80\x02"; }

Writer& Writer::none() {
  out_ += 'N';
  return *this;
}
Writer& Writer::boolean(bool value) {
  out_ += static_cast<char>(value ? 0x88 : 0x89);
  return *this;
}
Writer& Writer::integer(int64_t value) {
  if (value >= INT32_MIN && value <= INT32_MAX) {
    out_ += 'J';
    put_le(out_, static_cast<uint32_t>(static_cast<int32_t>(value)), 4);
  } else {
    out_ += static_cast<char>(0x8a);  // LONG1, 8 bytes two's complement
    out_ += static_cast<char>(8);
    put_le(out_, static_cast<uint64_t>(value), 8);
  }
  return *this;
}
Writer& Writer::string(std::string_view value) {
  out_ += 'X';
  put_le(out_, value.size(), 4);
  out_ += value;
  return *this;
}
Writer& Writer::global(std::string_view module, std::string_view name) {
  out_ += 'c';
  (out_ += module) += '\n';
  (out_ += name) += '\n';
  return *this;
}
Writer& Writer::mark() {
  out_ += '(';
  return *this;
}
Writer& Writer::tuple_from_mark() {
  out_ += 't';
  return *this;
}
Writer& Writer::empty_tuple() {
  out_ += ')';
  return *this;
}
Writer& Writer::tuple1() {
  out_ += static_cast<char>(0x85);
  return *this;
}
Writer& Writer::tuple2() {
  out_ += static_cast<char>(0x86);
  return *this;
}
Writer& Writer::tuple3() {
  out_ += static_cast<char>(0x87);
  return *this;
}
Writer& Writer::int_tuple(const std::vector<int64_t>& values) {
  mark();
  for (int64_t v : values) integer(v);
  return tuple_from_mark();
}
Writer& Writer::empty_list() {
  out_ += ']';
  return *this;
}
Writer& Writer::appends() {
  out_ += 'e';
  return *this;
}
Writer& Writer::empty_dict() {
  out_ += '}';
  return *this;
}
Writer& Writer::setitems() {
  out_ += 'u';
  return *this;
}
Writer& Writer::reduce() {
  out_ += 'R';
  return *this;
}
Writer& Writer::newobj() {
  out_ += static_cast<char>(0x81);
  return *this;
}
Writer& Writer::build() {
  out_ += 'b';
  return *this;
}
std::string Writer::finish() {
  out_ += '.';
  return std::move(out_);
}

}  // namespace fsdpsim::fsdp::pickle
