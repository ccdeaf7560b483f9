// Router logits: logits = inp @ weight^T in fp32, no bias (DESIGN.md's selective precision:
// the router stays fp32 whatever the activation type). On the CPU the activations are fp32
// already, so this is linear.cpp's product without the bias, through the same sgemm.
#include "core/cpu/cpu_backend.h"
#include "core/cpu/sgemm.h"

namespace moe {

void CpuBackend::router_logits_forward(float* logits,        // (N,E)
                                       const Act* inp_act,   // (N,D)
                                       const float* weight,  // (E,D)
                                       int N, int D, int E) {
  const float* inp = act_f32(inp_act);
  if (N == 0 || E == 0) return;
  // logits (N,E) = inp (N,D) @ weight^T (D,E)
  sgemm('N', 'T', N, E, D, 1.0f, inp, D, weight, D, 0.0f, logits, E);
}

void CpuBackend::router_logits_backward(Act* dinp_act,         // (N,D) += or nullptr
                                        float* dweight,        // (E,D) +=
                                        const float* dlogits,  // (N,E)
                                        const Act* inp_act,    // (N,D)
                                        const float* weight,   // (E,D)
                                        int N, int D, int E) {
  float* dinp = act_f32(dinp_act);
  const float* inp = act_f32(inp_act);
  if (N == 0 || E == 0 || D == 0) return;
  // dinp (N,D) += dlogits (N,E) @ weight (E,D)
  if (dinp != nullptr) sgemm('N', 'N', N, D, E, 1.0f, dlogits, E, weight, D, 1.0f, dinp, D);
  // dweight (E,D) += dlogits^T (E,N) @ inp (N,D)
  sgemm('T', 'N', E, D, N, 1.0f, dlogits, E, inp, D, 1.0f, dweight, D);
}

}  // namespace moe
