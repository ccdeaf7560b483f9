// The router's logits, fp32 throughout (DESIGN.md's selective precision): logits (N,E) =
// inp (N,D) @ weight (E,D)^T through cuBLASLt with fp32 operands and output, whatever E. The
// input is a bf16 activation: it is widened (exactly) into an fp32 scratch first, by the
// forward and again by the backward (the forward's scratch may have been reused since).
// Row-major (N,E) = (N,D) @ (E,D)^T is, in cuBLAS's column-major terms, logits^T (E,N) =
// W (E,D) * inp^T (D,N).
#include "core/cuda/cuda_backend.h"

namespace moe {
namespace {

// dst (n) += src (n): the fp32 product added into the bf16 activation, rounded once.
__global__ void accumulate_f32_kernel(act_t* dst, const float* src, size_t n) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    act_accumulate(dst, i, src[i]);
}

}  // namespace

void CudaBackend::router_logits_forward(float* logits,        // (N,E)
                                        const Act* inp_act,   // (N,D)
                                        const float* weight,  // (E,D)
                                        int N, int D, int E) {
  if (N == 0 || E == 0) return;
  const float* inp = to_f32(kF32RouterInp, act_ptr(inp_act), static_cast<size_t>(N) * D);  // (N,D)
  GemmCall g;  // logits^T (E,N) = W (E,D) * inp^T (D,N)
  g.fp32 = true;
  g.trans_a = true;
  g.m = E;
  g.n = N;
  g.k = D;
  g.a = weight;
  g.lda = D;
  g.b = inp;
  g.ldb = D;
  g.c = logits;
  g.ldc = E;
  gemm(g);
}

void CudaBackend::router_logits_backward(Act* dinp_act,         // (N,D) += or nullptr
                                         float* dweight,        // (E,D) +=
                                         const float* dlogits,  // (N,E)
                                         const Act* inp_act,    // (N,D)
                                         const float* weight,   // (E,D)
                                         int N, int D, int E) {
  act_t* dinp = act_ptr(dinp_act);
  if (N == 0 || E == 0 || D == 0) return;
  const size_t n = static_cast<size_t>(N) * D;
  if (dinp != nullptr) {
    // The product in fp32, then added into the bf16 dinp with one rounding.
    auto* product = static_cast<float*>(scratch(kF32RouterDinp, n * sizeof(float)));  // (N,D)
    GemmCall g;  // product^T (D,N) = W^T (D,E) * dlogits^T (E,N)
    g.fp32 = true;
    g.m = D;
    g.n = N;
    g.k = E;
    g.a = weight;
    g.lda = D;
    g.b = dlogits;
    g.ldb = E;
    g.c = product;
    g.ldc = D;
    gemm(g);
    note_write(dinp);
    accumulate_f32_kernel<<<grid_for(n), kThreads>>>(dinp, product, n);
    CUDA_CHECK_LAUNCH();
  }
  const float* inp = to_f32(kF32RouterInp, act_ptr(inp_act), n);  // (N,D)
  GemmCall g;  // dW^T (D,E) += inp^T (D,N) * dlogits (N,E)
  g.fp32 = true;
  g.trans_b = true;
  g.m = D;
  g.n = E;
  g.k = N;
  g.a = inp;
  g.lda = D;
  g.b = dlogits;
  g.ldb = E;
  g.c = dweight;
  g.ldc = D;
  g.beta = 1.0f;
  gemm(g);
}

}  // namespace moe
