// AdamW with torch.optim.AdamW semantics:
//   p *= 1 - lr*wd                        (decoupled decay, before the Adam step)
//   m = b1 m + (1-b1) g,   v = b2 v + (1-b2) g^2
//   p -= lr * mhat / (sqrt(vhat) + eps),  mhat = m / (1-b1^step),  vhat = v / (1-b2^step)
// The caller passes weight_decay 0 for tensors that are not decayed (fewer than two dims).
#include <cmath>

#include "core/cpu/cpu_backend.h"

namespace moe {

void CpuBackend::adamw_update(float* params,       // (n)
                              const float* grads,  // (n)
                              float* m,            // (n) first moment
                              float* v,            // (n) second moment
                              size_t n, float lr, float beta1, float beta2, float eps,
                              float weight_decay, int step) {
  // In double, as torch computes them (Python floats); the per-element work stays in fp32.
  const float bias_correction1 = static_cast<float>(1.0 - std::pow(double{beta1}, step));
  const float bias_correction2 = static_cast<float>(1.0 - std::pow(double{beta2}, step));
  const float decay = 1.0f - lr * weight_decay;
#pragma omp parallel for simd schedule(static)
  for (size_t i = 0; i < n; i++) {
    const float g = grads[i];
    m[i] = beta1 * m[i] + (1.0f - beta1) * g;
    v[i] = beta2 * v[i] + (1.0f - beta2) * g * g;
    const float m_hat = m[i] / bias_correction1;
    const float v_hat = v[i] / bias_correction2;
    params[i] = params[i] * decay - lr * m_hat / (std::sqrt(v_hat) + eps);
  }
}

}  // namespace moe
