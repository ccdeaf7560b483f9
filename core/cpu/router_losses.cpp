// Pieces of the router's auxiliary losses (DESIGN.md, Losses): column sums for the
// load-balancing P_i, the broadcast of its per-expert gradient, and the z-loss gradient.
#include <algorithm>
#include <vector>

#include "core/cpu/cpu_backend.h"

namespace moe {

void CpuBackend::column_sums(double* sums_host,  // (E)
                             const float* x,     // (N,E)
                             int N, int E) {
  // Fixed blocks of rows, each summed by one thread, then the blocks added in order: the
  // result does not depend on the thread count (layout-invariant losses need that).
  const int kBlock = 256;
  int nblocks = (N + kBlock - 1) / kBlock;
  std::vector<double> partial((size_t)nblocks * E, 0.0);  // (nblocks,E)
#pragma omp parallel for
  for (int b = 0; b < nblocks; b++) {
    double* acc = partial.data() + (size_t)b * E;  // (E)
    int n1 = std::min(N, (b + 1) * kBlock);
    for (int n = b * kBlock; n < n1; n++) {
      const float* row = x + (size_t)n * E;  // (E)
      for (int e = 0; e < E; e++) acc[e] += row[e];
    }
  }
  std::fill(sums_host, sums_host + E, 0.0);
  for (int b = 0; b < nblocks; b++)
    for (int e = 0; e < E; e++) sums_host[e] += partial[(size_t)b * E + e];
}

void CpuBackend::add_row_vector(float* x,             // (N,E) +=
                                const float* v_host,  // (E)
                                int N, int E) {
#pragma omp parallel for
  for (int n = 0; n < N; n++) {
    float* row = x + (size_t)n * E;  // (E)
    for (int e = 0; e < E; e++) row[e] += v_host[e];
  }
}

void CpuBackend::zloss_backward(float* dlogits,      // (N,E) +=
                                const float* probs,  // (N,E)
                                const float* lse,    // (N)
                                float scale, int N, int E) {
  // d(scale * lse^2)/dlogits = scale * 2 * lse * softmax(logits).
#pragma omp parallel for
  for (int n = 0; n < N; n++) {
    const float* p = probs + (size_t)n * E;  // (E)
    float* dx = dlogits + (size_t)n * E;     // (E)
    float c = scale * 2.0f * lse[n];
    for (int e = 0; e < E; e++) dx[e] += c * p[e];
  }
}

}  // namespace moe
