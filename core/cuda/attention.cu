// Causal multi-head attention as batched cuBLASLt products over the (batch, head) pairs, with
// a warp-per-row causal softmax between them (llm.c's layout):
//   q, k, v (B,NH,T,hd) bf16 <- qkv (B,T,3C);  att = softmax(mask(scale q k^T)) (B,NH,T,T) fp32;
//   y = att v (B,NH,T,hd) -> out (B,T,C).
// The interface saves att in fp32 (B,NH,T,T), so this is not a fused flash attention: the
// T x T probabilities go through memory once each way, and the upper triangle is computed by
// the score GEMM and then zeroed (at most twice the GEMM work of a triangular product).
#include <cmath>

#include "core/cuda/cuda_backend.h"
#include "core/cuda/device_math.cuh"

namespace moe {
namespace {

// q, k, v (B,NH,T,hd) bf16 from qkv (B,T,3C); head h is columns h*hd..(h+1)*hd of each part.
__global__ void split_heads_kernel(__nv_bfloat16* q, __nv_bfloat16* k, __nv_bfloat16* v,
                                   const float* qkv,  // (B,T,3C)
                                   int B, int T, int C, int NH) {
  const int hd = C / NH;
  const size_t total = static_cast<size_t>(B) * T * C;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    // i indexes (b, t, c) of one part; the output index is (b, h, t, d).
    const int c = static_cast<int>(i % C);
    const size_t bt = i / C;
    const int t = static_cast<int>(bt % T), b = static_cast<int>(bt / T);
    const int h = c / hd, d = c % hd;
    const size_t o = ((static_cast<size_t>(b) * NH + h) * T + t) * hd + d;
    const float* row = qkv + bt * 3 * C;  // (3C)
    q[o] = __float2bfloat16_rn(row[c]);
    k[o] = __float2bfloat16_rn(row[C + c]);
    v[o] = __float2bfloat16_rn(row[2 * C + c]);
  }
}

// dy (B,NH,T,hd) bf16 from dout (B,T,C).
__global__ void split_heads_one_kernel(__nv_bfloat16* out, const float* inp,  // (B,T,C)
                                       int B, int T, int C, int NH) {
  const int hd = C / NH;
  const size_t total = static_cast<size_t>(B) * T * C;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(i % C);
    const size_t bt = i / C;
    const int t = static_cast<int>(bt % T), b = static_cast<int>(bt / T);
    out[((static_cast<size_t>(b) * NH + c / hd) * T + t) * hd + c % hd] =
        __float2bfloat16_rn(inp[i]);
  }
}

// out (B,T,C) = y (B,NH,T,hd) with the heads merged back.
__global__ void merge_heads_kernel(float* out, const float* y, int B, int T, int C, int NH) {
  const int hd = C / NH;
  const size_t total = static_cast<size_t>(B) * T * C;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(i % C);
    const size_t bt = i / C;
    const int t = static_cast<int>(bt % T), b = static_cast<int>(bt / T);
    out[i] = y[((static_cast<size_t>(b) * NH + c / hd) * T + t) * hd + c % hd];
  }
}

// dqkv (B,T,3C) += dq | dk | dv, each (B,NH,T,hd).
__global__ void merge_heads_grad_kernel(float* dqkv, const float* dq, const float* dk,
                                        const float* dv, int B, int T, int C, int NH) {
  const int hd = C / NH;
  const size_t total = static_cast<size_t>(B) * T * C;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(i % C);
    const size_t bt = i / C;
    const int t = static_cast<int>(bt % T), b = static_cast<int>(bt / T);
    const size_t src = ((static_cast<size_t>(b) * NH + c / hd) * T + t) * hd + c % hd;
    float* row = dqkv + bt * 3 * C;  // (3C)
    row[c] += dq[src];
    row[C + c] += dk[src];
    row[2 * C + c] += dv[src];
  }
}

// One warp per row of att (B*NH*T rows of T): causal softmax over keys 0..t in place, zeros
// after t, and the bf16 copy the next product reads.
__global__ void causal_softmax_kernel(float* att,             // (B*NH*T, T) scores -> probs
                                      __nv_bfloat16* att_bf16,  // (B*NH*T, T)
                                      size_t rows, int T) {
  const size_t r = static_cast<size_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const int t = static_cast<int>(r % T);
  float* row = att + r * T;                      // (T)
  __nv_bfloat16* row_bf16 = att_bf16 + r * T;    // (T)
  float max = -INFINITY;
  for (int j = lane; j <= t; j += 32) max = fmaxf(max, row[j]);
  max = cuda::warp_max(max);
  float sum = 0.0f;
  for (int j = lane; j <= t; j += 32) sum += __expf(row[j] - max);
  const float inv_sum = 1.0f / cuda::warp_sum(sum);
  for (int j = lane; j < T; j += 32) {
    const float p = j <= t ? __expf(row[j] - max) * inv_sum : 0.0f;
    row[j] = p;
    row_bf16[j] = __float2bfloat16_rn(p);
  }
}

// dS = P * (dP - rowsum(P * dP)) over the causal part, 0 above the diagonal, as bf16.
__global__ void causal_softmax_backward_kernel(__nv_bfloat16* ds,  // (B*NH*T, T)
                                               const float* dp,    // (B*NH*T, T)
                                               const float* att,   // (B*NH*T, T)
                                               size_t rows, int T) {
  const size_t r = static_cast<size_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const int t = static_cast<int>(r % T);
  const float* p = att + r * T;  // (T)
  const float* d = dp + r * T;   // (T)
  float dot = 0.0f;
  for (int j = lane; j <= t; j += 32) dot += p[j] * d[j];
  dot = cuda::warp_sum(dot);
  for (int j = lane; j < T; j += 32)
    ds[r * T + j] = __float2bfloat16_rn(j <= t ? p[j] * (d[j] - dot) : 0.0f);
}

// One batched product over the B*NH pairs, column-major (see GemmCall).
GemmCall batched(bool trans_a, bool trans_b, int m, int n, int k, const void* a, int lda,
                 long long stride_a, const void* b, int ldb, long long stride_b, float* c,
                 int ldc, long long stride_c, int batch, float alpha) {
  GemmCall g;
  g.trans_a = trans_a;
  g.trans_b = trans_b;
  g.m = m;
  g.n = n;
  g.k = k;
  g.a = a;
  g.lda = lda;
  g.stride_a = stride_a;
  g.b = b;
  g.ldb = ldb;
  g.stride_b = stride_b;
  g.c = c;
  g.ldc = ldc;
  g.stride_c = stride_c;
  g.batch = batch;
  g.alpha = alpha;
  return g;
}

}  // namespace

void CudaBackend::attention_forward(float* out,        // (B,T,C)
                                    float* att,        // (B,NH,T,T)
                                    const float* qkv,  // (B,T,3C)
                                    int B, int T, int C, int NH) {
  if (B * T == 0) return;
  note_write(out);
  note_write(att);
  const int hd = C / NH, batch = B * NH;
  const size_t BTC = static_cast<size_t>(B) * T * C, rows = static_cast<size_t>(batch) * T;
  const long long head = static_cast<long long>(T) * hd, square = static_cast<long long>(T) * T;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  auto* q = static_cast<__nv_bfloat16*>(scratch(kBf16Q, BTC * 2));             // (B,NH,T,hd)
  auto* k = static_cast<__nv_bfloat16*>(scratch(kBf16K, BTC * 2));             // (B,NH,T,hd)
  auto* v = static_cast<__nv_bfloat16*>(scratch(kBf16V, BTC * 2));             // (B,NH,T,hd)
  auto* p = static_cast<__nv_bfloat16*>(scratch(kBf16Att, rows * T * 2));      // (B,NH,T,T)
  auto* y = static_cast<float*>(scratch(kF32Y, BTC * 4));                      // (B,NH,T,hd)
  split_heads_kernel<<<grid_for(BTC), kThreads>>>(q, k, v, qkv, B, T, C, NH);
  CUDA_CHECK_LAUNCH();
  // scores: att^T (T_k, T_q) = k (T_k,hd) * q^T (hd,T_q), i.e. row-major att = scale q k^T
  gemm(batched(true, false, T, T, hd, k, hd, head, q, hd, head, att, T, square, batch, scale));
  const int warps = kThreads / 32;
  causal_softmax_kernel<<<static_cast<unsigned>((rows + warps - 1) / warps), kThreads>>>(
      att, p, rows, T);
  CUDA_CHECK_LAUNCH();
  // y^T (hd, T) = v^T (hd,T) * att^T (T,T), i.e. row-major y = att v
  gemm(batched(false, false, hd, T, T, v, hd, head, p, T, square, y, hd, head, batch, 1.0f));
  merge_heads_kernel<<<grid_for(BTC), kThreads>>>(out, y, B, T, C, NH);
  CUDA_CHECK_LAUNCH();
}

// With P = att, dP = dy v^T:  dv = P^T dy;  dS = P * (dP - rowsum(P * dP));
// dq = scale dS k;  dk = scale dS^T q.
void CudaBackend::attention_backward(float* dqkv,        // (B,T,3C) +=
                                     float* scratch_att, // (B,NH,T,T) holds dP
                                     const float* dout,  // (B,T,C)
                                     const float* qkv,   // (B,T,3C)
                                     const float* att,   // (B,NH,T,T)
                                     int B, int T, int C, int NH) {
  if (B * T == 0) return;
  note_write(dqkv);
  note_write(scratch_att);
  const int hd = C / NH, batch = B * NH;
  const size_t BTC = static_cast<size_t>(B) * T * C, rows = static_cast<size_t>(batch) * T;
  const long long head = static_cast<long long>(T) * hd, square = static_cast<long long>(T) * T;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  auto* q = static_cast<__nv_bfloat16*>(scratch(kBf16Q, BTC * 2));         // (B,NH,T,hd)
  auto* k = static_cast<__nv_bfloat16*>(scratch(kBf16K, BTC * 2));         // (B,NH,T,hd)
  auto* v = static_cast<__nv_bfloat16*>(scratch(kBf16V, BTC * 2));         // (B,NH,T,hd)
  auto* dy = static_cast<__nv_bfloat16*>(scratch(kBf16Dout, BTC * 2));     // (B,NH,T,hd)
  auto* p = static_cast<__nv_bfloat16*>(scratch(kBf16Att, rows * T * 2));  // (B,NH,T,T) P, then dS
  auto* dq = static_cast<float*>(scratch(kF32Dq, BTC * 4));                // (B,NH,T,hd)
  auto* dk = static_cast<float*>(scratch(kF32Dk, BTC * 4));                // (B,NH,T,hd)
  auto* dv = static_cast<float*>(scratch(kF32Dv, BTC * 4));                // (B,NH,T,hd)
  split_heads_kernel<<<grid_for(BTC), kThreads>>>(q, k, v, qkv, B, T, C, NH);
  CUDA_CHECK_LAUNCH();
  split_heads_one_kernel<<<grid_for(BTC), kThreads>>>(dy, dout, B, T, C, NH);
  CUDA_CHECK_LAUNCH();
  launch_to_bf16(p, att, rows * T);
  // dP^T (T_k, T_q) = v (T_k,hd) * dy^T (hd,T_q), i.e. row-major dP = dy v^T
  gemm(batched(true, false, T, T, hd, v, hd, head, dy, hd, head, scratch_att, T, square, batch,
               1.0f));
  // dv^T (hd, T_k) = dy^T (hd,T_q) * P (T_q,T_k), i.e. row-major dv = P^T dy
  gemm(batched(false, true, hd, T, T, dy, hd, head, p, T, square, dv, hd, head, batch, 1.0f));
  const int warps = kThreads / 32;
  causal_softmax_backward_kernel<<<static_cast<unsigned>((rows + warps - 1) / warps), kThreads>>>(
      p, scratch_att, att, rows, T);
  CUDA_CHECK_LAUNCH();
  // dq^T (hd, T_q) = k^T (hd,T_k) * dS^T (T_k,T_q), i.e. row-major dq = dS k
  gemm(batched(false, false, hd, T, T, k, hd, head, p, T, square, dq, hd, head, batch, scale));
  // dk^T (hd, T_k) = q^T (hd,T_q) * dS (T_q,T_k), i.e. row-major dk = dS^T q
  gemm(batched(false, true, hd, T, T, q, hd, head, p, T, square, dk, hd, head, batch, scale));
  merge_heads_grad_kernel<<<grid_for(BTC), kThreads>>>(dqkv, dq, dk, dv, B, T, C, NH);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe
