// The CUDA backend's activations (core/activation.h) are bf16: `act_t`. Kernels load them
// widened to fp32, compute in fp32, and round once when they store (round to nearest even).
#pragma once

#include <cuda_bf16.h>

#include "core/activation.h"

namespace moe {

using act_t = __nv_bfloat16;

inline act_t* act_ptr(Act* p) { return reinterpret_cast<act_t*>(p); }
inline const act_t* act_ptr(const Act* p) { return reinterpret_cast<const act_t*>(p); }

__device__ __forceinline__ float act_load(const act_t* p, size_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ void act_store(act_t* p, size_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}
// p[i] += v, rounded once (the += of a backward into activation memory; not atomic).
__device__ __forceinline__ void act_accumulate(act_t* p, size_t i, float v) {
  p[i] = __float2bfloat16_rn(__bfloat162float(p[i]) + v);
}

}  // namespace moe
