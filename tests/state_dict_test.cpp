// Model and optimiser state dicts (fsdp/state_dict.h): the sharded dict
// against the unsharded model's rows (and its storage against the params'),
// the full dict against the unsharded model on every strategy, rank 0 only,
// strict errors, in-place loads, broadcast from rank 0, the full state dict
// file, and resume: 6 steps == 3 steps, state dict, fresh world, 3 steps
// (bitwise: the same arithmetic runs on the same numbers).

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "fsdp/distributed_checkpoint.h"
#include "fsdp/state_dict.h"
#include "scenarios/trainer.h"
#include "small_net.h"

namespace fsdpsim::fsdp {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using testnet::SmallNet;

using Case = testnet::WorldCase;
using testnet::world_of;

StateDictOptions full_options() {
  StateDictOptions options;
  options.full_state_dict = true;
  return options;
}

// A SmallNet with other values than make_small_net()'s (seed 12).
std::shared_ptr<SmallNet> other_net() {
  static std::mutex seed_mutex;
  std::lock_guard<std::mutex> lock(seed_mutex);
  torch::manual_seed(12);
  return std::make_shared<SmallNet>();
}

TensorDict named_tensors(torch::nn::Module& module) {
  TensorDict out;
  for (const auto& item : module.named_parameters()) out.insert(item.key(), item.value().detach().clone());
  return out;
}

class StateDictLayout : public ::testing::TestWithParam<Case> {};

// Sharded: keys in the unsharded model's order, each value this rank's rows
// of the unsharded param, in the param's own storage, with the global shape
// and every rank's chunk.
TEST_P(StateDictLayout, ShardedDictIsTheRanksRowsInTheParamsStorage) {
  const Case c = GetParam();
  auto reference = testnet::make_small_net();
  testnet::run_world_case(c, [&](sim::RankContext& ctx) {
    testnet::ShardedSmallNet net(ctx, c);
    auto& [model, engine, place] = net;
    const StateDict state = get_model_state_dict(engine, *model);
    std::vector<std::string> expected_keys, keys = state.keys();
    for (const auto& item : reference->named_parameters()) expected_keys.push_back(item.key());
    EXPECT_EQ(keys, expected_keys);
    const auto params = testnet::named_params(*model);
    for (const auto& item : reference->named_parameters()) {
      const ShardedTensor& value = state[item.key()];
      const at::Tensor rows = testnet::shard_rows(item.value(), place.rank, place.size);
      EXPECT_TRUE(torch::equal(value.local, rows)) << item.key();
      EXPECT_EQ(value.local.data_ptr(), params.at(item.key()).data_ptr()) << item.key() << ": a copy, not the shard";
      EXPECT_EQ(value.global_shape, item.value().sizes().vec()) << item.key();
      const int64_t chunk = (item.value().size(0) + place.size - 1) / place.size;
      EXPECT_EQ(value.offsets[0], std::min<int64_t>(place.rank * chunk, item.value().size(0))) << item.key();
      ASSERT_EQ(value.chunks.size(), static_cast<size_t>(place.size)) << item.key();
      int64_t rows_total = 0;
      for (const auto& chunk_meta : value.chunks) rows_total += chunk_meta.sizes[0];
      EXPECT_EQ(rows_total, item.value().size(0)) << item.key() << ": the chunks cover dim 0 once";
    }
  });
}

// Full: every rank gathers the unsharded model's tensors bitwise.
TEST_P(StateDictLayout, FullDictEqualsTheUnshardedModel) {
  const Case c = GetParam();
  auto reference = testnet::make_small_net();
  testnet::run_world_case(c, [&](sim::RankContext& ctx) {
    testnet::ShardedSmallNet net(ctx, c);
    auto& [model, engine, place] = net;
    const TensorDict full = to_tensors(get_model_state_dict(engine, *model, full_options()));
    ASSERT_EQ(full.size(), reference->named_parameters().size());
    for (const auto& item : reference->named_parameters()) {
      EXPECT_TRUE(torch::equal(full[item.key()], item.value())) << item.key() << " on rank " << ctx.rank();
    }
  });
}

// Loads write into the params in place (same TensorImpl): a full dict of
// other values lands as each rank's rows; a sharded dict round-trips.
TEST_P(StateDictLayout, LoadsWriteInPlace) {
  const Case c = GetParam();
  auto other = other_net();
  testnet::run_world_case(c, [&](sim::RankContext& ctx) {
    testnet::ShardedSmallNet net(ctx, c);
    auto& [model, engine, place] = net;
    std::map<std::string, const c10::TensorImpl*> identity;
    for (const auto& [name, p] : testnet::named_params(*model)) identity[name] = p.unsafeGetTensorImpl();
    set_model_state_dict(engine, *model, from_tensors(named_tensors(*other)), full_options());
    for (const auto& item : other->named_parameters()) {
      const at::Tensor param = testnet::named_params(*model).at(item.key());
      EXPECT_EQ(param.unsafeGetTensorImpl(), identity[item.key()]) << item.key();
      EXPECT_TRUE(torch::equal(param, testnet::shard_rows(item.value(), place.rank, place.size))) << item.key();
    }
    // Sharded: every value + 1, loaded back.
    StateDict shifted = get_model_state_dict(engine, *model);
    for (auto& item : shifted) item.value().local = item.value().local + 1;
    set_model_state_dict(engine, *model, shifted);
    for (const auto& item : other->named_parameters()) {
      const at::Tensor param = testnet::named_params(*model).at(item.key());
      EXPECT_TRUE(torch::equal(param, testnet::shard_rows(item.value(), place.rank, place.size) + 1)) << item.key();
    }
    // The model keeps training from the loaded values.
    sim::backward(fsdp::call(model, testnet::small_input(ctx.rank(), 0)).sum());
    EXPECT_TRUE(model->a->weight.grad().defined());
  });
}

// broadcast_from_rank0: only rank 0 holds the dict; every rank ends with its
// rows of it.
TEST_P(StateDictLayout, BroadcastFromRank0LoadsEveryRank) {
  const Case c = GetParam();
  auto other = other_net();
  testnet::run_world_case(c, [&](sim::RankContext& ctx) {
    testnet::ShardedSmallNet net(ctx, c);
    auto& [model, engine, place] = net;
    StateDictOptions options = full_options();
    options.broadcast_from_rank0 = true;
    const StateDict mine = ctx.rank() == 0 ? from_tensors(named_tensors(*other)) : StateDict();
    set_model_state_dict(engine, *model, mine, options);
    for (const auto& item : other->named_parameters()) {
      const at::Tensor param = testnet::named_params(*model).at(item.key());
      EXPECT_TRUE(torch::equal(param, testnet::shard_rows(item.value(), place.rank, place.size)))
          << item.key() << " on rank " << ctx.rank();
    }
  });
}

INSTANTIATE_TEST_SUITE_P(All, StateDictLayout,
                         ::testing::Values(Case{sim::RankKind::Threads, 3}, Case{sim::RankKind::Fibers, 3},
                                           Case{sim::RankKind::Threads, 5},
                                           Case{sim::RankKind::Threads, 3, ShardingStrategy::ShardGradOp},
                                           Case{sim::RankKind::Fibers, 3, ShardingStrategy::NoShard},
                                           Case{sim::RankKind::Threads, 4, ShardingStrategy::HybridShard, 2},
                                           Case{sim::RankKind::Fibers, 4, ShardingStrategy::HybridShard, 2}),
                         testnet::world_case_name);

void run_world(int world_size, sim::RankKind kind, const std::function<void(sim::RankContext&)>& body) {
  sim::WorldOptions options;
  options.world_size = world_size;
  options.rank_kind = kind;
  sim::World world(options);
  auto result = world.run(body);
  ASSERT_TRUE(result.ok()) << result.error_report();
}

TEST(StateDictOptionsTest, FullWithCpuOffloadIsRank0OnlyUnlessSaidOtherwise) {
  run_world(3, sim::RankKind::Threads, [](sim::RankContext& ctx) {
    auto model = testnet::make_small_net();
    Engine engine;
    testnet::shard_small_net(engine, *model, ctx.world_group(), ShardingStrategy::FullShard);
    StateDictOptions options = full_options();
    options.cpu_offload = true;
    const StateDict rank0 = get_model_state_dict(engine, *model, options);
    EXPECT_EQ(rank0.size(), ctx.rank() == 0 ? 8U : 0U) << "rank " << ctx.rank();
    for (const auto& item : rank0) EXPECT_TRUE(item.value().local.device().is_cpu());
    options.rank0_only = false;
    EXPECT_EQ(get_model_state_dict(engine, *model, options).size(), 8U) << "rank " << ctx.rank();
    options.cpu_offload = false;
    options.rank0_only = true;
    EXPECT_EQ(get_model_state_dict(engine, *model, options).size(), ctx.rank() == 0 ? 8U : 0U);
  });
}

TEST(StateDictStrict, ErrorsNameTheKeyTheShapesAndTheFix) {
  run_world(3, sim::RankKind::Threads, [](sim::RankContext& ctx) {
    auto model = testnet::make_small_net();
    Engine engine;
    testnet::shard_small_net(engine, *model, ctx.world_group(), ShardingStrategy::FullShard);
    const TensorDict full = to_tensors(get_model_state_dict(engine, *model, full_options()));
    const at::Tensor before = model->b->weight.detach().clone();

    TensorDict missing;
    for (const auto& item : full) {
      if (item.key() != "b.bias") missing.insert(item.key(), item.value() + 1);
    }
    try {
      set_model_state_dict(engine, *model, from_tensors(missing), full_options());
      ADD_FAILURE() << "a missing key loaded";
    } catch (const std::invalid_argument& e) {
      EXPECT_THAT(e.what(), HasSubstr("missing key 'b.bias'"));
      EXPECT_THAT(e.what(), HasSubstr("strict = false"));
    }
    EXPECT_TRUE(torch::equal(model->b->weight, before)) << "a refused load wrote nothing";
    StateDictOptions lax = full_options();
    lax.strict = false;
    set_model_state_dict(engine, *model, from_tensors(missing), lax);
    EXPECT_TRUE(torch::equal(model->b->weight, before + 1)) << "not strict: the others load";

    TensorDict unexpected = full;
    unexpected.insert("b.scale", at::ones({7}));
    EXPECT_THAT([&] { set_model_state_dict(engine, *model, from_tensors(unexpected), full_options()); },
                ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("unexpected key 'b.scale'")));

    TensorDict wrong_shape = full;
    wrong_shape["head.weight"] = at::zeros({3, 7});
    EXPECT_THAT([&] { set_model_state_dict(engine, *model, from_tensors(wrong_shape), full_options()); },
                ::testing::ThrowsMessage<std::invalid_argument>(
                    ::testing::AllOf(HasSubstr("'head.weight'"), HasSubstr("[3, 7]"), HasSubstr("[2, 7]"))));

    StateDict moved = get_model_state_dict(engine, *model);
    moved["a.weight"].offsets[0] += 1;
    EXPECT_THAT([&] { set_model_state_dict(engine, *model, moved); },
                ::testing::ThrowsMessage<std::invalid_argument>(
                    ::testing::AllOf(HasSubstr("'a.weight' is sharded differently"), HasSubstr("full_state_dict"))));
    EXPECT_THAT([&] { to_tensors(get_model_state_dict(engine, *model)); },
                ::testing::ThrowsMessage<std::invalid_argument>(HasSubstr("is a shard")));
  });
}

// A bad dict on rank 0 fails every rank (none waits for a broadcast that
// never comes).
TEST(StateDictStrict, BroadcastFromRank0FailsEveryRankOnABadDict) {
  sim::WorldOptions options;
  options.world_size = 3;
  options.rank_kind = sim::RankKind::Fibers;
  sim::World world(options);
  auto result = world.run([](sim::RankContext& ctx) {
    auto model = testnet::make_small_net();
    Engine engine(testnet::fiber_safe_engine_options());
    testnet::shard_small_net(engine, *model, ctx.world_group(), ShardingStrategy::FullShard);
    TensorDict bad = named_tensors(*testnet::make_small_net());
    bad["a.bias"] = at::zeros({6});
    StateDictOptions load = full_options();
    load.broadcast_from_rank0 = true;
    set_model_state_dict(engine, *model, ctx.rank() == 0 ? from_tensors(bad) : StateDict(), load);
  });
  ASSERT_FALSE(result.ok());
  for (int r = 0; r < 3; ++r) EXPECT_FALSE(result.ranks[r].ok) << "rank " << r << " went on";
  EXPECT_THAT(result.ranks[0].error, AllOf(HasSubstr("'a.bias'"), HasSubstr("[6]"), HasSubstr("[7]")));
}

TEST(StateDictStrict, AGatheredUnitIsRefused) {
  run_world(2, sim::RankKind::Threads, [](sim::RankContext& ctx) {
    auto model = testnet::make_small_net();
    Engine engine;
    testnet::shard_small_net(engine, *model, ctx.world_group(), ShardingStrategy::FullShard);
    engine.unshard_all();
    EXPECT_THAT([&] { get_model_state_dict(engine, *model); },
                ::testing::ThrowsMessage<std::runtime_error>(HasSubstr("reshard_all()")));
    engine.reshard_all();
    EXPECT_EQ(get_model_state_dict(engine, *model).size(), 8U);
  });
}

TEST(StateDictFile, SaveAndLoadRoundTripKeysInOrderAndValues) {
  const std::string path =
      (std::filesystem::temp_directory_path() / ("fsdpsim_state_dict_" + std::to_string(::getpid()) + ".pt")).string();
  TensorDict tensors;
  tensors.insert("z.weight", at::randn({3, 2}));
  tensors.insert("a.bias", at::arange(5, at::kDouble));
  tensors.insert("bn.num_batches_tracked", at::scalar_tensor(7, at::kLong));
  save_full_state_dict(path, tensors);
  const TensorDict loaded = load_full_state_dict(path);
  std::filesystem::remove(path);
  EXPECT_EQ(loaded.keys(), tensors.keys());
  for (const auto& item : tensors) {
    EXPECT_TRUE(torch::equal(loaded[item.key()], item.value())) << item.key();
    EXPECT_EQ(loaded[item.key()].dtype(), item.value().dtype()) << item.key();
  }
  EXPECT_THAT([] { load_full_state_dict("/nonexistent/fsdpsim.pt"); },
              ::testing::ThrowsMessage<std::runtime_error>(HasSubstr("/nonexistent/fsdpsim.pt")));
}

TEST(StateDictFile, TruncatedOrForeignFilesFailNamingThePath) {
  const auto dir = std::filesystem::temp_directory_path();
  const std::string good = (dir / ("fsdpsim_sd_good_" + std::to_string(::getpid()) + ".pt")).string();
  const std::string bad = (dir / ("fsdpsim_sd_bad_" + std::to_string(::getpid()) + ".pt")).string();
  TensorDict tensors;
  tensors.insert("w", at::randn({64, 64}).to(at::kBFloat16));
  save_full_state_dict(good, tensors);
  EXPECT_TRUE(torch::equal(load_full_state_dict(good)["w"], tensors["w"]));
  const auto size = std::filesystem::file_size(good);
  for (const size_t keep : {size / 2, size_t{100}, size_t{0}}) {
    std::filesystem::copy_file(good, bad, std::filesystem::copy_options::overwrite_existing);
    std::filesystem::resize_file(bad, keep);
    EXPECT_THAT([&] { load_full_state_dict(bad); }, ::testing::ThrowsMessage<std::runtime_error>(HasSubstr(bad)))
        << "kept " << keep << " of " << size << " bytes";
  }
  {
    std::ofstream out(bad, std::ios::binary | std::ios::trunc);
    out << "not a zip archive";
  }
  EXPECT_THAT([&] { load_full_state_dict(bad); },
              ::testing::ThrowsMessage<std::runtime_error>(HasSubstr("not a torch.save zip archive")));
  std::filesystem::remove(good);
  std::filesystem::remove(bad);
}

// ---------------------------------------------------------------------------
// Resume.

struct ResumeCase {
  sim::RankKind kind;
  int world;
  ShardingStrategy strategy;
  int replicate;
  scenarios::OptimizerKind optimizer;
  bool full;               // full state dicts (else sharded)
  bool broadcast = false;  // loaded with broadcast_from_rank0: only rank 0 passes its dicts
};

scenarios::TrainConfig resume_config(const ResumeCase& c) {
  scenarios::TrainConfig config;
  config.scenario.name = "nested_wrapped";
  config.strategy = c.strategy;
  config.replicate_size = c.replicate;
  config.optimizer = c.optimizer;
  config.zero_grad_set_to_none_alternate = true;
  return config;
}

struct Saved {
  StateDict model;
  OptimizerStateDict optim;
};

// Every rank's full model dict after training steps [0, until) (from a fresh
// model or, with `load`, from the rank's saved dicts at step `from`).
std::vector<TensorDict> train(const ResumeCase& c, int from, int until, std::vector<Saved>* save,
                              const std::vector<Saved>* load) {
  std::vector<TensorDict> finals(c.world);
  run_world(c.world, c.kind, [&](sim::RankContext& ctx) {
    at::set_num_threads(1);
    scenarios::Trainer trainer(resume_config(c), ctx.rank(), ctx.world_group());
    auto& root = *trainer.scenario().module();
    StateDictOptions options;
    options.full_state_dict = c.full;
    if (load != nullptr) {
      options.broadcast_from_rank0 = c.broadcast;
      const Saved none = Saved();
      const Saved& mine = c.broadcast && ctx.rank() != 0 ? none : (*load)[ctx.rank()];
      set_model_state_dict(*trainer.engine(), root, mine.model, options);
      set_optimizer_state_dict(*trainer.engine(), root, trainer.optimizer(), mine.optim, options);
      options.broadcast_from_rank0 = false;
    }
    for (int step = from; step < until; ++step) trainer.step(step);
    if (save != nullptr) {
      (*save)[ctx.rank()] = Saved{get_model_state_dict(*trainer.engine(), root, options),
                                  get_optimizer_state_dict(*trainer.engine(), root, trainer.optimizer(), options)};
    }
    finals[ctx.rank()] = to_tensors(get_model_state_dict(*trainer.engine(), root, full_options()));
  });
  return finals;
}

class StateDictResume : public ::testing::TestWithParam<ResumeCase> {};

TEST_P(StateDictResume, SixStepsEqualThreeSaveLoadIntoAFreshWorldThree) {
  const ResumeCase c = GetParam();
  const std::vector<TensorDict> straight = train(c, 0, 6, nullptr, nullptr);
  std::vector<Saved> saved(c.world);
  train(c, 0, 3, &saved, nullptr);
  const std::vector<TensorDict> resumed = train(c, 3, 6, nullptr, &saved);
  ASSERT_FALSE(straight[0].is_empty());
  for (int r = 0; r < c.world; ++r) {
    for (const auto& item : straight[r]) {
      EXPECT_TRUE(torch::equal(resumed[r][item.key()], item.value())) << item.key() << " on rank " << r;
    }
  }
  const auto& state = saved[0].optim.state;
  ASSERT_FALSE(state.is_empty()) << "the optimiser had state to save";
  const auto& first = state.begin()->value();
  EXPECT_TRUE(first.contains(c.optimizer == scenarios::OptimizerKind::SGD ? "momentum_buffer" : "exp_avg"));
  if (c.optimizer == scenarios::OptimizerKind::Adam) {
    EXPECT_EQ(first["step"].local.item<double>(), 3.0);
  }
}

std::vector<ResumeCase> resume_cases() {
  using scenarios::OptimizerKind;
  std::vector<ResumeCase> cases;
  for (bool full : {false, true}) {
    for (OptimizerKind optim : {OptimizerKind::SGD, OptimizerKind::Adam}) {
      cases.push_back({sim::RankKind::Threads, 3, ShardingStrategy::FullShard, 1, optim, full});
    }
    cases.push_back({sim::RankKind::Fibers, 3, ShardingStrategy::FullShard, 1, OptimizerKind::Adam, full});
    cases.push_back({sim::RankKind::Threads, 3, ShardingStrategy::ShardGradOp, 1, OptimizerKind::Adam, full});
    cases.push_back({sim::RankKind::Threads, 2, ShardingStrategy::NoShard, 1, OptimizerKind::SGD, full});
    cases.push_back({sim::RankKind::Fibers, 4, ShardingStrategy::HybridShard, 2, OptimizerKind::Adam, full});
  }
  cases.push_back({sim::RankKind::Threads, 3, ShardingStrategy::FullShard, 1, OptimizerKind::Adam, true, true});
  cases.push_back({sim::RankKind::Fibers, 4, ShardingStrategy::HybridShard, 2, OptimizerKind::SGD, true, true});
  cases.push_back({sim::RankKind::Threads, 2, ShardingStrategy::NoShard, 1, OptimizerKind::Adam, true, true});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(All, StateDictResume, ::testing::ValuesIn(resume_cases()),
                         [](const ::testing::TestParamInfo<ResumeCase>& info) {
                           const ResumeCase& c = info.param;
                           return std::string(sim::to_string(c.kind)) + "_w" + std::to_string(c.world) + "_" +
                                  to_string(c.strategy) + "_" + scenarios::to_string(c.optimizer) +
                                  (c.full ? "_full" : "_sharded") + (c.broadcast ? "_broadcast" : "");
                         });

// A full dict saved at world 2 loads at world 3 (resharded): the gathered
// model and optimiser state equal what was saved, and training on from it
// is bitwise the same whether world 3 shards (FullShard: each rank slices its
// rows) or replicates (NoShard: no slicing at all).
TEST(StateDictReshard, FullDictLoadsAtAnotherWorldSize) {
  const ResumeCase saver{sim::RankKind::Threads,         2,   ShardingStrategy::FullShard, 1,
                         scenarios::OptimizerKind::Adam, true};
  std::vector<Saved> saved(2);
  train(saver, 0, 3, &saved, nullptr);
  std::vector<Saved> at3(3, saved[0]);
  ResumeCase sharded = saver;
  sharded.world = 3;
  ResumeCase replicated = sharded;
  replicated.strategy = ShardingStrategy::NoShard;
  std::vector<Saved> reloaded(3);
  const auto by_rows = train(sharded, 3, 3, &reloaded, &at3);
  for (const auto& item : to_tensors(saved[0].model)) {
    EXPECT_TRUE(torch::equal(by_rows[2][item.key()], item.value())) << item.key();
  }
  for (const auto& item : saved[0].optim.state) {
    for (const auto& value : item.value()) {
      EXPECT_TRUE(torch::equal(reloaded[1].optim.state[item.key()][value.key()].local, value.value().local))
          << item.key() << "." << value.key();
    }
  }
  const auto sharded_run = train(sharded, 3, 6, nullptr, &at3);
  const auto replicated_run = train(replicated, 3, 6, nullptr, &at3);
  for (const auto& item : replicated_run[0]) {
    EXPECT_TRUE(torch::equal(sharded_run[1][item.key()], item.value())) << item.key();
  }
}

// ---------------------------------------------------------------------------
// Distributed checkpoints (fsdp/distributed_checkpoint.h): the same resume
// through torch.distributed.checkpoint's format on disk.

std::filesystem::path checkpoint_dir(const std::string& name) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("fsdpsim_dcp_resume_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  return dir;
}

struct DcpRun {
  std::vector<TensorDict> model;  // per rank, full, after the last step
  std::vector<TensorDict> optim;  // per rank, full: "<fqn>.<name>"
  int64_t loaded_step = -1;
};

// Steps [from, until) of `c`; `load`: first load_checkpoint from it; `save`:
// afterwards save_checkpoint to it (step = until).
DcpRun train_dcp(const ResumeCase& c, int from, int until, const std::filesystem::path* load,
                 const std::filesystem::path* save) {
  DcpRun run;
  run.model.resize(c.world);
  run.optim.resize(c.world);
  std::mutex mutex;
  run_world(c.world, c.kind, [&](sim::RankContext& ctx) {
    at::set_num_threads(1);
    scenarios::Trainer trainer(resume_config(c), ctx.rank(), ctx.world_group());
    auto& root = *trainer.scenario().module();
    if (load != nullptr) {
      const int64_t step = load_checkpoint(*load, *trainer.engine(), root, &trainer.optimizer());
      std::lock_guard<std::mutex> lock(mutex);
      run.loaded_step = step;
    }
    for (int step = from; step < until; ++step) trainer.step(step);
    if (save != nullptr) {
      save_checkpoint(*save, *trainer.engine(), root, &trainer.optimizer(),
                      dcp::process_group_coordinator(*ctx.world_group()), until);
    }
    run.model[ctx.rank()] = to_tensors(get_model_state_dict(*trainer.engine(), root, full_options()));
    const OptimizerStateDict optim =
        get_optimizer_state_dict(*trainer.engine(), root, trainer.optimizer(), full_options());
    for (const auto& param : optim.state) {
      for (const auto& state : param.value()) {
        run.optim[ctx.rank()].insert(param.key() + "." + state.key(), state.value().local);
      }
    }
  });
  return run;
}

class DcpResume : public ::testing::TestWithParam<ResumeCase> {};

TEST_P(DcpResume, SixStepsEqualThreeSaveLoadIntoAFreshWorldThree) {
  const ResumeCase c = GetParam();
  const auto dir = checkpoint_dir(to_string(c.strategy));
  const DcpRun straight = train_dcp(c, 0, 6, nullptr, nullptr);
  train_dcp(c, 0, 3, nullptr, &dir);
  ASSERT_TRUE(std::filesystem::exists(dir / ".metadata"));
  const DcpRun resumed = train_dcp(c, 3, 6, &dir, nullptr);
  std::filesystem::remove_all(dir);
  EXPECT_EQ(resumed.loaded_step, 3);
  for (int r = 0; r < c.world; ++r) {
    ASSERT_FALSE(straight.model[r].is_empty());
    for (const auto& item : straight.model[r]) {
      EXPECT_TRUE(torch::equal(resumed.model[r][item.key()], item.value())) << item.key() << " on rank " << r;
    }
    ASSERT_FALSE(straight.optim[r].is_empty());
    for (const auto& item : straight.optim[r]) {
      EXPECT_TRUE(torch::equal(resumed.optim[r][item.key()], item.value())) << item.key() << " on rank " << r;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(All, DcpResume,
                         ::testing::Values(ResumeCase{sim::RankKind::Threads, 3, ShardingStrategy::FullShard, 1,
                                                      scenarios::OptimizerKind::Adam, false},
                                           ResumeCase{sim::RankKind::Fibers, 3, ShardingStrategy::ShardGradOp, 1,
                                                      scenarios::OptimizerKind::SGD, false},
                                           ResumeCase{sim::RankKind::Fibers, 4, ShardingStrategy::HybridShard, 2,
                                                      scenarios::OptimizerKind::Adam, false}),
                         [](const ::testing::TestParamInfo<ResumeCase>& info) {
                           return std::string(sim::to_string(info.param.kind)) + "_w" +
                                  std::to_string(info.param.world) + "_" + to_string(info.param.strategy) + "_" +
                                  scenarios::to_string(info.param.optimizer);
                         });

// Saved at world 2 (FullShard), loaded at world 3 (dcp::load reshards): the
// model and Adam state equal what was saved, and training on is bitwise the
// same whether world 3 shards (FullShard) or replicates (NoShard).
TEST(DcpReshard, ACheckpointOfWorldTwoLoadsAtWorldThree) {
  const ResumeCase saver{sim::RankKind::Threads,         2,    ShardingStrategy::FullShard, 1,
                         scenarios::OptimizerKind::Adam, false};
  const auto dir = checkpoint_dir("reshard");
  const DcpRun saved = train_dcp(saver, 0, 3, nullptr, &dir);
  ResumeCase sharded = saver;
  sharded.world = 3;
  ResumeCase replicated = sharded;
  replicated.strategy = ShardingStrategy::NoShard;
  const DcpRun loaded = train_dcp(sharded, 3, 3, &dir, nullptr);
  for (const auto& item : saved.model[0]) {
    EXPECT_TRUE(torch::equal(loaded.model[2][item.key()], item.value())) << item.key();
  }
  ASSERT_FALSE(saved.optim[0].is_empty());
  for (const auto& item : saved.optim[0]) {
    EXPECT_TRUE(torch::equal(loaded.optim[1][item.key()], item.value())) << item.key();
  }
  const DcpRun by_rows = train_dcp(sharded, 3, 6, &dir, nullptr);
  const DcpRun replicas = train_dcp(replicated, 3, 6, &dir, nullptr);
  std::filesystem::remove_all(dir);
  for (const auto& item : replicas.model[0]) {
    EXPECT_TRUE(torch::equal(by_rows.model[1][item.key()], item.value())) << item.key();
  }
}

}  // namespace
}  // namespace fsdpsim::fsdp
