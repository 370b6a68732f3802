#pragma once
// Small helpers the tools share for their command lines and reports: integer
// flags, one clock reading, medians, printf-style formatting, byte counts.

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace fsdpsim::tools {

/// The integer value of `flag`; throws Error naming the flag for text that is
/// not exactly one integer ("needs an integer, got 'x'") or one outside
/// [min, max] ("must be in [min, max], got x").
template <typename Error = std::invalid_argument>
int64_t parse_integer(const std::string& flag, const std::string& text, int64_t min, int64_t max) {
  size_t used = 0;
  long long value = 0;
  if (!text.empty() && !std::isspace(static_cast<unsigned char>(text[0]))) {
    try {
      value = std::stoll(text, &used);
    } catch (const std::exception&) {
      used = 0;
    }
  }
  if (used == 0 || used != text.size()) throw Error(flag + " needs an integer, got '" + text + "'");
  if (value < min || value > max) {
    throw Error(flag + " must be in [" + std::to_string(min) + ", " + std::to_string(max) + "], got " + text);
  }
  return value;
}

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline double seconds_since(int64_t start_ns) { return static_cast<double>(now_ns() - start_ns) / 1e9; }

/// The middle value (the mean of the two middle ones for an even count); 0 for none.
inline double median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t mid = values.size() / 2;
  return values.size() % 2 ? values[mid] : (values[mid - 1] + values[mid]) / 2;
}

inline std::string format(const char* pattern, ...) __attribute__((format(printf, 1, 2)));
inline std::string format(const char* pattern, ...) {
  char buffer[512];
  va_list args;
  va_start(args, pattern);
  std::vsnprintf(buffer, sizeof buffer, pattern, args);
  va_end(args);
  return buffer;
}

/// "1.5 MiB" (binary units, one decimal; whole bytes below 1 KiB).
inline std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int unit = 0;
  while (bytes >= 1024 && unit < 4) {
    bytes /= 1024;
    ++unit;
  }
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, unit ? "%.1f %s" : "%.0f %s", bytes, units[unit]);
  return buffer;
}

/// `value` with `digits` decimals.
inline std::string fixed(double value, int digits) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.*f", digits, value);
  return buffer;
}

}  // namespace fsdpsim::tools
