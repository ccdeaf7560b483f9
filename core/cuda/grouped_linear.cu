// Grouped linear over the local experts: rows [offsets[e], offsets[e+1]) go through expert e.
// The inputs are converted to bf16 once for all experts; each non-empty expert is then one
// cuBLASLt product on its row range (the row counts differ per expert and are known on the
// host, since they sized the all-to-all).
#include <string>

#include "core/cuda/cuda_backend.h"

namespace moe {

void CudaBackend::grouped_linear_forward(float* out,               // (rows,OC)
                                         const float* inp,         // (rows,IC)
                                         const float* weight,      // (E,OC,IC)
                                         const float* bias,        // (E,OC) or nullptr
                                         const int* offsets_host,  // (E+1)
                                         int E, int IC, int OC) {
  const int rows = offsets_host[E] - offsets_host[0];
  if (rows <= 0 || OC == 0) return;
  const __nv_bfloat16* inp_bf16 =
      to_bf16(kBf16Inp, inp + static_cast<size_t>(offsets_host[0]) * IC,
              static_cast<size_t>(rows) * IC);  // (rows,IC) from offsets[0]
  const __nv_bfloat16* w_bf16 = bf16_weight(weight, static_cast<size_t>(E) * OC * IC);
  for (int e = 0; e < E; ++e) {
    const int r0 = offsets_host[e], n = offsets_host[e + 1] - r0;
    MOE_CHECK(n >= 0, "grouped_linear_forward: offsets must not decrease");
    if (n == 0) continue;
    GemmCall g;
    g.trans_a = true;
    g.m = OC;
    g.n = n;
    g.k = IC;
    g.a = w_bf16 + static_cast<size_t>(e) * OC * IC;
    g.lda = IC;
    g.b = inp_bf16 + static_cast<size_t>(r0 - offsets_host[0]) * IC;
    g.ldb = IC;
    g.c = out + static_cast<size_t>(r0) * OC;
    g.ldc = OC;
    g.bias = bias ? bias + static_cast<size_t>(e) * OC : nullptr;
    gemm(g);
  }
}

void CudaBackend::grouped_linear_backward(float* dinp,               // (rows,IC) +=
                                          float* dweight,            // (E,OC,IC) +=
                                          float* dbias,              // (E,OC)    +=
                                          const float* dout,         // (rows,OC)
                                          const float* inp,          // (rows,IC)
                                          const float* weight,       // (E,OC,IC)
                                          const int* offsets_host,   // (E+1)
                                          int E, int IC, int OC) {
  const int first = offsets_host[0], rows = offsets_host[E] - first;
  if (rows <= 0 || OC == 0 || IC == 0) return;
  const __nv_bfloat16* dout_bf16 = to_bf16(kBf16Dout, dout + static_cast<size_t>(first) * OC,
                                           static_cast<size_t>(rows) * OC);  // (rows,OC)
  const __nv_bfloat16* inp_bf16 = to_bf16(kBf16Inp, inp + static_cast<size_t>(first) * IC,
                                          static_cast<size_t>(rows) * IC);   // (rows,IC)
  const __nv_bfloat16* w_bf16 = bf16_weight(weight, static_cast<size_t>(E) * OC * IC);
  for (int e = 0; e < E; ++e) {
    const int r0 = offsets_host[e], n = offsets_host[e + 1] - r0;
    MOE_CHECK(n >= 0, "grouped_linear_backward: offsets must not decrease");
    if (n == 0) continue;
    const __nv_bfloat16* dout_e = dout_bf16 + static_cast<size_t>(r0 - first) * OC;  // (n,OC)
    const __nv_bfloat16* inp_e = inp_bf16 + static_cast<size_t>(r0 - first) * IC;    // (n,IC)
    if (dinp != nullptr) {
      GemmCall g;  // dinp_e^T (IC,n) += W_e^T (IC,OC) * dout_e^T (OC,n)
      g.m = IC;
      g.n = n;
      g.k = OC;
      g.a = w_bf16 + static_cast<size_t>(e) * OC * IC;
      g.lda = IC;
      g.b = dout_e;
      g.ldb = OC;
      g.c = dinp + static_cast<size_t>(r0) * IC;
      g.ldc = IC;
      g.beta = 1.0f;
      gemm(g);
    }
    GemmCall g;  // dW_e^T (IC,OC) += inp_e^T (IC,n) * dout_e (n,OC)
    g.trans_b = true;
    g.m = IC;
    g.n = OC;
    g.k = n;
    g.a = inp_e;
    g.lda = IC;
    g.b = dout_e;
    g.ldb = OC;
    g.c = dweight + static_cast<size_t>(e) * OC * IC;
    g.ldc = IC;
    g.beta = 1.0f;
    gemm(g);
    if (dbias != nullptr)
      add_column_sums(dbias + static_cast<size_t>(e) * OC, dout + static_cast<size_t>(r0) * OC, n,
                      OC);
  }
}

}  // namespace moe
