// Linear layer: out = inp @ weight^T + bias, weights [out, in] like torch.nn.Linear.
// Every product goes through oneDNN's sgemm (core/cpu/sgemm.h).
#include <algorithm>

#include "core/cpu/cpu_backend.h"
#include "core/cpu/sgemm.h"

namespace moe {

namespace {

// dbias sums dout over rows; the columns are split into blocks of this many (two cache lines)
// so each thread owns its sums, which run in row order: the same for any thread count.
constexpr int kColumnBlock = 32;

}  // namespace

void CpuBackend::linear_forward(Act* out_act,         // (N,OC)
                                const Act* inp_act,   // (N,IC)
                                const float* weight,  // (OC,IC)
                                const float* bias,    // (OC) or nullptr
                                int N, int IC, int OC) {
  float* out = act_f32(out_act);
  const float* inp = act_f32(inp_act);
  if (N == 0 || OC == 0) return;
  // With a bias, write it into every row of out first and let the GEMM add onto it (beta 1):
  // the bias then costs one streaming write, not a second read-modify-write pass after.
  float beta = 0.0f;
  if (bias != nullptr) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
      float* out_n = out + static_cast<size_t>(n) * OC;  // (OC)
      std::copy(bias, bias + OC, out_n);
    }
    beta = 1.0f;
  }
  // out (N,OC) = inp (N,IC) @ weight^T (IC,OC)
  sgemm('N', 'T', N, OC, IC, 1.0f, inp, IC, weight, IC, beta, out, OC);
}

void CpuBackend::linear_backward(Act* dinp_act,        // (N,IC)  += or nullptr
                                 float* dweight,       // (OC,IC) +=
                                 float* dbias,         // (OC)    += or nullptr
                                 const Act* dout_act,  // (N,OC)
                                 const Act* inp_act,   // (N,IC)
                                 const float* weight,  // (OC,IC)
                                 int N, int IC, int OC) {
  float* dinp = act_f32(dinp_act);
  const float* dout = act_f32(dout_act);
  const float* inp = act_f32(inp_act);
  if (N == 0 || OC == 0 || IC == 0) return;
  // dinp (N,IC) += dout (N,OC) @ weight (OC,IC)
  if (dinp != nullptr) sgemm('N', 'N', N, IC, OC, 1.0f, dout, OC, weight, IC, 1.0f, dinp, IC);
  // dweight (OC,IC) += dout^T (OC,N) @ inp (N,IC)
  sgemm('T', 'N', OC, IC, N, 1.0f, dout, OC, inp, IC, 1.0f, dweight, IC);
  if (dbias == nullptr) return;
#pragma omp parallel for schedule(static)
  for (int o0 = 0; o0 < OC; o0 += kColumnBlock) {
    int width = std::min(OC - o0, kColumnBlock);
    double sums[kColumnBlock] = {};  // (width) this block's column sums
    for (int n = 0; n < N; n++) {
      const float* dout_n = dout + static_cast<size_t>(n) * OC + o0;  // (width)
#pragma omp simd
      for (int o = 0; o < width; o++) sums[o] += dout_n[o];
    }
    for (int o = 0; o < width; o++) dbias[o0 + o] += static_cast<float>(sums[o]);
  }
}

}  // namespace moe
