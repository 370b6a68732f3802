#pragma once
// Time in this project is int64 nanoseconds everywhere; ns_to_us and ns_to_ms
// are the conversions (Chrome traces count microseconds, reports milliseconds).
//
// Thread-safety: a Clock is read from every rank at once; now_ns() is const
// and thread-safe (SteadyClock holds no state).

#include <chrono>
#include <cstdint>

namespace fsdpsim {

/// Source of timestamps for Work and traces. The fake fiber world may supply
/// a simulated clock; real backends use SteadyClock.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual int64_t now_ns() const = 0;
};

class SteadyClock final : public Clock {
 public:
  int64_t now_ns() const override {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  /// A process-wide instance (stateless, so sharing it is harmless).
  static const SteadyClock& instance() {
    static const SteadyClock clock;
    return clock;
  }
};

inline double ns_to_us(int64_t ns) { return static_cast<double>(ns) / 1000.0; }
inline double ns_to_ms(int64_t ns) { return static_cast<double>(ns) / 1e6; }

}  // namespace fsdpsim
