#pragma once
// Records engine events (unshard, reshard, pre/post-backward, final callback)
// into a TraceRecorder, beside the collectives of the same rank. Lives here
// because it joins two lower layers: fsdp (events) and backends/observe (traces).
//
// Thread-safety: one object per rank's engine; the recorder it shares is
// thread-safe.

#include <memory>

#include "backends/clock.h"
#include "backends/observe/trace_recorder.h"
#include "fsdp/fully_shard.h"

namespace fsdpsim::scenarios {

class TraceEngineHooks final : public fsdp::EngineHooks {
 public:
  TraceEngineHooks(std::shared_ptr<observe::TraceRecorder> recorder, int rank,
                   const Clock& clock = SteadyClock::instance())
      : recorder_(std::move(recorder)), rank_(rank), clock_(clock) {}

  void on_unshard(const std::string& unit, fsdp::TrainingState state) override { record("unshard", unit, state); }
  void on_reshard(const std::string& unit, fsdp::TrainingState state) override { record("reshard", unit, state); }
  void on_pre_backward(const std::string& unit, fsdp::TrainingState state) override {
    record("pre_backward", unit, state);
  }
  void on_post_backward(const std::string& unit, fsdp::TrainingState state) override {
    record("post_backward", unit, state);
  }
  void on_final_callback(const std::string& unit, fsdp::TrainingState state) override {
    record("final_callback", unit, state);
  }
  void on_prefetch(const std::string& unit, const std::string& target, fsdp::TrainingState state) override {
    const int64_t now = clock_.now_ns();
    recorder_->record_engine_event(rank_, "prefetch", unit.empty() ? "<root>" : unit,
                                   std::string(fsdp::to_string(state)) + " -> " + (target.empty() ? "none" : target),
                                   now, now);
  }

 private:
  void record(const char* kind, const std::string& unit, fsdp::TrainingState state) {
    const int64_t now = clock_.now_ns();
    recorder_->record_engine_event(rank_, kind, unit.empty() ? "<root>" : unit, fsdp::to_string(state), now, now);
  }

  std::shared_ptr<observe::TraceRecorder> recorder_;
  int rank_;
  const Clock& clock_;
};

}  // namespace fsdpsim::scenarios
