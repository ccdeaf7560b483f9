// Token + position embedding: out[b,t,:] = wte[idx[b,t],:] + wpe[t,:], the fp32 sum rounded to
// the bf16 activation. Backward scatters the widened dout into the fp32 gradients with atomics,
// since a token id can repeat within the batch.
#include "core/cuda/act.cuh"
#include "core/cuda/cuda_backend.h"

namespace moe {
namespace {

__global__ void embedding_forward_kernel(act_t* out,        // (B,T,C)
                                         const int* idx,    // (B,T)
                                         const float* wte,  // (V,C)
                                         const float* wpe,  // (Tmax,C)
                                         int BT, int T, int C) {
  const int bt = blockIdx.x;
  const int t = bt % T;
  const float* wte_ix = wte + static_cast<size_t>(idx[bt]) * C;  // (C)
  const float* wpe_t = wpe + static_cast<size_t>(t) * C;         // (C)
  act_t* out_bt = out + static_cast<size_t>(bt) * C;             // (C)
  for (int c = threadIdx.x; c < C; c += blockDim.x) act_store(out_bt, c, wte_ix[c] + wpe_t[c]);
}

__global__ void embedding_backward_kernel(float* dwte,        // (V,C)    +=
                                          float* dwpe,        // (Tmax,C) +=
                                          const act_t* dout,  // (B,T,C)
                                          const int* idx,     // (B,T)
                                          int BT, int T, int C) {
  const int bt = blockIdx.x;
  const int t = bt % T;
  const act_t* dout_bt = dout + static_cast<size_t>(bt) * C;  // (C)
  float* dwte_ix = dwte + static_cast<size_t>(idx[bt]) * C;   // (C)
  float* dwpe_t = dwpe + static_cast<size_t>(t) * C;          // (C)
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const float d = act_load(dout_bt, c);
    atomicAdd(dwte_ix + c, d);
    atomicAdd(dwpe_t + c, d);
  }
}

}  // namespace

void CudaBackend::embedding_forward(Act* out_act,      // (B,T,C)
                                    const int* idx,    // (B,T)
                                    const float* wte,  // (V,C)
                                    const float* wpe,  // (Tmax,C)
                                    int B, int T, int C) {
  act_t* out = act_ptr(out_act);
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
  const act_t* dout = act_ptr(dout_act);
  if (B * T == 0) return;
  note_write(dwte);
  note_write(dwpe);
  embedding_backward_kernel<<<B * T, kThreads>>>(dwte, dwpe, dout, idx, B * T, T, C);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe
