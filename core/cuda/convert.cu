// fp32 -> bf16 conversion of GEMM operands (round to nearest even), four floats per thread
// and step when the pointers allow 16-byte loads.
#include "core/cuda/cuda_backend.h"

namespace moe {
namespace {

__global__ void to_bf16_kernel(__nv_bfloat16* out,      // (n)
                               const float* inp,        // (n)
                               size_t n) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = __float2bfloat16_rn(inp[i]);
}

__global__ void to_bf16_vec4_kernel(__nv_bfloat162* out,  // (n4, 2)
                                    const float4* inp,    // (n4)
                                    size_t n4) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += stride) {
    const float4 v = inp[i];
    out[2 * i] = __floats2bfloat162_rn(v.x, v.y);
    out[2 * i + 1] = __floats2bfloat162_rn(v.z, v.w);
  }
}

}  // namespace

void launch_to_bf16(__nv_bfloat16* out, const float* inp, size_t n) {
  if (n == 0) return;
  const bool aligned = reinterpret_cast<uintptr_t>(inp) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(out) % 8 == 0;
  if (aligned && n >= 4) {
    const size_t n4 = n / 4;
    to_bf16_vec4_kernel<<<grid_for(n4), kThreads>>>(reinterpret_cast<__nv_bfloat162*>(out),
                                                    reinterpret_cast<const float4*>(inp), n4);
    CUDA_CHECK_LAUNCH();
    if (n % 4 != 0) {
      to_bf16_kernel<<<1, 32>>>(out + n4 * 4, inp + n4 * 4, n % 4);
      CUDA_CHECK_LAUNCH();
    }
    return;
  }
  to_bf16_kernel<<<grid_for(n), kThreads>>>(out, inp, n);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe
