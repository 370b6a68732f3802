#pragma once
// Small helpers the tools share for their command lines and reports: integer
// and number flags, one clock reading, medians, byte counts; {fmt} for the
// rest. Thread-safety: stateless functions.

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iostream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "backends/clock.h"

// fmt comes header-only from the torch wheel's headers (cmake/Dependencies.cmake).
static_assert(FMT_VERSION >= 120000, "fsdpsim formats with the torch wheel's fmt 12 (header-only)");

namespace fsdpsim::tools {

/// The integer value of `flag`; throws Error naming the flag for text that is
/// not exactly one decimal integer ("needs an integer, got 'x'": no sign
/// prefix '+', no spaces, no hex) or one outside [min, max] ("must be in
/// [min, max], got x").
template <typename Error = std::invalid_argument>
int64_t parse_integer(const std::string& flag, const std::string& text, int64_t min, int64_t max) {
  size_t used = 0;
  long long value = 0;
  const bool plain = !text.empty() && (std::isdigit(static_cast<unsigned char>(text[0])) || text[0] == '-');
  if (plain) {
    try {
      value = std::stoll(text, &used, 10);
    } catch (const std::exception&) {
      used = 0;
    }
  }
  if (used == 0 || used != text.size()) throw Error(flag + " needs an integer, got '" + text + "'");
  if (value < min || value > max) {
    throw Error(fmt::format("{} must be in [{}, {}], got {}", flag, min, max, text));
  }
  return value;
}

/// The decimal number `text` ("2", "0.5", "1e-3") as a finite double in
/// [min, max]; throws Error "<flag> needs <what> in [min, max], got 'text'"
/// otherwise. Hex floats, inf, nan and a '+' prefix are refused.
template <typename Error = std::invalid_argument>
double parse_number(const std::string& flag, const std::string& text, double min, double max,
                    const std::string& what = "a number") {
  auto refuse = [&]() -> Error {
    return Error(fmt::format("{} needs {} in [{:.10g}, {:.10g}], got '{}'", flag, what, min, max, text));
  };
  const bool decimal =
      !text.empty() && text.find_first_not_of("0123456789.eE+-") == std::string::npos && text[0] != '+';
  if (!decimal) throw refuse();
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || !std::isfinite(value) || value < min || value > max) throw refuse();
  return value;
}

/// Integers separated by commas ("2,4,8"), each as parse_integer reads it;
/// an empty item (a leading, trailing or doubled comma) is refused.
template <typename Error = std::invalid_argument>
std::vector<int64_t> parse_integer_list(const std::string& flag, const std::string& text, int64_t min, int64_t max) {
  std::vector<int64_t> values;
  size_t begin = 0;
  for (;;) {
    const size_t comma = text.find(',', begin);
    const std::string item = text.substr(begin, comma == std::string::npos ? std::string::npos : comma - begin);
    if (item.empty()) throw Error(flag + " needs a comma-separated list of integers, got '" + text + "'");
    values.push_back(parse_integer<Error>(flag, item, min, max));
    if (comma == std::string::npos) return values;
    begin = comma + 1;
  }
}

/// The first line of an error message (c10 errors append a backtrace).
inline std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

/// A tool's main body: whatever escapes it becomes one line
/// "<program>: error: <first line>" on stderr and exit code 1, never
/// std::terminate.
inline int guarded_main(const char* program, const std::function<int()>& body) {
  try {
    return body();
  } catch (const std::exception& e) {
    std::cerr << program << ": error: " << first_line(e.what()) << std::endl;
  } catch (...) {
    std::cerr << program << ": error: unknown exception" << std::endl;
  }
  return 1;
}

inline double seconds_since(int64_t start_ns) { return ns_to_s(steady_now_ns() - start_ns); }

/// A benchmark's frame: the header line (program, run size, cores, `setup`),
/// the sections (they return whether every measurement succeeded) and the
/// total line. Returns the exit code: 1 if a measurement failed.
inline int run_benchmark(const std::string& program, bool quick, const std::string& setup,
                         const std::function<bool()>& sections) {
  const int64_t started = steady_now_ns();
  std::cout << program << ": " << (quick ? "quick" : "full") << " run, " << std::thread::hardware_concurrency()
            << " cores, " << setup << "\n"
            << std::endl;
  const bool ok = sections();
  std::cout << fmt::format("total {:.1f} s{}", seconds_since(started), ok ? "" : ", SOME MEASUREMENTS FAILED")
            << std::endl;
  return ok ? 0 : 1;
}

/// The middle value (the mean of the two middle ones for an even count); 0 for none.
inline double median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t mid = values.size() / 2;
  return values.size() % 2 ? values[mid] : (values[mid - 1] + values[mid]) / 2;
}

/// "1.5 MiB" (binary units, one decimal; whole bytes below 1 KiB).
inline std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int unit = 0;
  while (bytes >= 1024 && unit < 4) {
    bytes /= 1024;
    ++unit;
  }
  return unit ? fmt::format("{:.1f} {}", bytes, units[unit]) : fmt::format("{:.0f} {}", bytes, units[unit]);
}

}  // namespace fsdpsim::tools
