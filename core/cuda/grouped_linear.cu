// Grouped linear over the local experts: rows [offsets[e], offsets[e+1]) go through expert e.
// The rows are bf16 activations, the GEMMs' operands as they are. The forward product and the
// backward's dinp product run as ONE cublasGemmGroupedBatchedEx call over the non-empty
// experts (grouped_gemm.h) with a bf16 output, the activations' type: the forward's goes
// straight into out, where one pass adds the expert's bias (and applies the GELU); the dinp
// product goes to a scratch that one pass adds into dinp; the GELU backward's goes into dpre,
// then scaled by gelu'(pre). Where that call is off or refused, each non-empty expert is one
// cuBLASLt product on its row range (the row counts differ per expert and are known on the
// host, since they sized the all-to-all). The weight gradient is always one cuBLASLt product
// per expert: see below.
#include <string>
#include <vector>

#include "core/cuda/cuda_backend.h"
#include "core/cuda/gelu_math.cuh"

namespace moe {
namespace {

// The expert owning `row` (absolute): the last e with offsets[e] <= row. That expert is not
// empty, because offsets[0] <= row < offsets[E].
__device__ int expert_of_row(const int* offsets, int E, int row) {
  int lo = 0, hi = E - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= row)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// In place over the product in out (rows,OC): out = product + bias[e] (OC), e the expert
// owning each row, and with gelu_out also gelu_out = gelu(out), both from the fp32 sum and
// rounded once: the bias + GELU of the experts' c_fc in one pass. Row i here is row
// offsets[0] + i of the interface's buffers.
__global__ void expert_output_kernel(act_t* out,           // (rows,OC) the product, then out
                                     act_t* gelu_out,      // (rows,OC) or nullptr
                                     const float* bias,    // (E,OC) or nullptr
                                     const int* offsets,   // (E+1), nullptr without bias
                                     int E, int rows, int OC) {
  const size_t total = static_cast<size_t>(rows) * OC;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    float value = act_load(out, i);
    if (bias != nullptr) {
      const int row = offsets[0] + static_cast<int>(i / OC);
      value += bias[static_cast<size_t>(expert_of_row(offsets, E, row)) * OC + i % OC];
      act_store(out, i, value);
    }
    if (gelu_out != nullptr) act_store(gelu_out, i, cuda::gelu_value(value));
  }
}

void check_offsets(const int* offsets_host, int E, const char* op) {
  for (int e = 0; e < E; ++e)
    MOE_CHECK(offsets_host[e + 1] >= offsets_host[e],
              std::string(op) + ": offsets must not decrease");
}

// The fallback forward: one cuBLASLt product per non-empty expert, bias in the epilogue.
void forward_per_expert(CudaBackend& backend,
                        act_t* out,                   // (rows,OC) absolute rows
                        const act_t* inp,             // (rows,IC) absolute rows
                        const __nv_bfloat16* w_bf16,  // (E,OC,IC)
                        const float* bias,            // (E,OC) or nullptr
                        const int* offsets_host,      // (E+1)
                        int E, int IC, int OC) {
  for (int e = 0; e < E; ++e) {
    const int r0 = offsets_host[e], n = offsets_host[e + 1] - r0;
    if (n == 0) continue;
    GemmCall g;  // out_e^T (OC,n) = W_e (OC,IC) * inp_e^T (IC,n)
    g.trans_a = true;
    g.m = OC;
    g.n = n;
    g.k = IC;
    g.a = w_bf16 + static_cast<size_t>(e) * OC * IC;
    g.lda = IC;
    g.b = inp + static_cast<size_t>(r0) * IC;
    g.ldb = IC;
    g.c = out + static_cast<size_t>(r0) * OC;
    g.c_bf16 = true;
    g.ldc = OC;
    g.bias = bias ? bias + static_cast<size_t>(e) * OC : nullptr;
    backend.gemm(g);
  }
}

// The fallback dinp: one cuBLASLt product per non-empty expert, accumulated (beta 1) or
// written (beta 0: every row from offsets[0] to offsets[E] belongs to one expert).
void dinp_per_expert(CudaBackend& backend,
                     act_t* dinp,                  // (rows,IC) absolute rows
                     const act_t* dout,            // (rows,OC) absolute rows
                     const __nv_bfloat16* w_bf16,  // (E,OC,IC)
                     const int* offsets_host,      // (E+1)
                     int E, int IC, int OC, float beta) {
  for (int e = 0; e < E; ++e) {
    const int r0 = offsets_host[e], n = offsets_host[e + 1] - r0;
    if (n == 0) continue;
    GemmCall g;  // dinp_e^T (IC,n) (+)= W_e^T (IC,OC) * dout_e^T (OC,n)
    g.m = IC;
    g.n = n;
    g.k = OC;
    g.a = w_bf16 + static_cast<size_t>(e) * OC * IC;
    g.lda = IC;
    g.b = dout + static_cast<size_t>(r0) * OC;
    g.ldb = OC;
    g.c = dinp + static_cast<size_t>(r0) * IC;
    g.c_bf16 = true;
    g.ldc = IC;
    g.beta = beta;
    backend.gemm(g);
  }
}

// The weight gradient: one cuBLASLt product per expert with an fp32 output and beta 1, so
// gradients accumulate over micro-batches in fp32 (the grouped call's bf16 output would round
// each micro-batch's contribution to bf16 first); the bias gradient as column sums.
void expert_weight_gradients(CudaBackend& backend,
                             float* dweight,           // (E,OC,IC) +=
                             float* dbias,             // (E,OC)    += or nullptr
                             const act_t* dout,        // (rows,OC) absolute rows
                             const act_t* inp,         // (rows,IC) absolute rows
                             const int* offsets_host,  // (E+1)
                             int E, int IC, int OC) {
  for (int e = 0; e < E; ++e) {
    const int r0 = offsets_host[e], n = offsets_host[e + 1] - r0;
    if (n == 0) continue;
    GemmCall g;  // dW_e^T (IC,OC) += inp_e^T (IC,n) * dout_e (n,OC)
    g.trans_b = true;
    g.m = IC;
    g.n = OC;
    g.k = n;
    g.a = inp + static_cast<size_t>(r0) * IC;  // (n,IC)
    g.lda = IC;
    g.b = dout + static_cast<size_t>(r0) * OC;  // (n,OC)
    g.ldb = OC;
    g.c = dweight + static_cast<size_t>(e) * OC * IC;
    g.ldc = IC;
    g.beta = 1.0f;
    backend.gemm(g);
    if (dbias != nullptr)
      backend.add_column_sums(dbias + static_cast<size_t>(e) * OC,
                              dout + static_cast<size_t>(r0) * OC, n, OC);
  }
}

}  // namespace

bool CudaBackend::grouped_expert_products(bool transpose_weight,
                                          const __nv_bfloat16* w_bf16,  // (E,OC,IC)
                                          const act_t* rows,     // (rows, IC or OC) from offsets[0]
                                          act_t* product,        // (rows, OC or IC) from offsets[0]
                                          const int* offsets_host,  // (E+1)
                                          int E, int IC, int OC) {
  if (!grouped_gemm_.enabled()) return false;
  // Expert e's rows of the product, column-major: product_e^T (m,n) = op(W_e) (m,k) *
  // rows_e^T (k,n), with W_e stored (OC,IC) row-major, i.e. (IC,OC) column-major (lda IC).
  const int m = transpose_weight ? OC : IC, k = transpose_weight ? IC : OC;
  const int first = offsets_host[0];
  std::vector<GroupedGemmProblem> problems;  // (non-empty experts)
  for (int e = 0; e < E; ++e) {
    const int r0 = offsets_host[e], n = offsets_host[e + 1] - r0;
    if (n == 0) continue;
    GroupedGemmProblem p;
    p.m = m;
    p.n = n;
    p.k = k;
    p.a = w_bf16 + static_cast<size_t>(e) * OC * IC;
    p.lda = IC;
    p.b = rows + static_cast<size_t>(r0 - first) * k;
    p.ldb = k;
    p.c = product + static_cast<size_t>(r0 - first) * m;
    p.ldc = m;
    problems.push_back(p);
  }
  const auto upload_pointers = [this](const void* host, size_t bytes) {
    return upload_bytes(kGroupedPointers, host, bytes);  // (3, problems)
  };
  return grouped_gemm_.run(device_, transpose_weight, /*trans_b=*/false, problems,
                           upload_pointers);
}

void CudaBackend::grouped_linear_forward(Act* out_act,             // (rows,OC)
                                         const Act* inp_act,       // (rows,IC)
                                         const float* weight,      // (E,OC,IC)
                                         const float* bias,        // (E,OC) or nullptr
                                         const int* offsets_host,  // (E+1)
                                         int E, int IC, int OC) {
  check_offsets(offsets_host, E, "grouped_linear_forward");
  expert_forward(act_ptr(out_act), nullptr, act_ptr(inp_act), weight, bias, offsets_host, E, IC,
                 OC);
}

void CudaBackend::grouped_linear_backward(Act* dinp_act,             // (rows,IC) += or nullptr
                                          float* dweight,            // (E,OC,IC) +=
                                          float* dbias,              // (E,OC)    += or nullptr
                                          const Act* dout_act,       // (rows,OC)
                                          const Act* inp_act,        // (rows,IC)
                                          const float* weight,       // (E,OC,IC)
                                          const int* offsets_host,   // (E+1)
                                          int E, int IC, int OC) {
  act_t* dinp = act_ptr(dinp_act);
  const act_t *dout = act_ptr(dout_act), *inp = act_ptr(inp_act);
  check_offsets(offsets_host, E, "grouped_linear_backward");
  const int first = offsets_host[0], rows = offsets_host[E] - first;
  if (rows <= 0 || OC == 0) return;  // IC == 0 still has bias gradients
  const __nv_bfloat16* w_bf16 = bf16_weight(weight, static_cast<size_t>(E) * OC * IC);

  if (dinp != nullptr && IC > 0) {
    const size_t total = static_cast<size_t>(rows) * IC;
    // The grouped call writes (beta 0) into a scratch, added into dinp by one pass.
    act_t* product = grouped_gemm_.enabled()
                         ? static_cast<act_t*>(scratch(kBf16Product, total * sizeof(act_t)))
                         : nullptr;  // (rows,IC) from offsets[0]
    if (product != nullptr &&
        grouped_expert_products(/*transpose_weight=*/false, w_bf16,
                                dout + static_cast<size_t>(first) * OC, product, offsets_host, E,
                                IC, OC)) {
      accumulate(reinterpret_cast<Act*>(dinp + static_cast<size_t>(first) * IC),
                 reinterpret_cast<const Act*>(product), total);
    } else {
      dinp_per_expert(*this, dinp, dout, w_bf16, offsets_host, E, IC, OC, /*beta=*/1.0f);
    }
  }

  expert_weight_gradients(*this, dweight, dbias, dout, inp, offsets_host, E, IC, OC);
}

// The experts' c_fc + GELU: see expert_forward.
void CudaBackend::grouped_linear_gelu_forward(Act* pre_act,             // (rows,OC)
                                              Act* out_act,             // (rows,OC)
                                              const Act* inp_act,       // (rows,IC)
                                              const float* weight,      // (E,OC,IC)
                                              const float* bias,        // (E,OC) or nullptr
                                              const int* offsets_host,  // (E+1)
                                              int E, int IC, int OC) {
  check_offsets(offsets_host, E, "grouped_linear_gelu_forward");
  expert_forward(act_ptr(pre_act), act_ptr(out_act), act_ptr(inp_act), weight, bias,
                 offsets_host, E, IC, OC);
}

// Both forwards: with the grouped call, the product goes straight into out, and one pass over
// it adds the bias (and, with gelu_out, applies the GELU: pre and gelu(pre) in one pass; no
// pass at all without either); per expert, the products with their bias epilogue, then the
// GELU kernel.
void CudaBackend::expert_forward(act_t* out,               // (rows,OC)
                                 act_t* gelu_out,          // (rows,OC) or nullptr
                                 const act_t* inp,         // (rows,IC)
                                 const float* weight,      // (E,OC,IC)
                                 const float* bias,        // (E,OC) or nullptr
                                 const int* offsets_host,  // (E+1)
                                 int E, int IC, int OC) {
  const int first = offsets_host[0], rows = offsets_host[E] - first;
  if (rows <= 0 || OC == 0) return;
  const __nv_bfloat16* w_bf16 = bf16_weight(weight, static_cast<size_t>(E) * OC * IC);
  const size_t total = static_cast<size_t>(rows) * OC, at = static_cast<size_t>(first) * OC;
  if (grouped_expert_products(/*transpose_weight=*/true, w_bf16,
                              inp + static_cast<size_t>(first) * IC, out + at, offsets_host, E,
                              IC, OC)) {
    note_write(out);
    if (bias == nullptr && gelu_out == nullptr) return;
    note_write(gelu_out);
    const int* offsets = bias ? upload(kIndexA, offsets_host, E + 1) : nullptr;  // (E+1)
    expert_output_kernel<<<grid_for(total), kThreads>>>(
        out + at, gelu_out ? gelu_out + at : nullptr, bias, offsets, E, rows, OC);
    CUDA_CHECK_LAUNCH();
    return;
  }
  forward_per_expert(*this, out, inp, w_bf16, bias, offsets_host, E, IC, OC);
  if (gelu_out != nullptr)
    gelu_forward(reinterpret_cast<Act*>(gelu_out + at), reinterpret_cast<const Act*>(out + at),
                 total);
}

// c_proj's backward through the GELU: dpre = dout @ W is written (beta 0: every row belongs
// to one expert) by the grouped call or one product per expert, then scaled by gelu'(pre) in
// place; the weight gradients read the same dout.
void CudaBackend::gelu_grouped_linear_backward(Act* dpre_act,            // (rows,IC) written
                                               float* dweight,           // (E,OC,IC) +=
                                               float* dbias,             // (E,OC)    += or nullptr
                                               const Act* dout_act,      // (rows,OC)
                                               const Act* gelu_act,      // (rows,IC) gelu(pre)
                                               const float* weight,      // (E,OC,IC)
                                               const Act* pre_act,       // (rows,IC)
                                               const int* offsets_host,  // (E+1)
                                               int E, int IC, int OC) {
  act_t* dpre = act_ptr(dpre_act);
  const act_t *dout = act_ptr(dout_act), *act = act_ptr(gelu_act), *pre = act_ptr(pre_act);
  check_offsets(offsets_host, E, "gelu_grouped_linear_backward");
  const int first = offsets_host[0], rows = offsets_host[E] - first;
  if (rows <= 0) return;
  const size_t total = static_cast<size_t>(rows) * IC, at = static_cast<size_t>(first) * IC;
  if (OC == 0) {  // no outputs: nothing flows back
    if (total > 0) fill_zero(dpre + at, sizeof(act_t) * total);
    return;
  }
  const __nv_bfloat16* w_bf16 = bf16_weight(weight, static_cast<size_t>(E) * OC * IC);
  if (IC > 0) {  // with IC == 0 there is no dpre, only the bias gradients
    if (!grouped_expert_products(/*transpose_weight=*/false, w_bf16,
                                 dout + static_cast<size_t>(first) * OC, dpre + at,
                                 offsets_host, E, IC, OC))
      dinp_per_expert(*this, dpre, dout, w_bf16, offsets_host, E, IC, OC, /*beta=*/0.0f);
    note_write(dpre);
    launch_scale_by_gelu_derivative(dpre + at, pre + at, total);
  }
  expert_weight_gradients(*this, dweight, dbias, dout, act, offsets_host, E, IC, OC);
}

}  // namespace moe
