// Conversions between fp32 and bf16: fp32 -> bf16 (round to nearest even) for the cached bf16
// copies of weights (bf16_weight) and gemm_rate's operand, four floats per thread and step
// when the pointers allow 16-byte loads; bf16 activations -> fp32 (exact) for the router's
// fp32 products (router_logits.cu), four per step when the pointers allow.
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

__global__ void to_f32_kernel(float* out,        // (n)
                              const act_t* inp,  // (n)
                              size_t n) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = act_load(inp, i);
}

__global__ void to_f32_vec4_kernel(float4* out,                 // (n4)
                                   const __nv_bfloat162* inp,   // (n4, 2)
                                   size_t n4) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += stride) {
    const float2 lo = __bfloat1622float2(inp[2 * i]), hi = __bfloat1622float2(inp[2 * i + 1]);
    out[i] = make_float4(lo.x, lo.y, hi.x, hi.y);
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

void launch_to_f32(float* out, const act_t* inp, size_t n) {
  if (n == 0) return;
  // An activation may start at any element (2-byte alignment): the pairs need 4 bytes.
  const bool aligned = reinterpret_cast<uintptr_t>(inp) % 4 == 0 &&
                       reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (aligned && n >= 4) {
    const size_t n4 = n / 4;
    to_f32_vec4_kernel<<<grid_for(n4), kThreads>>>(reinterpret_cast<float4*>(out),
                                                   reinterpret_cast<const __nv_bfloat162*>(inp),
                                                   n4);
    CUDA_CHECK_LAUNCH();
    if (n % 4 != 0) {
      to_f32_kernel<<<1, 32>>>(out + n4 * 4, inp + n4 * 4, n % 4);
      CUDA_CHECK_LAUNCH();
    }
    return;
  }
  to_f32_kernel<<<grid_for(n), kThreads>>>(out, inp, n);
  CUDA_CHECK_LAUNCH();
}

const float* CudaBackend::to_f32(Slot slot, const act_t* x, size_t n) {
  auto* out = static_cast<float*>(scratch(slot, n * sizeof(float) + 16));  // (n)
  launch_to_f32(out, x, n);
  return out;
}

}  // namespace moe
