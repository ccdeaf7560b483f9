// Combine: out[t] = sum over kept choices of gates[t,k] * y[row[t,k]] (row -1: dropped).
// Backward: dy[row] += g * dout[t] (atomics: the interface does not promise distinct rows),
// dgates[t,k] += dot(dout[t], y[row]) by a block reduction. The rows arrive on the host.
#include "core/cuda/cuda_backend.h"
#include "core/cuda/device_math.cuh"

namespace moe {
namespace {

__global__ void combine_forward_kernel(float* out,          // (N,D)
                                       const float* y,      // (rows,D)
                                       const float* gates,  // (N,K)
                                       const int* row,      // (N,K)
                                       int K, int D) {
  const int t = blockIdx.x;
  float* o = out + static_cast<size_t>(t) * D;  // (D)
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    float sum = 0.0f;
    for (int k = 0; k < K; ++k) {
      const int r = row[t * K + k];
      if (r >= 0) sum += gates[t * K + k] * y[static_cast<size_t>(r) * D + c];
    }
    o[c] = sum;
  }
}

__global__ void combine_backward_kernel(float* dy,           // (rows,D) +=
                                        float* dgates,       // (N,K)    +=
                                        const float* dout,   // (N,D)
                                        const float* y,      // (rows,D)
                                        const float* gates,  // (N,K)
                                        const int* row,      // (N,K)
                                        int K, int D) {
  const int t = blockIdx.x;
  const float* d = dout + static_cast<size_t>(t) * D;  // (D)
  for (int k = 0; k < K; ++k) {
    const int r = row[t * K + k];
    if (r < 0) continue;  // the same for every thread of the block
    const float g = gates[t * K + k];
    const float* yr = y + static_cast<size_t>(r) * D;  // (D)
    float* dyr = dy + static_cast<size_t>(r) * D;      // (D)
    float dot = 0.0f;
    for (int c = threadIdx.x; c < D; c += blockDim.x) {
      dot += d[c] * yr[c];
      atomicAdd(dyr + c, g * d[c]);
    }
    dot = cuda::block_sum(dot);
    if (threadIdx.x == 0) dgates[t * K + k] += dot;
  }
}

}  // namespace

void CudaBackend::combine_forward(Act* out_act,         // (N,D)
                                  const Act* y_act,     // (rows,D)
                                  const float* gates,   // (N,K)
                                  const int* row_host,  // (N,K)
                                  int N, int K, int D) {
  float* out = act_f32(out_act);
  const float* y = act_f32(y_act);
  if (N == 0) return;
  note_write(out);
  const int* row = upload(kIndexA, row_host, static_cast<size_t>(N) * K);
  combine_forward_kernel<<<N, kThreads>>>(out, y, gates, row, K, D);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::combine_backward(Act* dy_act,          // (rows,D) +=
                                   float* dgates,        // (N,K)    +=
                                   const Act* dout_act,  // (N,D)
                                   const Act* y_act,     // (rows,D)
                                   const float* gates,   // (N,K)
                                   const int* row_host,  // (N,K)
                                   int N, int K, int D) {
  float* dy = act_f32(dy_act);
  const float *dout = act_f32(dout_act), *y = act_f32(y_act);
  if (N == 0) return;
  note_write(dy);
  note_write(dgates);
  const int* row = upload(kIndexA, row_host, static_cast<size_t>(N) * K);
  combine_backward_kernel<<<N, kThreads>>>(dy, dgates, dout, y, gates, row, K, D);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe
