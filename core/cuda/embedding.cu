// Token + position embedding: out[b,t,:] = wte[idx[b,t],:] + wpe[t,:]. Backward scatters with
// atomics, since a token id can repeat within the batch.
#include "core/cuda/cuda_backend.h"

namespace moe {
namespace {

__global__ void embedding_forward_kernel(float* out,        // (B,T,C)
                                         const int* idx,    // (B,T)
                                         const float* wte,  // (V,C)
                                         const float* wpe,  // (Tmax,C)
                                         int BT, int T, int C) {
  const int bt = blockIdx.x;
  const int t = bt % T;
  const float* wte_ix = wte + static_cast<size_t>(idx[bt]) * C;  // (C)
  const float* wpe_t = wpe + static_cast<size_t>(t) * C;         // (C)
  float* out_bt = out + static_cast<size_t>(bt) * C;             // (C)
  for (int c = threadIdx.x; c < C; c += blockDim.x) out_bt[c] = wte_ix[c] + wpe_t[c];
}

__global__ void embedding_backward_kernel(float* dwte,        // (V,C)    +=
                                          float* dwpe,        // (Tmax,C) +=
                                          const float* dout,  // (B,T,C)
                                          const int* idx,     // (B,T)
                                          int BT, int T, int C) {
  const int bt = blockIdx.x;
  const int t = bt % T;
  const float* dout_bt = dout + static_cast<size_t>(bt) * C;  // (C)
  float* dwte_ix = dwte + static_cast<size_t>(idx[bt]) * C;   // (C)
  float* dwpe_t = dwpe + static_cast<size_t>(t) * C;          // (C)
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    atomicAdd(dwte_ix + c, dout_bt[c]);
    atomicAdd(dwpe_t + c, dout_bt[c]);
  }
}

}  // namespace

void CudaBackend::embedding_forward(Act* out_act,      // (B,T,C)
                                    const int* idx,    // (B,T)
                                    const float* wte,  // (V,C)
                                    const float* wpe,  // (Tmax,C)
                                    int B, int T, int C) {
  float* out = act_f32(out_act);
  if (B * T == 0) return;
  note_write(out);
  embedding_forward_kernel<<<B * T, kThreads>>>(out, idx, wte, wpe, B * T, T, C);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::embedding_backward(float* dwte,          // (V,C)    +=
                                     float* dwpe,          // (Tmax,C) +=
                                     const Act* dout_act,  // (B,T,C)
                                     const int* idx,       // (B,T)
                                     int B, int T, int C) {
  const float* dout = act_f32(dout_act);
  if (B * T == 0) return;
  note_write(dwte);
  note_write(dwpe);
  embedding_backward_kernel<<<B * T, kThreads>>>(dwte, dwpe, dout, idx, B * T, T, C);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe
