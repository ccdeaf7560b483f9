// Softmax cross-entropy per row: losses[i] = logsumexp(logits[i]) - logits[i, targets[i]].
// probs may be the logits buffer itself (the (N,V) logits are the largest activation; the
// model overwrites them in place), so each row reads what it needs before writing probs.
#include <algorithm>
#include <cmath>

#include "core/cpu/cpu_backend.h"
#include "core/cpu/simd_exp.h"

namespace moe {

void CpuBackend::crossentropy_forward(float* losses,          // (N)
                                      Act* probs_act,         // (N,V) may alias logits
                                      const Act* logits_act,  // (N,V)
                                      const int* targets,     // (N)
                                      int N, int V) {
  float* probs = act_f32(probs_act);
  const float* logits = act_f32(logits_act);
#pragma omp parallel for schedule(static)
  for (int i = 0; i < N; i++) {
    const float* x = logits + static_cast<size_t>(i) * V;  // (V)
    float* p = probs + static_cast<size_t>(i) * V;         // (V) maybe the same memory as x
    const float target_logit = x[targets[i]];  // read before p overwrites it
    float max = x[0];
#pragma omp simd reduction(max : max)
    for (int j = 0; j < V; j++) max = std::max(max, x[j]);
    // Elementwise in place: p[j] is written only after x[j] is read. The sum runs in double so
    // a 50k-word vocabulary adds up without losing the small terms.
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < V; j++) {
      p[j] = simd_expf(x[j] - max);
      sum += p[j];
    }
    const float inv_sum = static_cast<float>(1.0 / sum);
#pragma omp simd
    for (int j = 0; j < V; j++) p[j] *= inv_sum;
    losses[i] = static_cast<float>(std::log(sum) + max - target_logit);
  }
}

// The gradient of dloss * losses[i] with respect to logits[i]: (probs - onehot) * dloss.
// Written, not accumulated: it usually overwrites probs in place.
void CpuBackend::crossentropy_backward(Act* dlogits_act,      // (N,V) may alias probs
                                       const Act* probs_act,  // (N,V)
                                       const int* targets,    // (N)
                                       float dloss, int N, int V) {
  float* dlogits = act_f32(dlogits_act);
  const float* probs = act_f32(probs_act);
#pragma omp parallel for schedule(static)
  for (int i = 0; i < N; i++) {
    const float* p = probs + static_cast<size_t>(i) * V;  // (V)
    float* d = dlogits + static_cast<size_t>(i) * V;      // (V)
#pragma omp simd
    for (int j = 0; j < V; j++) d[j] = p[j] * dloss;
    d[targets[i]] -= dloss;
  }
}

}  // namespace moe
