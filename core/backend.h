// The backend interface: memory and every op the model and the experts need.
//
// model/ and experts/ call ops only through this interface, so a CUDA backend can be added
// without touching them. The CPU backend (core/cpu/) is the ground truth every other backend
// is tested against. All pointers are backend memory; `_host` marks a pointer to host memory.
//
// Activations (`Act*`, core/activation.h) are in the backend's activation_type(): fp32 on the
// CPU, bf16 on CUDA. Weights, weight gradients, optimizer state, the router's logits and
// probabilities, layernorm and attention statistics and the losses are fp32 (`float*`).
//
// Conventions (llm.c): arguments go outputs, saved stats, inputs, weights, dims. Forward writes
// its outputs; backward ACCUMULATES (+=) into every gradient it produces, so callers zero the
// gradient buffers once per step. Rows are tokens; matrices are row-major; weights are
// [out, in] like torch.nn.Linear.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/activation.h"

namespace moe {

enum class DropPolicy { kPosition, kProbs };

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // ---- memory --------------------------------------------------------------------------
  virtual void* alloc_bytes(size_t bytes) = 0;  // zero-filled, 64-byte aligned
  virtual void free_bytes(void* ptr) = 0;
  virtual void copy_to_host(void* dst_host, const void* src, size_t bytes) = 0;
  virtual void copy_from_host(void* dst, const void* src_host, size_t bytes) = 0;
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;
  virtual void fill_zero(void* ptr, size_t bytes) = 0;
  virtual void synchronize() = 0;

  // ---- activations ---------------------------------------------------------------------
  virtual ActType activation_type() const = 0;
  // n activations to host floats and back (converted when the activation type is not fp32).
  virtual void copy_act_to_host(float* dst_host, const Act* src, size_t n) = 0;
  virtual void copy_act_from_host(Act* dst, const float* src_host, size_t n) = 0;

  // ---- elementwise ---------------------------------------------------------------------
  // out = a + b  (n)
  virtual void add(Act* out, const Act* a, const Act* b, size_t n) = 0;
  // dst += src  (n)
  virtual void accumulate(Act* dst, const Act* src, size_t n) = 0;
  // x *= s  (n)
  virtual void scale(float* x, float s, size_t n) = 0;
  // sum of x^2 in double precision  (n)
  virtual double sum_squares(const float* x, size_t n) = 0;
  // true when every element is finite
  virtual bool all_finite(const float* x, size_t n) = 0;
  // out = a * factors elementwise  (n); out may alias a
  virtual void mul(Act* out, const Act* a, const float* factors, size_t n) = 0;

  // ---- embedding: out[b,t] = wte[idx[b,t]] + wpe[t] ------------------------------------
  virtual void embedding_forward(Act* out,          // (B,T,C)
                                 const int* idx,    // (B,T)
                                 const float* wte,  // (V,C)
                                 const float* wpe,  // (Tmax,C)
                                 int B, int T, int C) = 0;
  virtual void embedding_backward(float* dwte,         // (V,C)   +=
                                  float* dwpe,         // (Tmax,C) +=
                                  const Act* dout,     // (B,T,C)
                                  const int* idx,      // (B,T)
                                  int B, int T, int C) = 0;

  // ---- layernorm over the last dim, eps 1e-5 --------------------------------------------
  virtual void layernorm_forward(Act* out,            // (N,C)
                                 float* mean,         // (N)
                                 float* rstd,         // (N)
                                 const Act* inp,      // (N,C)
                                 const float* weight, // (C)
                                 const float* bias,   // (C)
                                 int N, int C) = 0;
  virtual void layernorm_backward(Act* dinp,           // (N,C) +=
                                  float* dweight,      // (C)   +=
                                  float* dbias,        // (C)   +=
                                  const Act* dout,     // (N,C)
                                  const Act* inp,      // (N,C)
                                  const float* weight, // (C)
                                  const float* mean,   // (N)
                                  const float* rstd,   // (N)
                                  int N, int C) = 0;

  // ---- linear: out = inp @ weight^T + bias ---------------------------------------------
  virtual void linear_forward(Act* out,            // (N,OC)
                              const Act* inp,      // (N,IC)
                              const float* weight, // (OC,IC)
                              const float* bias,   // (OC) or nullptr
                              int N, int IC, int OC) = 0;
  // dinp, dbias may be nullptr (not wanted).
  virtual void linear_backward(Act* dinp,            // (N,IC)  +=
                               float* dweight,       // (OC,IC) +=
                               float* dbias,         // (OC)    +=
                               const Act* dout,      // (N,OC)
                               const Act* inp,       // (N,IC)
                               const float* weight,  // (OC,IC)
                               int N, int IC, int OC) = 0;

  // ---- grouped linear over experts: rows [offsets[e], offsets[e+1]) use expert e ----------
  virtual void grouped_linear_forward(Act* out,            // (rows,OC)
                                      const Act* inp,      // (rows,IC)
                                      const float* weight, // (E,OC,IC)
                                      const float* bias,   // (E,OC)
                                      const int* offsets_host,  // (E+1)
                                      int E, int IC, int OC) = 0;
  virtual void grouped_linear_backward(Act* dinp,            // (rows,IC) +=
                                       float* dweight,       // (E,OC,IC) +=
                                       float* dbias,         // (E,OC)    +=
                                       const Act* dout,      // (rows,OC)
                                       const Act* inp,       // (rows,IC)
                                       const float* weight,  // (E,OC,IC)
                                       const int* offsets_host,  // (E+1)
                                       int E, int IC, int OC) = 0;

  // ---- linear + bias + GELU: the dense FFN's c_fc, one op so a backend can fuse it -------
  // pre = inp @ weight^T + bias;  out = gelu(pre)   (gelu's tanh form, below)
  virtual void linear_gelu_forward(Act* pre,            // (N,OC) saved for the backward
                                   Act* out,            // (N,OC)
                                   const Act* inp,      // (N,IC)
                                   const float* weight, // (OC,IC)
                                   const float* bias,   // (OC) or nullptr
                                   int N, int IC, int OC) = 0;
  // The backward of y = gelu(pre) @ weight^T + bias (the c_proj after c_fc's GELU), through
  // the GELU: dpre = gelu'(pre) * (dout @ weight) is WRITTEN (not accumulated); the weight and
  // bias gradients accumulate as in linear_backward, with act = gelu(pre) as the input.
  virtual void gelu_linear_backward(Act* dpre,            // (N,IC) written
                                    float* dweight,       // (OC,IC) +=
                                    float* dbias,         // (OC)    += or nullptr
                                    const Act* dout,      // (N,OC)
                                    const Act* act,       // (N,IC) gelu(pre), c_proj's input
                                    const float* weight,  // (OC,IC)
                                    const Act* pre,       // (N,IC) gelu's input
                                    int N, int IC, int OC) = 0;
  // The same two ops for the experts, grouped like grouped_linear: rows [offsets[e],
  // offsets[e+1]) use expert e, and only rows [offsets[0], offsets[E]) are touched.
  virtual void grouped_linear_gelu_forward(Act* pre,                 // (rows,OC)
                                           Act* out,                 // (rows,OC)
                                           const Act* inp,           // (rows,IC)
                                           const float* weight,      // (E,OC,IC)
                                           const float* bias,        // (E,OC) or nullptr
                                           const int* offsets_host,  // (E+1)
                                           int E, int IC, int OC) = 0;
  virtual void gelu_grouped_linear_backward(Act* dpre,                // (rows,IC) written
                                            float* dweight,           // (E,OC,IC) +=
                                            float* dbias,             // (E,OC)    += or nullptr
                                            const Act* dout,          // (rows,OC)
                                            const Act* act,           // (rows,IC) gelu(pre)
                                            const float* weight,      // (E,OC,IC)
                                            const Act* pre,           // (rows,IC)
                                            const int* offsets_host,  // (E+1)
                                            int E, int IC, int OC) = 0;

  // ---- GELU, tanh form -----------------------------------------------------------------
  virtual void gelu_forward(Act* out, const Act* inp, size_t n) = 0;
  virtual void gelu_backward(Act* dinp,          // (n) +=
                             const Act* inp,     // (n)
                             const Act* dout,    // (n)
                             size_t n) = 0;

  // ---- causal self-attention ------------------------------------------------------------
  // qkv rows hold q | k | v, each C wide; head h is columns h*hd..(h+1)*hd of each.
  // P = softmax(mask(q k^T / sqrt(hd))), out = P v. Flash-attention style: the forward saves
  // only lse, the logsumexp of each row's scaled, masked scores; the backward recomputes P.
  virtual void attention_forward(Act* out,          // (B,T,C)
                                 float* lse,        // (B,NH,T) saved
                                 const Act* qkv,    // (B,T,3C)
                                 int B, int T, int C, int NH) = 0;
  virtual void attention_backward(Act* dqkv,          // (B,T,3C) +=
                                  const Act* dout,    // (B,T,C)
                                  const Act* out,     // (B,T,C) the forward's output
                                  const Act* qkv,     // (B,T,3C)
                                  const float* lse,   // (B,NH,T) the forward's
                                  int B, int T, int C, int NH) = 0;

  // ---- softmax cross-entropy ------------------------------------------------------------
  // losses[i] = logsumexp(logits[i]) - logits[i, targets[i]]; probs = softmax(logits).
  virtual void crossentropy_forward(float* losses,        // (N)
                                    Act* probs,           // (N,V) may alias logits
                                    const Act* logits,    // (N,V)
                                    const int* targets,   // (N)
                                    int N, int V) = 0;
  // dlogits = (probs - onehot(target)) * dloss (written, not accumulated; may alias probs).
  virtual void crossentropy_backward(Act* dlogits,         // (N,V)
                                     const Act* probs,     // (N,V)
                                     const int* targets,   // (N)
                                     float dloss, int N, int V) = 0;

  // ---- router (fp32 throughout: DESIGN.md's selective precision) -------------------------
  // logits = inp @ weight^T, computed and stored in fp32 from the activations.
  virtual void router_logits_forward(float* logits,        // (N,E)
                                     const Act* inp,       // (N,D)
                                     const float* weight,  // (E,D)
                                     int N, int D, int E) = 0;
  // dinp (may be nullptr) and dweight accumulate, as in linear_backward.
  virtual void router_logits_backward(Act* dinp,             // (N,D) +=
                                      float* dweight,        // (E,D) +=
                                      const float* dlogits,  // (N,E)
                                      const Act* inp,        // (N,D)
                                      const float* weight,   // (E,D)
                                      int N, int D, int E) = 0;
  // probs = softmax(logits), lse = logsumexp(logits), per row.
  virtual void softmax_forward(float* probs,         // (N,E)
                               float* lse,           // (N)
                               const float* logits,  // (N,E)
                               int N, int E) = 0;
  // dlogits += softmax jacobian applied to dprobs.
  virtual void softmax_backward(float* dlogits,       // (N,E) +=
                                const float* dprobs,  // (N,E)
                                const float* probs,   // (N,E)
                                int N, int E) = 0;
  // The K largest probabilities per token (ties: lower expert id first), in decreasing order.
  // K == 1: gate = p; K > 1: gates renormalised to sum to 1 over the K chosen.
  virtual void topk_forward(int* expert_idx,      // (N,K)
                            float* gates,         // (N,K)
                            const float* probs,   // (N,E)
                            int N, int E, int K) = 0;
  virtual void topk_backward(float* dprobs,          // (N,E) +=
                             const float* dgates,    // (N,K)
                             const int* expert_idx,  // (N,K)
                             const float* probs,     // (N,E)
                             int N, int E, int K) = 0;
  // Capacity (DESIGN.md, Router): decides which choices are kept. A kept choice (t,k) gets
  // slot[t,k] = its position within its expert (0..counts[e]-1), a dropped one -1.
  // capacity < 0 means dropless. Host-side arrays: the counts size the expert GEMMs.
  virtual void capacity_assign(int* slot_host,              // (N,K)
                               int* counts_host,            // (E) kept choices per expert
                               int* choices_host,           // (E) choices per expert before capacity
                               const int* expert_idx,       // (N,K)
                               const float* gates,          // (N,K)
                               int N, int E, int K, int capacity, DropPolicy policy) = 0;

  // sums_host[e] = sum over rows of x[n,e], in double.
  virtual void column_sums(double* sums_host, const float* x, int N, int E) = 0;
  // x[n,:] += v_host for every row (the load-balancing gradient is the same for every token).
  virtual void add_row_vector(float* x,              // (N,E) +=
                              const float* v_host,   // (E)
                              int N, int E) = 0;
  // z-loss gradient: dlogits[n,e] += scale * 2 * lse[n] * probs[n,e]
  virtual void zloss_backward(float* dlogits,       // (N,E) +=
                              const float* probs,   // (N,E)
                              const float* lse,     // (N)
                              float scale, int N, int E) = 0;

  // ---- token permutation ----------------------------------------------------------------
  // out[r] = inp[row_idx[r]]   (row_idx on host)
  virtual void gather_rows(Act* out,                // (rows,D)
                           const Act* inp,          // (N,D)
                           const int* row_idx_host, // (rows)
                           int rows, int D) = 0;
  // dinp[row_idx[r]] += dout[r]
  virtual void scatter_add_rows(Act* dinp,               // (N,D) +=
                                const Act* dout,         // (rows,D)
                                const int* row_idx_host, // (rows)
                                int rows, int D) = 0;
  // out[t] = sum_k gates[t,k] * y[row[t,k]] over k with row[t,k] >= 0; no kept choice -> 0.
  virtual void combine_forward(Act* out,                // (N,D)
                               const Act* y,            // (rows,D)
                               const float* gates,      // (N,K)
                               const int* row_host,     // (N,K)
                               int N, int K, int D) = 0;
  // dy[row] += gates * dout[t];  dgates[t,k] += dot(dout[t], y[row]).
  virtual void combine_backward(Act* dy,                 // (rows,D) +=
                                float* dgates,           // (N,K)    +=
                                const Act* dout,         // (N,D)
                                const Act* y,            // (rows,D)
                                const float* gates,      // (N,K)
                                const int* row_host,     // (N,K)
                                int N, int K, int D) = 0;

  // ---- optimizer ------------------------------------------------------------------------
  // torch.optim.AdamW: p *= 1 - lr*wd; m,v moments; p -= lr * mhat / (sqrt(vhat) + eps).
  // step is 1-based (bias correction).
  virtual void adamw_update(float* params, const float* grads, float* m, float* v, size_t n,
                            float lr, float beta1, float beta2, float eps, float weight_decay,
                            int step) = 0;
};

// The CPU backend: fp32 everywhere (activations too), oneDNN GEMMs, OpenMP elementwise work.
std::unique_ptr<Backend> make_cpu_backend();

// The CUDA backend on GPU `device` (core/cuda/: bf16 activations and cuBLASLt GEMMs, fp32 router).
// Throws RuntimeError when this build has no CUDA or the GPU is missing.
std::unique_ptr<Backend> make_cuda_backend(int device);
// Empty when this build has CUDA and sees a GPU; otherwise why not ("no CUDA device: ...").
std::string cuda_unavailable_reason();

}  // namespace moe
