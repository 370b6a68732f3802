// Our side of the full state dict interop check (state_dict_interop.py): on
// fake thread ranks, the scenario's model sharded (FullShard) by the trainer
//   1. writes the full state dict of its own init (rank 0) to INIT_OUT, which
//      Python loads into the twin with load_state_dict(strict=True);
//   2. loads IN (Python's torch.save(twin.state_dict())) strictly into the
//      sharded model, checks the gathered dict equals IN bitwise, and writes
//      it (rank 0) to ROUNDTRIP_OUT, which Python compares with its own.
//
//   fsdpsim_state_dict_interop SCENARIO WORLD IN INIT_OUT ROUNDTRIP_OUT

#include <torch/torch.h>

#include <iostream>
#include <stdexcept>
#include <string>

#include "fsdp/state_dict.h"
#include "scenarios/trainer.h"
#include "sim/world.h"

namespace {

using namespace fsdpsim;

void run_rank(sim::RankContext& ctx, const std::string& scenario, const std::string& in, const std::string& init_out,
              const std::string& roundtrip_out) {
  scenarios::TrainConfig config;
  config.scenario.name = scenario;
  scenarios::Trainer trainer(config, ctx.rank(), ctx.world_group());
  fsdp::Engine& engine = *trainer.engine();
  const torch::nn::Module& root = *trainer.scenario().module();
  fsdp::StateDictOptions full;
  full.full_state_dict = true;
  full.cpu_offload = true;  // rank 0 only, as PyTorch
  const fsdp::StateDict init = fsdp::get_model_state_dict(engine, root, full);
  if (ctx.rank() == 0) fsdp::save_full_state_dict(init_out, fsdp::to_tensors(init));

  const fsdp::TensorDict python = fsdp::load_full_state_dict(in);
  fsdp::set_model_state_dict(engine, root, fsdp::from_tensors(python), full);
  const fsdp::StateDict loaded = fsdp::get_model_state_dict(engine, root, full);
  if (ctx.rank() != 0) return;
  const fsdp::TensorDict tensors = fsdp::to_tensors(loaded);
  for (const auto& item : python) {
    if (!torch::equal(tensors[item.key()], item.value().to(tensors[item.key()].dtype()))) {
      throw std::runtime_error("'" + item.key() + "' gathered after the load differs from the file");
    }
  }
  fsdp::save_full_state_dict(roundtrip_out, tensors);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 6) {
    std::cerr << "usage: fsdpsim_state_dict_interop SCENARIO WORLD IN INIT_OUT ROUNDTRIP_OUT\n";
    return 2;
  }
  try {
    sim::WorldOptions options;
    options.world_size = std::stoi(argv[2]);
    sim::World world(options);
    world.run([&](sim::RankContext& ctx) { run_rank(ctx, argv[1], argv[3], argv[4], argv[5]); }).throw_if_failed();
  } catch (const std::exception& e) {
    std::cerr << "fsdpsim_state_dict_interop: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
