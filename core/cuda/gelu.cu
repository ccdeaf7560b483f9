// GELU, tanh form (core/cuda/gelu_math.cuh), elementwise.
#include "core/cuda/cuda_backend.h"
#include "core/cuda/gelu_math.cuh"

namespace moe {
namespace {

__global__ void gelu_forward_kernel(float* out, const float* inp, size_t n) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = cuda::gelu_value(inp[i]);
}

__global__ void gelu_backward_kernel(float* dinp, const float* inp, const float* dout, size_t n) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    dinp[i] += cuda::gelu_derivative(inp[i]) * dout[i];
}

}  // namespace

void CudaBackend::gelu_forward(Act* out_act,        // (n)
                               const Act* inp_act,  // (n)
                               size_t n) {
  float* out = act_f32(out_act);
  const float* inp = act_f32(inp_act);
  if (n == 0) return;
  note_write(out);
  gelu_forward_kernel<<<grid_for(n), kThreads>>>(out, inp, n);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::gelu_backward(Act* dinp_act,        // (n) +=
                                const Act* inp_act,   // (n)
                                const Act* dout_act,  // (n)
                                size_t n) {
  float* dinp = act_f32(dinp_act);
  const float *inp = act_f32(inp_act), *dout = act_f32(dout_act);
  if (n == 0) return;
  note_write(dinp);
  gelu_backward_kernel<<<grid_for(n), kThreads>>>(dinp, inp, dout, n);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe
