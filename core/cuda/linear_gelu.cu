// The dense FFN's c_fc + GELU (core/backend.h) with the GELU in cuBLASLt's epilogue:
//   forward   GELU_AUX_BIAS: one GEMM stores pre = inp @ W^T + bias (the aux matrix) and
//             out = gelu(pre), instead of a bias epilogue, then a GELU kernel re-reading pre;
//   backward  DGELU: c_proj's input-gradient GEMM stores dpre = (dout @ W) * gelu'(pre)
//             straight away, instead of writing dout @ W, then a GELU-backward kernel reading
//             it and pre; c_proj's weight gradients read the same dout.
// pre, out and dpre are bf16 activations, and so is the epilogue's aux matrix (it has the
// output's type).
// cuBLASLt's GELU is the tanh form, as DESIGN.md's. Where cuBLASLt has no kernel for the
// fused epilogue (or its rules exclude the call: the aux leading dimension must be a multiple
// of 8, the bias 16-byte aligned), the op runs unfused: the product, then the GELU kernel of
// core/cuda/gelu_math.cuh. MOE_FUSED_GELU=0 forces that path (a comparison switch for
// benchmarks).
#include "core/cuda/cuda_backend.h"
#include "core/cuda/gelu_math.cuh"

namespace moe {
namespace {

// dpre (n) = round(gelu'(pre (n)) * dpre (n)), computed in fp32.
__global__ void scale_by_gelu_derivative_kernel(act_t* dpre, const act_t* pre, size_t n) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    act_store(dpre, i, cuda::gelu_derivative(act_load(pre, i)) * act_load(dpre, i));
}

}  // namespace

void launch_scale_by_gelu_derivative(act_t* dpre, const act_t* pre, size_t n) {
  if (n == 0) return;
  scale_by_gelu_derivative_kernel<<<grid_for(n), kThreads>>>(dpre, pre, n);
  CUDA_CHECK_LAUNCH();
}

void CudaBackend::linear_gelu_forward(Act* pre_act,         // (N,OC)
                                      Act* out_act,         // (N,OC)
                                      const Act* inp_act,   // (N,IC)
                                      const float* weight,  // (OC,IC)
                                      const float* bias,    // (OC) or nullptr
                                      int N, int IC, int OC) {
  act_t *pre = act_ptr(pre_act), *out = act_ptr(out_act);
  const act_t* inp = act_ptr(inp_act);
  if (N == 0 || OC == 0) return;
  GemmCall g = linear_forward_call(pre, inp, weight, bias, N, IC, OC);  // the unfused product
  if (fused_gelu_ && OC % 8 == 0) {
    GemmCall with_gelu = g;
    with_gelu.c = out;
    with_gelu.epilogue = GemmEpilogue::kGeluAux;
    with_gelu.aux = pre;
    with_gelu.ldaux = OC;
    if (try_gemm(with_gelu)) return;  // false also for a bias less than 16-byte aligned
  }
  gemm(g);
  gelu_forward(out_act, pre_act, static_cast<size_t>(N) * OC);
}

void CudaBackend::gelu_linear_backward(Act* dpre_act,        // (N,IC) written
                                       float* dweight,       // (OC,IC) +=
                                       float* dbias,         // (OC)    += or nullptr
                                       const Act* dout_act,  // (N,OC)
                                       const Act* gelu_act,  // (N,IC) gelu(pre), c_proj's input
                                       const float* weight,  // (OC,IC)
                                       const Act* pre_act,   // (N,IC)
                                       int N, int IC, int OC) {
  act_t* dpre = act_ptr(dpre_act);
  const act_t *dout = act_ptr(dout_act), *act = act_ptr(gelu_act), *pre = act_ptr(pre_act);
  if (N == 0 || IC == 0) return;
  const size_t n = static_cast<size_t>(N) * IC;
  if (OC == 0) {  // no outputs: nothing flows back
    fill_zero(dpre, sizeof(act_t) * n);
    return;
  }
  GemmCall g = linear_dinp_call(dpre, dout, weight, N, IC, OC);
  g.beta = 0.0f;  // written, not accumulated
  bool fused = false;
  if (fused_gelu_ && IC % 8 == 0) {
    GemmCall with_dgelu = g;
    with_dgelu.epilogue = GemmEpilogue::kDGelu;
    with_dgelu.aux = const_cast<act_t*>(pre);  // read only: DGELU's input
    with_dgelu.ldaux = IC;
    fused = try_gemm(with_dgelu);
  }
  if (!fused) {
    gemm(g);
    launch_scale_by_gelu_derivative(dpre, pre, n);
  }
  linear_weight_gradients(dweight, dbias, dout, act, N, IC, OC);
}

}  // namespace moe
