// Router softmax in fp32, one warp per token (E is tens to hundreds): probs and the
// logsumexp the z-loss needs; backward applies the softmax Jacobian.
#include "core/cuda/cuda_backend.h"
#include "core/cuda/device_math.cuh"

namespace moe {
namespace {

constexpr int kRowsPerBlock = kThreads / 32;

__global__ void softmax_forward_kernel(float* probs,         // (N,E)
                                       float* lse,           // (N)
                                       const float* logits,  // (N,E)
                                       int N, int E) {
  const int n = blockIdx.x * kRowsPerBlock + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (n >= N) return;
  const float* x = logits + static_cast<size_t>(n) * E;  // (E)
  float* p = probs + static_cast<size_t>(n) * E;         // (E)
  float max = -INFINITY;
  for (int e = lane; e < E; e += 32) max = fmaxf(max, x[e]);
  max = cuda::warp_max(max);
  double sum = 0.0;  // double, as on the CPU: the lse feeds a squared loss
  for (int e = lane; e < E; e += 32) sum += expf(x[e] - max);
  sum = cuda::warp_sum(sum);
  const float inv = static_cast<float>(1.0 / sum);
  for (int e = lane; e < E; e += 32) p[e] = expf(x[e] - max) * inv;
  if (lane == 0) lse[n] = max + static_cast<float>(log(sum));
}

// dlogits_i += p_i * (dp_i - sum_j p_j dp_j)
__global__ void softmax_backward_kernel(float* dlogits,       // (N,E) +=
                                        const float* dprobs,  // (N,E)
                                        const float* probs,   // (N,E)
                                        int N, int E) {
  const int n = blockIdx.x * kRowsPerBlock + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (n >= N) return;
  const float* dp = dprobs + static_cast<size_t>(n) * E;  // (E)
  const float* p = probs + static_cast<size_t>(n) * E;    // (E)
  float* dx = dlogits + static_cast<size_t>(n) * E;       // (E)
  double dot = 0.0;
  for (int e = lane; e < E; e += 32) dot += static_cast<double>(p[e]) * dp[e];
  const float dotf = static_cast<float>(cuda::warp_sum(dot));
  for (int e = lane; e < E; e += 32) dx[e] += p[e] * (dp[e] - dotf);
}

}  // namespace

void CudaBackend::softmax_forward(float* probs, float* lse, const float* logits, int N, int E) {
  if (N == 0) return;
  note_write(probs);
  note_write(lse);
  softmax_forward_kernel<<<(N + kRowsPerBlock - 1) / kRowsPerBlock, kThreads>>>(probs, lse, logits,
                                                                                N, E);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::softmax_backward(float* dlogits, const float* dprobs, const float* probs, int N,
                                   int E) {
  if (N == 0) return;
  note_write(dlogits);
  softmax_backward_kernel<<<(N + kRowsPerBlock - 1) / kRowsPerBlock, kThreads>>>(dlogits, dprobs,
                                                                                 probs, N, E);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe
