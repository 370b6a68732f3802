#include "backends/gloo/gloo_process_group.h"

#include "backends/checked_process_group.h"

// cmake/Torch.cmake defines USE_C10D_GLOO, as the wheel's torch_cpu target
// does; without it ProcessGroupGloo.hpp declares nothing.
#ifndef USE_C10D_GLOO
#error "USE_C10D_GLOO is not defined: build through cmake/Torch.cmake"
#endif

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/headeronly/version.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <signal.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <iostream>
#include <mutex>
#include <sstream>
#include <stdexcept>

#include "backends/collective_checks.h"
#include "backends/errors.h"
#include "backends/work_completion.h"

// The wheel ships no Gloo headers, so ProcessGroupGloo.hpp is compiled
// against Debian's libgloo-dev (an older Gloo) while the class itself lives,
// compiled against PyTorch's own Gloo, in libtorch_cpu.so. That is sound only
// while every Gloo type in the class is held by pointer, so that this file
// and the library agree on its layout: we allocate it (make_intrusive) and
// call its virtual functions, nothing inline that touches a Gloo type. The
// size below is the library's own allocation (its split() news 0x220 bytes);
// recheck it, and this reasoning, when the torch pin changes.
static_assert(TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 15,
              "re-check the ProcessGroupGloo layout assumption for this LibTorch");
static_assert(sizeof(c10d::ProcessGroupGloo) == 0x220,
              "ProcessGroupGloo's layout differs from libtorch_cpu.so's: the Gloo headers do not fit this LibTorch");

namespace fsdpsim {

namespace {

std::string first_line(const std::string& text) {
  auto end = text.find('\n');
  return end == std::string::npos ? text : text.substr(0, end);
}

// c10::Error::what() appends a C++ backtrace; Gloo's IoException names the
// source line first. One line of either is what a user needs.
std::string describe(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const c10::Error& e) {
    return first_line(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return first_line(e.what());
  } catch (...) {
    return "unknown error";
  }
}

std::string describe_current() { return describe(std::current_exception()); }

std::exception_ptr collective_error(const CollectiveDesc& desc, const std::string& what) {
  std::string message = desc.to_string() + " failed: " + what;
  if (what.find("Timed out") != std::string::npos || what.find("timed out") != std::string::npos) {
    return std::make_exception_ptr(CollectiveTimeoutError(message));
  }
  return std::make_exception_ptr(CommError(message));
}

bool gloo_handles(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
    case at::kDouble:
    case at::kHalf:
    case at::kChar:
    case at::kByte:
    case at::kInt:
    case at::kLong: return true;
    default: return false;
  }
}

// Gloo only moves dtypes it can also reduce. Pure data movement does not care
// about the values, so other dtypes travel as a Gloo dtype of the same width.
at::Tensor transport_view(const at::Tensor& tensor, const CollectiveDesc& desc) {
  if (gloo_handles(tensor.scalar_type())) return tensor;
  switch (tensor.element_size()) {
    case 1: return tensor.view(at::kByte);
    case 2: return tensor.view(at::kHalf);
    case 4: return tensor.view(at::kInt);
    case 8: return tensor.view(at::kLong);
    default:
      std::rethrow_exception(collective_error(
          desc, std::string("dtype ") + c10::toString(tensor.scalar_type()) + " cannot be sent over Gloo"));
  }
}

at::Tensor flat(const at::Tensor& tensor) { return tensor.view({tensor.numel()}); }

// rows: [size, n], row i from group rank i. The fake backend's arithmetic:
// rank order, in the tensor's dtype, one ATen op per step.
at::Tensor reduce_rows_in_rank_order(const at::Tensor& rows, ReduceOp op, double predivide, double postdivide) {
  const int64_t size = rows.size(0);
  // Pre-division happens in the compute type (float for half/bf16), rounded
  // once to the dtype, so a factor the dtype cannot represent is not
  // rounded before it is applied.
  const at::ScalarType dtype = rows.scalar_type();
  const bool reduced = dtype == at::kHalf || dtype == at::kBFloat16;
  auto input = [&](int64_t i) -> at::Tensor {
    if (predivide == 1.0) return rows[i];
    if (reduced) return at::div(rows[i].to(at::kFloat), predivide).to(dtype);
    return at::div(rows[i], predivide);
  };
  at::Tensor acc = input(0).clone();
  for (int64_t i = 1; i < size; ++i) {
    switch (op) {
      case ReduceOp::Sum:
      case ReduceOp::Avg: acc.add_(input(i)); break;
      case ReduceOp::Min: acc = at::minimum(acc, input(i)); break;
      case ReduceOp::Max: acc = at::maximum(acc, input(i)); break;
    }
  }
  if (op == ReduceOp::Avg) acc.div_(size);
  if (postdivide != 1.0) acc.div_(postdivide);
  return acc;
}

c10d::ReduceOp::RedOpType native_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum:
    case ReduceOp::Avg: return c10d::ReduceOp::SUM;
    case ReduceOp::Min: return c10d::ReduceOp::MIN;
    case ReduceOp::Max: return c10d::ReduceOp::MAX;
  }
  return c10d::ReduceOp::SUM;
}

// ---------------------------------------------------------------------------

// What one Gloo collective needs besides its completion: the post-processing
// to run once Gloo finished and the temporaries Gloo reads or writes. The
// Work handle owns only `completion` (aliasing this state); the c10d work is
// held here until it finished, so the future's callback never owns its owner
// for longer than the collective runs.
struct WorkState {
  WorkState(CollectiveDesc d, const Clock& c) : desc(std::move(d)), clock(c) {}

  const CollectiveDesc desc;
  const Clock& clock;
  WorkCompletion completion;

  std::mutex mutex;  // guards everything below
  // Runs once Gloo finished, before the work counts as completed.
  std::function<void()> finalize;
  std::vector<at::Tensor> buffers;
  c10::intrusive_ptr<c10d::Work> c10d_work;
};

void finish(const std::shared_ptr<WorkState>& state, std::exception_ptr gloo_error) {
  std::exception_ptr error;
  std::function<void()> finalize;
  {
    std::lock_guard<std::mutex> lock(state->mutex);
    finalize = std::move(state->finalize);
  }
  if (gloo_error) {
    error = collective_error(state->desc, describe(gloo_error));
  } else if (finalize) {
    try {
      finalize();
    } catch (...) {
      error = collective_error(state->desc, "local post-processing: " + describe_current());
    }
  }
  std::vector<at::Tensor> buffers;
  c10::intrusive_ptr<c10d::Work> c10d_work;
  {
    std::lock_guard<std::mutex> lock(state->mutex);
    buffers.swap(state->buffers);
    c10d_work.swap(state->c10d_work);
  }
  state->completion.complete(state->clock.now_ns(), error, [&state] { return state->desc.to_string(); });
}

WorkPtr work_of(const std::shared_ptr<WorkState>& state) {
  return std::make_shared<CompletionWork>(state->desc, std::shared_ptr<WorkCompletion>(state, &state->completion));
}

/// Completes `state` when `work` (already enqueued on Gloo) does.
void attach(const std::shared_ptr<WorkState>& state, c10::intrusive_ptr<c10d::Work> work) {
  {
    std::lock_guard<std::mutex> lock(state->mutex);
    state->c10d_work = work;
  }
  work->getFuture()->addCallback(
      [state](c10::ivalue::Future& future) { finish(state, future.hasError() ? future.exception_ptr() : nullptr); });
}

// ---------------------------------------------------------------------------

std::string partition_string(const std::vector<std::vector<int>>& partition) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < partition.size(); ++i) {
    out << (i ? ", " : "") << "[";
    for (size_t j = 0; j < partition[i].size(); ++j) out << (j ? ", " : "") << partition[i][j];
    out << "]";
  }
  out << "]";
  return out.str();
}

std::vector<uint8_t> bytes_of(const std::string& text) { return std::vector<uint8_t>(text.begin(), text.end()); }

class GlooProcessGroup final : public ProcessGroup {
 public:
  /// options.store is the world's store; this group's keys go under "<name>/".
  GlooProcessGroup(GlooOptions options, std::shared_ptr<::gloo::transport::Device> device)
      : options_(std::move(options)),
        clock_(options_.clock ? *options_.clock : SteadyClock::instance()),
        device_(std::move(device)) {
    group_store_ = c10::make_intrusive<c10d::PrefixStore>(options_.name, options_.store);
    auto gloo_options = c10d::ProcessGroupGloo::Options::create(options_.timeout);
    gloo_options->devices.push_back(device_);
    try {
      pg_ = c10::make_intrusive<c10d::ProcessGroupGloo>(group_store_, options_.rank, options_.size, gloo_options);
    } catch (...) {
      throw CommError("rank " + std::to_string(options_.rank) + " group " + options_.name + ": Gloo rendezvous of " +
                      std::to_string(options_.size) + " ranks failed (timeout " +
                      std::to_string(options_.timeout.count()) + " ms): " + describe_current());
    }
  }

  int rank() const override { return options_.rank; }
  int size() const override { return options_.size; }
  const std::string& name() const override { return options_.name; }
  const std::vector<int>& global_ranks() const override { return options_.global_ranks; }
  uint64_t sequence_number() const override { return seq_.load(); }

  WorkPtr all_gather_into_tensor(const at::Tensor& output, const at::Tensor& input) override {
    CollectiveDesc desc = check_all_gather(*this, output, input);
    auto state = begin(std::move(desc));
    const int64_t n = input.numel();
    if (n == 0) return completed(state);
    std::vector<at::Tensor> inputs{flat(transport_view(input, state->desc))};
    at::Tensor out = flat(transport_view(output, state->desc));
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int r = 0; r < size(); ++r) outputs[0].push_back(out.narrow(0, r * n, n));
    return issue(state, [&] { return pg_->allgather(outputs, inputs); });
  }

  WorkPtr reduce_scatter_tensor(const at::Tensor& output, const at::Tensor& input,
                                const ReduceScatterOptions& options) override {
    CollectiveDesc desc = check_reduce_scatter(*this, output, input, options);
    auto state = begin(std::move(desc));
    const int64_t n = output.numel();
    if (n == 0) return completed(state);
    at::Tensor received = at::empty({size(), n}, input.options());
    state->buffers.push_back(received);
    state->finalize = [received, output, options] {
      flat(output).copy_(
          reduce_rows_in_rank_order(received, options.reduce_op, options.predivide_factor, options.postdivide_factor));
    };
    if (size() == 1) {
      received.copy_(input.view({1, n}));
      return completed(state);
    }
    // Equal splits: chunk j of the input goes to rank j; row i of `received`
    // comes from rank i.
    at::Tensor send = flat(transport_view(input, state->desc));
    at::Tensor recv = flat(transport_view(received, state->desc));
    std::vector<int64_t> equal_splits;
    return issue(state, [&] { return pg_->all_to_all_single(recv, send, equal_splits, equal_splits); });
  }

  WorkPtr all_reduce(const at::Tensor& tensor, const AllReduceOptions& options) override {
    CollectiveDesc desc = check_all_reduce(*this, tensor, options);
    auto state = begin(std::move(desc));
    const int64_t n = tensor.numel();
    if (n == 0) return completed(state);
    if (!gloo_handles(tensor.scalar_type())) {
      // Gloo cannot reduce this dtype: gather every rank's tensor, reduce here.
      at::Tensor gathered = at::empty({size(), n}, tensor.options());
      state->buffers.push_back(gathered);
      state->finalize = [gathered, tensor, options] {
        flat(tensor).copy_(reduce_rows_in_rank_order(gathered, options.reduce_op, 1.0, 1.0));
      };
      std::vector<at::Tensor> inputs{flat(transport_view(tensor, state->desc))};
      at::Tensor out = flat(transport_view(gathered, state->desc));
      std::vector<std::vector<at::Tensor>> outputs(1);
      for (int r = 0; r < size(); ++r) outputs[0].push_back(out.narrow(0, r * n, n));
      return issue(state, [&] { return pg_->allgather(outputs, inputs); });
    }
    if (options.reduce_op == ReduceOp::Avg) {
      const int64_t group_size = size();
      state->finalize = [tensor, group_size] { tensor.div_(group_size); };
    }
    std::vector<at::Tensor> tensors{tensor};
    c10d::AllreduceOptions gloo_options;
    gloo_options.reduceOp = native_op(options.reduce_op);
    return issue(state, [&] { return pg_->allreduce(tensors, gloo_options); });
  }

  WorkPtr broadcast(const at::Tensor& tensor, const BroadcastOptions& options) override {
    CollectiveDesc desc = check_broadcast(*this, tensor, options);
    auto state = begin(std::move(desc));
    if (tensor.numel() == 0) return completed(state);
    std::vector<at::Tensor> tensors{transport_view(tensor, state->desc)};
    c10d::BroadcastOptions gloo_options;
    gloo_options.rootRank = options.root;
    return issue(state, [&] { return pg_->broadcast(tensors, gloo_options); });
  }

  WorkPtr barrier() override {
    auto state = begin(describe_barrier(*this));
    return issue(state, [&] { return pg_->barrier(); });
  }

  ProcessGroupPtr split(const std::vector<std::vector<int>>& partition) override {
    check_partition(*this, partition);
    const int index_on_parent = ++splits_;
    const std::string split_key = "split" + std::to_string(index_on_parent);
    const std::string context = "split " + std::to_string(index_on_parent) + " of group " + name() + " (rank " +
                                std::to_string(rank()) + ", partition " + partition_string(partition) + ")";
    // Every rank publishes its partition; a rank that passed another one
    // would otherwise build groups nobody else joins and hang until timeout.
    const std::string mine = partition_string(partition);
    std::vector<std::string> keys;
    for (int r = 0; r < size(); ++r) keys.push_back(split_key + "/partition/" + std::to_string(r));
    try {
      group_store_->set(keys[rank()], bytes_of(mine));
      group_store_->wait(keys, options_.timeout);
    } catch (...) {
      throw CommError(context + ": not every rank arrived within " + std::to_string(options_.timeout.count()) +
                      " ms: " + describe_current());
    }
    for (int r = 0; r < size(); ++r) {
      std::vector<uint8_t> theirs;
      try {
        theirs = group_store_->get(keys[r]);
      } catch (...) {
        throw CommError(context + ": reading rank " + std::to_string(r) + "'s partition failed: " + describe_current());
      }
      if (theirs != bytes_of(mine)) {
        throw CommError(context + ": rank " + std::to_string(r) + " passed a different partition " +
                        std::string(theirs.begin(), theirs.end()));
      }
    }
    for (size_t list = 0; list < partition.size(); ++list) {
      const auto& ranks = partition[list];
      for (size_t position = 0; position < ranks.size(); ++position) {
        if (ranks[position] != rank()) continue;
        GlooOptions sub = options_;
        sub.name = name() + "/" + split_key + "." + std::to_string(list);
        sub.rank = static_cast<int>(position);
        sub.size = static_cast<int>(ranks.size());
        sub.global_ranks.clear();
        for (int r : ranks) sub.global_ranks.push_back(global_ranks()[r]);
        return std::make_shared<GlooProcessGroup>(std::move(sub), device_);
      }
    }
    return nullptr;
  }

 private:
  std::shared_ptr<WorkState> begin(CollectiveDesc desc) {
    seq_.fetch_add(1);
    auto state = std::make_shared<WorkState>(std::move(desc), clock_);
    // Gloo does not say when the transfer starts; see the header.
    const int64_t issued = clock_.now_ns();
    state->completion.set_issued(issued, issued);
    return state;
  }

  WorkPtr completed(const std::shared_ptr<WorkState>& state) {
    WorkPtr work = work_of(state);
    finish(state, nullptr);
    return work;
  }

  template <typename Start>
  WorkPtr issue(const std::shared_ptr<WorkState>& state, Start&& start) {
    WorkPtr work = work_of(state);
    c10::intrusive_ptr<c10d::Work> gloo_work;
    try {
      gloo_work = start();
    } catch (...) {
      std::rethrow_exception(collective_error(state->desc, describe_current()));
    }
    attach(state, std::move(gloo_work));
    return work;
  }

  const GlooOptions options_;
  const Clock& clock_;
  std::shared_ptr<::gloo::transport::Device> device_;  // shared with subgroups
  c10::intrusive_ptr<c10d::Store> group_store_;        // options_.store under "<name>/"
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg_;
  std::atomic<uint64_t> seq_{0};
  int splits_ = 0;
};

[[noreturn]] void bad_env(const std::string& what) { throw std::invalid_argument("launch environment: " + what); }

bool is_set(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0';
}

int env_int(const char* name, long min, long max) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') bad_env(std::string(name) + " is not set");
  errno = 0;
  char* end = nullptr;
  long parsed = std::strtol(value, &end, 10);
  // strtol skips leading blanks; "RANK= 1" is more likely a quoting mistake.
  if (errno != 0 || end == value || *end != '\0' || std::isspace(static_cast<unsigned char>(*value))) {
    bad_env(std::string(name) + "='" + value + "' is not an integer");
  }
  if (parsed < min || parsed > max) {
    bad_env(std::string(name) + "=" + value + " is outside [" + std::to_string(min) + ", " + std::to_string(max) + "]");
  }
  return static_cast<int>(parsed);
}

// Gloo writes to its peers' sockets without MSG_NOSIGNAL on some paths, so a
// peer that dies can kill this process with SIGPIPE before the write's EPIPE
// becomes a CommError. Python ignores SIGPIPE at start-up, which is why
// torch.distributed does not see this; a C++ program must do it itself. A
// handler the program installed is left alone.
void ignore_default_sigpipe() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction current {};
    if (sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) std::signal(SIGPIPE, SIG_IGN);
  });
}

}  // namespace

ProcessGroupPtr make_gloo_process_group(GlooOptions options) {
  ignore_default_sigpipe();
  if (options.check_collectives) {
    GlooOptions side = options;
    side.name += "/check";
    side.check_collectives = false;
    options.check_collectives = false;
    ProcessGroupPtr inner = make_gloo_process_group(std::move(options));
    return std::make_shared<CheckedProcessGroup>(std::move(inner), make_gloo_process_group(std::move(side)));
  }
  const std::string context = "rank " + std::to_string(options.rank) + " group " + options.name;
  if (!options.store) throw CommError(context + ": GlooOptions.store is null");
  if (options.size < 1) throw CommError(context + ": group size " + std::to_string(options.size) + " < 1");
  if (options.rank < 0 || options.rank >= options.size) {
    throw CommError(context + ": rank is outside [0, " + std::to_string(options.size) + ")");
  }
  if (options.name.empty()) throw CommError(context + ": GlooOptions.name is empty");
  if (options.timeout.count() <= 0) throw CommError(context + ": timeout must be positive");
  if (options.global_ranks.empty()) {
    for (int r = 0; r < options.size; ++r) options.global_ranks.push_back(r);
  } else if (static_cast<int>(options.global_ranks.size()) != options.size) {
    throw CommError(context + ": " + std::to_string(options.global_ranks.size()) + " global ranks for a group of " +
                    std::to_string(options.size));
  }
  std::shared_ptr<::gloo::transport::Device> device;
  try {
    device = c10d::ProcessGroupGloo::createDeviceForHostname(options.hostname);
  } catch (...) {
    throw CommError(context + ": cannot create a Gloo device for host '" + options.hostname +
                    "': " + describe_current());
  }
  return std::make_shared<GlooProcessGroup>(std::move(options), std::move(device));
}

c10::intrusive_ptr<c10d::Store> make_tcp_store(const std::string& host, int port, int world_size, bool is_master,
                                               std::chrono::milliseconds timeout) {
  const std::string context =
      std::string(is_master ? "hosting" : "connecting to") + " TCP store " + host + ":" + std::to_string(port);
  if (port < (is_master ? 0 : 1) || port > 65535) throw CommError(context + ": port out of range");
  if (world_size < 1) throw CommError(context + ": world size " + std::to_string(world_size) + " < 1");
  c10d::TCPStoreOptions options;
  options.port = static_cast<std::uint16_t>(port);
  options.isServer = is_master;
  options.numWorkers = static_cast<std::size_t>(world_size);
  // The master must not block here: with port 0 its caller still has to
  // tell the others which port it got.
  options.waitWorkers = false;
  options.timeout = timeout;
  try {
    return c10::make_intrusive<c10d::TCPStore>(host, options);
  } catch (...) {
    throw CommError(context + " failed: " + describe_current());
  }
}

int tcp_store_port(const c10::intrusive_ptr<c10d::Store>& store) {
  auto* tcp = dynamic_cast<c10d::TCPStore*>(store.get());
  if (tcp == nullptr) throw std::invalid_argument("tcp_store_port: the store is not a TCPStore");
  return tcp->getPort();
}

LaunchEnv LaunchEnv::from_env() {
  LaunchEnv env;
  const char* addr = std::getenv("MASTER_ADDR");
  if (addr == nullptr || *addr == '\0') bad_env("MASTER_ADDR is not set");
  env.master_addr = addr;
  env.master_port = env_int("MASTER_PORT", 1, 65535);
  env.world_size = env_int("WORLD_SIZE", 1, 1 << 20);
  env.rank = env_int("RANK", 0, env.world_size - 1);
  env.local_rank = is_set("LOCAL_RANK") ? env_int("LOCAL_RANK", 0, env.world_size - 1) : env.rank;
  env.agent_store =
      is_set("TORCHELASTIC_USE_AGENT_STORE") && std::string(std::getenv("TORCHELASTIC_USE_AGENT_STORE")) == "True";
  env.restart_count = is_set("TORCHELASTIC_RESTART_COUNT") ? env_int("TORCHELASTIC_RESTART_COUNT", 0, 1 << 20) : 0;
  return env;
}

ProcessGroupPtr make_gloo_process_group_from_env(std::chrono::milliseconds timeout, bool check_collectives) {
  LaunchEnv env = LaunchEnv::from_env();
  GlooOptions options;
  const bool hosts_store = env.rank == 0 && !env.agent_store;
  options.store = make_tcp_store(env.master_addr, env.master_port, env.world_size, hosts_store, timeout);
  if (env.agent_store) {
    const std::string attempt = "fsdpsim/attempt" + std::to_string(env.restart_count);
    options.store = c10::make_intrusive<c10d::PrefixStore>(attempt, options.store);
  }
  options.rank = env.rank;
  options.size = env.world_size;
  options.timeout = timeout;
  options.check_collectives = check_collectives;
  return make_gloo_process_group(std::move(options));
}

}  // namespace fsdpsim
