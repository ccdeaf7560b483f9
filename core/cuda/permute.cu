// Token permutation: gather rows into expert order, and its adjoint, the scatter-add back
// (atomics: a token appears once per kept choice). The row indices arrive on the host and
// are uploaded with the op.
#include "core/cuda/cuda_backend.h"

namespace moe {
namespace {

__global__ void gather_rows_kernel(float* out,            // (rows,D)
                                   const float* inp,      // (N,D)
                                   const int* row_idx,    // (rows)
                                   int D) {
  const int r = blockIdx.x;
  const float* src = inp + static_cast<size_t>(row_idx[r]) * D;  // (D)
  float* dst = out + static_cast<size_t>(r) * D;                 // (D)
  for (int c = threadIdx.x; c < D; c += blockDim.x) dst[c] = src[c];
}

__global__ void scatter_add_rows_kernel(float* dinp,          // (N,D) +=
                                        const float* dout,    // (rows,D)
                                        const int* row_idx,   // (rows)
                                        int D) {
  const int r = blockIdx.x;
  const float* src = dout + static_cast<size_t>(r) * D;          // (D)
  float* dst = dinp + static_cast<size_t>(row_idx[r]) * D;       // (D)
  for (int c = threadIdx.x; c < D; c += blockDim.x) atomicAdd(dst + c, src[c]);
}

}  // namespace

void CudaBackend::gather_rows(Act* out_act,             // (rows,D)
                              const Act* inp_act,       // (N,D)
                              const int* row_idx_host,  // (rows)
                              int rows, int D) {
  float* out = act_f32(out_act);
  const float* inp = act_f32(inp_act);
  if (rows == 0) return;
  note_write(out);
  const int* row_idx = upload(kIndexA, row_idx_host, rows);
  gather_rows_kernel<<<rows, kThreads>>>(out, inp, row_idx, D);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::scatter_add_rows(Act* dinp_act,            // (N,D) +=
                                   const Act* dout_act,      // (rows,D)
                                   const int* row_idx_host,  // (rows)
                                   int rows, int D) {
  float* dinp = act_f32(dinp_act);
  const float* dout = act_f32(dout_act);
  if (rows == 0) return;
  note_write(dinp);
  const int* row_idx = upload(kIndexA, row_idx_host, rows);
  scatter_add_rows_kernel<<<rows, kThreads>>>(dinp, dout, row_idx, D);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe
