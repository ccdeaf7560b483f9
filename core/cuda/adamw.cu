// AdamW (torch.optim.AdamW semantics, as the CPU backend): decoupled decay, bias-corrected
// moments, eps after the square root. The same kernel writes the parameters' bf16 copy when
// the GEMMs hold one, so weights are converted once per step, inside the update.
#include <cmath>

#include "core/cuda/cuda_backend.h"

namespace moe {
namespace {

__global__ void adamw_kernel(float* params,             // (n)
                             __nv_bfloat16* params_bf16,  // (n) or nullptr
                             const float* grads,        // (n)
                             float* m,                  // (n)
                             float* v,                  // (n)
                             size_t n, float lr, float beta1, float beta2, float eps,
                             float decay, float bias_correction1, float bias_correction2) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float g = grads[i];
    const float m_i = beta1 * m[i] + (1.0f - beta1) * g;
    const float v_i = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = m_i;
    v[i] = v_i;
    const float m_hat = m_i / bias_correction1, v_hat = v_i / bias_correction2;
    const float p = params[i] * decay - lr * m_hat / (sqrtf(v_hat) + eps);
    params[i] = p;
    if (params_bf16 != nullptr) params_bf16[i] = __float2bfloat16_rn(p);
  }
}

}  // namespace

void CudaBackend::adamw_update(float* params, const float* grads, float* m, float* v, size_t n,
                               float lr, float beta1, float beta2, float eps, float weight_decay,
                               int step) {
  if (n == 0) return;
  note_write(m);
  note_write(v);
  // A valid bf16 copy of the parameters' allocation stays valid: the kernel updates it too.
  uintptr_t base = 0;
  Allocation* a = find_allocation(params, &base);
  __nv_bfloat16* shadow = nullptr;
  if (a != nullptr && a->shadow != nullptr && a->shadow_valid)
    shadow = a->shadow + (reinterpret_cast<uintptr_t>(params) - base) / sizeof(float);
  else
    note_write(params);
  const float bias_correction1 = static_cast<float>(1.0 - std::pow(double{beta1}, step));
  const float bias_correction2 = static_cast<float>(1.0 - std::pow(double{beta2}, step));
  adamw_kernel<<<grid_for(n), kThreads>>>(params, shadow, grads, m, v, n, lr, beta1, beta2, eps,
                                          1.0f - lr * weight_decay, bias_correction1,
                                          bias_correction2);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe
