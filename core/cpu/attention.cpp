// Causal multi-head self-attention on packed qkv rows (q | k | v, each C wide; head h is
// columns h*hd..(h+1)*hd of each), per DESIGN.md:
//   att = softmax(mask(q k^T / sqrt(hd))),   out = att v.
//
// Each (batch, head) pair is independent: its q, k and v are strided views of qkv (row stride
// 3C), so the products are oneDNN GEMMs on those views with no copies, and the pairs are
// spread over the OpenMP threads. oneDNN sees it is inside a parallel region and runs each
// GEMM on the calling thread, so the threads are not oversubscribed. The mask and the softmax
// are plain loops over the lower triangle.
#include <oneapi/dnnl/dnnl.h>

#include <algorithm>
#include <cmath>

#include "core/cpu/cpu_backend.h"
#include "core/cpu/simd_exp.h"
#include "core/error.h"

namespace moe {

namespace {

// Called inside the parallel loop, which an exception must not leave: returns 1 on failure
// and the caller throws after the loop.
int sgemm_failed(char transa, char transb, int M, int N, int K, float alpha, const float* A,
                 int lda, const float* B, int ldb, float beta, float* C, int ldc) {
  return dnnl_sgemm(transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc) != dnnl_success;
}

}  // namespace

void CpuBackend::attention_forward(float* out,        // (B,T,C)
                                   float* att,        // (B,NH,T,T)
                                   const float* qkv,  // (B,T,3C)
                                   int B, int T, int C, int NH) {
  const int hd = C / NH;
  const int C3 = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  int num_failed = 0;
#pragma omp parallel for schedule(static) reduction(+ : num_failed)
  for (int bh = 0; bh < B * NH; bh++) {
    const int b = bh / NH;
    const int h = bh % NH;
    const float* q = qkv + static_cast<size_t>(b) * T * C3 + h * hd;  // (T,hd) stride 3C
    const float* k = q + C;                                           // (T,hd) stride 3C
    const float* v = q + 2 * C;                                       // (T,hd) stride 3C
    float* att_bh = att + static_cast<size_t>(bh) * T * T;            // (T,T)
    float* out_bh = out + static_cast<size_t>(b) * T * C + h * hd;    // (T,hd) stride C
    // att (T,T) = scale * q (T,hd) @ k^T (hd,T); the upper triangle is computed and then
    // overwritten, simpler than a triangular product and at most twice the work.
    num_failed += sgemm_failed('N', 'T', T, T, hd, scale, q, C3, k, C3, 0.0f, att_bh, T);
    // Causal softmax of each row t over keys 0..t; keys after t get probability 0, so the
    // next product can run over whole rows.
    for (int t = 0; t < T; t++) {
      float* row = att_bh + static_cast<size_t>(t) * T;  // (T)
      float max = row[0];
#pragma omp simd reduction(max : max)
      for (int j = 0; j <= t; j++) max = std::max(max, row[j]);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int j = 0; j <= t; j++) {
        row[j] = simd_expf(row[j] - max);
        sum += row[j];
      }
      const float inv_sum = 1.0f / sum;
#pragma omp simd
      for (int j = 0; j <= t; j++) row[j] *= inv_sum;
      for (int j = t + 1; j < T; j++) row[j] = 0.0f;
    }
    // out (T,hd) = att (T,T) @ v (T,hd)
    num_failed += sgemm_failed('N', 'N', T, hd, T, 1.0f, att_bh, T, v, C3, 0.0f, out_bh, C);
  }
  MOE_CHECK(num_failed == 0, "attention_forward: dnnl_sgemm failed");
}

// With P = att (T,T), S the scaled scores and dP = dout v^T:
//   dv += P^T dout;   dS = P * (dP - rowsum(P * dP));   dq += scale dS k;   dk += scale dS^T q.
// dS keeps the zeros above the diagonal since P has them there.
void CpuBackend::attention_backward(float* dqkv,        // (B,T,3C) +=
                                    float* scratch,     // (B,NH,T,T) holds dP, then dS
                                    const float* dout,  // (B,T,C)
                                    const float* qkv,   // (B,T,3C)
                                    const float* att,   // (B,NH,T,T)
                                    int B, int T, int C, int NH) {
  const int hd = C / NH;
  const int C3 = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  int num_failed = 0;
#pragma omp parallel for schedule(static) reduction(+ : num_failed)
  for (int bh = 0; bh < B * NH; bh++) {
    const int b = bh / NH;
    const int h = bh % NH;
    const size_t qkv_offset = static_cast<size_t>(b) * T * C3 + h * hd;
    const float* q = qkv + qkv_offset;                                      // (T,hd) stride 3C
    const float* k = q + C;                                                 // (T,hd) stride 3C
    const float* v = q + 2 * C;                                             // (T,hd) stride 3C
    float* dq = dqkv + qkv_offset;                                          // (T,hd) stride 3C
    float* dk = dq + C;                                                     // (T,hd) stride 3C
    float* dv = dq + 2 * C;                                                 // (T,hd) stride 3C
    const float* att_bh = att + static_cast<size_t>(bh) * T * T;            // (T,T)
    float* datt = scratch + static_cast<size_t>(bh) * T * T;                // (T,T)
    const float* dout_bh = dout + static_cast<size_t>(b) * T * C + h * hd;  // (T,hd) stride C
    // dP (T,T) = dout (T,hd) @ v^T (hd,T)
    num_failed += sgemm_failed('N', 'T', T, T, hd, 1.0f, dout_bh, C, v, C3, 0.0f, datt, T);
    // dv (T,hd) += P^T (T,T) @ dout (T,hd)
    num_failed += sgemm_failed('T', 'N', T, hd, T, 1.0f, att_bh, T, dout_bh, C, 1.0f, dv, C3);
    // Softmax backward in place, row by row over the causal part: dP becomes dS.
    for (int t = 0; t < T; t++) {
      const float* p = att_bh + static_cast<size_t>(t) * T;  // (T)
      float* d = datt + static_cast<size_t>(t) * T;           // (T)
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int j = 0; j <= t; j++) dot += p[j] * d[j];
#pragma omp simd
      for (int j = 0; j <= t; j++) d[j] = p[j] * (d[j] - dot);
      for (int j = t + 1; j < T; j++) d[j] = 0.0f;
    }
    // dq (T,hd) += scale * dS (T,T) @ k (T,hd)
    num_failed += sgemm_failed('N', 'N', T, hd, T, scale, datt, T, k, C3, 1.0f, dq, C3);
    // dk (T,hd) += scale * dS^T (T,T) @ q (T,hd)
    num_failed += sgemm_failed('T', 'N', T, hd, T, scale, datt, T, q, C3, 1.0f, dk, C3);
  }
  MOE_CHECK(num_failed == 0, "attention_backward: dnnl_sgemm failed");
}

}  // namespace moe
