// Token + position embedding: out[b,t,:] = wte[idx[b,t],:] + wpe[t,:].
#include <algorithm>

#include "core/cpu/cpu_backend.h"

namespace moe {

namespace {
// Backward splits the channels into blocks of this many floats (two cache lines), one block
// per task, so no two threads ever write the same gradient element.
constexpr int kChannelBlock = 32;
}  // namespace

void CpuBackend::embedding_forward(Act* out_act,      // (B,T,C)
                                   const int* idx,    // (B,T)
                                   const float* wte,  // (V,C)
                                   const float* wpe,  // (Tmax,C)
                                   int B, int T, int C) {
  float* out = act_f32(out_act);
#pragma omp parallel for schedule(static)
  for (int bt = 0; bt < B * T; bt++) {
    int t = bt % T;
    float* out_bt = out + static_cast<size_t>(bt) * C;                 // (C)
    const float* wte_ix = wte + static_cast<size_t>(idx[bt]) * C;      // (C)
    const float* wpe_t = wpe + static_cast<size_t>(t) * C;             // (C)
#pragma omp simd
    for (int c = 0; c < C; c++) out_bt[c] = wte_ix[c] + wpe_t[c];
  }
}

// A token id can repeat within the batch, so splitting the work over tokens would race on
// dwte rows. Split over channel blocks instead: every thread reads all tokens but owns its
// columns of dwte and dwpe outright. The sum per element runs in token order, so the result
// does not depend on the thread count.
void CpuBackend::embedding_backward(float* dwte,          // (V,C)    +=
                                    float* dwpe,          // (Tmax,C) +=
                                    const Act* dout_act,  // (B,T,C)
                                    const int* idx,       // (B,T)
                                    int B, int T, int C) {
  const float* dout = act_f32(dout_act);
#pragma omp parallel for schedule(static)
  for (int c0 = 0; c0 < C; c0 += kChannelBlock) {
    int c1 = std::min(C, c0 + kChannelBlock);
    for (int bt = 0; bt < B * T; bt++) {
      int t = bt % T;
      const float* dout_bt = dout + static_cast<size_t>(bt) * C;       // (C)
      float* dwte_ix = dwte + static_cast<size_t>(idx[bt]) * C;        // (C)
      float* dwpe_t = dwpe + static_cast<size_t>(t) * C;               // (C)
#pragma omp simd
      for (int c = c0; c < c1; c++) {
        dwte_ix[c] += dout_bt[c];
        dwpe_t[c] += dout_bt[c];
      }
    }
  }
}

}  // namespace moe
