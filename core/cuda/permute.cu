// Token permutation: gather rows into expert order, and its adjoint, the scatter-add back.
// The row indices arrive on the host and are uploaded with the op. Activations are bf16.
//
// The scatter-add has repeated destinations (a token appears once per kept choice when
// top-k > 1), and bf16 has no cheap exact atomic add (sm_80 emulates it with a compare-and-
// swap loop, and each atomic rounds once more), so it runs the other way round: the host groups
// the sources by destination row, and one block per destination sums its sources in fp32 and
// adds the sum once. One writer per element, one rounding, the same result on every run.
// combine.cu's dy uses the same scatter (scatter_add_by_destination).
#include <algorithm>
#include <vector>

#include "core/cuda/act.cuh"
#include "core/cuda/cuda_backend.h"
#include "core/cuda/device_math.cuh"

namespace moe {

namespace {

// out[r] = inp[row_idx[r]], `width` units per row: V is act_t, or uint4 (cuda::kActVec
// activations) when D and both pointers allow 16-byte units.
template <typename V>
__global__ void gather_rows_kernel(V* out,              // (rows,width)
                                   const V* inp,        // (N,width)
                                   const int* row_idx,  // (rows)
                                   int width) {
  const int r = blockIdx.x;
  const V* src = inp + static_cast<size_t>(row_idx[r]) * width;  // (width)
  V* dst = out + static_cast<size_t>(r) * width;                 // (width)
  for (int c = threadIdx.x; c < width; c += blockDim.x) dst[c] = src[c];
}

// The sources of each destination row, as scatter_add_by_destination uploads them: `groups`
// destinations in increasing order, packed = [dest (groups) | begin (groups+1) | source]; the
// sources of group g are source[begin[g] .. begin[g+1]), in increasing j (a serial loop's order).
struct DestinationGroups {
  std::vector<int> packed;
  int groups = 0;
};

DestinationGroups group_by_destination(const int* dest_host,  // (m) -1: no destination
                                       int m) {
  int max_dest = -1;
  for (int j = 0; j < m; ++j) max_dest = std::max(max_dest, dest_host[j]);
  std::vector<int> cursor(static_cast<size_t>(max_dest) + 1, 0);  // (max_dest+1) counts first
  int sources = 0;
  for (int j = 0; j < m; ++j)
    if (dest_host[j] >= 0) {
      ++cursor[dest_host[j]];
      ++sources;
    }
  DestinationGroups out;
  for (int d = 0; d <= max_dest; ++d) out.groups += cursor[d] > 0;
  const int G = out.groups;
  out.packed.resize(static_cast<size_t>(G) + (G + 1) + sources);
  int* dest = out.packed.data();  // (G)
  int* begin = dest + G;          // (G+1)
  int* source = begin + G + 1;    // (sources)
  begin[0] = 0;
  for (int d = 0, g = 0; d <= max_dest; ++d) {
    if (cursor[d] == 0) continue;
    dest[g] = d;
    begin[g + 1] = begin[g] + cursor[d];
    cursor[d] = begin[g];  // now where d's next source goes
    ++g;
  }
  for (int j = 0; j < m; ++j)
    if (dest_host[j] >= 0) source[cursor[dest_host[j]]++] = j;
  return out;
}

// One block per group g: dst[dest[g]] += sum over its sources j of scale[j] * src[j / src_div].
__global__ void scatter_add_grouped_kernel(act_t* dst,          // (*,D) +=
                                           const act_t* src,    // (m / src_div,D)
                                           int src_div,
                                           const float* scale,  // (m) or nullptr: 1
                                           const int* packed,   // DestinationGroups::packed
                                           int G, int D) {
  const int g = blockIdx.x;
  const int* begin = packed + G;          // (G+1)
  const int* source = begin + G + 1;      // (sources)
  const int s0 = begin[g], s1 = begin[g + 1];
  act_t* d = dst + static_cast<size_t>(packed[g]) * D;  // (D)
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    float sum = 0.0f;
    for (int s = s0; s < s1; ++s) {
      const int j = source[s];
      const float x = act_load(src, static_cast<size_t>(j / src_div) * D + c);
      sum += scale != nullptr ? scale[j] * x : x;
    }
    act_accumulate(d, c, sum);
  }
}

}  // namespace

void scatter_add_by_destination(CudaBackend& backend, act_t* dst, const act_t* src, int src_div,
                                const float* scale, const int* dest_host, int m, int D) {
  if (m == 0 || D == 0) return;
  const DestinationGroups groups = group_by_destination(dest_host, m);
  if (groups.groups == 0) return;
  const int* packed = backend.upload(CudaBackend::kIndexB, groups.packed.data(),
                                     groups.packed.size());
  scatter_add_grouped_kernel<<<groups.groups, kThreads>>>(dst, src, src_div, scale, packed,
                                                          groups.groups, D);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::gather_rows(Act* out_act,             // (rows,D)
                              const Act* inp_act,       // (N,D)
                              const int* row_idx_host,  // (rows)
                              int rows, int D) {
  act_t* out = act_ptr(out_act);
  const act_t* inp = act_ptr(inp_act);
  if (rows == 0) return;
  note_write(out);
  const int* row_idx = upload(kIndexA, row_idx_host, rows);
  if (D % cuda::kActVec == 0 && cuda::vec_aligned(out) && cuda::vec_aligned(inp))
    gather_rows_kernel<<<rows, kThreads>>>(reinterpret_cast<uint4*>(out),
                                           reinterpret_cast<const uint4*>(inp), row_idx,
                                           D / cuda::kActVec);
  else
    gather_rows_kernel<<<rows, kThreads>>>(out, inp, row_idx, D);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::scatter_add_rows(Act* dinp_act,            // (N,D) +=
                                   const Act* dout_act,      // (rows,D)
                                   const int* row_idx_host,  // (rows)
                                   int rows, int D) {
  act_t* dinp = act_ptr(dinp_act);
  const act_t* dout = act_ptr(dout_act);
  if (rows == 0) return;
  note_write(dinp);
  scatter_add_by_destination(*this, dinp, dout, 1, nullptr, row_idx_host, rows, D);
}

}  // namespace moe
