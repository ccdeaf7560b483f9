// Top-k experts per token, one thread per token (K and E are small): the K largest
// probabilities in decreasing order, ties to the lower expert id, exactly the CPU backend's
// total order, so both backends route a token the same way given the same probabilities.
#include <string>

#include "core/cuda/cuda_backend.h"

namespace moe {
namespace {

__global__ void topk_forward_kernel(int* expert_idx,     // (N,K)
                                    float* gates,        // (N,K)
                                    const float* probs,  // (N,E)
                                    int N, int E, int K) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const float* p = probs + static_cast<size_t>(n) * E;  // (E)
  int* idx = expert_idx + static_cast<size_t>(n) * K;   // (K)
  float* g = gates + static_cast<size_t>(n) * K;        // (K)
  int prev = -1;
  float prev_p = 0.0f;
  double sum = 0.0;
  for (int k = 0; k < K; ++k) {
    // The best expert strictly after the previous choice in (p descending, id ascending).
    int best = -1;
    for (int e = 0; e < E; ++e) {
      const bool after_prev = prev < 0 || p[e] < prev_p || (p[e] == prev_p && e > prev);
      if (!after_prev) continue;
      if (best < 0 || p[e] > p[best]) best = e;
    }
    if (best < 0) best = k;  // only NaN probabilities get here; keep the index in range
    idx[k] = best;
    g[k] = p[best];
    sum += p[best];
    prev = best;
    prev_p = p[best];
  }
  if (K > 1) {
    const float inv = static_cast<float>(1.0 / sum);
    for (int k = 0; k < K; ++k) g[k] *= inv;
  }
}

// K == 1: dp[idx] += dg. K > 1 (g_j = p_j / s): dp_i += (dg_i - sum_j dg_j g_j) / s.
__global__ void topk_backward_kernel(float* dprobs,          // (N,E) +=
                                     const float* dgates,    // (N,K)
                                     const int* expert_idx,  // (N,K)
                                     const float* probs,     // (N,E)
                                     int N, int E, int K) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const float* p = probs + static_cast<size_t>(n) * E;       // (E)
  const float* dg = dgates + static_cast<size_t>(n) * K;     // (K)
  const int* idx = expert_idx + static_cast<size_t>(n) * K;  // (K)
  float* dp = dprobs + static_cast<size_t>(n) * E;           // (E)
  if (K == 1) {
    dp[idx[0]] += dg[0];
    return;
  }
  double s = 0.0, dot = 0.0;
  for (int k = 0; k < K; ++k) s += p[idx[k]];
  for (int k = 0; k < K; ++k) dot += static_cast<double>(dg[k]) * p[idx[k]];
  const double inv = 1.0 / s;
  for (int k = 0; k < K; ++k) dp[idx[k]] += static_cast<float>((dg[k] - dot * inv) * inv);
}

}  // namespace

void CudaBackend::topk_forward(int* expert_idx, float* gates, const float* probs, int N, int E,
                               int K) {
  MOE_CHECK(K >= 1 && K <= E, "topk_forward: need 1 <= K <= E");
  if (N == 0) return;
  note_write(expert_idx);
  note_write(gates);
  topk_forward_kernel<<<(N + 127) / 128, 128>>>(expert_idx, gates, probs, N, E, K);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::topk_backward(float* dprobs, const float* dgates, const int* expert_idx,
                                const float* probs, int N, int E, int K) {
  if (N == 0) return;
  note_write(dprobs);
  topk_backward_kernel<<<(N + 127) / 128, 128>>>(dprobs, dgates, expert_idx, probs, N, E, K);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe
