// LayerNorm over the last dim, eps 1e-5: one warp per row for the per-row work; dweight and
// dbias (sums over rows) by column blocks, partial sums over row chunks added with atomics.
// Activations (inp, out, dout, dinp) are bf16, widened on load; the statistics, the sums and
// the parameters and their gradients are fp32, and every stored activation is rounded once.
#include <algorithm>

#include "core/cuda/act.cuh"
#include "core/cuda/cuda_backend.h"
#include "core/cuda/device_math.cuh"

namespace moe {
namespace {

constexpr float kEps = 1e-5f;
constexpr int kRowsPerBlock = kThreads / 32;  // one warp per row
constexpr int kRowChunk = 256;                // rows per block of the column sums

__global__ void layernorm_forward_kernel(act_t* out,           // (N,C)
                                         float* mean,          // (N)
                                         float* rstd,          // (N)
                                         const act_t* inp,     // (N,C)
                                         const float* weight,  // (C)
                                         const float* bias,    // (C)
                                         int N, int C) {
  const int n = blockIdx.x * kRowsPerBlock + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (n >= N) return;
  const act_t* x = inp + static_cast<size_t>(n) * C;  // (C)
  act_t* y = out + static_cast<size_t>(n) * C;        // (C)
  float sum = 0.0f;
  for (int c = lane; c < C; c += 32) sum += act_load(x, c);
  const float m = cuda::warp_sum(sum) / C;
  // Two passes (mean, then the variance about it), as the CPU backend does.
  float sum_sq = 0.0f;
  for (int c = lane; c < C; c += 32) {
    const float d = act_load(x, c) - m;
    sum_sq += d * d;
  }
  const float s = rsqrtf(cuda::warp_sum(sum_sq) / C + kEps);
  for (int c = lane; c < C; c += 32)
    act_store(y, c, (act_load(x, c) - m) * s * weight[c] + bias[c]);
  if (lane == 0) {
    mean[n] = m;
    rstd[n] = s;
  }
}

// dinp += rstd * (g - mean(g) - xhat * mean(g * xhat)), g = weight * dout.
__global__ void layernorm_backward_input_kernel(act_t* dinp,          // (N,C) +=
                                                const act_t* dout,    // (N,C)
                                                const act_t* inp,     // (N,C)
                                                const float* weight,  // (C)
                                                const float* mean,    // (N)
                                                const float* rstd,    // (N)
                                                int N, int C) {
  const int n = blockIdx.x * kRowsPerBlock + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (n >= N) return;
  const act_t* dy = dout + static_cast<size_t>(n) * C;  // (C)
  const act_t* x = inp + static_cast<size_t>(n) * C;    // (C)
  act_t* dx = dinp + static_cast<size_t>(n) * C;        // (C)
  const float m = mean[n], s = rstd[n];
  float g_sum = 0.0f, g_xhat_sum = 0.0f;
  for (int c = lane; c < C; c += 32) {
    const float g = weight[c] * act_load(dy, c);
    g_sum += g;
    g_xhat_sum += g * (act_load(x, c) - m) * s;
  }
  const float g_mean = cuda::warp_sum(g_sum) / C;
  const float g_xhat_mean = cuda::warp_sum(g_xhat_sum) / C;
  for (int c = lane; c < C; c += 32) {
    const float xhat = (act_load(x, c) - m) * s;
    act_accumulate(dx, c, s * (weight[c] * act_load(dy, c) - g_mean - xhat * g_xhat_mean));
  }
}

// block (32, 8): x is the column within a 32-wide block, y strides the chunk's rows.
__global__ void layernorm_backward_params_kernel(float* dweight,       // (C) +=
                                                 float* dbias,         // (C) +=
                                                 const act_t* dout,    // (N,C)
                                                 const act_t* inp,     // (N,C)
                                                 const float* mean,    // (N)
                                                 const float* rstd,    // (N)
                                                 int N, int C) {
  __shared__ float dw_part[8][33];  // (8, 32) padded against bank conflicts
  __shared__ float db_part[8][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float dw = 0.0f, db = 0.0f;
  if (c < C) {
    // gridDim.y is capped at 65535 (N > 65535 * kRowChunk rows): chunks stride over the grid.
    for (int n0 = blockIdx.y * kRowChunk; n0 < N; n0 += gridDim.y * kRowChunk) {
      const int n1 = min(N, n0 + kRowChunk);
      for (int n = n0 + threadIdx.y; n < n1; n += blockDim.y) {
        const float dy = act_load(dout, static_cast<size_t>(n) * C + c);
        dw += dy * (act_load(inp, static_cast<size_t>(n) * C + c) - mean[n]) * rstd[n];
        db += dy;
      }
    }
  }
  dw_part[threadIdx.y][threadIdx.x] = dw;
  db_part[threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int j = 1; j < blockDim.y; ++j) {
      dw += dw_part[j][threadIdx.x];
      db += db_part[j][threadIdx.x];
    }
    atomicAdd(dweight + c, dw);
    atomicAdd(dbias + c, db);
  }
}

}  // namespace

void CudaBackend::layernorm_forward(Act* out_act,         // (N,C)
                                    float* mean,          // (N)
                                    float* rstd,          // (N)
                                    const Act* inp_act,   // (N,C)
                                    const float* weight,  // (C)
                                    const float* bias,    // (C)
                                    int N, int C) {
  act_t* out = act_ptr(out_act);
  const act_t* inp = act_ptr(inp_act);
  if (N == 0) return;
  note_write(out);
  note_write(mean);
  note_write(rstd);
  const int blocks = (N + kRowsPerBlock - 1) / kRowsPerBlock;
  layernorm_forward_kernel<<<blocks, kThreads>>>(out, mean, rstd, inp, weight, bias, N, C);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::layernorm_backward(Act* dinp_act,        // (N,C) +=
                                     float* dweight,       // (C)   +=
                                     float* dbias,         // (C)   +=
                                     const Act* dout_act,  // (N,C)
                                     const Act* inp_act,   // (N,C)
                                     const float* weight,  // (C)
                                     const float* mean,    // (N)
                                     const float* rstd,    // (N)
                                     int N, int C) {
  act_t* dinp = act_ptr(dinp_act);
  const act_t *dout = act_ptr(dout_act), *inp = act_ptr(inp_act);
  if (N == 0) return;
  note_write(dinp);
  note_write(dweight);
  note_write(dbias);
  const int blocks = (N + kRowsPerBlock - 1) / kRowsPerBlock;
  layernorm_backward_input_kernel<<<blocks, kThreads>>>(dinp, dout, inp, weight, mean, rstd, N, C);
  CUDA_CHECK_LAUNCH();
  const dim3 grid((C + 31) / 32, std::min((N + kRowChunk - 1) / kRowChunk, 65535)), block(32, 8);
  layernorm_backward_params_kernel<<<grid, block>>>(dweight, dbias, dout, inp, mean, rstd, N, C);
  CUDA_CHECK_LAUNCH();
}

}  // namespace moe
