// Grouped linear over experts: rows [offsets[e], offsets[e+1]) of inp go through expert e,
// out = inp_e @ W_e^T + b_e. One oneDNN sgemm per non-empty expert (row-major), so the GEMM
// is never hand-written; oneDNN threads each GEMM itself, so experts run one after another.
#include <oneapi/dnnl/dnnl.h>

#include <string>

#include "core/cpu/cpu_backend.h"
#include "core/error.h"

namespace moe {

namespace {

void sgemm(char transa, char transb, int M, int N, int K, float alpha, const float* A, int lda,
           const float* B, int ldb, float beta, float* C, int ldc) {
  dnnl_status_t st = dnnl_sgemm(transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  MOE_CHECK(st == dnnl_success, "dnnl_sgemm failed with status " + std::to_string(st));
}

}  // namespace

void CpuBackend::grouped_linear_forward(float* out,               // (rows,OC)
                                        const float* inp,         // (rows,IC)
                                        const float* weight,      // (E,OC,IC)
                                        const float* bias,        // (E,OC) or nullptr
                                        const int* offsets_host,  // (E+1)
                                        int E, int IC, int OC) {
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

void CpuBackend::grouped_linear_backward(float* dinp,              // (rows,IC) += or nullptr
                                         float* dweight,           // (E,OC,IC) +=
                                         float* dbias,             // (E,OC)    += or nullptr
                                         const float* dout,        // (rows,OC)
                                         const float* inp,         // (rows,IC)
                                         const float* weight,      // (E,OC,IC)
                                         const int* offsets_host,  // (E+1)
                                         int E, int IC, int OC) {
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

}  // namespace moe
