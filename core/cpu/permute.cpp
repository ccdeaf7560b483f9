// Token permutation: gather rows into expert order, and its adjoint, the scatter-add back.
#include <algorithm>
#include <cstring>

#include "core/cpu/cpu_backend.h"

namespace moe {

void CpuBackend::gather_rows(Act* out_act,             // (rows,D)
                             const Act* inp_act,       // (N,D)
                             const int* row_idx_host,  // (rows)
                             int rows, int D) {
  float* out = act_f32(out_act);
  const float* inp = act_f32(inp_act);
#pragma omp parallel for
  for (int r = 0; r < rows; r++)
    std::memcpy(out + (size_t)r * D, inp + (size_t)row_idx_host[r] * D, sizeof(float) * D);
}

void CpuBackend::scatter_add_rows(Act* dinp_act,            // (N,D) +=
                                  const Act* dout_act,      // (rows,D)
                                  const int* row_idx_host,  // (rows)
                                  int rows, int D) {
  float* dinp = act_f32(dinp_act);
  const float* dout = act_f32(dout_act);
  // A token appears once per kept choice (top-k > 1), so destinations repeat. Threads split
  // the columns instead of the rows: no two threads touch the same element, and every element
  // adds its sources in r order, the same result as a serial loop for any thread count.
  const int kCols = 16;  // one 64-byte cache line of floats per thread and row
  int nblocks = (D + kCols - 1) / kCols;
#pragma omp parallel for
  for (int b = 0; b < nblocks; b++) {
    int c0 = b * kCols;
    int c1 = std::min(D, c0 + kCols);
    for (int r = 0; r < rows; r++) {
      const float* src = dout + (size_t)r * D;              // (D)
      float* dst = dinp + (size_t)row_idx_host[r] * D;      // (D)
      for (int c = c0; c < c1; c++) dst[c] += src[c];
    }
  }
}

}  // namespace moe
