// Helpers shared by the benchmarks: a clock, the median, and the JSON line each benchmark
// ends with (like moe-eval, the last line on stdout is one JSON object, for scripts).
#pragma once

#include <algorithm>
#include <chrono>
#include <iostream>
#include <limits>
#include <nlohmann/json.hpp>
#include <vector>

namespace moe::bench {

using Clock = std::chrono::steady_clock;

inline double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// Wall-clock milliseconds of one call of fn.
template <typename Fn>
double time_ms(Fn&& fn) {
  const auto start = Clock::now();
  fn();
  return ms_since(start);
}

// The median (mean of the middle two for an even count); NaN, which JSON prints as null,
// when there are no samples. Medians, not means: other jobs share the machine.
inline double median(std::vector<double> samples) {
  if (samples.empty()) return std::numeric_limits<double>::quiet_NaN();
  std::sort(samples.begin(), samples.end());
  const size_t mid = samples.size() / 2;
  return samples.size() % 2 == 1 ? samples[mid] : 0.5 * (samples[mid - 1] + samples[mid]);
}

// One compact JSON object on its own line, flushed so a reader on a pipe sees it at once.
inline void print_json_line(const nlohmann::json& object) {
  std::cout << object.dump() << std::endl;
}

}  // namespace moe::bench
