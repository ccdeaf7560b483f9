// Elementwise ops (memory-bound, grid-stride loops): add, accumulate and mul over bf16
// activations, computed in fp32 and rounded once per stored element, 16 bytes per thread where
// the pointers allow it; scale and the two reductions whose result the interface returns on
// the host (one device-to-host copy each) over fp32 gradients.
#include "core/cuda/act.cuh"
#include "core/cuda/cuda_backend.h"
#include "core/cuda/device_math.cuh"

namespace moe {
namespace {

using cuda::kActVec;

#define GRID_STRIDE(i, n)                                                                    \
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);       \
       i += static_cast<size_t>(gridDim.x) * blockDim.x)

// out may alias a or b (accumulate is add with out = a): each element is read before it is
// written, by the same thread.
__global__ void add_kernel(act_t* out,      // (n)
                           const act_t* a,  // (n)
                           const act_t* b,  // (n)
                           size_t n, size_t num_vec) {
  GRID_STRIDE(v, num_vec) {
    float x[kActVec], y[kActVec];
    cuda::act_load_vec(x, a, v);
    cuda::act_load_vec(y, b, v);
    for (int k = 0; k < kActVec; ++k) x[k] += y[k];
    cuda::act_store_vec(out, v, x);
  }
  GRID_STRIDE(j, n - num_vec * kActVec) {
    const size_t i = num_vec * kActVec + j;
    act_store(out, i, act_load(a, i) + act_load(b, i));
  }
}

// out may alias a: every element is read before it is written, by the same thread.
__global__ void mul_kernel(act_t* out,            // (n)
                           const act_t* a,        // (n)
                           const float* factors,  // (n)
                           size_t n, size_t num_vec) {
  GRID_STRIDE(v, num_vec) {
    float x[kActVec], f[kActVec];
    cuda::act_load_vec(x, a, v);
    cuda::f32_load_vec(f, factors, v);
    for (int k = 0; k < kActVec; ++k) x[k] *= f[k];
    cuda::act_store_vec(out, v, x);
  }
  GRID_STRIDE(j, n - num_vec * kActVec) {
    const size_t i = num_vec * kActVec + j;
    act_store(out, i, act_load(a, i) * factors[i]);
  }
}

__global__ void scale_kernel(float* x, float s, size_t n) { GRID_STRIDE(i, n) x[i] *= s; }

// total += sum of x^2 over this block's elements, in double.
__global__ void sum_squares_kernel(double* total, const float* x, size_t n) {
  double sum = 0.0;
  GRID_STRIDE(i, n) sum += static_cast<double>(x[i]) * x[i];
  sum = cuda::block_sum(sum);
  if (threadIdx.x == 0) atomicAdd(total, sum);
}

// num_bad += number of NaN/inf elements (exponent bits all ones).
__global__ void count_nonfinite_kernel(unsigned long long* num_bad, const float* x, size_t n) {
  unsigned long long bad = 0;
  GRID_STRIDE(i, n) bad += (__float_as_uint(x[i]) & 0x7f800000u) == 0x7f800000u;
  bad = cuda::block_sum(bad);
  if (threadIdx.x == 0 && bad > 0) atomicAdd(num_bad, bad);
}

}  // namespace

void CudaBackend::add(Act* out_act,      // (n)
                      const Act* a_act,  // (n)
                      const Act* b_act,  // (n)
                      size_t n) {
  act_t* out = act_ptr(out_act);
  const act_t *a = act_ptr(a_act), *b = act_ptr(b_act);
  if (n == 0) return;
  note_write(out);
  const size_t num_vec = cuda::vec_count(n, {out, a, b});
  add_kernel<<<grid_for(num_vec > 0 ? num_vec : n), kThreads>>>(out, a, b, n, num_vec);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::accumulate(Act* dst_act,        // (n) +=
                             const Act* src_act,  // (n)
                             size_t n) {
  add(dst_act, dst_act, src_act, n);
}

void CudaBackend::scale(float* x, float s, size_t n) {
  if (n == 0) return;
  note_write(x);
  scale_kernel<<<grid_for(n), kThreads>>>(x, s, n);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::mul(Act* out_act,          // (n) may alias a
                      const Act* a_act,      // (n)
                      const float* factors,  // (n)
                      size_t n) {
  act_t* out = act_ptr(out_act);
  const act_t* a = act_ptr(a_act);
  if (n == 0) return;
  note_write(out);
  const size_t num_vec = cuda::vec_count(n, {out, a, factors});
  mul_kernel<<<grid_for(num_vec > 0 ? num_vec : n), kThreads>>>(out, a, factors, n, num_vec);
  CUDA_CHECK_LAUNCH();
}

double CudaBackend::sum_squares(const float* x, size_t n) {
  if (n == 0) return 0.0;
  auto* total = static_cast<double*>(scratch(kReduce, sizeof(double)));  // (1)
  CUDA_CHECK(cudaMemsetAsync(total, 0, sizeof(double), 0));
  sum_squares_kernel<<<grid_for(n), kThreads>>>(total, x, n);
  CUDA_CHECK_LAUNCH();
  double result = 0.0;
  CUDA_CHECK(cudaMemcpy(&result, total, sizeof(double), cudaMemcpyDeviceToHost));
  return result;
}

bool CudaBackend::all_finite(const float* x, size_t n) {
  if (n == 0) return true;
  auto* num_bad = static_cast<unsigned long long*>(scratch(kReduce, sizeof(unsigned long long)));
  CUDA_CHECK(cudaMemsetAsync(num_bad, 0, sizeof(unsigned long long), 0));
  count_nonfinite_kernel<<<grid_for(n), kThreads>>>(num_bad, x, n);
  CUDA_CHECK_LAUNCH();
  unsigned long long result = 0;
  CUDA_CHECK(cudaMemcpy(&result, num_bad, sizeof(result), cudaMemcpyDeviceToHost));
  return result == 0;
}

}  // namespace moe
