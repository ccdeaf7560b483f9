// GELU, tanh form, written as x * sigmoid(2u) with u = sqrt(2/pi) (x + 0.044715 x^3), as the
// CPU backend computes it (one exp, no cancellation in 1 + tanh(u) for very negative x).
#include "core/cuda/cuda_backend.h"

namespace moe {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;

__global__ void gelu_forward_kernel(float* out, const float* inp, size_t n) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float x = inp[i];
    const float u = kSqrt2OverPi * (x + kCubic * x * x * x);
    out[i] = x / (1.0f + __expf(-2.0f * u));
  }
}

__global__ void gelu_backward_kernel(float* dinp, const float* inp, const float* dout, size_t n) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float x = inp[i];
    const float u = kSqrt2OverPi * (x + kCubic * x * x * x);
    const float du_dx = kSqrt2OverPi * (1.0f + 3.0f * kCubic * x * x);
    const float sig = 1.0f / (1.0f + __expf(-2.0f * u));
    dinp[i] += (sig + x * 2.0f * sig * (1.0f - sig) * du_dx) * dout[i];
  }
}

}  // namespace

void CudaBackend::gelu_forward(float* out,        // (n)
                               const float* inp,  // (n)
                               size_t n) {
  if (n == 0) return;
  note_write(out);
  gelu_forward_kernel<<<grid_for(n), kThreads>>>(out, inp, n);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::gelu_backward(float* dinp,        // (n) +=
                                const float* inp,   // (n)
                                const float* dout,  // (n)
                                size_t n) {
  if (n == 0) return;
  note_write(dinp);
  gelu_backward_kernel<<<grid_for(n), kThreads>>>(dinp, inp, dout, n);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe
