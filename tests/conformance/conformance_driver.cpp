// Our side of the FSDP2 conformance suite (tests/conformance/README.md).
//
// For one case it writes, into --out DIR:
//   init_rank{r}.pt   the initial params (full, by FQN, each tied TensorImpl
//                     once) and the inputs of every step, from
//                     scenarios::make_scenario: the single source of the
//                     numbers, which fsdp2_reference.py loads;
//   ours_rank{r}.json losses, every collective (op, group's global ranks,
//                     dtype, element counts, reduce op) and every EngineHooks
//                     event of every step, and each param's shard placement;
//   ours_rank{r}.pt   each param's shard and grad shard after every step.
// It runs fsdp::Engine on fake thread ranks (exact, rank-order reductions),
// with the same optimiser as FSDP2's side: SGD lr 1e-2 momentum 0.9, grads
// set to none before every step.
//
// Modes mp_bf16 / mp_bf16_bf16: raf_on with mixed precision (param_dtype
// bf16, reduce_dtype fp32 / bf16) on every unit. The train family (cases.py
// TRAIN_MODES): ckpt (every non-root unit's own computation under
// fsdp::checkpoint), clip (fsdp::clip_grad_norm_ before every step; the
// norms go to the JSON), mp_accum (mp_bf16's policy with accum's pattern),
// hsdp_noar (HybridShard, set_requires_all_reduce(false) on all but the last
// micro-batch).
//
//   fsdpsim_conformance_driver --out DIR --scenario S --world W --mode M
//       [--replicate R] [--steps N] [--forward-prefetch UNIT=T1,T2]...
//       [--backward-prefetch UNIT=T1,T2]...

#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/torch.h>

#include <any>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "backends/comm_hooks.h"
#include "fsdp/all_gather_extension.h"
#include "fsdp/clip_grad.h"
#include "fsdp/fully_shard.h"
#include "scenarios/models.h"
#include "sim/fiber_autograd.h"
#include "sim/world.h"

namespace {

using fsdpsim::CollectiveDesc;
using fsdpsim::CollectiveOp;
using nlohmann::json;
namespace fsdp = fsdpsim::fsdp;
namespace scenarios = fsdpsim::scenarios;
namespace sim = fsdpsim::sim;

struct Options {
  std::string out;
  std::string scenario;
  std::string mode;  // raf_on, raf_off, hsdp, prefetch, accum, mp_*, ckpt, clip, mp_accum, ext_bf16
  int world = 2;
  int replicate = 1;
  int steps = 3;
  std::vector<std::pair<std::string, std::vector<std::string>>> forward_prefetch;
  std::vector<std::pair<std::string, std::vector<std::string>>> backward_prefetch;
};

std::pair<std::string, std::vector<std::string>> parse_list(const std::string& text) {
  const auto eq = text.find('=');
  if (eq == std::string::npos) throw std::invalid_argument("expected UNIT=T1,T2, got '" + text + "'");
  std::pair<std::string, std::vector<std::string>> result{text.substr(0, eq), {}};
  std::stringstream rest(text.substr(eq + 1));
  std::string item;
  while (std::getline(rest, item, ',')) result.second.push_back(item);
  return result;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) throw std::invalid_argument("flag " + flag + " needs a value");
    const std::string value = argv[++i];
    if (flag == "--out")
      o.out = value;
    else if (flag == "--scenario")
      o.scenario = value;
    else if (flag == "--mode")
      o.mode = value;
    else if (flag == "--world")
      o.world = std::stoi(value);
    else if (flag == "--replicate")
      o.replicate = std::stoi(value);
    else if (flag == "--steps")
      o.steps = std::stoi(value);
    else if (flag == "--forward-prefetch")
      o.forward_prefetch.push_back(parse_list(value));
    else if (flag == "--backward-prefetch")
      o.backward_prefetch.push_back(parse_list(value));
    else
      throw std::invalid_argument("unknown flag " + flag);
  }
  if (o.out.empty() || o.scenario.empty() || o.mode.empty()) {
    throw std::invalid_argument("--out, --scenario and --mode are required");
  }
  static const std::set<std::string> kModes = {"raf_on", "raf_off",  "hsdp", "prefetch", "mp_bf16",   "mp_bf16_bf16",
                                               "accum",  "mp_accum", "ckpt", "clip",     "hsdp_noar", "ext_bf16"};
  if (kModes.count(o.mode) == 0) throw std::invalid_argument("unknown mode " + o.mode);
  return o;
}

// accum: each step runs kAccumMicro micro-batches, the first ones without
// gradient sync and with params kept gathered after backward, the last with
// both back on (PyTorch's test_gradient_accumulation); inputs are indexed by
// micro-batch (step * kAccumMicro + m).
constexpr int kAccumMicro = 3;
bool accumulates(const Options& o) { return o.mode == "accum" || o.mode == "mp_accum" || o.mode == "hsdp_noar"; }
int micro_batches(const Options& o) { return accumulates(o) ? kAccumMicro : 1; }
// clip: small enough that every step clips (cases.py CLIP_MAX_NORM).
constexpr double kClipMaxNorm = 0.05;

// clip: a param that no rank's forward uses, in a unit whose other params
// are used (cases.py UNUSED_PARAM): FSDP2 leaves its grad None and
// reduce-scatters none of it, clip_grad_norm_ skips it; ours must too.
void add_unused_param(const Options& o, torch::nn::Module& root) {
  if (o.mode != "clip") return;
  const std::string unit = o.scenario == "mlp_stack" ? "1" : "module.2";
  for (const auto& item : root.named_modules()) {
    if (item.key() == unit) item.value()->register_parameter("spare", at::linspace(-1.0, 1.0, 6));
  }
}

scenarios::ScenarioConfig scenario_config(const Options& o) {
  scenarios::ScenarioConfig config;
  config.name = o.scenario;
  config.checkpoint_units = o.mode == "ckpt";
  return config;
}

fsdp::ShardingStrategy strategy_of(const Options& o) {
  if (o.mode == "raf_off") return fsdp::ShardingStrategy::ShardGradOp;
  if (o.mode == "hsdp" || o.mode == "hsdp_noar") return fsdp::ShardingStrategy::HybridShard;
  return fsdp::ShardingStrategy::FullShard;
}

fsdp::MixedPrecisionPolicy mp_policy_of(const Options& o) {
  fsdp::MixedPrecisionPolicy mp;
  if (o.mode == "mp_bf16" || o.mode == "mp_bf16_bf16" || o.mode == "mp_accum") {
    mp.param_dtype = at::kBFloat16;
    mp.reduce_dtype = o.mode == "mp_bf16_bf16" ? at::kBFloat16 : at::kFloat;
  }
  return mp;
}

// ext_bf16: gathers a bf16 copy of the padded shard and upcasts it (FSDP2's
// side: fsdp2_reference.py Bf16GatherTensor). Stateless, so one object may
// serve every param of a rank.
class Bf16Gather : public fsdp::AllGatherExtension {
 public:
  fsdp::AllGatherInputs pre_all_gather(const at::Tensor&, const fsdp::AllGatherContext& context) override {
    return {{context.padded_shard.to(at::kBFloat16)}, {}};
  }
  at::Tensor post_all_gather(const std::vector<at::Tensor>& gathered, const std::any&, at::ScalarType param_dtype,
                             const std::optional<at::Tensor>& out) override {
    if (out) return out->copy_(gathered[0]);  // later gathers: in place
    return gathered[0].to(param_dtype, /*non_blocking=*/false, /*copy=*/true);
  }
};

// ext_bf16: every torch::nn::Linear weight of every unit but the root gets
// Bf16Gather (cases.py EXT_MODES); other modes leave the options alone.
void add_bf16_gathers(const Options& o, const torch::nn::Module* root, scenarios::ShardingSetup& setup) {
  if (o.mode != "ext_bf16") return;
  auto extension = std::make_shared<Bf16Gather>();
  setup.adjust_unit_options = [root, extension](const torch::nn::Module& unit, fsdp::FullyShardOptions& options) {
    if (&unit == root) return;
    for (const auto& item : unit.named_modules()) {
      if (dynamic_cast<const torch::nn::LinearImpl*>(item.value().get()) == nullptr) continue;
      const std::string prefix = item.key().empty() ? "" : item.key() + ".";
      options.all_gather_extensions[prefix + "weight"] = extension;
    }
  };
}

void write_file(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + path);
}

void save_tensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  c10::Dict<std::string, at::Tensor> dict;
  for (const auto& [key, value] : tensors) dict.insert(key, value.detach().contiguous());
  write_file(path, torch::pickle_save(c10::IValue(dict)));
}

/// Records each collective this rank issues while `on`.
/// One rank's timeline position, shared by its two recorders so collectives
/// and engine events can be ordered against each other.
struct Timeline {
  int64_t next = 0;
};

class RecordingCommHooks final : public fsdpsim::DefaultCommHooks {
 public:
  explicit RecordingCommHooks(std::shared_ptr<Timeline> timeline) : timeline_(std::move(timeline)) {}
  bool on = false;
  std::vector<std::vector<std::pair<int64_t, CollectiveDesc>>> steps;
  void before(const CollectiveDesc& desc) override {
    if (on) steps.back().emplace_back(timeline_->next++, desc);
  }

 private:
  std::shared_ptr<Timeline> timeline_;
};

class RecordingEngineHooks final : public fsdp::EngineHooks {
 public:
  explicit RecordingEngineHooks(std::shared_ptr<Timeline> timeline) : timeline_(std::move(timeline)) {}
  bool on = false;
  std::vector<json> steps;  // one array per step
  void on_unshard(const std::string& unit, fsdp::TrainingState s) override { add("unshard", unit, s); }
  void on_reshard(const std::string& unit, fsdp::TrainingState s) override { add("reshard", unit, s); }
  void on_pre_backward(const std::string& unit, fsdp::TrainingState s) override { add("pre_backward", unit, s); }
  void on_post_backward(const std::string& unit, fsdp::TrainingState s) override { add("post_backward", unit, s); }
  void on_final_callback(const std::string& unit, fsdp::TrainingState s) override { add("final_callback", unit, s); }
  void on_prefetch(const std::string& unit, const std::string& target, fsdp::TrainingState s) override {
    if (!on) return;
    steps.back().push_back({{"seq", timeline_->next++},
                            {"kind", "prefetch"},
                            {"unit", unit},
                            {"target", target},
                            {"state", fsdp::to_string(s)}});
  }

 private:
  void add(const char* kind, const std::string& unit, fsdp::TrainingState s) {
    if (on) {
      steps.back().push_back(
          {{"seq", timeline_->next++}, {"kind", kind}, {"unit", unit}, {"state", fsdp::to_string(s)}});
    }
  }
  std::shared_ptr<Timeline> timeline_;
};

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kByte: return "uint8";
    default: return c10::toString(t);
  }
}

void run_rank(const Options& o, sim::RankContext& ctx) {
  const int rank = ctx.rank();
  auto timeline = std::make_shared<Timeline>();
  auto comm = std::make_shared<RecordingCommHooks>(timeline);
  auto events = std::make_shared<RecordingEngineHooks>(timeline);
  fsdpsim::ProcessGroupPtr world = std::make_shared<fsdpsim::HookedProcessGroup>(ctx.world_group(), comm);
  auto setup = scenarios::make_sharding_setup(world, strategy_of(o), o.replicate);
  setup.mp_policy = mp_policy_of(o);
  std::map<std::string, std::vector<int>> group_ranks;
  for (const auto& group : {setup.world, setup.shard_group, setup.replicate_group, setup.self_group}) {
    if (group) group_ranks[group->name()] = group->global_ranks();
  }

  auto scenario = scenarios::make_scenario(scenario_config(o), rank);
  add_unused_param(o, *scenario->module());
  add_bf16_gathers(o, scenario->module().get(), setup);
  fsdp::EngineOptions engine_options;
  engine_options.queue_backward_callback = sim::queue_backward_callback;
  engine_options.hooks.push_back(events);
  fsdp::Engine engine(engine_options);
  scenario->shard(engine, setup);
  auto module = scenario->module();

  std::map<std::string, std::shared_ptr<torch::nn::Module>> modules;
  for (const auto& item : module->named_modules()) modules[item.key()] = item.value();
  auto module_at = [&](const std::string& fqn) {
    auto found = modules.find(fqn);
    if (found == modules.end()) throw std::invalid_argument("no module '" + fqn + "' in " + o.scenario);
    return found->second;
  };
  for (const auto& [unit, targets] : o.forward_prefetch) {
    std::vector<std::shared_ptr<torch::nn::Module>> list;
    for (const auto& t : targets) list.push_back(module_at(t));
    engine.set_forward_prefetch(module_at(unit), list);
  }
  for (const auto& [unit, targets] : o.backward_prefetch) {
    std::vector<std::shared_ptr<torch::nn::Module>> list;
    for (const auto& t : targets) list.push_back(module_at(t));
    engine.set_backward_prefetch(module_at(unit), list);
  }

  const auto named = scenarios::unique_named_parameters(*module);
  std::vector<at::Tensor> params;
  for (const auto& item : named) params.push_back(item.second);
  torch::optim::SGD optimizer(params, torch::optim::SGDOptions(1e-2).momentum(0.9));

  json losses = json::array();
  json norms = json::array();
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (int step = 0; step < o.steps; ++step) {
    comm->steps.emplace_back();
    events->steps.push_back(json::array());
    comm->on = events->on = true;
    for (auto& p : params) p.mutable_grad().reset();  // zero_grad(set_to_none=True)
    const int micro = micro_batches(o);
    std::vector<at::Tensor> step_losses;
    for (int m = 0; m < micro; ++m) {
      const bool last = m == micro - 1;
      if (o.mode == "hsdp_noar") {
        engine.set_requires_all_reduce(last);  // reduce-scatter every micro-batch, all-reduce the last
      } else if (accumulates(o)) {
        engine.set_requires_gradient_sync(last);
        engine.set_reshard_after_backward(last);
      }
      auto loss = scenario->forward_loss(scenario->input(rank, step * micro + m));
      sim::backward(loss);
      step_losses.push_back(loss);
    }
    if (o.mode == "clip") norms.push_back(fsdp::clip_grad_norm_(engine, kClipMaxNorm));
    optimizer.step();
    comm->on = events->on = false;
    for (const auto& loss : step_losses) losses.push_back(loss.item<double>());
    for (const auto& [fqn, param] : named) {
      // Copies now: the optimiser updates these tensors in place.
      tensors.emplace_back("step/" + std::to_string(step) + "/param/" + fqn, param.detach().clone());
      if (param.grad().defined()) {
        tensors.emplace_back("step/" + std::to_string(step) + "/grad/" + fqn, param.grad().detach().clone());
      }
    }
  }

  json placements = json::object();
  std::map<std::string, std::string> unit_of_param;
  for (const fsdp::Unit* unit : engine.units()) {
    const auto& group = unit->options().shard_group;
    for (const auto& fqn : unit->param_fqns()) {
      placements[fqn] = {{"index", group->rank()}, {"count", group->size()}, {"unit", unit->fqn()}};
    }
  }
  json collectives = json::array();
  for (const auto& step : comm->steps) {
    json list = json::array();
    for (const auto& [seq, d] : step) {
      auto found = group_ranks.find(d.group);
      json entry = {{"seq", seq},
                    {"op", fsdpsim::to_string(d.op)},
                    {"group", found == group_ranks.end() ? json(d.group) : json(found->second)},
                    {"group_name", d.group},
                    {"dtype", dtype_name(d.dtype)},
                    {"in_numel", d.input_numel()},
                    {"out_numel", d.output_numel()},
                    {"reduce_op", nullptr}};
      if (d.op == CollectiveOp::ReduceScatter || d.op == CollectiveOp::AllReduce) {
        entry["reduce_op"] = fsdpsim::to_string(d.reduce_op);
        if (d.predivide_factor != 1.0 || d.postdivide_factor != 1.0) {
          entry["predivide"] = d.predivide_factor;
          entry["postdivide"] = d.postdivide_factor;
        }
      }
      list.push_back(entry);
    }
    collectives.push_back(list);
  }
  json out = {{"rank", rank},
              {"torch", std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH)},
              {"losses", losses},
              {"norms", norms},
              {"collectives", collectives},
              {"events", events->steps},
              {"placements", placements}};
  std::ofstream(o.out + "/ours_rank" + std::to_string(rank) + ".json") << out.dump(1) << "\n";
  save_tensors(o.out + "/ours_rank" + std::to_string(rank) + ".pt", tensors);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options o = parse(argc, argv);
    at::set_num_threads(1);
    // The numbers both sides start from.
    for (int r = 0; r < o.world; ++r) {
      auto scenario = scenarios::make_scenario(scenario_config(o), r);
      add_unused_param(o, *scenario->module());
      std::vector<std::pair<std::string, at::Tensor>> init;
      for (const auto& [fqn, param] : scenarios::unique_named_parameters(*scenario->module())) {
        init.emplace_back("param/" + fqn, param);
      }
      for (int step = 0; step < o.steps * micro_batches(o); ++step) {
        const auto inputs = scenario->input(r, step);
        for (size_t i = 0; i < inputs.size(); ++i) {
          init.emplace_back("input/" + std::to_string(step) + "/" + std::to_string(i), inputs[i]);
        }
      }
      save_tensors(o.out + "/init_rank" + std::to_string(r) + ".pt", init);
    }

    sim::WorldOptions options;
    options.world_size = o.world;
    options.rank_kind = sim::RankKind::Threads;
    options.backend = sim::CommBackend::Fake;
    sim::World world(options);
    auto result = world.run([&](sim::RankContext& ctx) { run_rank(o, ctx); });
    if (!result.ok()) {
      std::cerr << "conformance_driver: " << result.error_report() << "\n";
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "conformance_driver: " << e.what() << "\n";
    return 2;
  }
}
