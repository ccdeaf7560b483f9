// Capacity (DESIGN.md, Router) on the device: one block per expert walks the choices in
// position order (choice rank k major, then token t) and numbers the expert's choices with a
// block-wide prefix sum, 1024 choices per round. `position` keeps the first `capacity`;
// `probs` ranks each choice of a full expert by (gate descending, position order) and keeps
// the top `capacity`, then numbers the kept ones in position order, as the CPU backend does.
// The interface returns slot/counts/choices on the host (they size the expert GEMMs and the
// all-to-all): they come back packed in one device-to-host copy, the one host round trip.
#include <algorithm>
#include <string>
#include <vector>

#include "core/cuda/cuda_backend.h"

namespace moe {
namespace {

constexpr int kScanThreads = 1024;

// Exclusive prefix sum of flag over the block (blockDim.x == kScanThreads); *total gets the sum.
__device__ int block_exclusive_scan(int flag, int* total) {
  __shared__ int warp_offsets[32];
  __shared__ int block_total;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag != 0);
  const int in_warp = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) warp_offsets[warp] = __popc(ballot);
  __syncthreads();
  if (warp == 0) {
    const int count = warp_offsets[lane];
    int inclusive = count;
    for (int offset = 1; offset < 32; offset <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, inclusive, offset);
      if (lane >= offset) inclusive += up;
    }
    warp_offsets[lane] = inclusive - count;
    if (lane == 31) block_total = inclusive;
  }
  __syncthreads();
  const int result = warp_offsets[warp] + in_warp;
  *total = block_total;
  __syncthreads();  // the shared words are reused by the next call
  return result;
}

// Choice id (t*K + k) of the o-th choice in position order.
__device__ inline int choice_at(int o, int N, int K) { return (o % N) * K + o / N; }

__device__ inline float gate_key(float g) { return isnan(g) ? -INFINITY : g; }

// out = [slot (N*K) | counts (E) | choices (E)]; order (E, N*K): the expert's choice ids in
// position order (probs policy only).
__global__ void capacity_kernel(int* out, int* order, const int* expert_idx,  // (N,K)
                                const float* gates,                           // (N,K)
                                int N, int E, int K, int capacity, bool by_probs) {
  const int e = blockIdx.x, NK = N * K;
  int* slot = out;
  int* list = by_probs ? order + static_cast<size_t>(e) * NK : nullptr;  // (NK) its choices
  int num = 0;  // this expert's choices so far
  for (int base = 0; base < NK; base += kScanThreads) {
    const int o = base + threadIdx.x;
    const int i = o < NK ? choice_at(o, N, K) : 0;
    const int match = o < NK && expert_idx[i] == e;
    int round_total = 0;
    const int rank = num + block_exclusive_scan(match, &round_total);
    if (match) {
      if (by_probs) list[rank] = i;
      else slot[i] = capacity < 0 || rank < capacity ? rank : -1;
    }
    num += round_total;
  }
  if (by_probs) {
    __syncthreads();  // list complete
    const bool full = capacity >= 0 && num > capacity;
    int kept_so_far = 0;
    for (int base = 0; base < num; base += kScanThreads) {
      const int j = base + threadIdx.x;
      int keep = 0;
      if (j < num) {
        keep = 1;
        if (full) {
          const float key = gate_key(gates[list[j]]);
          int better = 0;  // choices ranked before j: higher gate, or equal and earlier
          for (int j2 = 0; j2 < num; ++j2) {
            const float key2 = gate_key(gates[list[j2]]);
            better += key2 > key || (key2 == key && j2 < j);
          }
          keep = better < capacity;
        }
      }
      int round_total = 0;
      const int number = kept_so_far + block_exclusive_scan(keep, &round_total);
      if (j < num) slot[list[j]] = keep ? number : -1;
      kept_so_far += round_total;
    }
  }
  if (threadIdx.x == 0) {
    out[NK + e] = capacity < 0 ? num : min(num, capacity);  // counts
    out[NK + E + e] = num;                                  // choices
  }
}

}  // namespace

void CudaBackend::capacity_assign(int* slot_host, int* counts_host, int* choices_host,
                                  const int* expert_idx, const float* gates, int N, int E, int K,
                                  int capacity, DropPolicy policy) {
  const size_t NK = static_cast<size_t>(N) * K;
  auto* packed = static_cast<int*>(scratch(kIndexB, (NK + 2 * E) * sizeof(int)));  // (NK+2E)
  // -1 everywhere first: a choice whose expert index is out of range is never matched.
  CUDA_CHECK(cudaMemsetAsync(packed, 0xff, NK * sizeof(int), 0));
  const bool by_probs = policy == DropPolicy::kProbs;
  int* order = by_probs ? static_cast<int*>(scratch(kCapacityOrder, E * NK * sizeof(int) + 4))
                        : nullptr;  // (E, NK)
  capacity_kernel<<<E, kScanThreads>>>(packed, order, expert_idx, gates, N, E, K, capacity,
                                       by_probs);
  CUDA_CHECK_LAUNCH();
  std::vector<int> host(NK + 2 * E);
  CUDA_CHECK(cudaMemcpy(host.data(), packed, host.size() * sizeof(int), cudaMemcpyDeviceToHost));
  std::copy(host.begin(), host.begin() + NK, slot_host);
  std::copy(host.begin() + NK, host.begin() + NK + E, counts_host);
  std::copy(host.begin() + NK + E, host.end(), choices_host);
  size_t matched = 0;
  for (int e = 0; e < E; ++e) matched += choices_host[e];
  MOE_CHECK(matched == NK, "capacity_assign: " + std::to_string(NK - matched) +
                               " expert indices out of range [0," + std::to_string(E) + ")");
}

}  // namespace moe
