// Causal multi-head self-attention on packed qkv rows (q | k | v, each C wide; head h is
// columns h*hd..(h+1)*hd of each), per DESIGN.md:
//   P = softmax(mask(q k^T / sqrt(hd))),   out = P v.
//
// Flash-attention style in what is kept: the forward saves only the logsumexp of each row's
// scores (B,NH,T), never the T x T probabilities, and the backward recomputes P from it. Work
// goes by blocks of kQueryBlock queries: a block's queries see keys 0..end-1 only, so the
// products cover the causal triangle plus one block, not the whole square. The block's scores
// (kQueryBlock x T) live in a per-thread buffer. Each (batch, head) pair is independent: its q,
// k, v are strided views of qkv (row stride 3C), so the products are oneDNN GEMMs on those
// views with no copies, and the pairs are spread over the OpenMP threads (oneDNN sees it is
// inside a parallel region and runs each GEMM on the calling thread).
#include <oneapi/dnnl/dnnl.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/cpu/cpu_backend.h"
#include "core/cpu/simd_exp.h"
#include "core/error.h"

namespace moe {

namespace {

constexpr int kQueryBlock = 64;

// Called inside the parallel loop, which an exception must not leave: returns 1 on failure
// and the caller throws after the loop.
int sgemm_failed(char transa, char transb, int M, int N, int K, float alpha, const float* A,
                 int lda, const float* B, int ldb, float beta, float* C, int ldc) {
  return dnnl_sgemm(transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc) != dnnl_success;
}

// The views of one (batch, head) pair.
struct HeadViews {
  size_t qkv_offset;  // of q's first element in qkv (B,T,3C); k and v follow at +C, +2C
  size_t out_offset;  // of the first element in out (B,T,C)
  size_t lse_offset;  // of the first element in lse (B,NH,T)
};

HeadViews head_views(int bh, int T, int C, int NH) {
  const int b = bh / NH, h = bh % NH, hd = C / NH;
  return {static_cast<size_t>(b) * T * 3 * C + static_cast<size_t>(h) * hd,
          static_cast<size_t>(b) * T * C + static_cast<size_t>(h) * hd,
          static_cast<size_t>(bh) * T};
}

}  // namespace

void CpuBackend::attention_forward(Act* out_act,        // (B,T,C)
                                   float* lse,          // (B,NH,T)
                                   const Act* qkv_act,  // (B,T,3C)
                                   int B, int T, int C, int NH) {
  float* out = act_f32(out_act);
  const float* qkv = act_f32(qkv_act);
  const int hd = C / NH;
  const int C3 = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  int num_failed = 0;
#pragma omp parallel reduction(+ : num_failed)
  {
    std::vector<float> scores(static_cast<size_t>(kQueryBlock) * T);  // (kQueryBlock, T)
#pragma omp for schedule(static)
    for (int bh = 0; bh < B * NH; bh++) {
      const HeadViews view = head_views(bh, T, C, NH);
      const float* q = qkv + view.qkv_offset;  // (T,hd) stride 3C
      const float* k = q + C;                  // (T,hd) stride 3C
      const float* v = q + 2 * C;              // (T,hd) stride 3C
      float* out_bh = out + view.out_offset;   // (T,hd) stride C
      float* lse_bh = lse + view.lse_offset;   // (T)
      for (int t0 = 0; t0 < T; t0 += kQueryBlock) {
        const int rows = std::min(kQueryBlock, T - t0), keys = t0 + rows;
        // S (rows,keys) = scale * q[t0..] (rows,hd) @ k^T (hd,keys)
        num_failed += sgemm_failed('N', 'T', rows, keys, hd, scale, q + size_t(t0) * C3, C3, k,
                                   C3, 0.0f, scores.data(), keys);
        // Causal softmax of each row over keys 0..t; later keys get probability 0 so the next
        // product can run over whole rows.
        for (int r = 0; r < rows; r++) {
          const int t = t0 + r;
          float* row = scores.data() + static_cast<size_t>(r) * keys;  // (keys)
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
          for (int j = t + 1; j < keys; j++) row[j] = 0.0f;
          lse_bh[t] = max + std::log(sum);
        }
        // out[t0..] (rows,hd) = P (rows,keys) @ v (keys,hd)
        num_failed += sgemm_failed('N', 'N', rows, hd, keys, 1.0f, scores.data(), keys, v, C3,
                                   0.0f, out_bh + size_t(t0) * C, C);
      }
    }
  }
  MOE_CHECK(num_failed == 0, "attention_forward: dnnl_sgemm failed");
}

// Per query block, with P recomputed from the saved logsumexp, dP = dout v^T and
// delta = rowsum(dout * out) (which equals rowsum(P * dP), without needing dP first):
//   dv += P^T dout;   dS = P * (dP - delta);   dq += scale dS k;   dk += scale dS^T q.
// dS keeps the zeros above the diagonal since P has them there.
void CpuBackend::attention_backward(Act* dqkv_act,        // (B,T,3C) +=
                                    const Act* dout_act,  // (B,T,C)
                                    const Act* out_act,   // (B,T,C)
                                    const Act* qkv_act,   // (B,T,3C)
                                    const float* lse,     // (B,NH,T)
                                    int B, int T, int C, int NH) {
  float* dqkv = act_f32(dqkv_act);
  const float* dout = act_f32(dout_act);
  const float* out = act_f32(out_act);
  const float* qkv = act_f32(qkv_act);
  const int hd = C / NH;
  const int C3 = 3 * C;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  int num_failed = 0;
#pragma omp parallel reduction(+ : num_failed)
  {
    std::vector<float> probs(static_cast<size_t>(kQueryBlock) * T);   // (kQueryBlock, T) P
    std::vector<float> dscores(static_cast<size_t>(kQueryBlock) * T); // (kQueryBlock, T) dP, dS
#pragma omp for schedule(static)
    for (int bh = 0; bh < B * NH; bh++) {
      const HeadViews view = head_views(bh, T, C, NH);
      const float* q = qkv + view.qkv_offset;            // (T,hd) stride 3C
      const float* k = q + C;                            // (T,hd) stride 3C
      const float* v = q + 2 * C;                        // (T,hd) stride 3C
      float* dq = dqkv + view.qkv_offset;                // (T,hd) stride 3C
      float* dk = dq + C;                                // (T,hd) stride 3C
      float* dv = dq + 2 * C;                            // (T,hd) stride 3C
      const float* dout_bh = dout + view.out_offset;     // (T,hd) stride C
      const float* out_bh = out + view.out_offset;       // (T,hd) stride C
      const float* lse_bh = lse + view.lse_offset;       // (T)
      for (int t0 = 0; t0 < T; t0 += kQueryBlock) {
        const int rows = std::min(kQueryBlock, T - t0), keys = t0 + rows;
        const float* q_blk = q + size_t(t0) * C3;            // (rows,hd) stride 3C
        const float* dout_blk = dout_bh + size_t(t0) * C;    // (rows,hd) stride C
        // S, then P = exp(S - lse) on the causal part.
        num_failed += sgemm_failed('N', 'T', rows, keys, hd, scale, q_blk, C3, k, C3, 0.0f,
                                   probs.data(), keys);
        // dP (rows,keys) = dout (rows,hd) @ v^T (hd,keys)
        num_failed += sgemm_failed('N', 'T', rows, keys, hd, 1.0f, dout_blk, C, v, C3, 0.0f,
                                   dscores.data(), keys);
        for (int r = 0; r < rows; r++) {
          const int t = t0 + r;
          float* p = probs.data() + static_cast<size_t>(r) * keys;    // (keys)
          float* d = dscores.data() + static_cast<size_t>(r) * keys;  // (keys)
          const float* o = out_bh + static_cast<size_t>(t) * C;       // (hd)
          const float* g = dout_bh + static_cast<size_t>(t) * C;      // (hd)
          float delta = 0.0f;
#pragma omp simd reduction(+ : delta)
          for (int i = 0; i < hd; i++) delta += o[i] * g[i];
          const float row_lse = lse_bh[t];
#pragma omp simd
          for (int j = 0; j <= t; j++) {
            p[j] = simd_expf(p[j] - row_lse);
            d[j] = p[j] * (d[j] - delta);
          }
          for (int j = t + 1; j < keys; j++) p[j] = d[j] = 0.0f;
        }
        // dv (keys,hd) += P^T (keys,rows) @ dout (rows,hd)
        num_failed += sgemm_failed('T', 'N', keys, hd, rows, 1.0f, probs.data(), keys, dout_blk,
                                   C, 1.0f, dv, C3);
        // dq[t0..] (rows,hd) += scale * dS (rows,keys) @ k (keys,hd)
        num_failed += sgemm_failed('N', 'N', rows, hd, keys, scale, dscores.data(), keys, k, C3,
                                   1.0f, dq + size_t(t0) * C3, C3);
        // dk (keys,hd) += scale * dS^T (keys,rows) @ q (rows,hd)
        num_failed += sgemm_failed('T', 'N', keys, hd, rows, scale, dscores.data(), keys, q_blk,
                                   C3, 1.0f, dk, C3);
      }
    }
  }
  MOE_CHECK(num_failed == 0, "attention_backward: dnnl_sgemm failed");
}

}  // namespace moe
