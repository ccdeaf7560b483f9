// The bf16 GEMM rate of this GPU through the same cuBLASLt path the CUDA backend's linears
// take (bf16 operands, fp32 accumulation and output): the denominator of bench_step's MFU
// with --device cuda.
#pragma once

namespace moe {

struct GemmRate {
  double median_ms = 0;  // one product, median over the timed repetitions
  double tflops = 0;     // 2*m*n*k / median time
};

// out (m,n) = a (m,k) @ b^T (k,n) on random bf16 inputs, timed with CUDA events after
// warm-up; `reps` timed products. Throws RuntimeError without CUDA.
GemmRate measure_cuda_gemm_rate(int m, int n, int k, int reps);

}  // namespace moe
