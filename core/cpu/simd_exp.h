// A vectorizable expf for the CPU ops' inner loops (gelu, softmax).
//
// glibc only offers vector expf/tanhf under -ffast-math, so a loop that calls std::exp runs
// one element at a time; this one inlines into `#pragma omp simd` loops and runs 8-16 lanes.
// Cephes' expf: round x/ln2 to n, reduce r = x - n*ln2 (ln2 split in two for exactness),
// a degree-6 polynomial for e^r on [-ln2/2, ln2/2], then scale by 2^n through the exponent
// bits. Accurate to about 2 ulp on [-87, 88]; inputs outside are clamped there
// (e^-87 ~ 1.6e-38, e^88 ~ 1.7e38), so no inf or denormal comes out; NaN is not supported.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>

namespace moe {

inline float simd_expf(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // Round to nearest by adding 1.5*2^23: std::floor would stop GCC from vectorizing the loop.
  const float kRound = 12582912.0f;
  float n = (x * 1.44269504088896341f + kRound) - kRound;
  float r = x - n * 0.693359375f;    // ln2 high part: exact in float
  r = r + n * 2.12194440e-4f;        // ln2 low part
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

}  // namespace moe
