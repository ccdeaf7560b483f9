// One cublasGemmGroupedBatchedEx call over the local experts (see grouped_gemm.h), with its
// lazily created cuBLAS handle and the one-time checks that decide whether it is used.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/cuda/cuda_backend.h"

namespace moe {
namespace {

constexpr const char* kFallback = "experts run one cuBLASLt product each";

// cuBLAS documents that the 16-bit matrices of its pointer-array GEMMs must be aligned (16
// bytes, ideally) and it cannot check pointers that sit in device memory: a misaligned one
// would be a device fault, not an error status. So the grouped call takes only operands whose
// every matrix starts on 16 bytes and whose columns are whole 16-byte multiples.
bool aligned_16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
bool aligned_problem(const GroupedGemmProblem& p) {
  const int per_16_bytes = 16 / sizeof(__nv_bfloat16);
  return aligned_16(p.a) && aligned_16(p.b) && aligned_16(p.c) && p.lda % per_16_bytes == 0 &&
         p.ldb % per_16_bytes == 0 && p.ldc % per_16_bytes == 0;
}

}  // namespace

GroupedGemm::GroupedGemm() {
  const char* value = std::getenv("MOE_GROUPED_GEMM");
  enabled_ = value == nullptr || std::strcmp(value, "0") != 0;
}

GroupedGemm::~GroupedGemm() {
  // No throwing from a destructor; the process is usually ending.
  if (handle_ != nullptr) cublasDestroy(handle_);
}

void GroupedGemm::refuse(const std::string& why) {
  enabled_ = false;
  std::fprintf(stderr, "moe: cublasGemmGroupedBatchedEx unavailable (%s); %s\n", why.c_str(),
               kFallback);
}

bool GroupedGemm::ensure_handle(int device) {
  if (handle_ != nullptr) return true;
  // The handle belongs to the device current at creation: the backend's.
  CUDA_CHECK(cudaSetDevice(device));
  cublasHandle_t handle = nullptr;
  cublasStatus_t status = cublasCreate(&handle);
  if (status != CUBLAS_STATUS_SUCCESS) {
    refuse(std::string(cublasGetStatusName(status)) + " from cublasCreate");
    return false;
  }
  // Stream 0, the legacy default stream: ordered with every other op of the backend.
  status = cublasSetStream(handle, 0);
  // With a bf16 output cuBLAS may otherwise reduce split-k partial sums in bf16: keep every
  // reduction in the fp32 compute type, as the cuBLASLt products do (gemm.cu's reduction
  // scheme mask).
  if (status == CUBLAS_STATUS_SUCCESS)
    status = cublasSetMathMode(handle, static_cast<cublasMath_t>(
                                           CUBLAS_DEFAULT_MATH |
                                           CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
  if (status != CUBLAS_STATUS_SUCCESS) {
    cublasDestroy(handle);
    refuse(std::string(cublasGetStatusName(status)) + " from cublasSetStream/cublasSetMathMode");
    return false;
  }
  handle_ = handle;
  return true;
}

bool GroupedGemm::run(int device, bool trans_a, bool trans_b,
                      const std::vector<GroupedGemmProblem>& problems, const Upload& upload) {
  if (!enabled_ || problems.empty()) return false;
  for (const GroupedGemmProblem& p : problems) {
    if (p.m <= 0 || p.n <= 0 || p.k <= 0) return false;  // nothing cuBLAS should see
    if (!aligned_problem(p)) {
      if (!warned_misaligned_)
        std::fprintf(stderr,
                     "moe: expert GEMM operands not 16-byte aligned (m %d, k %d, lda %d, ldb %d, "
                     "ldc %d); %s\n",
                     p.m, p.k, p.lda, p.ldb, p.ldc, kFallback);
      warned_misaligned_ = true;
      return false;
    }
  }
  if (!ensure_handle(device)) return false;

  const int num_groups = static_cast<int>(problems.size());
  // Host arrays, one entry per group (each group is one product).
  std::vector<cublasOperation_t> op_a(num_groups, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N);
  std::vector<cublasOperation_t> op_b(num_groups, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N);
  std::vector<int> m(num_groups), n(num_groups), k(num_groups);        // (groups)
  std::vector<int> lda(num_groups), ldb(num_groups), ldc(num_groups);  // (groups)
  std::vector<int> group_size(num_groups, 1);                          // (groups)
  std::vector<float> alpha(num_groups, 1.0f), beta(num_groups, 0.0f);  // (groups) fp32 scale
  std::vector<const void*> pointers(3 * static_cast<size_t>(num_groups));  // (3, groups): A, B, C
  for (int g = 0; g < num_groups; ++g) {
    const GroupedGemmProblem& p = problems[g];
    m[g] = p.m;
    n[g] = p.n;
    k[g] = p.k;
    lda[g] = p.lda;
    ldb[g] = p.ldb;
    ldc[g] = p.ldc;
    pointers[g] = p.a;
    pointers[num_groups + g] = p.b;
    pointers[2 * static_cast<size_t>(num_groups) + g] = p.c;
  }
  // cublasGemmGroupedBatchedEx arrived in cuBLAS 12.5; an older toolkit (the GPU machine's
  // own) still builds, and its backends run the experts one product each.
#if CUBLAS_VERSION >= 120500
  // The copy is ordered before the GEMM on stream 0, and `pointers` may go on return.
  void** device_pointers = static_cast<void**>(const_cast<void*>(
      upload(pointers.data(), pointers.size() * sizeof(void*))));  // (3, groups) device
  void** a_array = device_pointers;                                        // (groups) device
  void** b_array = device_pointers + num_groups;                           // (groups) device
  void** c_array = device_pointers + 2 * static_cast<size_t>(num_groups);  // (groups) device
  const cublasStatus_t status = cublasGemmGroupedBatchedEx(
      handle_, op_a.data(), op_b.data(), m.data(), n.data(), k.data(), alpha.data(), a_array,
      CUDA_R_16BF, lda.data(), b_array, CUDA_R_16BF, ldb.data(), beta.data(), c_array,
      CUDA_R_16BF, ldc.data(), num_groups, group_size.data(), CUBLAS_COMPUTE_32F);
#else
  (void)upload;
  const cublasStatus_t status = CUBLAS_STATUS_NOT_SUPPORTED;
#endif
  if (status != CUBLAS_STATUS_SUCCESS) {
    // Whatever cuBLAS did, it wrote only the C matrices (the caller's scratch, or an output
    // its loop then writes in full, beta 0), and the caller's loop computes every product
    // again from the operands.
    refuse(cublasGetStatusName(status));
    return false;
  }
  return true;
}

}  // namespace moe
