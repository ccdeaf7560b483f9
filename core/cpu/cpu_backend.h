// The CPU backend: fp32, GEMMs through oneDNN, elementwise work parallel with OpenMP.
// Each op family lives in its own file under core/cpu/ (one op per file); shapes are documented
// on the interface in core/backend.h. Activations are fp32 here (activation_type() is kF32):
// an op that reads or writes an `Act` argument views it as float (act_f32) on entry, the
// parameter carrying an `_act` suffix so the float view keeps the plain name.
#pragma once

#include "core/backend.h"

namespace moe {

class CpuBackend final : public Backend {
 public:
  std::string name() const override;
  void* alloc_bytes(size_t bytes) override;
  void free_bytes(void* ptr) override;
  void copy_to_host(void* dst_host, const void* src, size_t bytes) override;
  void copy_from_host(void* dst, const void* src_host, size_t bytes) override;
  void copy(void* dst, const void* src, size_t bytes) override;
  void fill_zero(void* ptr, size_t bytes) override;
  void synchronize() override;
  ActType activation_type() const override;
  void copy_act_to_host(float* dst_host, const Act* src, size_t n) override;
  void copy_act_from_host(Act* dst, const float* src_host, size_t n) override;
  void add(Act* out, const Act* a, const Act* b, size_t n) override;
  void accumulate(Act* dst, const Act* src, size_t n) override;
  void scale(float* x, float s, size_t n) override;
  double sum_squares(const float* x, size_t n) override;
  bool all_finite(const float* x, size_t n) override;
  void mul(Act* out, const Act* a, const float* factors, size_t n) override;
  void embedding_forward(Act* out, const int* idx, const float* wte, const float* wpe, int B, int T, int C) override;
  void embedding_backward(float* dwte, float* dwpe, const Act* dout, const int* idx, int B, int T, int C) override;
  void layernorm_forward(Act* out, float* mean, float* rstd, const Act* inp, const float* weight, const float* bias, int N, int C) override;
  void layernorm_backward(Act* dinp, float* dweight, float* dbias, const Act* dout, const Act* inp, const float* weight, const float* mean, const float* rstd, int N, int C) override;
  void linear_forward(Act* out, const Act* inp, const float* weight, const float* bias, int N, int IC, int OC) override;
  void linear_backward(Act* dinp, float* dweight, float* dbias, const Act* dout, const Act* inp, const float* weight, int N, int IC, int OC) override;
  void grouped_linear_forward(Act* out, const Act* inp, const float* weight, const float* bias, const int* offsets_host, int E, int IC, int OC) override;
  void grouped_linear_backward(Act* dinp, float* dweight, float* dbias, const Act* dout, const Act* inp, const float* weight, const int* offsets_host, int E, int IC, int OC) override;
  void linear_gelu_forward(Act* pre, Act* out, const Act* inp, const float* weight, const float* bias, int N, int IC, int OC) override;
  void gelu_linear_backward(Act* dpre, float* dweight, float* dbias, const Act* dout, const Act* act, const float* weight, const Act* pre, int N, int IC, int OC) override;
  void grouped_linear_gelu_forward(Act* pre, Act* out, const Act* inp, const float* weight, const float* bias, const int* offsets_host, int E, int IC, int OC) override;
  void gelu_grouped_linear_backward(Act* dpre, float* dweight, float* dbias, const Act* dout, const Act* act, const float* weight, const Act* pre, const int* offsets_host, int E, int IC, int OC) override;
  void gelu_forward(Act* out, const Act* inp, size_t n) override;
  void gelu_backward(Act* dinp, const Act* inp, const Act* dout, size_t n) override;
  void attention_forward(Act* out, float* lse, const Act* qkv, int B, int T, int C, int NH) override;
  void attention_backward(Act* dqkv, const Act* dout, const Act* out, const Act* qkv, const float* lse, int B, int T, int C, int NH) override;
  void crossentropy_forward(float* losses, Act* probs, const Act* logits, const int* targets, int N, int V) override;
  void crossentropy_backward(Act* dlogits, const Act* probs, const int* targets, float dloss, int N, int V) override;
  void router_logits_forward(float* logits, const Act* inp, const float* weight, int N, int D, int E) override;
  void router_logits_backward(Act* dinp, float* dweight, const float* dlogits, const Act* inp, const float* weight, int N, int D, int E) override;
  void softmax_forward(float* probs, float* lse, const float* logits, int N, int E) override;
  void softmax_backward(float* dlogits, const float* dprobs, const float* probs, int N, int E) override;
  void topk_forward(int* expert_idx, float* gates, const float* probs, int N, int E, int K) override;
  void topk_backward(float* dprobs, const float* dgates, const int* expert_idx, const float* probs, int N, int E, int K) override;
  void capacity_assign(int* slot_host, int* counts_host, int* choices_host, const int* expert_idx, const float* gates, int N, int E, int K, int capacity, DropPolicy policy) override;
  void column_sums(double* sums_host, const float* x, int N, int E) override;
  void add_row_vector(float* x, const float* v_host, int N, int E) override;
  void zloss_backward(float* dlogits, const float* probs, const float* lse, float scale, int N, int E) override;
  void gather_rows(Act* out, const Act* inp, const int* row_idx_host, int rows, int D) override;
  void scatter_add_rows(Act* dinp, const Act* dout, const int* row_idx_host, int rows, int D) override;
  void combine_forward(Act* out, const Act* y, const float* gates, const int* row_host, int N, int K, int D) override;
  void combine_backward(Act* dy, float* dgates, const Act* dout, const Act* y, const float* gates, const int* row_host, int N, int K, int D) override;
  void adamw_update(float* params, const float* grads, float* m, float* v, size_t n, float lr, float beta1, float beta2, float eps, float weight_decay, int step) override;
};

}  // namespace moe
