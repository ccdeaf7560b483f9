// GELU, tanh form (core/cuda/gelu_math.cuh), elementwise over bf16 activations: computed in
// fp32 from the widened inputs, rounded once per stored element, 16 bytes per thread where the
// pointers allow it (as in elementwise.cu).
#include "core/cuda/act.cuh"
#include "core/cuda/cuda_backend.h"
#include "core/cuda/device_math.cuh"
#include "core/cuda/gelu_math.cuh"

namespace moe {
namespace {

using cuda::kActVec;

#define GRID_STRIDE(i, n)                                                                    \
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);       \
       i += static_cast<size_t>(gridDim.x) * blockDim.x)

__global__ void gelu_forward_kernel(act_t* out,        // (n)
                                    const act_t* inp,  // (n)
                                    size_t n, size_t num_vec) {
  GRID_STRIDE(v, num_vec) {
    float x[kActVec];
    cuda::act_load_vec(x, inp, v);
    for (int k = 0; k < kActVec; ++k) x[k] = cuda::gelu_value(x[k]);
    cuda::act_store_vec(out, v, x);
  }
  GRID_STRIDE(j, n - num_vec * kActVec) {
    const size_t i = num_vec * kActVec + j;
    act_store(out, i, cuda::gelu_value(act_load(inp, i)));
  }
}

// dinp += gelu'(inp) * dout: the product and the sum in fp32, one rounding.
__global__ void gelu_backward_kernel(act_t* dinp,         // (n) +=
                                     const act_t* inp,    // (n)
                                     const act_t* dout,   // (n)
                                     size_t n, size_t num_vec) {
  GRID_STRIDE(v, num_vec) {
    float dx[kActVec], x[kActVec], dy[kActVec];
    cuda::act_load_vec(dx, dinp, v);
    cuda::act_load_vec(x, inp, v);
    cuda::act_load_vec(dy, dout, v);
    for (int k = 0; k < kActVec; ++k) dx[k] += cuda::gelu_derivative(x[k]) * dy[k];
    cuda::act_store_vec(dinp, v, dx);
  }
  GRID_STRIDE(j, n - num_vec * kActVec) {
    const size_t i = num_vec * kActVec + j;
    act_accumulate(dinp, i, cuda::gelu_derivative(act_load(inp, i)) * act_load(dout, i));
  }
}

}  // namespace

void CudaBackend::gelu_forward(Act* out_act,        // (n)
                               const Act* inp_act,  // (n)
                               size_t n) {
  act_t* out = act_ptr(out_act);
  const act_t* inp = act_ptr(inp_act);
  if (n == 0) return;
  note_write(out);
  const size_t num_vec = cuda::vec_count(n, {out, inp});
  gelu_forward_kernel<<<grid_for(num_vec > 0 ? num_vec : n), kThreads>>>(out, inp, n, num_vec);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::gelu_backward(Act* dinp_act,        // (n) +=
                                const Act* inp_act,   // (n)
                                const Act* dout_act,  // (n)
                                size_t n) {
  act_t* dinp = act_ptr(dinp_act);
  const act_t *inp = act_ptr(inp_act), *dout = act_ptr(dout_act);
  if (n == 0) return;
  note_write(dinp);
  const size_t num_vec = cuda::vec_count(n, {dinp, inp, dout});
  gelu_backward_kernel<<<grid_for(num_vec > 0 ? num_vec : n), kThreads>>>(dinp, inp, dout, n,
                                                                           num_vec);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe
