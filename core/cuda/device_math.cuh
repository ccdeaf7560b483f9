// Reductions shared by the CUDA kernels: warp-level shuffles, and a block-level sum built on
// them (one shared-memory round); and 16-byte vector loads and stores of activations.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "core/cuda/act.cuh"

namespace moe::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ inline T warp_sum(T x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

__device__ inline float warp_max(float x) {
  for (int offset = 16; offset > 0; offset >>= 1)
    x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the sum.
template <typename T>
__device__ inline T block_sum(T x) {
  __shared__ T partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = blockDim.x / 32;
  x = warp_sum(x);
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  T total = lane < num_warps ? partial[lane] : T(0);
  return warp_sum(total);
}

__device__ inline float block_max(float x) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = blockDim.x / 32;
  x = warp_max(x);
  __syncthreads();
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  float total = lane < num_warps ? partial[lane] : -INFINITY;
  return warp_max(total);
}

// ---- 16-byte vectors of activations: 8 bf16 per load or store -----------------------------
// A 2-byte load per thread moves 64 bytes per warp instruction; the elementwise kernels move
// 16 bytes per thread where every pointer allows it (host-checked: vec_count), the rest
// one element at a time.
constexpr int kActVec = 8;

inline bool vec_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Of n elements, how many whole vectors an elementwise kernel may move as vectors: 0 unless
// every pointer is 16-byte aligned (the elements past them go one by one).
inline size_t vec_count(size_t n, std::initializer_list<const void*> pointers) {
  for (const void* p : pointers)
    if (!vec_aligned(p)) return 0;
  return n / kActVec;
}

// x = the kActVec activations of vector i of p (elements kActVec*i ..), widened to fp32.
__device__ inline void act_load_vec(float (&x)[kActVec], const act_t* p, size_t i) {
  const uint4 raw = reinterpret_cast<const uint4*>(p)[i];
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
  for (int k = 0; k < kActVec / 2; ++k) {
    const float2 f = __bfloat1622float2(pairs[k]);
    x[2 * k] = f.x;
    x[2 * k + 1] = f.y;
  }
}

// Vector i of p = x, each element rounded to nearest even.
__device__ inline void act_store_vec(act_t* p, size_t i, const float (&x)[kActVec]) {
  uint4 raw;
  __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&raw);
  for (int k = 0; k < kActVec / 2; ++k) pairs[k] = __floats2bfloat162_rn(x[2 * k], x[2 * k + 1]);
  reinterpret_cast<uint4*>(p)[i] = raw;
}

// x = the kActVec floats of vector i of p (fp32 operands of the same kernels; two 16-byte loads).
__device__ inline void f32_load_vec(float (&x)[kActVec], const float* p, size_t i) {
  const float4* v = reinterpret_cast<const float4*>(p) + 2 * i;
  const float4 lo = v[0], hi = v[1];
  x[0] = lo.x;
  x[1] = lo.y;
  x[2] = lo.z;
  x[3] = lo.w;
  x[4] = hi.x;
  x[5] = hi.y;
  x[6] = hi.z;
  x[7] = hi.w;
}

}  // namespace moe::cuda
