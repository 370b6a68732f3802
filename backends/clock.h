#pragma once
// Time in this project is int64 nanoseconds everywhere. The conversions below
// are the only ones: Chrome traces count microseconds, reports milliseconds
// or seconds, options take milliseconds.
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

// Templates so int64 counts and double averages convert the same way.
template <typename Ns>
constexpr double ns_to_us(Ns ns) {
  return static_cast<double>(ns) / 1e3;
}
template <typename Ns>
constexpr double ns_to_ms(Ns ns) {
  return static_cast<double>(ns) / 1e6;
}
template <typename Ns>
constexpr double ns_to_s(Ns ns) {
  return static_cast<double>(ns) / 1e9;
}
constexpr double us_to_ns(double us) { return us * 1e3; }
inline std::chrono::nanoseconds ms_to_ns(double ms) { return std::chrono::nanoseconds(static_cast<int64_t>(ms * 1e6)); }
/// Steady-clock nanoseconds now (SteadyClock's reading).
inline int64_t steady_now_ns() { return SteadyClock::instance().now_ns(); }

}  // namespace fsdpsim
