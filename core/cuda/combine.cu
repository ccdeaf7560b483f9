// Combine: out[t] = sum over kept choices of gates[t,k] * y[row[t,k]] (row -1: dropped), over
// bf16 activations with fp32 gates, summed in fp32 and rounded once. Backward: dgates[t,k] +=
// dot(dout[t], y[row]) by a block reduction in fp32; dy[row] += g * dout[t] by permute.cu's
// scatter by destination (the interface does not promise distinct rows, and bf16 has no cheap
// exact atomic add: one writer per dy element instead). The rows arrive on the host.
#include "core/cuda/act.cuh"
#include "core/cuda/cuda_backend.h"
#include "core/cuda/device_math.cuh"

namespace moe {

namespace {

__global__ void combine_forward_kernel(act_t* out,          // (N,D)
                                       const act_t* y,      // (rows,D)
                                       const float* gates,  // (N,K)
                                       const int* row,      // (N,K)
                                       int K, int D) {
  const int t = blockIdx.x;
  act_t* o = out + static_cast<size_t>(t) * D;  // (D)
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    float sum = 0.0f;
    for (int k = 0; k < K; ++k) {
      const int r = row[t * K + k];
      if (r >= 0) sum += gates[t * K + k] * act_load(y, static_cast<size_t>(r) * D + c);
    }
    act_store(o, c, sum);
  }
}

// dgates[t,k] += dot(dout[t], y[row[t,k]]) for the kept choices, one block per token.
__global__ void combine_dgates_kernel(float* dgates,       // (N,K) +=
                                      const act_t* dout,   // (N,D)
                                      const act_t* y,      // (rows,D)
                                      const int* row,      // (N,K)
                                      int K, int D) {
  const int t = blockIdx.x;
  const act_t* d = dout + static_cast<size_t>(t) * D;  // (D)
  for (int k = 0; k < K; ++k) {
    const int r = row[t * K + k];
    if (r < 0) continue;  // the same for every thread of the block
    const act_t* yr = y + static_cast<size_t>(r) * D;  // (D)
    float dot = 0.0f;
    for (int c = threadIdx.x; c < D; c += blockDim.x) dot += act_load(d, c) * act_load(yr, c);
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
  act_t* out = act_ptr(out_act);
  const act_t* y = act_ptr(y_act);
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
  act_t* dy = act_ptr(dy_act);
  const act_t *dout = act_ptr(dout_act), *y = act_ptr(y_act);
  if (N == 0) return;
  note_write(dy);
  note_write(dgates);
  const int* row = upload(kIndexA, row_host, static_cast<size_t>(N) * K);
  combine_dgates_kernel<<<N, kThreads>>>(dgates, dout, y, row, K, D);
  CUDA_CHECK_LAUNCH();
  // Choice j = t*K + k sends gates[j] * dout[t] to dy[row[j]].
  scatter_add_by_destination(*this, dy, dout, K, gates, row_host, N * K, D);
}

}  // namespace moe
