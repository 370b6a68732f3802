// `fsdpsim run` and `fsdpsim list`: RunOptions from the command line (CLI11).

#include <CLI/CLI.hpp>
#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <map>
#include <memory>

#include "scenarios/models.h"
#include "tools/cli.h"
#include "tools/format_util.h"
#include "tools/runner.h"

namespace fsdpsim::tools {

namespace {

int64_t parse_int(const std::string& flag, const std::string& value, int64_t min, int64_t max) {
  return parse_integer<UsageError>(flag, value, min, max);
}

double parse_ms(const std::string& flag, const std::string& value) {
  return parse_number<UsageError>(flag, value, 0, 3.6e6, "milliseconds");
}

template <typename Enum>
Enum parse_choice(const std::string& flag, const std::string& value, const std::map<std::string, Enum>& choices) {
  auto it = choices.find(value);
  if (it != choices.end()) return it->second;
  std::string names;
  for (const auto& [name, unused] : choices) names += (names.empty() ? "" : ", ") + name;
  throw UsageError(flag + " must be one of " + names + ", got '" + value + "'");
}

// --compute-time measured|zero|fixed:US
void parse_compute_time(const std::string& text, RunOptions& options) {
  const std::string fixed_prefix = "fixed:";
  if (text.rfind(fixed_prefix, 0) == 0) {
    const double us =
        parse_number<UsageError>("--compute-time fixed:US", text.substr(fixed_prefix.size()), 0, 3.6e9, "microseconds");
    options.world.compute_time = sim::ComputeTime::Fixed;
    options.world.fixed_compute_ns = static_cast<int64_t>(us * 1000);
    return;
  }
  options.world.compute_time = parse_choice<sim::ComputeTime>(
      "--compute-time", text, {{"measured", sim::ComputeTime::Measured}, {"zero", sim::ComputeTime::Zero}});
}

// What the options below fill besides RunOptions.
struct RunParse {
  RunOptions options;
  int mesh_shards = 0;
};

void bind_world_options(CLI::App& app, RunParse& p) {
  RunOptions& o = p.options;
  add_value(app, "--scenario", "NAME", "test model (default mlp_stack; 'fsdpsim list')",
            [&o](const std::string& v) { o.scenario.name = v; });
  add_value(app, "--backend", "fake|gloo", "in-memory fake or Gloo over loopback (default fake)",
            [&o](const std::string& v) {
              o.world.backend = parse_choice<sim::CommBackend>(
                  "--backend", v, {{"fake", sim::CommBackend::Fake}, {"gloo", sim::CommBackend::Gloo}});
            });
  add_value(app, "--ranks", "threads|fibers|processes", "how ranks run (processes: Gloo only; default threads)",
            [&o](const std::string& v) {
              o.processes = v == "processes";
              if (!o.processes) {
                o.world.rank_kind = parse_choice<sim::RankKind>(
                    "--ranks", v, {{"threads", sim::RankKind::Threads}, {"fibers", sim::RankKind::Fibers}});
              }
            });
  add_value(
      app, "--world-size", "N", "ranks (default 4; threads up to 8192, fibers up to 1048576)",
      [&o](const std::string& v) { o.world.world_size = static_cast<int>(parse_int("--world-size", v, 1, 1 << 20)); });
  add_value(app, "--mesh", "RxS", "hybrid_shard: R replicas of S shards (R*S = world size)",
            [&p](const std::string& v) {
              const size_t x = v.find('x');
              if (x == std::string::npos) throw UsageError("--mesh needs RxS, got '" + v + "'");
              p.options.replicate_size = static_cast<int>(parse_int("--mesh", v.substr(0, x), 1, 8192));
              p.mesh_shards = static_cast<int>(parse_int("--mesh", v.substr(x + 1), 1, 8192));
            });
  add_value(
      app, "--schedule", "round-robin|seeded-random", "fiber schedule (seeded by --seed; fibers only)",
      [&o](const std::string& v) {
        o.world.schedule = parse_choice<sim::SchedulePolicy>(
            "--schedule", v,
            {{"round-robin", sim::SchedulePolicy::RoundRobin}, {"seeded-random", sim::SchedulePolicy::SeededRandom}});
      });
  app.add_flag("--simulated-time", o.world.simulated_time, "fibers: simulated clock, predicted step time");
  add_value(app, "--cost-model", "PRESET", "simulated time: the cost model preset (default fake-2core)",
            [&o](const std::string& v) { o.cost_model = v; });
  add_value(app, "--compute-time", "measured|zero|fixed:US",
            "simulated time: what compute costs (default measured); zero or fixed:US (per slice of rank code) make a "
            "seeded run's times and traces reproducible bit for bit",
            [&o](const std::string& v) { parse_compute_time(v, o); });
  add_value(app, "--op-costs", "FILE",
            "simulated time: charge each op its cost in FILE (written by --record-op-costs) instead of measuring",
            [&o](const std::string& v) {
              o.op_costs_path = v;
              o.world.compute_time = sim::ComputeTime::OpCosts;
            });
  add_value(app, "--record-op-costs", "FILE",
            "simulated time, measured compute: save every op's measured cost (by name and input shapes) to FILE",
            [&o](const std::string& v) { o.record_op_costs_path = v; });
  app.add_flag("--data-free", o.data_free,
               "params, activations and grads on the meta device (shapes only): predict the step time at scale "
               "(needs --ranks fibers --simulated-time and --op-costs or --compute-time fixed:US|zero)");
  add_value(app, "--representative-ranks", "auto|R,R,...",
            "data-free: run one rank per class of shard shapes (auto: where any param's shard size changes, plus 0 "
            "and N-1) or the listed global ranks, each standing in for the ranks like it",
            [&o](const std::string& v) {
              if (v.empty()) throw UsageError("--representative-ranks needs auto or a list of ranks, e.g. 0,5,7");
              o.representative_ranks = v;
            });
  app.add_flag("--no-trace", o.no_trace, "keep and write no trace (large worlds)");
  add_value(app, "--fiber-stack-kib", "N", "stack of each fiber rank in KiB (default 512)", [&o](const std::string& v) {
    o.world.fiber_stack_bytes = static_cast<size_t>(parse_int("--fiber-stack-kib", v, 64, 1 << 20)) * 1024;
  });
  add_value(app, "--fiber-stacks", "guarded|pooled",
            "fiber stacks: one mapping each with a guard page (default; about 32000 fibers at most), or carved from "
            "one mapping (any number; an overflow is caught by a canary when the rank ends)",
            [&o](const std::string& v) {
              o.world.fiber_stacks = parse_choice<sim::FiberStacks>(
                  "--fiber-stacks", v, {{"guarded", sim::FiberStacks::Guarded}, {"pooled", sim::FiberStacks::Pooled}});
            });
  add_value(app, "--timeout", "S",
            "collective timeout in seconds (default 60); process ranks: also the launcher's grace for the other ranks "
            "after one fails",
            [&o](const std::string& v) {
              o.world.collective_timeout = std::chrono::milliseconds(
                  static_cast<int64_t>(parse_number<UsageError>("--timeout", v, 0.001, 86400, "seconds") * 1000));
            });
}

void bind_training_options(CLI::App& app, RunOptions& o) {
  add_value(app, "--strategy", "full_shard|shard_grad_op|no_shard|hybrid_shard",
            "sharding strategy (default full_shard)", [&o](const std::string& v) {
              o.strategy =
                  parse_choice<fsdp::ShardingStrategy>("--strategy", v,
                                                       {{"full_shard", fsdp::ShardingStrategy::FullShard},
                                                        {"shard_grad_op", fsdp::ShardingStrategy::ShardGradOp},
                                                        {"no_shard", fsdp::ShardingStrategy::NoShard},
                                                        {"hybrid_shard", fsdp::ShardingStrategy::HybridShard}});
            });
  add_value(app, "--prefetch", "backward_pre|backward_post|none", "backward prefetch (default backward_pre)",
            [&o](const std::string& v) {
              o.backward_prefetch =
                  parse_choice<fsdp::BackwardPrefetch>("--prefetch", v,
                                                       {{"backward_pre", fsdp::BackwardPrefetch::BackwardPre},
                                                        {"backward_post", fsdp::BackwardPrefetch::BackwardPost},
                                                        {"none", fsdp::BackwardPrefetch::None}});
            });
  app.add_flag("--forward-prefetch", o.forward_prefetch, "implicit forward prefetch");
  add_value(app, "--steps", "N", "training steps (default 40)",
            [&o](const std::string& v) { o.steps = static_cast<int>(parse_int("--steps", v, 1, 1000000)); });
  add_value(app, "--seed", "N", "seed of the data and the fiber schedule (default 0)", [&o](const std::string& v) {
    o.scenario.seed = static_cast<uint64_t>(parse_int("--seed", v, 0, INT64_MAX));
  });
  add_value(app, "--optimizer", "sgd|adam", "optimiser (default sgd)", [&o](const std::string& v) {
    o.optimizer = parse_choice<scenarios::OptimizerKind>(
        "--optimizer", v, {{"sgd", scenarios::OptimizerKind::SGD}, {"adam", scenarios::OptimizerKind::Adam}});
  });
  add_value(app, "--mlp-dim", "N", "mlp_stack: width (default 64)",
            [&o](const std::string& v) { o.scenario.mlp_dim = parse_int("--mlp-dim", v, 1, 1 << 16); });
  add_value(app, "--trace", "PATH",
            "Chrome trace (default fsdpsim-trace.json); PATH.jsonl too, streamed as the run goes (each record "
            "written once final, so memory holds only what is in flight; the summary prints the peak), the "
            "Chrome trace made from it at the end",
            [&o](const std::string& v) { o.trace_path = v; });
  add_value(
      app, "--heartbeat", "S",
      "fake backend: every S seconds of a run, where each rank is (grouped ranks, a few lines at any world "
      "size), so a long step shows progress (default 30; 0: off)",
      [&o](const std::string& v) { o.heartbeat_s = parse_number<UsageError>("--heartbeat", v, 0, 86400, "seconds"); });
  app.add_flag("--check-parity", o.check_parity, "also run the unsharded reference and compare every step");
  add_value(app, "--resume", "DIR",
            "load the checkpoint in DIR (torch.distributed.checkpoint format; any world size or strategy) and "
            "train --steps more from its step",
            [&o](const std::string& v) { o.resume_dir = v; });
  add_value(app, "--save", "DIR", "after training, save a checkpoint (model, optimiser, step) to DIR",
            [&o](const std::string& v) { o.save_dir = v; });
}

void bind_delay_options(CLI::App& app, RunOptions& o) {
  auto delay = [&app](const std::string& name, const std::string& help, std::function<void(double)> set) {
    add_value(app, name, "MS", help, [name, set](const std::string& v) { set(parse_ms(name, v)); });
  };
  delay("--delay-reduce-scatter", "sleep before every reduce-scatter",
        [&o](double ms) { o.delays.before_reduce_scatter = ms_to_ns(ms); });
  delay("--delay-all-gather", "sleep before every all-gather",
        [&o](double ms) { o.delays.before_all_gather = ms_to_ns(ms); });
  delay("--delay-after-all-gather", "sleep after every all-gather",
        [&o](double ms) { o.delays.after_all_gather = ms_to_ns(ms); });
  add_value(app, "--delay-rank", "R", "the comm delays above on rank R only", [&o](const std::string& v) {
    o.delays.only_rank = static_cast<int>(parse_int("--delay-rank", v, 0, 8191));
  });
  add_value(app, "--straggler", "R:MS", "rank R sleeps MS before every collective", [&o](const std::string& v) {
    const size_t colon = v.find(':');
    if (colon == std::string::npos) throw UsageError("--straggler needs RANK:MS, got '" + v + "'");
    o.delays.straggler_rank = static_cast<int>(parse_int("--straggler", v.substr(0, colon), 0, 8191));
    o.delays.straggler_delay = ms_to_ns(parse_ms("--straggler", v.substr(colon + 1)));
  });
  delay("--delay-after-loss", "sleep after the loss", [&o](double ms) { o.delay_after_loss_ms = ms; });
  delay("--delay-before-step", "sleep before the optimiser step", [&o](double ms) { o.delay_before_step_ms = ms; });
  delay("--delay-before-reshard", "sleep before freeing gathered params",
        [&o](double ms) { o.delay_before_reshard_ms = ms; });
}

// --mesh RxS gives the world size, or must match --world-size, in any order.
void resolve_mesh(bool world_given, int mesh_shards, RunOptions& options) {
  const int64_t mesh_size = int64_t{options.replicate_size} * mesh_shards;
  if (world_given && mesh_size != options.world.world_size) {
    throw UsageError("--mesh " + std::to_string(options.replicate_size) + "x" + std::to_string(mesh_shards) + " has " +
                     std::to_string(mesh_size) + " ranks but --world-size is " +
                     std::to_string(options.world.world_size));
  }
  if (mesh_size > 8192) throw UsageError("--mesh has " + std::to_string(mesh_size) + " ranks, over 8192");
  options.world.world_size = static_cast<int>(mesh_size);
}

// Options that mean nothing without another one are refused, not ignored.
void require_companions(const CLI::App& app, const RunOptions& options) {
  auto require = [&](const char* flag, bool present, const char* needed) {
    if (app.count(flag) > 0 && !present) throw UsageError(std::string(flag) + " needs " + needed);
  };
  require("--cost-model", options.world.simulated_time, "--simulated-time");
  require("--compute-time", options.world.simulated_time, "--simulated-time");
  require("--op-costs", options.world.simulated_time, "--simulated-time");
  if (app.count("--op-costs") > 0 && app.count("--compute-time") > 0) {
    throw UsageError("--op-costs sets what compute costs: not with --compute-time");
  }
  require("--schedule", !options.processes && options.world.rank_kind == sim::RankKind::Fibers, "--ranks fibers");
  require("--fiber-stack-kib", !options.processes && options.world.rank_kind == sim::RankKind::Fibers,
          "--ranks fibers");
  require("--fiber-stacks", !options.processes && options.world.rank_kind == sim::RankKind::Fibers, "--ranks fibers");
  const sim::DelayOptions& d = options.delays;
  require("--delay-rank",
          d.before_reduce_scatter.count() > 0 || d.before_all_gather.count() > 0 || d.after_all_gather.count() > 0,
          "a delay it restricts (--delay-reduce-scatter, --delay-all-gather or --delay-after-all-gather)");
}

// What needs the whole line: the mesh, companions, the options' own checks.
RunOptions finish(const CLI::App& app, RunParse& p, const std::vector<std::string>& args) {
  RunOptions options = p.options;
  options.args = args;
  if (p.mesh_shards > 0) resolve_mesh(app.count("--world-size") > 0, p.mesh_shards, options);
  require_companions(app, options);
  try {
    options.validate();
  } catch (const std::invalid_argument& e) {
    throw UsageError(e.what());
  }
  return options;
}

void bind_run_options(CLI::App& app, RunParse& p) {
  bind_world_options(app, p);
  bind_training_options(app, p.options);
  bind_delay_options(app, p.options);
}

// Dies of `signal` as if it had not been caught (the temporary files are gone).
[[noreturn]] void reraise(int signal) {
  std::signal(signal, SIG_DFL);
  std::raise(signal);
  std::_Exit(128 + signal);
}

int run_action(const CLI::App& app, RunParse& p, Command& command) {
  auto first = std::find(command.args.begin(), command.args.end(), "run");
  const RunOptions options = finish(app, p, std::vector<std::string>(first + 1, command.args.end()));
  try {
    if (!options.no_trace) check_trace_writable(options.trace_path);
  } catch (const std::invalid_argument& e) {
    throw UsageError(e.what());
  }
  try {
    return run_scenario(options, command.out, command.err);
  } catch (const RunInterruptedError& e) {
    command.err << "fsdpsim: error: " << e.what() << std::endl;
    reraise(e.signal());
  }
}

}  // namespace

RunOptions parse_run_options(const std::vector<std::string>& args) {
  CLI::App app("fsdpsim run", "run");
  RunParse p;
  bind_run_options(app, p);
  parse_args(app, args);
  return finish(app, p, args);
}

void add_run_commands(CLI::App& root, Command& command) {
  CLI::App* run = root.add_subcommand("run", "train a scenario with the FSDP engine; progress and a summary");
  auto p = std::make_shared<RunParse>();
  bind_run_options(*run, *p);
  run->callback([run, p, &command] { command.action = [run, p, &command] { return run_action(*run, *p, command); }; });

  CLI::App* list = root.add_subcommand("list", "the scenarios 'fsdpsim run --scenario' takes");
  list->callback([&command] {
    command.action = [&command] {
      for (const auto& name : scenarios::scenario_names()) command.out << name << "\n";
      return 0;
    };
  });
}

}  // namespace fsdpsim::tools
