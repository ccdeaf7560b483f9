// Grouped linear over the local experts: rows [offsets[e], offsets[e+1]) go through expert e.
// The inputs are converted to bf16 once for all experts. The forward product and the
// backward's dinp product then run as ONE cublasGemmGroupedBatchedEx call over the non-empty
// experts (grouped_gemm.h): its output is bf16, so a small kernel turns it into the fp32 the
// interface wants (adding the expert's bias, or accumulating into dinp). Where that call is
// off or refused, each non-empty expert is one cuBLASLt product on its row range, as before
// (the row counts differ per expert and are known on the host, since they sized the
// all-to-all). The weight gradient is always one cuBLASLt product per expert: see below.
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

// out (rows,OC) = float(product (rows,OC)) + bias[e] (OC), e the expert owning each row, and
// with gelu_out also gelu_out = gelu(out): the bias + GELU of the experts' c_fc in the pass
// that widens the product anyway. Row i here is row offsets[0] + i of the interface's buffers.
__global__ void expert_output_kernel(float* out,                      // (rows,OC)
                                     float* gelu_out,                 // (rows,OC) or nullptr
                                     const __nv_bfloat16* product,    // (rows,OC)
                                     const float* bias,               // (E,OC) or nullptr
                                     const int* offsets,              // (E+1), nullptr without bias
                                     int E, int rows, int OC) {
  const size_t total = static_cast<size_t>(rows) * OC;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    float value = __bfloat162float(product[i]);
    if (bias != nullptr) {
      const int row = offsets[0] + static_cast<int>(i / OC);
      value += bias[static_cast<size_t>(expert_of_row(offsets, E, row)) * OC + i % OC];
    }
    out[i] = value;
    if (gelu_out != nullptr) gelu_out[i] = cuda::gelu_value(value);
  }
}

// dst (n) += float(src (n)).
__global__ void accumulate_bf16_kernel(float* dst, const __nv_bfloat16* src, size_t n) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    dst[i] += __bfloat162float(src[i]);
}

// dpre (n) = float(product (n)) * gelu'(pre (n)): the input gradient through the GELU, written.
__global__ void gelu_input_gradient_kernel(float* dpre, const __nv_bfloat16* product,
                                           const float* pre, size_t n) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    dpre[i] = __bfloat162float(product[i]) * cuda::gelu_derivative(pre[i]);
}

void check_offsets(const int* offsets_host, int E, const char* op) {
  for (int e = 0; e < E; ++e)
    MOE_CHECK(offsets_host[e + 1] >= offsets_host[e],
              std::string(op) + ": offsets must not decrease");
}

// The fallback forward: one cuBLASLt product per non-empty expert, fp32 output, bias in the
// epilogue.
void forward_per_expert(CudaBackend& backend,
                        float* out,                     // (rows,OC) absolute rows
                        const __nv_bfloat16* inp_bf16,  // (rows,IC) from offsets[0]
                        const __nv_bfloat16* w_bf16,    // (E,OC,IC)
                        const float* bias,              // (E,OC) or nullptr
                        const int* offsets_host,        // (E+1)
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
    g.b = inp_bf16 + static_cast<size_t>(r0 - offsets_host[0]) * IC;
    g.ldb = IC;
    g.c = out + static_cast<size_t>(r0) * OC;
    g.ldc = OC;
    g.bias = bias ? bias + static_cast<size_t>(e) * OC : nullptr;
    backend.gemm(g);
  }
}

// The fallback dinp: one cuBLASLt product per non-empty expert, accumulating in fp32.
void dinp_per_expert(CudaBackend& backend,
                     float* dinp,                     // (rows,IC) += absolute rows
                     const __nv_bfloat16* dout_bf16,  // (rows,OC) from offsets[0]
                     const __nv_bfloat16* w_bf16,     // (E,OC,IC)
                     const int* offsets_host,         // (E+1)
                     int E, int IC, int OC) {
  for (int e = 0; e < E; ++e) {
    const int r0 = offsets_host[e], n = offsets_host[e + 1] - r0;
    if (n == 0) continue;
    GemmCall g;  // dinp_e^T (IC,n) += W_e^T (IC,OC) * dout_e^T (OC,n)
    g.m = IC;
    g.n = n;
    g.k = OC;
    g.a = w_bf16 + static_cast<size_t>(e) * OC * IC;
    g.lda = IC;
    g.b = dout_bf16 + static_cast<size_t>(r0 - offsets_host[0]) * OC;
    g.ldb = OC;
    g.c = dinp + static_cast<size_t>(r0) * IC;
    g.ldc = IC;
    g.beta = 1.0f;
    backend.gemm(g);
  }
}

// The weight gradient: one cuBLASLt product per expert with an fp32 output and beta 1, so
// gradients accumulate over micro-batches in fp32 (the grouped call's bf16 output would round
// each micro-batch's contribution to bf16 first); the bias gradient as column sums.
void expert_weight_gradients(CudaBackend& backend,
                             float* dweight,                  // (E,OC,IC) +=
                             float* dbias,                    // (E,OC)    += or nullptr
                             const float* dout,               // (rows,OC) absolute rows
                             const __nv_bfloat16* dout_bf16,  // (rows,OC) from offsets[0]
                             const __nv_bfloat16* inp_bf16,   // (rows,IC) from offsets[0]
                             const int* offsets_host,         // (E+1)
                             int E, int IC, int OC) {
  const int first = offsets_host[0];
  for (int e = 0; e < E; ++e) {
    const int r0 = offsets_host[e], n = offsets_host[e + 1] - r0;
    if (n == 0) continue;
    GemmCall g;  // dW_e^T (IC,OC) += inp_e^T (IC,n) * dout_e (n,OC)
    g.trans_b = true;
    g.m = IC;
    g.n = OC;
    g.k = n;
    g.a = inp_bf16 + static_cast<size_t>(r0 - first) * IC;  // (n,IC)
    g.lda = IC;
    g.b = dout_bf16 + static_cast<size_t>(r0 - first) * OC;  // (n,OC)
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

const __nv_bfloat16* CudaBackend::grouped_expert_products(bool transpose_weight,
                                                         const __nv_bfloat16* w_bf16,
                                                         const __nv_bfloat16* rows_bf16,
                                                         const int* offsets_host, int E, int IC,
                                                         int OC) {
  if (!grouped_gemm_.enabled()) return nullptr;
  // Expert e's rows of the product, column-major: product_e^T (m,n) = op(W_e) (m,k) *
  // rows_e^T (k,n), with W_e stored (OC,IC) row-major, i.e. (IC,OC) column-major (lda IC).
  const int m = transpose_weight ? OC : IC, k = transpose_weight ? IC : OC;
  const int first = offsets_host[0], rows = offsets_host[E] - first;
  auto* product = static_cast<__nv_bfloat16*>(
      scratch(kBf16Product, static_cast<size_t>(rows) * m * sizeof(__nv_bfloat16)));  // (rows,m)
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
    p.b = rows_bf16 + static_cast<size_t>(r0 - first) * k;
    p.ldb = k;
    p.c = product + static_cast<size_t>(r0 - first) * m;
    p.ldc = m;
    problems.push_back(p);
  }
  const auto upload_pointers = [this](const void* host, size_t bytes) {
    return upload_bytes(kGroupedPointers, host, bytes);  // (3, problems)
  };
  return grouped_gemm_.run(device_, transpose_weight, /*trans_b=*/false, problems,
                           upload_pointers)
             ? product
             : nullptr;
}

void CudaBackend::grouped_linear_forward(Act* out_act,             // (rows,OC)
                                         const Act* inp_act,       // (rows,IC)
                                         const float* weight,      // (E,OC,IC)
                                         const float* bias,        // (E,OC) or nullptr
                                         const int* offsets_host,  // (E+1)
                                         int E, int IC, int OC) {
  check_offsets(offsets_host, E, "grouped_linear_forward");
  expert_forward(act_f32(out_act), nullptr, act_f32(inp_act), weight, bias, offsets_host, E, IC,
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
  float* dinp = act_f32(dinp_act);
  const float *dout = act_f32(dout_act), *inp = act_f32(inp_act);
  check_offsets(offsets_host, E, "grouped_linear_backward");
  const int first = offsets_host[0], rows = offsets_host[E] - first;
  if (rows <= 0 || OC == 0) return;  // IC == 0 still has bias gradients
  const __nv_bfloat16* dout_bf16 = to_bf16(kBf16Dout, dout + static_cast<size_t>(first) * OC,
                                           static_cast<size_t>(rows) * OC);  // (rows,OC)
  const __nv_bfloat16* inp_bf16 = to_bf16(kBf16Inp, inp + static_cast<size_t>(first) * IC,
                                          static_cast<size_t>(rows) * IC);   // (rows,IC)
  const __nv_bfloat16* w_bf16 = bf16_weight(weight, static_cast<size_t>(E) * OC * IC);

  if (dinp != nullptr && IC > 0) {
    if (const __nv_bfloat16* product =
            grouped_expert_products(/*transpose_weight=*/false, w_bf16, dout_bf16, offsets_host,
                                    E, IC, OC)) {  // (rows,IC) from offsets[0]
      note_write(dinp);
      const size_t total = static_cast<size_t>(rows) * IC;
      accumulate_bf16_kernel<<<grid_for(total), kThreads>>>(
          dinp + static_cast<size_t>(first) * IC, product, total);
      CUDA_CHECK_LAUNCH();
    } else {
      dinp_per_expert(*this, dinp, dout_bf16, w_bf16, offsets_host, E, IC, OC);
    }
  }

  expert_weight_gradients(*this, dweight, dbias, dout, dout_bf16, inp_bf16, offsets_host, E, IC,
                          OC);
}

// The experts' c_fc + GELU: with the grouped call, the widening pass adds the bias and applies
// the GELU too (pre and out in one pass over the product); per expert, the products with
// their bias epilogue, then the GELU kernel.
void CudaBackend::grouped_linear_gelu_forward(Act* pre_act,             // (rows,OC)
                                              Act* out_act,             // (rows,OC)
                                              const Act* inp_act,       // (rows,IC)
                                              const float* weight,      // (E,OC,IC)
                                              const float* bias,        // (E,OC) or nullptr
                                              const int* offsets_host,  // (E+1)
                                              int E, int IC, int OC) {
  check_offsets(offsets_host, E, "grouped_linear_gelu_forward");
  expert_forward(act_f32(pre_act), act_f32(out_act), act_f32(inp_act), weight, bias,
                 offsets_host, E, IC, OC);
}

// Both forwards: with the grouped call, the pass that widens the bf16 product adds the bias
// (and, with gelu_out, applies the GELU: pre and gelu(pre) in one pass); per expert, the
// products with their bias epilogue, then the GELU kernel.
void CudaBackend::expert_forward(float* out,               // (rows,OC)
                                 float* gelu_out,          // (rows,OC) or nullptr
                                 const float* inp,         // (rows,IC)
                                 const float* weight,      // (E,OC,IC)
                                 const float* bias,        // (E,OC) or nullptr
                                 const int* offsets_host,  // (E+1)
                                 int E, int IC, int OC) {
  const int first = offsets_host[0], rows = offsets_host[E] - first;
  if (rows <= 0 || OC == 0) return;
  const __nv_bfloat16* inp_bf16 =
      to_bf16(kBf16Inp, inp + static_cast<size_t>(first) * IC,
              static_cast<size_t>(rows) * IC);  // (rows,IC) from offsets[0]
  const __nv_bfloat16* w_bf16 = bf16_weight(weight, static_cast<size_t>(E) * OC * IC);
  const size_t total = static_cast<size_t>(rows) * OC, at = static_cast<size_t>(first) * OC;
  if (const __nv_bfloat16* product =
          grouped_expert_products(/*transpose_weight=*/true, w_bf16, inp_bf16, offsets_host, E,
                                  IC, OC)) {  // (rows,OC) from offsets[0]
    note_write(out);
    note_write(gelu_out);
    const int* offsets = bias ? upload(kIndexA, offsets_host, E + 1) : nullptr;  // (E+1)
    expert_output_kernel<<<grid_for(total), kThreads>>>(
        out + at, gelu_out ? gelu_out + at : nullptr, product, bias, offsets, E, rows, OC);
    CUDA_CHECK_LAUNCH();
    return;
  }
  forward_per_expert(*this, out, inp_bf16, w_bf16, bias, offsets_host, E, IC, OC);
  if (gelu_out != nullptr) gelu_forward(f32_act(gelu_out + at), f32_act(out + at), total);
}

// c_proj's backward through the GELU: dout is converted once for both products. With the
// grouped call, one pass turns the bf16 dinp product into dpre = product * gelu'(pre); per
// expert, a zeroed dpre takes the products, then is scaled by gelu'(pre).
void CudaBackend::gelu_grouped_linear_backward(Act* dpre_act,            // (rows,IC) written
                                               float* dweight,           // (E,OC,IC) +=
                                               float* dbias,             // (E,OC)    += or nullptr
                                               const Act* dout_act,      // (rows,OC)
                                               const Act* gelu_act,      // (rows,IC) gelu(pre)
                                               const float* weight,      // (E,OC,IC)
                                               const Act* pre_act,       // (rows,IC)
                                               const int* offsets_host,  // (E+1)
                                               int E, int IC, int OC) {
  float* dpre = act_f32(dpre_act);
  const float *dout = act_f32(dout_act), *act = act_f32(gelu_act), *pre = act_f32(pre_act);
  check_offsets(offsets_host, E, "gelu_grouped_linear_backward");
  const int first = offsets_host[0], rows = offsets_host[E] - first;
  if (rows <= 0) return;
  const size_t total = static_cast<size_t>(rows) * IC, at = static_cast<size_t>(first) * IC;
  if (OC == 0) {  // no outputs: nothing flows back
    if (total > 0) fill_zero(dpre + at, sizeof(float) * total);
    return;
  }
  const __nv_bfloat16* dout_bf16 = to_bf16(kBf16Dout, dout + static_cast<size_t>(first) * OC,
                                           static_cast<size_t>(rows) * OC);  // (rows,OC)
  const __nv_bfloat16* act_bf16 = to_bf16(kBf16Inp, act + at, total);       // (rows,IC)
  const __nv_bfloat16* w_bf16 = bf16_weight(weight, static_cast<size_t>(E) * OC * IC);
  // (rows,IC) from offsets[0]; with IC == 0 there is no dpre, only the bias gradients.
  const __nv_bfloat16* product =
      IC > 0 ? grouped_expert_products(/*transpose_weight=*/false, w_bf16, dout_bf16,
                                       offsets_host, E, IC, OC)
             : nullptr;
  if (product != nullptr) {
    note_write(dpre);
    gelu_input_gradient_kernel<<<grid_for(total), kThreads>>>(dpre + at, product, pre + at,
                                                              total);
    CUDA_CHECK_LAUNCH();
  } else if (IC > 0) {
    fill_zero(dpre + at, sizeof(float) * total);
    dinp_per_expert(*this, dpre, dout_bf16, w_bf16, offsets_host, E, IC, OC);
    launch_scale_by_gelu_derivative(dpre + at, pre + at, total);
  }
  expert_weight_gradients(*this, dweight, dbias, dout, dout_bf16, act_bf16, offsets_host, E, IC,
                          OC);
}

}  // namespace moe
