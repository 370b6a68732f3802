#include "sim/delay_hooks.h"

#include <sstream>
#include <stdexcept>

#include "backends/clock.h"
#include "sim/world.h"

namespace fsdpsim::sim {

namespace {

std::string milliseconds(std::chrono::nanoseconds duration) {
  std::ostringstream out;
  out << ns_to_ms(duration.count()) << "ms";
  return out.str();
}

}  // namespace

void DelayOptions::validate() const {
  for (auto [name, value] :
       {std::make_pair("before_reduce_scatter", before_reduce_scatter),
        std::make_pair("before_all_gather", before_all_gather), std::make_pair("after_all_gather", after_all_gather),
        std::make_pair("straggler_delay", straggler_delay)}) {
    if (value.count() < 0) throw std::invalid_argument(std::string("DelayOptions::") + name + " is negative");
  }
  if (only_rank < -1) throw std::invalid_argument("DelayOptions::only_rank must be -1 (every rank) or a rank");
  if (straggler_rank < -1) throw std::invalid_argument("DelayOptions::straggler_rank must be -1 (none) or a rank");
}

std::string DelayOptions::describe() const {
  std::ostringstream out;
  const char* separator = "";
  auto item = [&](const std::string& text) {
    out << separator << text;
    separator = ", ";
  };
  if (before_reduce_scatter.count() > 0) item("rs " + milliseconds(before_reduce_scatter));
  if (before_all_gather.count() > 0) item("ag before " + milliseconds(before_all_gather));
  if (after_all_gather.count() > 0) item("ag after " + milliseconds(after_all_gather));
  if (only_rank >= 0 &&
      (before_reduce_scatter.count() > 0 || before_all_gather.count() > 0 || after_all_gather.count() > 0)) {
    item("on rank " + std::to_string(only_rank));
  }
  if (straggler_rank >= 0 && straggler_delay.count() > 0) {
    item("straggler " + std::to_string(straggler_rank) + " " + milliseconds(straggler_delay));
  }
  if (separator[0] == '\0') out << "no delays";
  return out.str();
}

DelayHooks::DelayHooks(DelayOptions options, int rank) : options_(options), rank_(rank) {
  options_.validate();
  if (rank < 0) throw std::invalid_argument("DelayHooks: rank must be >= 0");
}

void DelayHooks::sleep(std::chrono::nanoseconds duration) {
  if (duration.count() <= 0) return;
  sleeps_.fetch_add(1);
  slept_ns_.fetch_add(duration.count());
  sleep_for(duration);
}

void DelayHooks::before(const CollectiveDesc& desc) {
  if (options_.straggler_rank == rank_) sleep(options_.straggler_delay);
  if (!delays_here()) return;
  if (desc.op == CollectiveOp::ReduceScatter) sleep(options_.before_reduce_scatter);
  if (desc.op == CollectiveOp::AllGather) sleep(options_.before_all_gather);
}

WorkPtr DelayHooks::run(const CollectiveDesc&, const std::function<WorkPtr()>& issue) { return issue(); }

void DelayHooks::after(const CollectiveDesc& desc, const WorkPtr&) {
  if (delays_here() && desc.op == CollectiveOp::AllGather) sleep(options_.after_all_gather);
}

}  // namespace fsdpsim::sim
