// Capacity (DESIGN.md, Router): which top-k choices each expert keeps, and where. Choices are
// visited in "position order": choice rank k major, then token t = 0..N-1, so every first
// choice comes before any second choice. Kept choices of an expert are numbered in that order
// for both policies, so the expert's rows have one deterministic layout.
// Host-side and serial: N*K is a few thousand, and the result sizes the expert GEMMs.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/cpu/cpu_backend.h"
#include "core/error.h"

namespace moe {

void CpuBackend::capacity_assign(int* slot_host,         // (N,K)
                                 int* counts_host,       // (E) kept choices per expert
                                 int* choices_host,      // (E) choices per expert before capacity
                                 const int* expert_idx,  // (N,K)
                                 const float* gates,     // (N,K)
                                 int N, int E, int K, int capacity, DropPolicy policy) {
  std::fill(counts_host, counts_host + E, 0);
  std::fill(choices_host, choices_host + E, 0);
  for (int i = 0; i < N * K; i++) {
    int e = expert_idx[i];
    MOE_CHECK(e >= 0 && e < E, "capacity_assign: expert index " + std::to_string(e) +
                                   " out of range [0," + std::to_string(E) + ")");
    choices_host[e]++;
  }

  // keep[t*K+k]: whether choice (t,k) survives capacity.
  std::vector<char> keep((size_t)N * K, 1);  // (N,K)
  if (capacity >= 0 && policy == DropPolicy::kPosition) {
    // First come, first served in position order.
    std::vector<int> taken(E, 0);  // (E)
    for (int k = 0; k < K; k++)
      for (int t = 0; t < N; t++) {
        int i = t * K + k;
        int e = expert_idx[i];
        if (taken[e] < capacity) taken[e]++;
        else keep[i] = 0;
      }
  } else if (capacity >= 0 && policy == DropPolicy::kProbs) {
    // Bucket the choices per expert in position order (counting sort), then each full expert
    // keeps its `capacity` highest gates; stable sort breaks gate ties by position order.
    std::vector<int> start(E + 1, 0);  // (E+1)
    for (int e = 0; e < E; e++) start[e + 1] = start[e] + choices_host[e];
    std::vector<int> fill(start.begin(), start.end() - 1);  // (E) next free spot per bucket
    std::vector<int> order((size_t)N * K);                   // (N*K) choice ids by expert
    for (int k = 0; k < K; k++)
      for (int t = 0; t < N; t++) {
        int i = t * K + k;
        order[fill[expert_idx[i]]++] = i;
      }
    // NaN gates (a diverged step) sort last, so the comparison stays a strict weak order.
    auto key = [&](int i) { return std::isnan(gates[i]) ? -INFINITY : gates[i]; };
    for (int e = 0; e < E; e++) {
      if (choices_host[e] <= capacity) continue;
      auto first = order.begin() + start[e];
      auto last = order.begin() + start[e + 1];
      std::stable_sort(first, last, [&](int a, int b) { return key(a) > key(b); });
      for (auto it = first + capacity; it != last; ++it) keep[*it] = 0;
    }
  }
  // Number the kept choices of each expert in position order; -1 marks a dropped choice.
  for (int k = 0; k < K; k++)
    for (int t = 0; t < N; t++) {
      int i = t * K + k;
      slot_host[i] = keep[i] ? counts_host[expert_idx[i]]++ : -1;
    }
}

}  // namespace moe
