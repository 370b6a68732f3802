#include "fsdp/distributed_checkpoint.h"

#include <ATen/ATen.h>

#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "fsdp/state_dict.h"

namespace fsdpsim::fsdp {
namespace {

constexpr const char* kModelPrefix = "model.";
constexpr const char* kOptimPrefix = "optim.state.";
constexpr const char* kStepKey = "fsdpsim.step";

dcp::Entry entry_of(const std::string& key, const ShardedTensor& value) {
  dcp::Entry entry;
  entry.fqn = key;
  entry.dtype = value.local.scalar_type();
  entry.global_shape = value.global_shape;
  entry.chunks.push_back(dcp::Chunk{value.offsets, value.local});
  return entry;
}

// The optimiser state key "optim.state.<fqn>.<name>" split at its last dot.
std::pair<std::string, std::string> split_optim_key(const std::string& key) {
  const std::string rest = key.substr(std::string(kOptimPrefix).size());
  const size_t dot = rest.rfind('.');
  if (dot == std::string::npos || dot == 0) throw std::runtime_error("checkpoint key '" + key + "' names no state");
  return {rest.substr(0, dot), rest.substr(dot + 1)};
}

// A chunk to load one optimiser state tensor into: the param's own layout
// when the state has the param's shape, else whole (Adam's 0-dim step).
ShardedTensor state_slot(const ShardedTensor& param, const dcp::SavedTensor& saved) {
  if (saved.global_shape == param.global_shape) {
    ShardedTensor slot = param;
    slot.local = at::empty(param.local.sizes(), param.local.options().dtype(saved.dtype));
    return slot;
  }
  return ShardedTensor::whole(at::empty(saved.global_shape, at::TensorOptions().dtype(saved.dtype)));
}

}  // namespace

int64_t save_checkpoint(const std::filesystem::path& dir, Engine& engine, const torch::nn::Module& root,
                        const torch::optim::Optimizer* optimizer, const dcp::Coordinator& coordinator, int64_t step) {
  std::vector<dcp::Entry> entries;
  const StateDict model = get_model_state_dict(engine, root);
  for (const auto& item : model) entries.push_back(entry_of(kModelPrefix + item.key(), item.value()));
  if (optimizer != nullptr) {
    const OptimizerStateDict optim = get_optimizer_state_dict(engine, root, *optimizer);
    for (const auto& param : optim.state) {
      for (const auto& state : param.value()) {
        entries.push_back(entry_of(kOptimPrefix + param.key() + "." + state.key(), state.value()));
      }
    }
  }
  entries.push_back(entry_of(kStepKey, ShardedTensor::whole(at::scalar_tensor(step, at::kLong))));
  return dcp::save(dir, entries, coordinator).bytes_written;
}

int64_t load_checkpoint(const std::filesystem::path& dir, Engine& engine, const torch::nn::Module& root,
                        torch::optim::Optimizer* optimizer) {
  const dcp::CheckpointMetadata saved = dcp::read_metadata(dir);
  // The model's sharded dict shares the params' storage: loading into its
  // chunks writes the params in place; set_model_state_dict then checks it.
  StateDict model = get_model_state_dict(engine, root);
  std::vector<dcp::Entry> entries;
  for (const auto& item : model) entries.push_back(entry_of(kModelPrefix + item.key(), item.value()));
  // Optimiser state: a slot per saved key, shaped as its param's shard.
  std::vector<std::pair<std::string, std::string>> optim_keys;
  std::vector<ShardedTensor> optim_slots;
  if (optimizer != nullptr) {
    for (const auto& [key, tensor] : saved.tensors) {
      if (key.rfind(kOptimPrefix, 0) != 0) continue;
      auto [fqn, name] = split_optim_key(key);
      const ShardedTensor* param = model.find(fqn);
      if (param == nullptr)
        throw std::runtime_error("checkpoint key '" + key + "': the model has no param '" + fqn + "'");
      optim_keys.emplace_back(fqn, name);
      optim_slots.push_back(state_slot(*param, tensor));
      entries.push_back(entry_of(key, optim_slots.back()));
    }
  }
  ShardedTensor step = ShardedTensor::whole(at::zeros({}, at::kLong));
  entries.push_back(entry_of(kStepKey, step));
  dcp::load(dir, entries);
  set_model_state_dict(engine, root, model);
  if (optimizer != nullptr) {
    OptimizerStateDict optim = get_optimizer_state_dict(engine, root, *optimizer);  // its groups, as built
    optim.state.clear();
    for (size_t i = 0; i < optim_keys.size(); ++i) {
      const auto& [fqn, name] = optim_keys[i];
      if (optim.state.find(fqn) == nullptr) optim.state.insert(fqn, torch::OrderedDict<std::string, ShardedTensor>());
      optim.state[fqn].insert(name, optim_slots[i]);
    }
    set_optimizer_state_dict(engine, root, *optimizer, optim);
  }
  return step.local.item<int64_t>();
}

}  // namespace fsdpsim::fsdp
