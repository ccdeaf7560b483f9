// Elementwise ops over flat fp32 buffers (memory-bound, grid-stride loops; activations are
// fp32 here), and the two reductions whose result the interface returns on the host (one
// device-to-host copy each).
#include "core/cuda/cuda_backend.h"
#include "core/cuda/device_math.cuh"

namespace moe {
namespace {

#define GRID_STRIDE(i, n)                                                                    \
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);       \
       i += static_cast<size_t>(gridDim.x) * blockDim.x)

__global__ void add_kernel(float* out, const float* a, const float* b, size_t n) {
  GRID_STRIDE(i, n) out[i] = a[i] + b[i];
}
__global__ void accumulate_kernel(float* dst, const float* src, size_t n) {
  GRID_STRIDE(i, n) dst[i] += src[i];
}
__global__ void scale_kernel(float* x, float s, size_t n) { GRID_STRIDE(i, n) x[i] *= s; }
__global__ void mul_kernel(float* out, const float* a, const float* factors, size_t n) {
  GRID_STRIDE(i, n) out[i] = a[i] * factors[i];
}

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
  float* out = act_f32(out_act);
  const float *a = act_f32(a_act), *b = act_f32(b_act);
  if (n == 0) return;
  note_write(out);
  add_kernel<<<grid_for(n), kThreads>>>(out, a, b, n);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::accumulate(Act* dst_act,        // (n) +=
                             const Act* src_act,  // (n)
                             size_t n) {
  float* dst = act_f32(dst_act);
  const float* src = act_f32(src_act);
  if (n == 0) return;
  note_write(dst);
  accumulate_kernel<<<grid_for(n), kThreads>>>(dst, src, n);
  CUDA_CHECK_LAUNCH();
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
  float* out = act_f32(out_act);
  const float* a = act_f32(a_act);
  if (n == 0) return;
  note_write(out);
  mul_kernel<<<grid_for(n), kThreads>>>(out, a, factors, n);
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
