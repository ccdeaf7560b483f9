// Combine: each token's output is the gate-weighted sum of its kept choices' expert outputs,
// out[t] = sum_k gates[t,k] * y[row[t,k]]; row -1 is a dropped choice and adds nothing, so a
// token with no kept choice outputs 0 and only the residual carries it.
#include <algorithm>

#include "core/cpu/cpu_backend.h"

namespace moe {

void CpuBackend::combine_forward(Act* out_act,         // (N,D)
                                 const Act* y_act,     // (rows,D)
                                 const float* gates,   // (N,K)
                                 const int* row_host,  // (N,K)
                                 int N, int K, int D) {
  float* out = act_f32(out_act);
  const float* y = act_f32(y_act);
#pragma omp parallel for
  for (int t = 0; t < N; t++) {
    float* o = out + (size_t)t * D;  // (D)
    std::fill(o, o + D, 0.0f);
    for (int k = 0; k < K; k++) {
      int row = row_host[(size_t)t * K + k];
      if (row < 0) continue;  // dropped by capacity
      float g = gates[(size_t)t * K + k];
      const float* yr = y + (size_t)row * D;  // (D)
      for (int c = 0; c < D; c++) o[c] += g * yr[c];
    }
  }
}

void CpuBackend::combine_backward(Act* dy_act,          // (rows,D) +=
                                  float* dgates,        // (N,K)    +=
                                  const Act* dout_act,  // (N,D)
                                  const Act* y_act,     // (rows,D)
                                  const float* gates,   // (N,K)
                                  const int* row_host,  // (N,K)
                                  int N, int K, int D) {
  float* dy = act_f32(dy_act);
  const float* dout = act_f32(dout_act);
  const float* y = act_f32(y_act);
  // dgates: one token per iteration, each writes only its own K gates.
#pragma omp parallel for
  for (int t = 0; t < N; t++) {
    const float* d = dout + (size_t)t * D;  // (D)
    for (int k = 0; k < K; k++) {
      int row = row_host[(size_t)t * K + k];
      if (row < 0) continue;
      const float* yr = y + (size_t)row * D;  // (D)
      double dot = 0.0;
      for (int c = 0; c < D; c++) dot += (double)d[c] * yr[c];
      dgates[(size_t)t * K + k] += (float)dot;
    }
  }
  // dy: nothing in the interface promises distinct rows, so threads split the columns (as in
  // scatter_add_rows): race-free and the same sum order as a serial loop.
  const int kCols = 16;  // one 64-byte cache line of floats per thread and row
  int nblocks = (D + kCols - 1) / kCols;
#pragma omp parallel for
  for (int b = 0; b < nblocks; b++) {
    int c0 = b * kCols;
    int c1 = std::min(D, c0 + kCols);
    for (int t = 0; t < N; t++) {
      const float* d = dout + (size_t)t * D;  // (D)
      for (int k = 0; k < K; k++) {
        int row = row_host[(size_t)t * K + k];
        if (row < 0) continue;
        float g = gates[(size_t)t * K + k];
        float* dyr = dy + (size_t)row * D;  // (D)
        for (int c = c0; c < c1; c++) dyr[c] += g * d[c];
      }
    }
  }
}

}  // namespace moe
