// The local experts' products as one cublasGemmGroupedBatchedEx call (cuBLAS, not cuBLASLt):
// one group of size 1 per non-empty expert, each with its own m, n, k. Operands and output are
// bf16 with fp32 accumulation (CUBLAS_COMPUTE_32F), the combination NVIDIA documents for this
// call, and bf16 is the activations' type: the callers (grouped_linear.cu) pass the experts'
// rows as they are and write the product into an activation (or a scratch they add from).
//
// Whether the call is used: not under MOE_GROUPED_GEMM=0 (read when the backend is created,
// so a test compares both paths with two backends); not after cuBLAS refused it once
// (NOT_SUPPORTED, INVALID_VALUE ... on this GPU or driver: one line on stderr, then never
// tried again); not for operands it cannot take safely (see aligned_problem in the .cu). In
// each case run returns false and the caller runs its per-expert cuBLASLt loop instead.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <functional>
#include <string>
#include <vector>

namespace moe {

// One product in cuBLAS's column-major terms: C (m,n) = op(A) (m,k) * op(B) (k,n), beta 0.
// A is stored (k,m) when the call's trans_a is set, else (m,k); B is stored (n,k) when
// trans_b, else (k,n). All three are device pointers to bf16.
struct GroupedGemmProblem {
  int m = 0, n = 0, k = 0;
  const __nv_bfloat16* a = nullptr;
  int lda = 0;
  const __nv_bfloat16* b = nullptr;
  int ldb = 0;
  __nv_bfloat16* c = nullptr;
  int ldc = 0;
};

class GroupedGemm {
 public:
  GroupedGemm();  // reads MOE_GROUPED_GEMM
  GroupedGemm(const GroupedGemm&) = delete;
  GroupedGemm& operator=(const GroupedGemm&) = delete;
  // Destroys the cuBLAS handle. CudaBackend's destructor has synchronized the device by then
  // (members are destroyed after its body).
  ~GroupedGemm();

  // False under MOE_GROUPED_GEMM=0 and after cuBLAS refused the call: then the caller need
  // not even prepare the problems.
  bool enabled() const { return enabled_; }

  // Runs every problem as one grouped call on the legacy default stream (stream order, like
  // every op of the backend), or returns false without writing anything: then the caller must
  // compute the products itself. The call takes its A, B and C pointer arrays from the
  // device: upload copies host bytes to device memory in stream order and returns where
  // (the backend's upload_bytes); device is the backend's.
  using Upload = std::function<const void*(const void* host, size_t bytes)>;
  bool run(int device, bool trans_a, bool trans_b, const std::vector<GroupedGemmProblem>& problems,
           const Upload& upload);

 private:
  // Creates the handle on first use; false (after the one stderr line) when cuBLAS cannot.
  bool ensure_handle(int device);
  // Prints the one line and turns the grouped call off for the rest of the backend's life.
  void refuse(const std::string& why);

  cublasHandle_t handle_ = nullptr;
  bool enabled_ = true;             // false under MOE_GROUPED_GEMM=0 or after cuBLAS refused
  bool warned_misaligned_ = false;  // the misaligned-operands line printed
};

}  // namespace moe
