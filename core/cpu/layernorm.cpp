// LayerNorm over the last dimension: out = (x - mean) * rstd * weight + bias, eps 1e-5.
// The forward saves mean and rstd per row so the backward need not recompute them.
#include <algorithm>
#include <cmath>

#include "core/cpu/cpu_backend.h"

namespace moe {

namespace {
constexpr float kEps = 1e-5f;
// dweight and dbias are sums over rows; they are split over blocks of this many channels
// (two cache lines) so each thread owns its columns and the sums need no atomics.
constexpr int kChannelBlock = 32;
}  // namespace

void CpuBackend::layernorm_forward(Act* out_act,         // (N,C)
                                   float* mean,          // (N)
                                   float* rstd,          // (N)
                                   const Act* inp_act,   // (N,C)
                                   const float* weight,  // (C)
                                   const float* bias,    // (C)
                                   int N, int C) {
  float* out = act_f32(out_act);
  const float* inp = act_f32(inp_act);
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; n++) {
    const float* x = inp + static_cast<size_t>(n) * C;  // (C)
    float* y = out + static_cast<size_t>(n) * C;        // (C)
    // Two passes (mean, then the variance about it) avoid E[x^2] - E[x]^2 cancellation.
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int c = 0; c < C; c++) sum += x[c];
    float m = sum / C;
    float sum_sq = 0.0f;
#pragma omp simd reduction(+ : sum_sq)
    for (int c = 0; c < C; c++) sum_sq += (x[c] - m) * (x[c] - m);
    float s = 1.0f / std::sqrt(sum_sq / C + kEps);
#pragma omp simd
    for (int c = 0; c < C; c++) y[c] = (x[c] - m) * s * weight[c] + bias[c];
    mean[n] = m;
    rstd[n] = s;
  }
}

// With xhat = (x - mean) * rstd and g = weight * dout:
//   dinp    += rstd * (g - mean(g) - xhat * mean(g * xhat))
//   dweight += sum over rows of dout * xhat,   dbias += sum over rows of dout.
// dinp is per row (parallel over rows); dweight and dbias sum over rows, so they get their
// own pass parallel over channel blocks, with double sums in row order: deterministic for
// any thread count.
void CpuBackend::layernorm_backward(Act* dinp_act,        // (N,C) +=
                                    float* dweight,       // (C)   +=
                                    float* dbias,         // (C)   +=
                                    const Act* dout_act,  // (N,C)
                                    const Act* inp_act,   // (N,C)
                                    const float* weight,  // (C)
                                    const float* mean,    // (N)
                                    const float* rstd,    // (N)
                                    int N, int C) {
  float* dinp = act_f32(dinp_act);
  const float* dout = act_f32(dout_act);
  const float* inp = act_f32(inp_act);
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; n++) {
    const float* dy = dout + static_cast<size_t>(n) * C;  // (C)
    const float* x = inp + static_cast<size_t>(n) * C;    // (C)
    float* dx = dinp + static_cast<size_t>(n) * C;        // (C)
    float m = mean[n];
    float s = rstd[n];
    float g_mean = 0.0f;       // mean(g)
    float g_xhat_mean = 0.0f;  // mean(g * xhat)
#pragma omp simd reduction(+ : g_mean, g_xhat_mean)
    for (int c = 0; c < C; c++) {
      float g = weight[c] * dy[c];
      g_mean += g;
      g_xhat_mean += g * (x[c] - m) * s;
    }
    g_mean /= C;
    g_xhat_mean /= C;
#pragma omp simd
    for (int c = 0; c < C; c++) {
      float xhat = (x[c] - m) * s;
      dx[c] += s * (weight[c] * dy[c] - g_mean - xhat * g_xhat_mean);
    }
  }

#pragma omp parallel for schedule(static)
  for (int c0 = 0; c0 < C; c0 += kChannelBlock) {
    int width = std::min(C - c0, kChannelBlock);
    double dw[kChannelBlock] = {};  // (width) this block's dweight sums
    double db[kChannelBlock] = {};  // (width) this block's dbias sums
    for (int n = 0; n < N; n++) {
      const float* dy = dout + static_cast<size_t>(n) * C + c0;  // (width)
      const float* x = inp + static_cast<size_t>(n) * C + c0;    // (width)
      float m = mean[n];
      float s = rstd[n];
#pragma omp simd
      for (int c = 0; c < width; c++) {
        dw[c] += static_cast<double>(dy[c]) * ((x[c] - m) * s);
        db[c] += dy[c];
      }
    }
    for (int c = 0; c < width; c++) {
      dweight[c0 + c] += static_cast<float>(dw[c]);
      dbias[c0 + c] += static_cast<float>(db[c]);
    }
  }
}

}  // namespace moe
