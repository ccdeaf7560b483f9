// Router softmax: probs = softmax(logits) and lse = logsumexp(logits) per row. The lse is
// saved for the z-loss. Rows are independent, so they are spread over threads.
#include <cmath>

#include "core/cpu/cpu_backend.h"

namespace moe {

void CpuBackend::softmax_forward(float* probs,         // (N,E)
                                 float* lse,           // (N)
                                 const float* logits,  // (N,E)
                                 int N, int E) {
#pragma omp parallel for
  for (int n = 0; n < N; n++) {
    const float* x = logits + (size_t)n * E;  // (E)
    float* p = probs + (size_t)n * E;         // (E)
    // Subtract the row max so exp never overflows (numerical stability).
    float maxv = -INFINITY;
    for (int e = 0; e < E; e++) maxv = std::fmax(maxv, x[e]);
    double sum = 0.0;  // double: the lse feeds a squared loss, keep it accurate
    for (int e = 0; e < E; e++) {
      float v = std::exp(x[e] - maxv);
      p[e] = v;
      sum += v;
    }
    float inv = (float)(1.0 / sum);
    for (int e = 0; e < E; e++) p[e] *= inv;
    lse[n] = maxv + (float)std::log(sum);
  }
}

void CpuBackend::softmax_backward(float* dlogits,       // (N,E) +=
                                  const float* dprobs,  // (N,E)
                                  const float* probs,   // (N,E)
                                  int N, int E) {
#pragma omp parallel for
  for (int n = 0; n < N; n++) {
    const float* dp = dprobs + (size_t)n * E;  // (E)
    const float* p = probs + (size_t)n * E;    // (E)
    float* dx = dlogits + (size_t)n * E;       // (E)
    // Jacobian of softmax: dx_i = p_i * (dp_i - sum_j p_j dp_j).
    double dot = 0.0;
    for (int e = 0; e < E; e++) dot += (double)p[e] * dp[e];
    for (int e = 0; e < E; e++) dx[e] += p[e] * (dp[e] - (float)dot);
  }
}

}  // namespace moe
