// GELU, tanh form (core/cpu/gelu_math.h), elementwise.
#include "core/cpu/cpu_backend.h"
#include "core/cpu/gelu_math.h"

namespace moe {

void CpuBackend::gelu_forward(float* out,        // (n)
                              const float* inp,  // (n)
                              size_t n) {
#pragma omp parallel for simd schedule(static)
  for (size_t i = 0; i < n; i++) out[i] = gelu_math::value(inp[i]);
}

void CpuBackend::gelu_backward(float* dinp,        // (n) +=
                               const float* inp,   // (n)
                               const float* dout,  // (n)
                               size_t n) {
#pragma omp parallel for simd schedule(static)
  for (size_t i = 0; i < n; i++) dinp[i] += gelu_math::derivative(inp[i]) * dout[i];
}

}  // namespace moe
