// Every product of the backend goes through here: cuBLASLt, bf16 (or fp32) operands, fp32
// accumulation, a bf16 (activation) or fp32 output, an optional bias (or bias + GELU, or
// GELU-gradient) epilogue, strided batches. The algorithm is chosen by cuBLASLt's heuristic
// once per shape and cached.
#include <cstdio>
#include <optional>
#include <string>
#include <utility>

#include "core/cuda/cuda_backend.h"

namespace moe {
namespace {

// Owns the descriptors of one call.
struct LtDescriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  ~LtDescriptors() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

void make_layout(cublasLtMatrixLayout_t* layout, cudaDataType_t type, int rows, int cols, int ld,
                 int batch, long long stride) {
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(layout, type, rows, cols, ld));
  if (batch > 1) {
    CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(*layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                                                  &batch, sizeof(batch)));
    CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(
        *layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
  }
}

// The largest power of two (at most 256) dividing the address of every batch's matrix:
// cuBLASLt's heuristic assumes 256-byte alignment unless told, and sub-matrices of the flat
// parameter buffer (or an expert's rows) are often less aligned.
uint32_t alignment(const void* ptr, long long stride_bytes, int batch) {
  uintptr_t bits = reinterpret_cast<uintptr_t>(ptr);
  if (batch > 1) bits |= static_cast<uintptr_t>(stride_bytes);
  uint32_t align = 256;
  while (align > 1 && bits % align != 0) align >>= 1;
  return align;
}

// c (n columns of ldc, the first m rows of each) += bias (m): the epilogue's work, for a bias
// that cuBLASLt's epilogue cannot take. A bf16 c is widened, summed in fp32 and rounded once.
__device__ __forceinline__ void add_to(float* c, size_t i, float v) { c[i] += v; }
__device__ __forceinline__ void add_to(act_t* c, size_t i, float v) { act_accumulate(c, i, v); }

template <typename T>  // float or act_t
__global__ void add_bias_kernel(T* c, const float* bias, int m, int n, int ldc) {
  const size_t total = static_cast<size_t>(m) * n;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t column = i / m;
    const int row = static_cast<int>(i % m);
    add_to(c, column * ldc + row, bias[row]);
  }
}

}  // namespace

void CudaBackend::gemm(const GemmCall& call) {
  MOE_CHECK(call.epilogue == GemmEpilogue::kBias, "gemm: GELU epilogues go through try_gemm");
  MOE_CHECK(call.bias == nullptr || call.batch == 1, "gemm: a bias needs a single product");
  if (try_gemm(call)) return;
  // No kernel with the bias epilogue for this shape, or a bias the epilogue cannot take (a
  // pointer inside the flat parameter buffer, or its bf16 copy, may be less than 16-byte
  // aligned): the product, then the bias.
  GemmCall without_bias = call;
  without_bias.bias = nullptr;
  if (call.bias == nullptr || !try_gemm(without_bias))
    throw RuntimeError("cuBLASLt has no algorithm for the GEMM m=" + std::to_string(call.m) +
                       " n=" + std::to_string(call.n) + " k=" + std::to_string(call.k));
  const int grid = grid_for(static_cast<size_t>(call.m) * call.n);
  if (call.c_bf16)
    add_bias_kernel<<<grid, kThreads>>>(static_cast<act_t*>(call.c), call.bias, call.m, call.n,
                                        call.ldc);
  else
    add_bias_kernel<<<grid, kThreads>>>(static_cast<float*>(call.c), call.bias, call.m, call.n,
                                        call.ldc);
  CUDA_CHECK_LAUNCH();
}

bool CudaBackend::try_gemm(const GemmCall& g) {
  if (g.m == 0 || g.n == 0 || g.batch == 0) return true;
  const bool gelu = g.epilogue != GemmEpilogue::kBias;
  MOE_CHECK(!gelu || (g.batch == 1 && g.aux != nullptr && !g.fp32),
            "gemm: a GELU epilogue needs one bf16 product and its aux matrix");
  MOE_CHECK(g.epilogue != GemmEpilogue::kDGelu || g.bias == nullptr,
            "gemm: the DGELU epilogue takes no bias");
  MOE_CHECK(!(g.fp32 && g.c_bf16), "gemm: a bf16 output needs bf16 operands");
  // The epilogue's bias has the output's type: with a bf16 C, the fp32 bias's cached bf16
  // copy (its address follows the fp32 one's offset, so it may be only 2-byte aligned).
  const void* bias = g.bias;
  if (g.bias != nullptr && g.c_bf16) bias = bf16_weight(g.bias, static_cast<size_t>(g.m));
  if (bias != nullptr && reinterpret_cast<uintptr_t>(bias) % 16 != 0) return false;
  const cudaDataType_t operand = g.fp32 ? CUDA_R_32F : CUDA_R_16BF;
  const cudaDataType_t output = g.c_bf16 ? CUDA_R_16BF : CUDA_R_32F;
  LtDescriptors d;
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_a = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a,
                                              sizeof(op_a)));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b,
                                              sizeof(op_b)));
  cublasLtEpilogue_t epilogue = g.bias != nullptr ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  if (g.epilogue == GemmEpilogue::kGeluAux)
    epilogue = g.bias != nullptr ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
  if (g.epilogue == GemmEpilogue::kDGelu) epilogue = CUBLASLT_EPILOGUE_DGELU;
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue,
                                              sizeof(epilogue)));
  if (bias != nullptr) {
    const cudaDataType_t bias_type = output;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                                                &bias_type, sizeof(bias_type)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                                sizeof(bias)));
  }
  if (gelu) {
    // The GELU input (pre-activation): written by GELU_AUX, read by DGELU. Its type defaults
    // to the output's (bf16: pre and dpre are activations); the heuristic reads the pointer's
    // alignment.
    const int64_t ldaux = g.ldaux;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                                                &g.aux, sizeof(g.aux)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                                                &ldaux, sizeof(ldaux)));
  }
  // Stored shapes (column-major): op(A) is (m,k), op(B) is (k,n).
  make_layout(&d.a, operand, g.trans_a ? g.k : g.m, g.trans_a ? g.m : g.k, g.lda, g.batch,
              g.stride_a);
  make_layout(&d.b, operand, g.trans_b ? g.n : g.k, g.trans_b ? g.k : g.n, g.ldb, g.batch,
              g.stride_b);
  make_layout(&d.c, output, g.m, g.n, g.ldc, g.batch, g.stride_c);

  const long long operand_bytes = g.fp32 ? 4 : 2, output_bytes = g.c_bf16 ? 2 : 4;
  const uint32_t align_a = alignment(g.a, g.stride_a * operand_bytes, g.batch);
  const uint32_t align_b = alignment(g.b, g.stride_b * operand_bytes, g.batch);
  const uint32_t align_c = alignment(g.c, g.stride_c * output_bytes, g.batch);
  const std::string key =
      std::to_string(align_a) + "," + std::to_string(align_b) + "," + std::to_string(align_c) +
      "," + std::to_string(g.trans_a) + std::to_string(g.trans_b) + "," + std::to_string(g.m) +
      "," + std::to_string(g.n) + "," + std::to_string(g.k) + "," + std::to_string(g.lda) + "," +
      std::to_string(g.ldb) + "," + std::to_string(g.ldc) + "," + std::to_string(g.batch) + "," +
      std::to_string(g.stride_a) + "," + std::to_string(g.stride_b) + "," +
      std::to_string(g.stride_c) + "," + std::to_string(static_cast<int>(epilogue)) + "," +
      // The heuristic reads the bias and aux pointers' alignment too.
      (bias ? std::to_string(alignment(bias, 0, 1)) + "," : "") +
      (gelu ? std::to_string(alignment(g.aux, 0, 1)) + "," + std::to_string(g.ldaux) + "," : "") +
      (g.fp32 ? "fp32" : "bf16") + (g.c_bf16 ? ">bf16" : ">fp32") + (g.beta != 0.0f ? "acc" : "");
  auto it = algo_cache_.find(key);
  if (it == algo_cache_.end()) {
    cublasLtMatmulPreference_t preference = nullptr;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&preference));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &lt_workspace_bytes_,
        sizeof(lt_workspace_bytes_)));
    const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> alignments[] = {
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c}};
    for (const auto& [attribute, bytes] : alignments)
      CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(preference, attribute, &bytes,
                                                        sizeof(bytes)));
    if (g.c_bf16) {
      // Split-k partial sums in fp32 only: the default also admits reductions in (or through)
      // the bf16 output, which would round every partial sum (algorithms without split-k stay
      // admitted).
      const uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
      CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          preference, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reduction, sizeof(reduction)));
    }
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
        lt_, d.op, d.a, d.b, d.c, d.c, preference, 1, &result, &found);
    cublasLtMatmulPreferenceDestroy(preference);
    // cuBLASLt reports "no algorithm for this configuration" as NOT_SUPPORTED, not always as
    // success with found == 0: both mean the caller's fallback. Remembered either way.
    if (status == CUBLAS_STATUS_NOT_SUPPORTED)
      found = 0;
    else
      CUBLAS_CHECK(status);
    std::optional<cublasLtMatmulAlgo_t> algo;
    if (found > 0) algo = result.algo;
    it = algo_cache_.emplace(key, algo).first;
  }
  if (!it->second.has_value()) return false;
  note_write(g.c);
  if (g.epilogue == GemmEpilogue::kGeluAux) note_write(g.aux);
  const cublasStatus_t status =
      cublasLtMatmul(lt_, d.op, &g.alpha, g.a, d.a, g.b, d.b, &g.beta, g.c, d.c, g.c, d.c,
                     &*it->second, lt_workspace_, lt_workspace_bytes_, 0);
  if (gelu && (status == CUBLAS_STATUS_NOT_SUPPORTED || status == CUBLAS_STATUS_INVALID_VALUE)) {
    // cuBLASLt checks some epilogue rules only here, before any work: forget the algorithm,
    // say so once, and let the caller run the GELU as a kernel.
    it->second.reset();
    if (!warned_gelu_epilogue_)
      std::fprintf(stderr, "moe: cuBLASLt refused the GELU epilogue (%s); the GELU runs as a kernel\n",
                   cublasLtGetStatusName(status));
    warned_gelu_epilogue_ = true;
    return false;
  }
  CUBLAS_CHECK(status);
  return true;
}

}  // namespace moe
