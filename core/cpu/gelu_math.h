// GELU, tanh form, per element: gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3).
//
// Since 0.5 (1 + tanh(u)) = sigmoid(2u), this is x * sigmoid(2u) = x / (1 + e^(-2u)): one exp
// and no tanh, so loops over it vectorize with simd_expf (std::tanh would run one lane at a
// time). It also avoids the cancellation in 1 + tanh(u) for very negative x. Shared by the GELU
// op (gelu.cpp) and the fused linear + GELU (linear_gelu.cpp), which must agree bit for bit.
#pragma once

#include <cmath>
#include <cstddef>
#include <numbers>

#include "core/cpu/simd_exp.h"

namespace moe::gelu_math {

inline const float kSqrt2OverPi = static_cast<float>(std::sqrt(2.0 / std::numbers::pi));
constexpr float kCubic = 0.044715f;

inline float value(float x) {
  float u = kSqrt2OverPi * (x + kCubic * x * x * x);
  return x / (1.0f + simd_expf(-2.0f * u));
}

// d/dx [x * sig] = sig + x * sig' * du/dx,  sig = sigmoid(2u),  d sig/du = 2 sig (1 - sig),
// which is the usual 0.5 (1 + tanh u) + 0.5 x sech^2(u) du/dx written with sig.
inline float derivative(float x) {
  float u = kSqrt2OverPi * (x + kCubic * x * x * x);
  float du_dx = kSqrt2OverPi * (1.0f + 3.0f * kCubic * x * x);
  float sig = 1.0f / (1.0f + simd_expf(-2.0f * u));
  return sig + x * 2.0f * sig * (1.0f - sig) * du_dx;
}

// grad (n) *= gelu'(x (n)), in place: the input gradient through the GELU once the product
// after it has been written into grad (linear_gelu.cpp, grouped_linear.cpp).
inline void scale_by_derivative(float* grad, const float* x, size_t n) {
#pragma omp parallel for simd schedule(static)
  for (size_t i = 0; i < n; i++) grad[i] = derivative(x[i]) * grad[i];
}

}  // namespace moe::gelu_math
