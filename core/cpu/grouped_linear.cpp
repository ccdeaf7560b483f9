// Grouped linear over experts: rows [offsets[e], offsets[e+1]) of inp go through expert e,
// out = inp_e @ W_e^T + b_e. One oneDNN sgemm per non-empty expert (row-major), so the GEMM
// is never hand-written; oneDNN threads each GEMM itself, so experts run one after another.
// The GELU variants (the experts' c_fc, and c_proj's input gradient through the GELU) are the
// same products with the GELU pass after them (core/cpu/gelu_math.h).
#include <algorithm>

#include "core/cpu/cpu_backend.h"
#include "core/cpu/gelu_math.h"
#include "core/cpu/sgemm.h"
#include "core/error.h"

namespace moe {

void CpuBackend::grouped_linear_forward(Act* out_act,             // (rows,OC)
                                        const Act* inp_act,       // (rows,IC)
                                        const float* weight,      // (E,OC,IC)
                                        const float* bias,        // (E,OC) or nullptr
                                        const int* offsets_host,  // (E+1)
                                        int E, int IC, int OC) {
  float* out = act_f32(out_act);
  const float* inp = act_f32(inp_act);
  for (int e = 0; e < E; e++) {
    int r0 = offsets_host[e];
    int n = offsets_host[e + 1] - r0;
    MOE_CHECK(n >= 0, "grouped_linear_forward: offsets must not decrease");
    if (n == 0) continue;  // an expert that received no tokens: nothing to compute
    float* out_e = out + (size_t)r0 * OC;        // (n,OC)
    const float* inp_e = inp + (size_t)r0 * IC;  // (n,IC)
    const float* w_e = weight + (size_t)e * OC * IC;  // (OC,IC)
    float beta = 0.0f;
    if (bias != nullptr) {
      // Seed the output with the bias so the GEMM adds onto it (beta = 1): one pass over out.
      const float* b_e = bias + (size_t)e * OC;  // (OC)
#pragma omp parallel for
      for (int i = 0; i < n; i++) {
        float* row = out_e + (size_t)i * OC;  // (OC)
        for (int o = 0; o < OC; o++) row[o] = b_e[o];
      }
      beta = 1.0f;
    }
    // out_e (n,OC) = inp_e (n,IC) @ w_e^T (IC,OC)
    sgemm('N', 'T', n, OC, IC, 1.0f, inp_e, IC, w_e, IC, beta, out_e, OC);
  }
}

void CpuBackend::grouped_linear_backward(Act* dinp_act,            // (rows,IC) += or nullptr
                                         float* dweight,           // (E,OC,IC) +=
                                         float* dbias,             // (E,OC)    += or nullptr
                                         const Act* dout_act,      // (rows,OC)
                                         const Act* inp_act,       // (rows,IC)
                                         const float* weight,      // (E,OC,IC)
                                         const int* offsets_host,  // (E+1)
                                         int E, int IC, int OC) {
  float* dinp = act_f32(dinp_act);
  const float* dout = act_f32(dout_act);
  const float* inp = act_f32(inp_act);
  for (int e = 0; e < E; e++) {
    int r0 = offsets_host[e];
    int n = offsets_host[e + 1] - r0;
    MOE_CHECK(n >= 0, "grouped_linear_backward: offsets must not decrease");
    if (n == 0) continue;  // no rows: every gradient of this expert stays as it was
    const float* dout_e = dout + (size_t)r0 * OC;     // (n,OC)
    const float* inp_e = inp + (size_t)r0 * IC;       // (n,IC)
    const float* w_e = weight + (size_t)e * OC * IC;  // (OC,IC)
    if (dinp != nullptr) {
      // dinp_e (n,IC) += dout_e (n,OC) @ w_e (OC,IC)
      sgemm('N', 'N', n, IC, OC, 1.0f, dout_e, OC, w_e, IC, 1.0f, dinp + (size_t)r0 * IC, IC);
    }
    // dweight_e (OC,IC) += dout_e^T (OC,n) @ inp_e (n,IC)
    sgemm('T', 'N', OC, IC, n, 1.0f, dout_e, OC, inp_e, IC, 1.0f, dweight + (size_t)e * OC * IC,
          IC);
    if (dbias != nullptr) {
      // Column sums of dout_e; one column per iteration, so threads never share an output.
      float* db_e = dbias + (size_t)e * OC;  // (OC)
#pragma omp parallel for
      for (int o = 0; o < OC; o++) {
        double s = 0.0;
        for (int i = 0; i < n; i++) s += dout_e[(size_t)i * OC + o];
        db_e[o] += (float)s;
      }
    }
  }
}

void CpuBackend::grouped_linear_gelu_forward(Act* pre,                 // (rows,OC)
                                             Act* out,                 // (rows,OC)
                                             const Act* inp,           // (rows,IC)
                                             const float* weight,      // (E,OC,IC)
                                             const float* bias,        // (E,OC) or nullptr
                                             const int* offsets_host,  // (E+1)
                                             int E, int IC, int OC) {
  grouped_linear_forward(pre, inp, weight, bias, offsets_host, E, IC, OC);
  const size_t first = static_cast<size_t>(offsets_host[0]) * OC,
               last = static_cast<size_t>(offsets_host[E]) * OC;
  gelu_forward(act_at(out, first, ActType::kF32), act_at(pre, first, ActType::kF32),
               last - first);
}

void CpuBackend::gelu_grouped_linear_backward(Act* dpre_act,             // (rows,IC) written
                                              float* dweight,           // (E,OC,IC) +=
                                              float* dbias,             // (E,OC)    += or nullptr
                                              const Act* dout_act,      // (rows,OC)
                                              const Act* act,           // (rows,IC)
                                              const float* weight,      // (E,OC,IC)
                                              const Act* pre_act,       // (rows,IC)
                                              const int* offsets_host,  // (E+1)
                                              int E, int IC, int OC) {
  float* dpre = act_f32(dpre_act);
  const float* dout = act_f32(dout_act);
  const float* pre = act_f32(pre_act);
  grouped_linear_backward(nullptr, dweight, dbias, dout_act, act, weight, offsets_host, E, IC,
                          OC);
  for (int e = 0; e < E; e++) {
    int r0 = offsets_host[e];
    int n = offsets_host[e + 1] - r0;
    if (n == 0 || IC == 0) continue;
    float* dpre_e = dpre + (size_t)r0 * IC;  // (n,IC)
    if (OC == 0) {  // no outputs: nothing flows back
      std::fill(dpre_e, dpre_e + (size_t)n * IC, 0.0f);
      continue;
    }
    // dpre_e (n,IC) = dout_e (n,OC) @ w_e (OC,IC)
    sgemm('N', 'N', n, IC, OC, 1.0f, dout + (size_t)r0 * OC, OC, weight + (size_t)e * OC * IC, IC,
          0.0f, dpre_e, IC);
  }
  const size_t first = static_cast<size_t>(offsets_host[0]) * IC,
               last = static_cast<size_t>(offsets_host[E]) * IC;
  gelu_math::scale_by_derivative(dpre + first, pre + first, last - first);
}

}  // namespace moe
