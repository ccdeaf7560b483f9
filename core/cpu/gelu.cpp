// GELU, tanh form (core/cpu/gelu_math.h), elementwise.
#include "core/cpu/cpu_backend.h"
#include "core/cpu/gelu_math.h"

namespace moe {

void CpuBackend::gelu_forward(Act* out_act,        // (n)
                              const Act* inp_act,  // (n)
                              size_t n) {
  float* out = act_f32(out_act);
  const float* inp = act_f32(inp_act);
#pragma omp parallel for simd schedule(static)
  for (size_t i = 0; i < n; i++) out[i] = gelu_math::value(inp[i]);
}

void CpuBackend::gelu_backward(Act* dinp_act,        // (n) +=
                               const Act* inp_act,   // (n)
                               const Act* dout_act,  // (n)
                               size_t n) {
  float* dinp = act_f32(dinp_act);
  const float* inp = act_f32(inp_act);
  const float* dout = act_f32(dout_act);
#pragma omp parallel for simd schedule(static)
  for (size_t i = 0; i < n; i++) dinp[i] += gelu_math::derivative(inp[i]) * dout[i];
}

}  // namespace moe
