// Top-k expert selection: the K largest probabilities per token in decreasing order, ties to
// the lower expert id (a total order, so the choice is deterministic on every backend).
// K == 1: gate = p (Switch); K > 1: gates renormalised over the K chosen, g_j = p_j / s.
#include "core/cpu/cpu_backend.h"
#include "core/error.h"

namespace moe {

void CpuBackend::topk_forward(int* expert_idx,     // (N,K)
                              float* gates,        // (N,K)
                              const float* probs,  // (N,E)
                              int N, int E, int K) {
  MOE_CHECK(K >= 1 && K <= E, "topk_forward: need 1 <= K <= E");
#pragma omp parallel for
  for (int n = 0; n < N; n++) {
    const float* p = probs + (size_t)n * E;  // (E)
    int* idx = expert_idx + (size_t)n * K;   // (K)
    float* g = gates + (size_t)n * K;        // (K)
    // Pick the k-th choice as the best expert strictly after the (k-1)-th one in the order
    // (p descending, id ascending): no per-row mask needed, O(K*E) with K tiny.
    int prev = -1;
    float prev_p = 0.0f;
    double sum = 0.0;
    for (int k = 0; k < K; k++) {
      int best = -1;
      for (int e = 0; e < E; e++) {
        bool after_prev = prev < 0 || p[e] < prev_p || (p[e] == prev_p && e > prev);
        if (!after_prev) continue;
        if (best < 0 || p[e] > p[best]) best = e;  // strict >: ties keep the lower id
      }
      // Only NaN probabilities (a diverged step) leave no candidate: keep the index in range;
      // the non-finite loss check discards such a step.
      if (best < 0) best = k;
      idx[k] = best;
      g[k] = p[best];
      sum += p[best];
      prev = best;
      prev_p = p[best];
    }
    if (K > 1) {
      float inv = (float)(1.0 / sum);
      for (int k = 0; k < K; k++) g[k] *= inv;
    }
  }
}

void CpuBackend::topk_backward(float* dprobs,          // (N,E) +=
                               const float* dgates,    // (N,K)
                               const int* expert_idx,  // (N,K)
                               const float* probs,     // (N,E)
                               int N, int E, int K) {
#pragma omp parallel for
  for (int n = 0; n < N; n++) {
    const float* p = probs + (size_t)n * E;     // (E)
    const float* dg = dgates + (size_t)n * K;   // (K)
    const int* idx = expert_idx + (size_t)n * K;  // (K)
    float* dp = dprobs + (size_t)n * E;         // (E)
    if (K == 1) {  // gate = p: the gradient passes straight through
      dp[idx[0]] += dg[0];
      continue;
    }
    // g_j = p_j / s, s = sum_chosen p: dp_i = (dg_i - sum_j dg_j g_j) / s for chosen i,
    // 0 for the rest (they do not enter the gates).
    double s = 0.0;
    for (int k = 0; k < K; k++) s += p[idx[k]];
    double dot = 0.0;  // sum_j dg_j p_j
    for (int k = 0; k < K; k++) dot += (double)dg[k] * p[idx[k]];
    double inv = 1.0 / s;
    for (int k = 0; k < K; k++) dp[idx[k]] += (float)((dg[k] - dot * inv) * inv);
  }
}

}  // namespace moe
