// The bf16 GEMM rate of this GPU through the backend's own cuBLASLt path (bench_step's MFU
// denominator): random inputs (never zeros, which run faster), warm-up, CUDA events. bf16
// operands, fp32 accumulation and a bf16 output: the linear forward's product, as the model
// runs it.
#include <algorithm>
#include <vector>

#include "core/cuda/cuda_backend.h"

namespace moe {
namespace {

// Values in [-1, 1) from a per-element hash: no host upload of gigabytes.
__global__ void fill_random_kernel(float* x, size_t n, unsigned seed) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed;
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    x[i] = static_cast<float>(h) * (2.0f / 4294967296.0f) - 1.0f;
  }
}

}  // namespace

GemmRate measure_gemm_rate(int m, int n, int k, int reps) {
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CudaBackend backend(device);
  const size_t a_size = static_cast<size_t>(m) * k, b_size = static_cast<size_t>(n) * k;
  auto* a = static_cast<float*>(backend.alloc_bytes(a_size * sizeof(float)));  // (m,k)
  auto* b = static_cast<float*>(backend.alloc_bytes(b_size * sizeof(float)));  // (n,k) weight
  auto* c = static_cast<act_t*>(
      backend.alloc_bytes(static_cast<size_t>(m) * n * sizeof(act_t)));  // (m,n)
  fill_random_kernel<<<grid_for(a_size), kThreads>>>(a, a_size, 1u);
  CUDA_CHECK_LAUNCH();
  fill_random_kernel<<<grid_for(b_size), kThreads>>>(b, b_size, 2u);
  CUDA_CHECK_LAUNCH();
  const __nv_bfloat16* a_bf16 = backend.to_bf16(CudaBackend::kBf16Inp, a, a_size);
  const __nv_bfloat16* b_bf16 = backend.bf16_weight(b, b_size);
  // c (m,n) = a (m,k) @ b^T, as linear_forward: c^T (n,m) = b (n,k) * a^T (k,m).
  GemmCall g;
  g.trans_a = true;
  g.m = n;
  g.n = m;
  g.k = k;
  g.a = b_bf16;
  g.lda = k;
  g.b = a_bf16;
  g.ldb = k;
  g.c = c;
  g.c_bf16 = true;
  g.ldc = n;
  for (int i = 0; i < 3; ++i) backend.gemm(g);
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<float> ms(reps);
  for (int i = 0; i < reps; ++i) {
    CUDA_CHECK(cudaEventRecord(start, 0));
    backend.gemm(g);
    CUDA_CHECK(cudaEventRecord(stop, 0));
    CUDA_CHECK(cudaEventSynchronize(stop));
    CUDA_CHECK(cudaEventElapsedTime(&ms[i], start, stop));
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  GemmRate rate;
  rate.median_ms = ms[reps / 2];
  rate.tflops = 2.0 * m * n * k / (rate.median_ms * 1e-3) * 1e-12;
  backend.free_bytes(a);
  backend.free_bytes(b);
  backend.free_bytes(c);
  return rate;
}

}  // namespace moe
