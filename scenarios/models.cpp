#include "scenarios/models.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <stdexcept>
#include <unordered_set>

#include "backends/mesh.h"
#include "fsdp/checkpoint.h"

namespace fsdpsim::scenarios {

// ---------------------------------------------------------------------------
// Sharding setup.

fsdp::FullyShardOptions ShardingSetup::options() const {
  fsdp::FullyShardOptions options;
  options.strategy = strategy;
  options.shard_group = shard_group;
  options.replicate_group = replicate_group;
  options.mp_policy = mp_policy;
  options.offload_policy = offload_policy;
  return options;
}

fsdp::FullyShardOptions ShardingSetup::rank_local_options() const {
  fsdp::FullyShardOptions options;
  options.strategy = strategy == fsdp::ShardingStrategy::ShardGradOp ? fsdp::ShardingStrategy::ShardGradOp
                                                                     : fsdp::ShardingStrategy::FullShard;
  options.shard_group = self_group;
  options.mp_policy = mp_policy;
  options.offload_policy = offload_policy;
  return options;
}

ShardingSetup make_sharding_setup(const ProcessGroupPtr& world, fsdp::ShardingStrategy strategy, int replicate_size) {
  if (!world) throw std::invalid_argument("make_sharding_setup: no world group");
  if (strategy == fsdp::ShardingStrategy::HybridShard && (replicate_size < 1 || world->size() % replicate_size != 0)) {
    throw std::invalid_argument("make_sharding_setup: replicate_size " + std::to_string(replicate_size) +
                                " does not divide world size " + std::to_string(world->size()));
  }
  ShardingSetup setup;
  setup.strategy = strategy;
  setup.world = world;
  // Same split order on every rank: the self group first, then the mesh.
  setup.self_group = make_self_group(*world);
  switch (strategy) {
    case fsdp::ShardingStrategy::FullShard:
    case fsdp::ShardingStrategy::ShardGradOp: setup.shard_group = world; break;
    case fsdp::ShardingStrategy::NoShard:
      setup.shard_group = setup.self_group;
      setup.replicate_group = world;
      break;
    case fsdp::ShardingStrategy::HybridShard: {
      Mesh2D mesh = make_mesh_2d(*world, replicate_size, world->size() / replicate_size);
      setup.shard_group = mesh.shard_group;
      setup.replicate_group = mesh.replicate_group;
      break;
    }
  }
  return setup;
}

// ---------------------------------------------------------------------------
// Parameter helpers.

std::vector<std::pair<std::string, at::Tensor>> unique_named_parameters(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, at::Tensor>> result;
  std::unordered_set<const c10::TensorImpl*> seen;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    if (seen.insert(item.value().unsafeGetTensorImpl()).second) result.emplace_back(item.key(), item.value());
  }
  return result;
}

std::vector<at::Tensor> unique_parameters(const torch::nn::Module& module) {
  std::vector<at::Tensor> result;
  for (auto& item : unique_named_parameters(module)) result.push_back(std::move(item.second));
  return result;
}

namespace {

constexpr uint64_t kInitStream = 1;
constexpr uint64_t kInputStream = 2;
constexpr uint64_t kExpertStream = 3;
constexpr uint64_t kTargetStream = 4;

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// A seed for one stream of random numbers: init, expert init, inputs of (rank, step).
uint64_t derive_seed(uint64_t seed, uint64_t stream, uint64_t a = 0, uint64_t b = 0) {
  return splitmix64(splitmix64(splitmix64(seed ^ (stream << 56)) + a) + b);
}

// The global RNG is shared by every rank thread: draw from private generators.
at::Generator generator(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

at::Tensor uniform(at::IntArrayRef sizes, double bound, at::Generator& gen) {
  return at::rand(sizes, gen) * (2 * bound) - bound;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Overwrites every param accepted by `select` (in named_parameters order):
// matrices U(+-1/sqrt(fan_in)) like LibTorch's Linear, 1-D weights (norm
// scales) 1 + U(+-0.1), other vectors U(+-0.1). Every value is random, so a
// shard written to the wrong rows cannot go unnoticed.
void init_parameters(torch::nn::Module& module, at::Generator gen,
                     const std::function<bool(const std::string&)>& select = {}) {
  torch::NoGradGuard no_grad;
  for (auto& [fqn, param] : unique_named_parameters(module)) {
    if (select && !select(fqn)) continue;
    if (param.dim() >= 2) {
      param.copy_(uniform(param.sizes(), 1.0 / std::sqrt(static_cast<double>(param.size(1))), gen));
    } else if (ends_with(fqn, "weight")) {
      param.copy_(uniform(param.sizes(), 0.1, gen) + 1.0);
    } else {
      param.copy_(uniform(param.sizes(), 0.1, gen));
    }
  }
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

// ---------------------------------------------------------------------------
// Modules.

/// A Sequential whose children run through fsdp::call, so nested units gather
/// (torch::nn::Sequential's forward calls its children directly).
class ChainImpl : public torch::nn::Module {
 public:
  template <typename Holder>
  Holder add(const std::string& name, Holder holder) {
    register_module(name, holder);
    steps_.push_back([holder](at::Tensor x) mutable { return fsdp::call(holder, std::move(x)); });
    return holder;
  }
  at::Tensor forward(at::Tensor x) {
    for (auto& step : steps_) x = step(std::move(x));
    return x;
  }

 private:
  std::vector<std::function<at::Tensor(at::Tensor)>> steps_;
};
TORCH_MODULE(Chain);

/// NestedWrappedModule and its relatives: the model lives in `module`.
class NestedRootImpl : public torch::nn::Module {
 public:
  NestedRootImpl() : module(register_module("module", Chain())) {}
  at::Tensor forward(at::Tensor x) { return fsdp::call(module, std::move(x)); }
  Chain module;
};
TORCH_MODULE(NestedRoot);

/// Linear whose weight is another module's parameter, registered here too
/// (the tie of TransformerWithSharedParams: output_proj.weight IS
/// embed_tokens.weight, one TensorImpl under two names).
class TiedLinearImpl : public torch::nn::Module {
 public:
  TiedLinearImpl(const at::Tensor& shared_weight, int64_t out_features) {
    weight = register_parameter("weight", shared_weight);
    bias = register_parameter("bias", torch::empty({out_features}));
  }
  at::Tensor forward(const at::Tensor& x) { return torch::nn::functional::linear(x, weight, bias); }
  at::Tensor weight;
  at::Tensor bias;
};
TORCH_MODULE(TiedLinear);

class EncoderStackImpl : public torch::nn::Module {
 public:
  EncoderStackImpl(int num_layers, const torch::nn::TransformerEncoderLayerOptions& options, int64_t d_model) {
    auto list = register_module("layers", torch::nn::ModuleList());
    for (int i = 0; i < num_layers; ++i) {
      layers.emplace_back(options);
      list->push_back(layers.back());
    }
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d_model})));
  }
  at::Tensor forward(at::Tensor src) {
    for (auto& layer : layers) src = fsdp::call(layer, std::move(src));
    return norm(src);
  }
  std::vector<torch::nn::TransformerEncoderLayer> layers;
  torch::nn::LayerNorm norm{nullptr};
};
TORCH_MODULE(EncoderStack);

class DecoderStackImpl : public torch::nn::Module {
 public:
  DecoderStackImpl(int num_layers, const torch::nn::TransformerDecoderLayerOptions& options, int64_t d_model) {
    auto list = register_module("layers", torch::nn::ModuleList());
    for (int i = 0; i < num_layers; ++i) {
      layers.emplace_back(options);
      list->push_back(layers.back());
    }
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d_model})));
  }
  at::Tensor forward(at::Tensor tgt, const at::Tensor& memory) {
    for (auto& layer : layers) tgt = fsdp::call(layer, std::move(tgt), at::Tensor(memory));
    return norm(tgt);
  }
  std::vector<torch::nn::TransformerDecoderLayer> layers;
  torch::nn::LayerNorm norm{nullptr};
};
TORCH_MODULE(DecoderStack);

/// nn.Transformer's encoder and decoder, written out so that each layer runs
/// through fsdp::call (LibTorch's Transformer calls its layers directly).
class TransformerCoreImpl : public torch::nn::Module {
 public:
  TransformerCoreImpl(int64_t d_model, int64_t nhead, int64_t dim_feedforward, int num_layers) {
    encoder = register_module(
        "encoder",
        EncoderStack(
            num_layers,
            torch::nn::TransformerEncoderLayerOptions(d_model, nhead).dim_feedforward(dim_feedforward).dropout(0.0),
            d_model));
    decoder = register_module(
        "decoder",
        DecoderStack(
            num_layers,
            torch::nn::TransformerDecoderLayerOptions(d_model, nhead).dim_feedforward(dim_feedforward).dropout(0.0),
            d_model));
  }
  EncoderStack encoder{nullptr};
  DecoderStack decoder{nullptr};
};
TORCH_MODULE(TransformerCore);

class TransformerWithSharedParamsImpl : public torch::nn::Module {
 public:
  static constexpr int64_t kVocab = 23;
  static constexpr int64_t kDModel = 16;
  static constexpr int64_t kBatch = 2;

  explicit TransformerWithSharedParamsImpl(bool batch_norm) {
    embed_tokens = register_module("embed_tokens", torch::nn::Embedding(kVocab, kDModel));
    transformer = register_module("transformer", TransformerCore(kDModel, /*nhead=*/2, /*dim_feedforward=*/8,
                                                                 /*num_layers=*/2));
    output_proj = register_module("output_proj", TiedLinear(embed_tokens->weight, kVocab));
    vocab_bias = register_buffer("vocab_bias", torch::ones({kDModel}));
    long_buffer = register_buffer("long_buffer", torch::zeros({kDModel}, torch::kLong));
    if (batch_norm) bn = register_module("bn", torch::nn::BatchNorm1d(kBatch));
  }

  at::Tensor forward(at::Tensor src_ids, at::Tensor tgt_ids) {
    auto src = embed_tokens(src_ids);
    src = src + vocab_bias + long_buffer.to(src.scalar_type());
    auto tgt = embed_tokens(tgt_ids);
    if (!bn.is_empty()) tgt = bn(tgt);
    auto memory = transformer->encoder->forward(src);
    auto x = transformer->decoder->forward(tgt, memory);
    return output_proj(x);
  }

  torch::nn::Embedding embed_tokens{nullptr};
  TransformerCore transformer{nullptr};
  TiedLinear output_proj{nullptr};
  torch::nn::BatchNorm1d bn{nullptr};
  at::Tensor vocab_bias;
  at::Tensor long_buffer;
};
TORCH_MODULE(TransformerWithSharedParams);

class DoubleLinearImpl : public torch::nn::Module {
 public:
  DoubleLinearImpl(int64_t dim, bool use_second_linear)
      : lin1(register_module("lin1", torch::nn::Linear(dim, dim))),
        lin2(register_module("lin2", torch::nn::Linear(dim, dim))),
        use_second_linear_(use_second_linear) {}
  std::vector<at::Tensor> forward(at::Tensor x) {
    std::vector<at::Tensor> outputs{torch::relu(fsdp::call(lin1, at::Tensor(x)))};
    if (use_second_linear_) outputs.push_back(torch::relu(fsdp::call(lin2, at::Tensor(x))));
    return outputs;
  }
  torch::nn::Linear lin1;
  torch::nn::Linear lin2;

 private:
  bool use_second_linear_;
};
TORCH_MODULE(DoubleLinear);

/// A block whose `branch` runs on some ranks only: rank-divergent control
/// flow inside one unit (PyTorch's FSDP reduces the unit's whole gradient,
/// zeros where a rank did not use a param).
class BranchBlockImpl : public torch::nn::Module {
 public:
  BranchBlockImpl(int64_t dim, bool takes_branch)
      : main(register_module("main", torch::nn::Linear(dim, dim))),
        branch(register_module("branch", torch::nn::Linear(dim, dim))),
        takes_branch_(takes_branch) {}
  at::Tensor forward(at::Tensor x) {
    at::Tensor out = main(x);
    if (takes_branch_) out = out + torch::tanh(branch(x));
    return torch::relu(out);
  }
  torch::nn::Linear main;
  torch::nn::Linear branch;

 private:
  bool takes_branch_;
};
TORCH_MODULE(BranchBlock);

class RankDivergentImpl : public torch::nn::Module {
 public:
  RankDivergentImpl(int64_t dim, bool takes_branch)
      : trunk(register_module("trunk", torch::nn::Linear(dim, dim))),
        block(register_module("block", BranchBlock(dim, takes_branch))),
        head(register_module("head", torch::nn::Linear(dim, 3))) {}
  at::Tensor forward(at::Tensor x) {
    x = torch::relu(fsdp::call(trunk, std::move(x)));
    return head(fsdp::call(block, std::move(x)));
  }
  torch::nn::Linear trunk;
  BranchBlock block;
  torch::nn::Linear head;
};
TORCH_MODULE(RankDivergent);

class MlpImpl : public torch::nn::Module {
 public:
  MlpImpl(int64_t dim, int64_t mult, bool with_buffer, bool checkpointed = false)
      : in_proj(register_module("in_proj", torch::nn::Linear(dim, mult * dim))),
        out_proj(register_module("out_proj", torch::nn::Linear(mult * dim, dim))),
        checkpointed_(checkpointed) {
    if (with_buffer) buffer = register_buffer("buffer", torch::zeros({dim}));
  }
  at::Tensor forward(at::Tensor x) {
    auto body = [this](const at::Tensor& in) {
      auto z = torch::relu(out_proj(torch::relu(in_proj(in))));
      return buffer.defined() ? z + buffer : z;
    };
    return checkpointed_ ? fsdp::checkpoint(body, x) : body(x);
  }
  torch::nn::Linear in_proj;
  torch::nn::Linear out_proj;
  at::Tensor buffer;

 private:
  bool checkpointed_;
};
TORCH_MODULE(Mlp);

/// A Linear whose forward runs under fsdp::checkpoint: the same params and
/// names as torch::nn::Linear (fsdp::call resolves forward on this type).
class CheckpointedLinearImpl : public torch::nn::LinearImpl {
 public:
  CheckpointedLinearImpl(int64_t in, int64_t out) : torch::nn::LinearImpl(torch::nn::LinearOptions(in, out)) {}
  at::Tensor forward(const at::Tensor& x) {
    return fsdp::checkpoint([this](const at::Tensor& in) { return torch::nn::LinearImpl::forward(in); }, x);
  }
};
TORCH_MODULE(CheckpointedLinear);

/// Parameters of given shapes, each used elementwise against an input of its
/// shape: loss = sum_i sum(tanh(p_i) * x_i).
class ParamBlockImpl : public torch::nn::Module {
 public:
  explicit ParamBlockImpl(const std::vector<std::pair<std::string, std::vector<int64_t>>>& shapes) {
    for (const auto& [name, shape] : shapes) params.push_back(register_parameter(name, torch::empty(shape)));
  }
  at::Tensor forward(std::vector<at::Tensor> inputs) { return terms(params, inputs, 0); }

  static at::Tensor terms(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& inputs, size_t first) {
    at::Tensor total;
    for (size_t i = 0; i < params.size(); ++i) {
      auto term = (torch::tanh(params[i]) * inputs.at(first + i)).sum();
      total = total.defined() ? total + term : term;
    }
    return total;
  }
  std::vector<at::Tensor> params;
};
TORCH_MODULE(ParamBlock);

/// Shapes that shard unevenly at world 128 (the reference's list): block0
/// and block1 are units, b2 belongs to the root.
class UnevenShapesImpl : public torch::nn::Module {
 public:
  UnevenShapesImpl() {
    block0 = register_module("block0", ParamBlock(std::vector<std::pair<std::string, std::vector<int64_t>>>{
                                           {"w0", {17, 257}}, {"b0", {17}}, {"w1", {64, 312}}, {"b1", {64}}}));
    block1 = register_module("block1", ParamBlock(std::vector<std::pair<std::string, std::vector<int64_t>>>{
                                           {"w2", {64, 64}}, {"w3", {512, 64}}, {"w4", {64, 297}}}));
    b2 = register_parameter("b2", torch::empty({256}));
  }
  /// Inputs: block0's four, block1's three, then b2's.
  at::Tensor forward(std::vector<at::Tensor> inputs) {
    auto first = fsdp::call(block0, std::vector<at::Tensor>(inputs.begin(), inputs.begin() + 4));
    auto second = fsdp::call(block1, std::vector<at::Tensor>(inputs.begin() + 4, inputs.begin() + 7));
    return first + second + ParamBlockImpl::terms({b2}, inputs, 7);
  }
  static std::vector<std::vector<int64_t>> input_shapes() {
    return {{17, 257}, {17}, {64, 312}, {64}, {64, 64}, {512, 64}, {64, 297}, {256}};
  }
  ParamBlock block0{nullptr};
  ParamBlock block1{nullptr};
  at::Tensor b2;
};
TORCH_MODULE(UnevenShapes);

// ---------------------------------------------------------------------------
// Scenarios.

class ScenarioBase : public Scenario {
 public:
  ScenarioBase(std::string name, const ScenarioConfig& config) : name_(std::move(name)), config_(config) {}

  const std::string& name() const override { return name_; }
  std::shared_ptr<torch::nn::Module> module() override { return root_; }
  void shard(fsdp::Engine& engine, const ShardingSetup& setup) override {
    for (const auto& unit : units_) {
      fsdp::FullyShardOptions options = unit.rank_local ? setup.rank_local_options() : setup.options();
      options.reduce_scatter_unused_params = unit.reduce_scatter_unused_params;
      if (setup.adjust_unit_options) setup.adjust_unit_options(*unit.module, options);
      engine.fully_shard(unit.module, options);
    }
  }
  std::set<std::string> rank_local_params() const override { return rank_local_; }
  fsdp::WrapPolicyPtr wrap_policy() const override { return wrap_policy_; }
  int sharded_blocks() const override { return static_cast<int>(units_.size()) - 1; }

 protected:
  struct UnitSpec {
    std::shared_ptr<torch::nn::Module> module;
    bool rank_local = false;
    bool reduce_scatter_unused_params = false;  ///< ranks use different params of it
  };
  /// Units in fully_shard order: children first, the root last.
  void add_unit(std::shared_ptr<torch::nn::Module> module, bool rank_local = false,
                bool reduce_scatter_unused_params = false) {
    units_.push_back({std::move(module), rank_local, reduce_scatter_unused_params});
  }
  at::Generator input_generator(int rank, int step) const {
    return generator(derive_seed(config_.seed, kInputStream, static_cast<uint64_t>(rank), static_cast<uint64_t>(step)));
  }
  at::Generator init_generator() const { return generator(derive_seed(config_.seed, kInitStream)); }
  /// randn(4, mlp_dim): the batch of the dense models (double_linear).
  std::vector<at::Tensor> dense_input(int rank, int step) const {
    return {at::randn({4, config_.mlp_dim}, input_generator(rank, step))};
  }
  /// randn(4, mlp_dim): the rank's fixed batch of the models that fit a
  /// teacher (mlp_stack, rank_divergent), the same every step.
  at::Tensor fixed_batch(int rank) const { return at::randn({4, config_.mlp_dim}, input_generator(rank, 0)); }
  /// x T, T = randn(mlp_dim, out) / sqrt(mlp_dim): a fixed linear teacher,
  /// the same on every rank.
  at::Tensor teacher(const at::Tensor& x, int64_t out) const {
    const int64_t dim = config_.mlp_dim;
    at::Generator gen = generator(derive_seed(config_.seed, kTargetStream, static_cast<uint64_t>(out)));
    at::Tensor weights = at::randn({dim, out}, gen);
    return at::matmul(x, weights / std::sqrt(static_cast<double>(dim)));
  }

  std::string name_;
  ScenarioConfig config_;
  std::shared_ptr<torch::nn::Module> root_;
  std::vector<UnitSpec> units_;
  std::set<std::string> rank_local_;
  fsdp::WrapPolicyPtr wrap_policy_;
};

// Picks the modules at the given paths from the root.
fsdp::WrapPolicyPtr wrap_paths(std::set<std::string> fqns) {
  return fsdp::wrap_modules_where(
      [fqns = std::move(fqns)](const torch::nn::Module&, const std::string& fqn) { return fqns.count(fqn) > 0; });
}

/// Models rooted at NestedRoot: input rand(4, 8), loss out.sum().
class NestedScenario : public ScenarioBase {
 public:
  using ScenarioBase::ScenarioBase;
  std::vector<at::Tensor> input(int rank, int step) override { return {at::rand({4, 8}, input_generator(rank, step))}; }
  at::Tensor forward_loss(const std::vector<at::Tensor>& input) override {
    return fsdp::call(model_, at::Tensor(input.at(0))).sum();
  }

 protected:
  NestedRoot model_;  // default-constructed: an empty `module` chain
};

/// Seq(Linear(8,4), Shard(Seq(Shard(Linear(4,16)), Linear(16,16))),
/// Shard(Linear(16,4)), Linear(4,8)), root sharded; with always_wrap every
/// submodule is a unit.
class NestedWrappedScenario : public NestedScenario {
 public:
  NestedWrappedScenario(const ScenarioConfig& config, bool always_wrap)
      : NestedScenario(always_wrap ? "always_wrap_nested" : "nested_wrapped", config) {
    auto& chain = model_->module;
    // checkpoint_units: the units' own Linears (module.1's is module.1.1)
    // run checkpointed; the root's (module.0, module.3) do not.
    auto linear = [&](Chain& parent, const std::string& name, int64_t in, int64_t out, bool checkpointed) {
      if (checkpointed) return std::shared_ptr<torch::nn::Module>(parent->add(name, CheckpointedLinear(in, out)).ptr());
      return std::shared_ptr<torch::nn::Module>(parent->add(name, torch::nn::Linear(in, out)).ptr());
    };
    const bool ckpt = config.checkpoint_units;
    auto first = linear(chain, "0", 8, 4, false);
    auto inner = chain->add("1", Chain());
    auto inner_first = linear(inner, "0", 4, 16, ckpt);
    auto inner_second = linear(inner, "1", 16, 16, ckpt);
    auto third = linear(chain, "2", 16, 4, ckpt);
    auto last = linear(chain, "3", 4, 8, false);
    root_ = model_.ptr();
    init_parameters(*root_, init_generator());
    wrap_policy_ = always_wrap
                       ? fsdp::wrap_modules_where([](const torch::nn::Module&, const std::string&) { return true; })
                       : wrap_paths({"module.1.0", "module.1", "module.2"});
    if (always_wrap) {
      add_unit(first);
      add_unit(inner_first);
      add_unit(inner_second);
      add_unit(inner.ptr());
      add_unit(third);
      add_unit(last);
      add_unit(chain.ptr());
    } else {
      add_unit(inner_first);
      add_unit(inner.ptr());
      add_unit(third);
    }
    add_unit(root_);
  }
};

/// Like nested_wrapped, with the last two Linears in one unit; everything is
/// frozen except that unit's second Linear (module.2.1).
class NonUniformReqGradScenario : public NestedScenario {
 public:
  explicit NonUniformReqGradScenario(const ScenarioConfig& config) : NestedScenario("non_uniform_req_grad", config) {
    auto& chain = model_->module;
    chain->add("0", torch::nn::Linear(8, 4));
    auto inner = chain->add("1", Chain());
    auto inner_first = inner->add("0", torch::nn::Linear(4, 16));
    inner->add("1", torch::nn::Linear(16, 16));
    auto tail = chain->add("2", Chain());
    tail->add("0", torch::nn::Linear(16, 4));
    tail->add("1", torch::nn::Linear(4, 8));
    root_ = model_.ptr();
    init_parameters(*root_, init_generator());
    for (auto& item : root_->named_parameters()) {
      if (!starts_with(item.key(), "module.2.1.")) item.value().set_requires_grad(false);
    }
    add_unit(inner_first.ptr());
    add_unit(inner.ptr());
    add_unit(tail.ptr());
    wrap_policy_ = wrap_paths({"module.1.0", "module.1", "module.2"});
    add_unit(root_);
  }
};

/// Seq(Linear(8,12), shared Linear(12,23), expert Linear(23,12),
/// Linear(12,8)); the expert is seeded per rank and sharded over its own
/// rank only; `shared` and the root over the strategy's groups.
class MixtureOfExpertsScenario : public NestedScenario {
 public:
  MixtureOfExpertsScenario(const ScenarioConfig& config, int rank) : NestedScenario("mixture_of_experts", config) {
    auto& chain = model_->module;
    chain->add("0", torch::nn::Linear(8, 12));
    auto shared = chain->add("1", torch::nn::Linear(12, 23));
    auto expert = chain->add("2", torch::nn::Linear(23, 12));
    chain->add("3", torch::nn::Linear(12, 8));
    root_ = model_.ptr();
    const std::string expert_prefix = "module.2.";
    init_parameters(*root_, init_generator(), [&](const std::string& fqn) { return !starts_with(fqn, expert_prefix); });
    // The reference seeds the expert 42 + rank.
    init_parameters(*root_, generator(derive_seed(config.seed, kExpertStream, 42 + static_cast<uint64_t>(rank))),
                    [&](const std::string& fqn) { return starts_with(fqn, expert_prefix); });
    for (auto& item : expert->named_parameters()) rank_local_.insert(expert_prefix + item.key());
    add_unit(shared.ptr());
    add_unit(expert.ptr(), /*rank_local=*/true);
    add_unit(root_);
  }
};

/// Embedding(23,16) -> 2 encoder + 2 decoder layers (d_model 16, 2 heads,
/// ff 8, no dropout) -> output_proj tied to the embedding; each layer a unit,
/// the root owns embedding, final norms, output_proj and the BatchNorm.
class TransformerScenario : public ScenarioBase {
 public:
  explicit TransformerScenario(const ScenarioConfig& config)
      : ScenarioBase("transformer", config), model_(config.batch_norm) {
    root_ = model_.ptr();
    init_parameters(*root_, init_generator());
    for (auto& layer : model_->transformer->encoder->layers) add_unit(layer.ptr());
    for (auto& layer : model_->transformer->decoder->layers) add_unit(layer.ptr());
    add_unit(root_);
    // By type name: the string form (the layers are LibTorch's classes).
    wrap_policy_ =
        fsdp::wrap_module_types({"torch::nn::TransformerEncoderLayerImpl", "torch::nn::TransformerDecoderLayerImpl"});
  }
  /// src (6, 2) and tgt (4, 2) token ids: arange shifted per (rank, step).
  std::vector<at::Tensor> input(int rank, int step) override {
    const int64_t vocab = TransformerWithSharedParamsImpl::kVocab;
    auto shifts = at::randint(vocab, {2}, input_generator(rank, step), at::kLong);
    auto src = (at::arange(12, at::kLong).view({6, 2}) + shifts[0]).remainder(vocab);
    auto tgt = (at::arange(8, at::kLong).view({4, 2}) + shifts[1]).remainder(vocab);
    return {src, tgt};
  }
  at::Tensor forward_loss(const std::vector<at::Tensor>& input) override {
    auto out = fsdp::call(model_, at::Tensor(input.at(0)), at::Tensor(input.at(1)));
    return torch::nn::functional::cross_entropy(
        out.view({-1, out.size(-1)}), input.at(1).view({-1}),
        torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
  }

 private:
  TransformerWithSharedParams model_;
};

/// lin1 and lin2 each a unit, the (param-less) root a unit; input randn(4,
/// dim), loss the sum of every returned output.
class DoubleLinearScenario : public ScenarioBase {
 public:
  explicit DoubleLinearScenario(const ScenarioConfig& config)
      : ScenarioBase("double_linear", config), model_(config.mlp_dim, config.use_second_linear) {
    root_ = model_.ptr();
    init_parameters(*root_, init_generator());
    add_unit(model_->lin1.ptr());
    add_unit(model_->lin2.ptr());
    add_unit(root_);
    wrap_policy_ = fsdp::wrap_module_types<torch::nn::LinearImpl>();
  }
  std::vector<at::Tensor> input(int rank, int step) override { return dense_input(rank, step); }
  at::Tensor forward_loss(const std::vector<at::Tensor>& input) override {
    at::Tensor loss;
    for (const auto& out : fsdp::call(model_, at::Tensor(input.at(0)))) {
      loss = loss.defined() ? loss + out.sum() : out.sum();
    }
    return loss;
  }

 private:
  DoubleLinear model_;
};

/// Seq(MLP(d, 3), MLP(d, 4), MLP(d, 3), LayerNorm(d)): each MLP a unit; the
/// LayerNorm gives the root params of its own (as the reference's
/// sequence-parallel variant), so the root unit gathers too (B + 1).
///
/// A real objective, so `fsdpsim run`'s loss falls and levels off: each rank
/// regresses its own fixed batch x = randn(4, d) (the same every step) onto a
/// fixed teacher's outputs tanh(x T), T = randn(d, d) / sqrt(d) the same on
/// every rank; loss = mse_loss (the mean).
class MlpStackScenario : public ScenarioBase {
 public:
  explicit MlpStackScenario(const ScenarioConfig& config) : ScenarioBase("mlp_stack", config) {
    const int64_t dim = config.mlp_dim;
    auto first = model_->add("0", Mlp(dim, 3, config.mlp_buffer, config.checkpoint_units));
    auto second = model_->add("1", Mlp(dim, 4, config.mlp_buffer, config.checkpoint_units));
    auto third = model_->add("2", Mlp(dim, 3, config.mlp_buffer, config.checkpoint_units));
    model_->add("3", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})));
    root_ = model_.ptr();
    auto gen = init_generator();
    init_parameters(*root_, gen);
    if (config.mlp_buffer) {
      torch::NoGradGuard no_grad;
      for (auto& buffer : root_->buffers()) buffer.copy_(at::randn(buffer.sizes(), gen));
    }
    add_unit(first.ptr());
    add_unit(second.ptr());
    add_unit(third.ptr());
    add_unit(root_);
    wrap_policy_ = fsdp::wrap_module_types<MlpImpl>();
  }
  /// {x, target}: the rank's fixed batch and the teacher's outputs for it.
  std::vector<at::Tensor> input(int rank, int /*step*/) override {
    at::Tensor x = fixed_batch(rank);
    return {x, at::tanh(teacher(x, config_.mlp_dim))};
  }
  at::Tensor forward_loss(const std::vector<at::Tensor>& input) override {
    return torch::nn::functional::mse_loss(fsdp::call(model_, at::Tensor(input.at(0))), input.at(1));
  }

 private:
  Chain model_;
};

/// trunk and block units, the root owns head; block.branch runs on even
/// ranks only. Classification: the rank's fixed batch x = randn(4, dim), its
/// labels the argmax of a fixed linear teacher's 3 outputs; loss
/// cross_entropy (the mean).
class RankDivergentScenario : public ScenarioBase {
 public:
  RankDivergentScenario(const ScenarioConfig& config, int rank)
      : ScenarioBase("rank_divergent", config), model_(config.mlp_dim, rank % 2 == 0) {
    root_ = model_.ptr();
    init_parameters(*root_, init_generator());
    add_unit(model_->trunk.ptr());
    // The branch runs on even ranks only: zeros from the others (FSDP2's
    // set_reduce_scatter_unused_params), or the reduce-scatters would differ.
    add_unit(model_->block.ptr(), /*rank_local=*/false, /*reduce_scatter_unused_params=*/true);
    add_unit(root_);
    // No wrap policy: the block unit takes other options than the rest.
  }
  /// {x, labels}.
  std::vector<at::Tensor> input(int rank, int /*step*/) override {
    at::Tensor x = fixed_batch(rank);
    return {x, teacher(x, 3).argmax(1)};
  }
  at::Tensor forward_loss(const std::vector<at::Tensor>& input) override {
    return torch::nn::functional::cross_entropy(fsdp::call(model_, at::Tensor(input.at(0))), input.at(1));
  }

 private:
  RankDivergent model_;
};

class UnevenShapesScenario : public ScenarioBase {
 public:
  explicit UnevenShapesScenario(const ScenarioConfig& config) : ScenarioBase("uneven_shapes", config) {
    root_ = model_.ptr();
    init_parameters(*root_, init_generator());
    add_unit(model_->block0.ptr());
    add_unit(model_->block1.ptr());
    add_unit(root_);
    wrap_policy_ = fsdp::wrap_module_types<ParamBlockImpl>();
  }
  std::vector<at::Tensor> input(int rank, int step) override {
    auto gen = input_generator(rank, step);
    std::vector<at::Tensor> inputs;
    for (const auto& shape : UnevenShapesImpl::input_shapes()) inputs.push_back(at::randn(shape, gen));
    return inputs;
  }
  at::Tensor forward_loss(const std::vector<at::Tensor>& input) override {
    return fsdp::call(model_, std::vector<at::Tensor>(input));
  }

 private:
  UnevenShapes model_;
};

}  // namespace

std::vector<std::string> scenario_names() {
  return {"nested_wrapped", "always_wrap_nested", "transformer",   "mixture_of_experts", "non_uniform_req_grad",
          "double_linear",  "mlp_stack",          "uneven_shapes", "rank_divergent"};
}

std::unique_ptr<Scenario> make_scenario(const ScenarioConfig& config, int rank) {
  const std::string& name = config.name;
  if (config.checkpoint_units && name != "nested_wrapped" && name != "mlp_stack") {
    throw std::invalid_argument("scenario '" + name +
                                "': checkpoint_units is supported by mlp_stack and nested_wrapped only");
  }
  if (name == "nested_wrapped") return std::make_unique<NestedWrappedScenario>(config, /*always_wrap=*/false);
  if (name == "always_wrap_nested") return std::make_unique<NestedWrappedScenario>(config, /*always_wrap=*/true);
  if (name == "transformer") return std::make_unique<TransformerScenario>(config);
  if (name == "mixture_of_experts") return std::make_unique<MixtureOfExpertsScenario>(config, rank);
  if (name == "non_uniform_req_grad") return std::make_unique<NonUniformReqGradScenario>(config);
  if (name == "double_linear") return std::make_unique<DoubleLinearScenario>(config);
  if (name == "mlp_stack") return std::make_unique<MlpStackScenario>(config);
  if (name == "uneven_shapes") return std::make_unique<UnevenShapesScenario>(config);
  if (name == "rank_divergent") return std::make_unique<RankDivergentScenario>(config, rank);
  std::string known;
  for (const auto& candidate : scenario_names()) known += (known.empty() ? "" : ", ") + candidate;
  throw std::invalid_argument("unknown scenario '" + name + "'; known: " + known);
}

}  // namespace fsdpsim::scenarios
