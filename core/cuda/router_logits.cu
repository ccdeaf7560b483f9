// The router's logits, fp32 throughout (DESIGN.md's selective precision): logits (N,E) =
// inp (N,D) @ weight (E,D)^T through cuBLASLt with fp32 operands and output, whatever E (the
// products of linear.cu's narrow fp32 path, without a bias). Row-major (N,E) = (N,D) @ (E,D)^T
// is, in cuBLAS's column-major terms, logits^T (E,N) = W (E,D) * inp^T (D,N).
#include "core/cuda/cuda_backend.h"

namespace moe {

void CudaBackend::router_logits_forward(float* logits,        // (N,E)
                                        const Act* inp_act,   // (N,D)
                                        const float* weight,  // (E,D)
                                        int N, int D, int E) {
  const float* inp = act_f32(inp_act);
  if (N == 0 || E == 0) return;
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
  float* dinp = act_f32(dinp_act);
  const float* inp = act_f32(inp_act);
  if (N == 0 || E == 0 || D == 0) return;
  if (dinp != nullptr) {
    GemmCall g;  // dinp^T (D,N) += W^T (D,E) * dlogits^T (E,N)
    g.fp32 = true;
    g.m = D;
    g.n = N;
    g.k = E;
    g.a = weight;
    g.lda = D;
    g.b = dlogits;
    g.ldb = E;
    g.c = dinp;
    g.ldc = D;
    g.beta = 1.0f;
    gemm(g);
  }
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
