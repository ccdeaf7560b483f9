// GELU, tanh form, per element, written as x * sigmoid(2u) with u = sqrt(2/pi) (x + 0.044715 x^3),
// as the CPU backend computes it (core/cpu/gelu_math.h: one exp, no cancellation in 1 + tanh(u)
// for very negative x). Shared by the GELU op (gelu.cu) and the unfused path of linear + GELU
// (linear_gelu.cu).
#pragma once

#include <cuda_runtime.h>

namespace moe::cuda {

constexpr float kGeluSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;

__device__ inline float gelu_value(float x) {
  const float u = kGeluSqrt2OverPi * (x + kGeluCubic * x * x * x);
  return x / (1.0f + __expf(-2.0f * u));
}

// sig + x * 2 sig (1 - sig) du/dx with sig = sigmoid(2u).
__device__ inline float gelu_derivative(float x) {
  const float u = kGeluSqrt2OverPi * (x + kGeluCubic * x * x * x);
  const float du_dx = kGeluSqrt2OverPi * (1.0f + 3.0f * kGeluCubic * x * x);
  const float sig = 1.0f / (1.0f + __expf(-2.0f * u));
  return sig + x * 2.0f * sig * (1.0f - sig) * du_dx;
}

}  // namespace moe::cuda
