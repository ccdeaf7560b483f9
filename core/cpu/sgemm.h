// The one oneDNN call the CPU products go through: row-major C = alpha*op(A)*op(B) + beta*C
// (dnnl_sgemm's convention), threaded by oneDNN over the caller's OpenMP threads. Throws a
// RuntimeError naming the shape when oneDNN refuses.
#pragma once

namespace moe {

void sgemm(char transa, char transb, int M, int N, int K, float alpha, const float* A, int lda,
           const float* B, int ldb, float beta, float* C, int ldc);

}  // namespace moe
