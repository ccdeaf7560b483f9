// The CUDA backend: every op of core/backend.h on one GPU, one op family per .cu file.
//
// Precision: activations (every `Act` argument) are bf16 (act_t, core/cuda/act.cuh):
// activation_type() is kBF16, kernels load them widened to fp32, compute in fp32 and round
// once per stored element, and the copy_act_* ops round and widen on the host. Weights (the
// master copy), gradients, optimizer moments, the router and the losses stay fp32. GEMMs run
// through cuBLASLt with bf16 operands and fp32 accumulation: activations are operands as they
// are, and a weight's bf16 copy is cached (see bf16_weight) and refreshed by the fused AdamW
// kernel, so weights are converted once per step, not once per use. A product that is an
// activation (a linear's output, dinp, the GELU's pre and dpre) is stored bf16 by cuBLASLt,
// with its bias in the epilogue as the bias's cached bf16 copy (cuBLASLt's bias has the
// output's type); weight gradients accumulate in fp32 (dW += from bf16 operands). The router's
// logits (router_logits.cu) run fully in fp32 from a widened copy of their bf16 input:
// DESIGN.md keeps the router in fp32, and it costs nothing. The local experts' forward and
// dinp products are one cublasGemmGroupedBatchedEx call with a bf16 output (grouped_gemm.h,
// grouped_linear.cu).
//
// Streams: every op runs in order on the legacy default stream, so ops need no events between
// them; the NCCL communicator (dist/nccl_communicator.cpp) orders its own stream against it.
// Host-side arguments of the interface (offsets_host, row_idx_host, v_host ...) are uploaded
// with the op through pinned staging, so they do not synchronize with the stream; results the
// interface returns on the host (capacity counts, column sums, sum_squares, all_finite) are
// one device-to-host copy each.
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/cuda/act.cuh"
#include "core/cuda/grouped_gemm.h"
#include "core/cuda_gemm_rate.h"
#include "core/error.h"

namespace moe {

// Throws RuntimeError naming the failed call and where it was made.
void cuda_check(cudaError_t status, const char* call, const char* file, int line);
void cublas_check(cublasStatus_t status, const char* call, const char* file, int line);
#define CUDA_CHECK(call) ::moe::cuda_check((call), #call, __FILE__, __LINE__)
#define CUBLAS_CHECK(call) ::moe::cublas_check((call), #call, __FILE__, __LINE__)
// After every kernel launch: a bad configuration shows up here, not three ops later.
#define CUDA_CHECK_LAUNCH() ::moe::cuda_check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

// Threads per block of the 1-D elementwise kernels, and their grid for n elements (capped:
// the kernels loop grid-stride, so a capped grid still covers every element).
constexpr int kThreads = 256;
inline int grid_for(size_t n, int threads = kThreads) {
  const size_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 * 4 ? (blocks == 0 ? 1 : blocks) : 65535 * 4);
}

// What cuBLASLt does to a product before storing it (beyond alpha, beta):
//   kBias     + bias per column when bias != nullptr (CUBLASLT_EPILOGUE_BIAS), else nothing
//   kGeluAux  aux = product (+ bias); C = gelu(aux)         (GELU_AUX[_BIAS], the forward)
//   kDGelu    C = product * gelu'(aux), aux read             (DGELU, the backward)
enum class GemmEpilogue { kBias, kGeluAux, kDGelu };

// One cuBLASLt product in column-major terms (cuBLAS's convention):
//   C (m,n) = alpha * op(A) (m,k) * op(B) (k,n) + beta * C  [+ bias (m) per column]
// A is stored (k,m) when trans_a else (m,k), column-major with leading dimension lda; B is
// stored (n,k) when trans_b else (k,n). Batched with strides when batch > 1. A and B are bf16
// (fp32 when fp32 is set: the router); C is bf16 when c_bf16 (an activation), else fp32 (a
// weight gradient, the router's products); accumulation is fp32.
struct GemmCall {
  bool trans_a = false, trans_b = false;
  int m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int lda = 0;
  long long stride_a = 0;
  const void* b = nullptr;
  int ldb = 0;
  long long stride_b = 0;
  void* c = nullptr;            // act_t when c_bf16, else float
  bool c_bf16 = false;          // C is bf16 (needs bf16 operands)
  int ldc = 0;
  long long stride_c = 0;
  int batch = 1;
  float alpha = 1.0f, beta = 0.0f;
  // (m) added to every column; nullptr: none. The fp32 weight: with a bf16 C the epilogue
  // takes its cached bf16 copy (bf16_weight), since cuBLASLt's bias has the output's type.
  const float* bias = nullptr;
  bool fp32 = false;            // operands are fp32 (router): no bf16 anywhere
  GemmEpilogue epilogue = GemmEpilogue::kBias;
  void* aux = nullptr;          // (m,n) column-major, ld ldaux, C's type: GELU's input
  int ldaux = 0;                // a multiple of 8 (cuBLASLt's rule)
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

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

  // ---- internals shared by the op files -------------------------------------------------
  // Scratch that lives until the next call with the same slot (ops run in stream order, so
  // an op may reuse a slot the previous op used). Grows, never shrinks.
  enum Slot {
    kBf16Inp, kBf16Dout, kBf16Q, kBf16K, kBf16V, kF32Dq, kF32Delta,
    kIndexA, kIndexB, kHostVector, kReduce, kCapacityOrder,
    kBf16Product,     // the grouped expert dinp GEMM's bf16 output (grouped_linear.cu)
    kGroupedPointers, // its device arrays of A, B and C pointers
    kF32RouterInp,    // the router's input widened to fp32 (router_logits.cu)
    kF32RouterDinp,   // the router's fp32 dinp product, before it is added (router_logits.cu)
    kNumSlots
  };
  void* scratch(Slot slot, size_t bytes);
  // Uploads `count` host ints into a scratch slot and returns the device copy.
  const int* upload(Slot slot, const int* host, size_t count);
  // Copies `bytes` host bytes into a scratch slot, stream-ordered and without synchronizing
  // (through pinned staging, memory.cu); the host bytes may be reused on return.
  const void* upload_bytes(Slot slot, const void* host, size_t bytes);
  // The bf16 copy of n floats: converted now into the slot (gemm_rate.cu's random operand).
  const __nv_bfloat16* to_bf16(Slot slot, const float* x, size_t n);
  // The fp32 copy of n activations: widened now into the slot (convert.cu).
  const float* to_f32(Slot slot, const act_t* x, size_t n);
  // The bf16 copy of a weight: the whole allocation holding it is converted on first use and
  // kept until a write to that allocation (any op's output, a copy, fill, load) invalidates
  // it; adamw_update refreshes it in the same kernel instead. Memory written outside this
  // backend's ops (a communicator) must not be a GEMM weight without a following backend op
  // writing it; nothing in model/ does that (weights change only through AdamW and loads).
  const __nv_bfloat16* bf16_weight(const float* w, size_t n);
  // Every op calls this for each device buffer it writes.
  void note_write(const void* ptr);
  // The product, with its bias in the epilogue where cuBLASLt can, else added by a kernel.
  // Throws when cuBLASLt has no algorithm even without the bias.
  void gemm(const GemmCall& call);
  // The product exactly as asked (any epilogue); false, with nothing done, when cuBLASLt has
  // no algorithm for it (the answer is cached per shape) or the epilogue's bias is not 16-byte
  // aligned (a pointer inside the flat parameter buffer may be less), so the caller takes its
  // fallback.
  bool try_gemm(const GemmCall& call);
  // The calls of linear_forward (out (N,OC) = inp @ W^T + bias) and of linear_backward's input
  // gradient (dinp (N,IC) += dout @ W), shared with the fused linear + GELU (linear_gelu.cu).
  GemmCall linear_forward_call(act_t* out, const act_t* inp, const float* weight,
                               const float* bias, int N, int IC, int OC);
  GemmCall linear_dinp_call(act_t* dinp, const act_t* dout, const float* weight, int N, int IC,
                            int OC);
  // linear_backward's dweight (+=, fp32) and dbias (+=, may be nullptr).
  void linear_weight_gradients(float* dweight, float* dbias, const act_t* dout, const act_t* inp,
                               int N, int IC, int OC);
  // dbias (OC) += column sums of dout (N,OC), summed in fp32.
  void add_column_sums(float* dbias, const act_t* dout, int N, int OC);

 private:
  struct Allocation {
    size_t bytes = 0;
    __nv_bfloat16* shadow = nullptr;  // bf16 copy of the floats, or nullptr
    bool shadow_valid = false;
  };
  // The local experts' forward (transpose_weight: rows_e W_e^T, rows (rows,IC)) or dinp
  // (rows_e W_e, rows (rows,OC)) products as one grouped call, written (beta 0) into product
  // (rows, OC or IC) from offsets[0] (every row of it: each belongs to one expert); false when
  // the grouped call is off or was refused, and the caller runs one cuBLASLt product per
  // expert (grouped_linear.cu).
  bool grouped_expert_products(bool transpose_weight, const __nv_bfloat16* w_bf16,
                               const act_t* rows, act_t* product, const int* offsets_host, int E,
                               int IC, int OC);
  // grouped_linear_forward (gelu_out == nullptr) and grouped_linear_gelu_forward (out is
  // then the GELU's input, pre), offsets already checked (grouped_linear.cu).
  void expert_forward(act_t* out, act_t* gelu_out, const act_t* inp, const float* weight,
                      const float* bias, const int* offsets_host, int E, int IC, int OC);
  // The allocation holding ptr, or nullptr.
  Allocation* find_allocation(const void* ptr, uintptr_t* base = nullptr);

  int device_ = 0;
  std::string device_name_;
  cublasLtHandle_t lt_ = nullptr;
  void* lt_workspace_ = nullptr;
  size_t lt_workspace_bytes_ = 0;
  // By shape, types and epilogue; empty when cuBLASLt has none for the key.
  std::map<std::string, std::optional<cublasLtMatmulAlgo_t>> algo_cache_;
  std::map<uintptr_t, Allocation> allocations_;              // by base address
  struct ScratchBuffer {
    void* ptr = nullptr;
    size_t bytes = 0;
  };
  ScratchBuffer scratch_[kNumSlots];
  // Pinned host buffers that uploads pass through (upload_bytes), kStagingDepth per slot.
  static constexpr int kStagingDepth = 4;
  struct PinnedStaging {
    void* host = nullptr;          // pinned (cudaMallocHost)
    size_t bytes = 0;
    cudaEvent_t copied = nullptr;  // recorded after the last copy out of host
  };
  PinnedStaging staging_[kNumSlots][kStagingDepth];
  int staging_turn_[kNumSlots] = {};  // the slot's next staging buffer
  GroupedGemm grouped_gemm_;  // the experts' products as one cuBLAS call (grouped_linear.cu)
  bool fused_gelu_ = true;     // false under MOE_FUSED_GELU=0, read when created (linear_gelu.cu)
  bool warned_gelu_epilogue_ = false;  // the one line when cuBLASLt refused it at run time
};

// dpre (n) *= gelu'(pre (n)) on the default stream, in fp32, rounded once: the unfused GELU
// backward after a product wrote dpre (linear_gelu.cu).
void launch_scale_by_gelu_derivative(act_t* dpre, const act_t* pre, size_t n);

// dst[dest_host[j]] += scale[j] * src[j / src_div] for every j in [0, m) with dest_host[j] >= 0
// (scale nullptr: 1), the sources of each destination row summed in fp32 and added once: the
// scatter with repeated destinations of scatter_add_rows and combine_backward (permute.cu).
// dst and src rows are D wide; dest_host on the host, scale on the device.
void scatter_add_by_destination(CudaBackend& backend, act_t* dst, const act_t* src, int src_div,
                                const float* scale, const int* dest_host, int m, int D);

// Elementwise fp32 -> bf16 on the default stream: out (n) = bf16(inp (n)) (convert.cu).
void launch_to_bf16(__nv_bfloat16* out, const float* inp, size_t n);
// Elementwise bf16 -> fp32 on the default stream: out (n) = float(inp (n)), exact (convert.cu).
void launch_to_f32(float* out, const act_t* inp, size_t n);

// The bf16 GEMM rate of the current device through CudaBackend::gemm (gemm_rate.cu).
GemmRate measure_gemm_rate(int m, int n, int k, int reps);

}  // namespace moe
