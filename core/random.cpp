#include "core/random.h"

#include <cmath>

namespace moe {

double standard_normal(uint64_t key) {
  // 1 - u lies in (0, 1], so the logarithm is finite.
  const double radius_uniform = 1.0 - uniform_double(random_key({key, 0}));
  const double angle_uniform = uniform_double(random_key({key, 1}));
  const double two_pi = 6.283185307179586476925286766559;
  return std::sqrt(-2.0 * std::log(radius_uniform)) * std::cos(two_pi * angle_uniform);
}

float truncated_normal(uint64_t key, float cut) {
  // At cut = 2 a draw is accepted 95% of the time, so the loop ends after ~1.05 attempts.
  constexpr uint64_t kMaxAttempts = 1000;
  for (uint64_t attempt = 0; attempt < kMaxAttempts; ++attempt) {
    const double x = standard_normal(random_key({key, attempt}));
    if (std::fabs(x) <= cut) return static_cast<float>(x);
  }
  // Only a tiny cut gets here; the density is then flat over [-cut, cut] to within cut^2/2.
  return static_cast<float>((2.0 * uniform_double(random_key({key, kMaxAttempts})) - 1.0) * cut);
}

}  // namespace moe
