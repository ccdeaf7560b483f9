// Pieces of the router's auxiliary losses: column sums of the probabilities (P_i, returned on
// the host in double), the per-expert load-balancing gradient added to every row, and the
// z-loss gradient.
#include "core/cuda/cuda_backend.h"

namespace moe {
namespace {

constexpr int kRowChunk = 256;

// sums (E) += column sums over a chunk of rows, in double.
__global__ void column_sums_double_kernel(double* sums, const float* x,  // (N,E)
                                          int N, int E) {
  const int n0 = blockIdx.x * kRowChunk, n1 = min(N, n0 + kRowChunk);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    double sum = 0.0;
    for (int n = n0; n < n1; ++n) sum += x[static_cast<size_t>(n) * E + e];
    atomicAdd(sums + e, sum);
  }
}

__global__ void add_row_vector_kernel(float* x,         // (N,E) +=
                                      const float* v,   // (E)
                                      int N, int E) {
  const size_t total = static_cast<size_t>(N) * E;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    x[i] += v[i % E];
}

// dlogits[n,e] += scale * 2 * lse[n] * probs[n,e]
__global__ void zloss_backward_kernel(float* dlogits, const float* probs, const float* lse,
                                      float scale, int N, int E) {
  const size_t total = static_cast<size_t>(N) * E;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    dlogits[i] += scale * 2.0f * lse[i / E] * probs[i];
}

}  // namespace

void CudaBackend::column_sums(double* sums_host, const float* x, int N, int E) {
  auto* sums = static_cast<double*>(scratch(kReduce, E * sizeof(double) + 8));  // (E)
  CUDA_CHECK(cudaMemsetAsync(sums, 0, E * sizeof(double), 0));
  if (N > 0) {
    column_sums_double_kernel<<<(N + kRowChunk - 1) / kRowChunk, 128>>>(sums, x, N, E);
    CUDA_CHECK_LAUNCH();
  }
  CUDA_CHECK(cudaMemcpy(sums_host, sums, E * sizeof(double), cudaMemcpyDeviceToHost));
}

void CudaBackend::add_row_vector(float* x, const float* v_host, int N, int E) {
  if (N == 0) return;
  note_write(x);
  const auto* v = static_cast<const float*>(
      upload_bytes(kHostVector, v_host, static_cast<size_t>(E) * sizeof(float)));  // (E)
  add_row_vector_kernel<<<grid_for(static_cast<size_t>(N) * E), kThreads>>>(x, v, N, E);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::zloss_backward(float* dlogits, const float* probs, const float* lse,
                                 float scale, int N, int E) {
  if (N == 0) return;
  note_write(dlogits);
  zloss_backward_kernel<<<grid_for(static_cast<size_t>(N) * E), kThreads>>>(dlogits, probs, lse,
                                                                            scale, N, E);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe
