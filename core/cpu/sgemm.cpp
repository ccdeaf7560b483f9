#include "core/cpu/sgemm.h"

#include <oneapi/dnnl/dnnl.h>

#include <string>

#include "core/error.h"

namespace moe {

void sgemm(char transa, char transb, int M, int N, int K, float alpha, const float* A, int lda,
           const float* B, int ldb, float beta, float* C, int ldc) {
  dnnl_status_t status = dnnl_sgemm(transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  MOE_CHECK(status == dnnl_success,
            "dnnl_sgemm failed with status " + std::to_string(static_cast<int>(status)) +
                " (M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" +
                std::to_string(K) + ")");
}

}  // namespace moe
