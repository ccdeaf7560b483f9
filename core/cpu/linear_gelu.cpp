// The dense FFN's c_fc + GELU as one op (core/backend.h). On the CPU the GEMM and the GELU
// stay two passes, as the separate ops compute them (oneDNN's sgemm has no epilogue); the
// backward writes dout @ weight straight into dpre and scales it there, so it needs no
// scratch and no zeroing.
#include <algorithm>

#include "core/cpu/cpu_backend.h"
#include "core/cpu/gelu_math.h"
#include "core/cpu/sgemm.h"

namespace moe {

void CpuBackend::linear_gelu_forward(Act* pre,             // (N,OC)
                                     Act* out,             // (N,OC)
                                     const Act* inp,       // (N,IC)
                                     const float* weight,  // (OC,IC)
                                     const float* bias,    // (OC) or nullptr
                                     int N, int IC, int OC) {
  linear_forward(pre, inp, weight, bias, N, IC, OC);
  gelu_forward(out, pre, static_cast<size_t>(N) * OC);
}

void CpuBackend::gelu_linear_backward(Act* dpre_act,        // (N,IC) written
                                      float* dweight,       // (OC,IC) +=
                                      float* dbias,         // (OC)    += or nullptr
                                      const Act* dout_act,  // (N,OC)
                                      const Act* act,       // (N,IC)
                                      const float* weight,  // (OC,IC)
                                      const Act* pre_act,   // (N,IC)
                                      int N, int IC, int OC) {
  float* dpre = act_f32(dpre_act);
  const float* dout = act_f32(dout_act);
  const float* pre = act_f32(pre_act);
  if (N == 0 || IC == 0) return;
  const size_t n = static_cast<size_t>(N) * IC;
  if (OC == 0) {  // no outputs: nothing flows back
    std::fill(dpre, dpre + n, 0.0f);
    return;
  }
  linear_backward(nullptr, dweight, dbias, dout_act, act, weight, N, IC, OC);
  // dpre (N,IC) = dout (N,OC) @ weight (OC,IC), then times gelu'(pre) in place
  sgemm('N', 'N', N, IC, OC, 1.0f, dout, OC, weight, IC, 0.0f, dpre, IC);
  gelu_math::scale_by_derivative(dpre, pre, n);
}

}  // namespace moe
