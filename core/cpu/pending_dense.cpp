// TEMPORARY: placeholders for ops not yet written; each is removed as its op file lands.
#include "core/cpu/cpu_backend.h"
#include "core/error.h"
namespace moe {
void CpuBackend::add(float* out, const float* a, const float* b, size_t n) { throw RuntimeError("add not written yet"); }
void CpuBackend::accumulate(float* dst, const float* src, size_t n) { throw RuntimeError("accumulate not written yet"); }
void CpuBackend::scale(float* x, float s, size_t n) { throw RuntimeError("scale not written yet"); }
double CpuBackend::sum_squares(const float* x, size_t n) { throw RuntimeError("sum_squares not written yet"); }
bool CpuBackend::all_finite(const float* x, size_t n) { throw RuntimeError("all_finite not written yet"); }
void CpuBackend::mul(float* out, const float* a, const float* b, size_t n) { throw RuntimeError("mul not written yet"); }
void CpuBackend::embedding_forward(float* out, const int* idx, const float* wte, const float* wpe, int B, int T, int C) { throw RuntimeError("embedding_forward not written yet"); }
void CpuBackend::embedding_backward(float* dwte, float* dwpe, const float* dout, const int* idx, int B, int T, int C) { throw RuntimeError("embedding_backward not written yet"); }
void CpuBackend::layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight, const float* bias, int N, int C) { throw RuntimeError("layernorm_forward not written yet"); }
void CpuBackend::layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp, const float* weight, const float* mean, const float* rstd, int N, int C) { throw RuntimeError("layernorm_backward not written yet"); }
void CpuBackend::linear_forward(float* out, const float* inp, const float* weight, const float* bias, int N, int IC, int OC) { throw RuntimeError("linear_forward not written yet"); }
void CpuBackend::linear_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp, const float* weight, int N, int IC, int OC) { throw RuntimeError("linear_backward not written yet"); }
void CpuBackend::gelu_forward(float* out, const float* inp, size_t n) { throw RuntimeError("gelu_forward not written yet"); }
void CpuBackend::gelu_backward(float* dinp, const float* inp, const float* dout, size_t n) { throw RuntimeError("gelu_backward not written yet"); }
void CpuBackend::attention_forward(float* out, float* att, const float* qkv, int B, int T, int C, int NH) { throw RuntimeError("attention_forward not written yet"); }
void CpuBackend::attention_backward(float* dqkv, float* scratch, const float* dout, const float* qkv, const float* att, int B, int T, int C, int NH) { throw RuntimeError("attention_backward not written yet"); }
void CpuBackend::crossentropy_forward(float* losses, float* probs, const float* logits, const int* targets, int N, int V) { throw RuntimeError("crossentropy_forward not written yet"); }
void CpuBackend::crossentropy_backward(float* dlogits, const float* probs, const int* targets, float dloss, int N, int V) { throw RuntimeError("crossentropy_backward not written yet"); }
void CpuBackend::adamw_update(float* params, const float* grads, float* m, float* v, size_t n, float lr, float beta1, float beta2, float eps, float weight_decay, int step) { throw RuntimeError("adamw_update not written yet"); }
}  // namespace moe
