// Elementwise ops over flat fp32 buffers: memory-bound loops, parallel over threads and SIMD
// lanes. The thread count is the caller's (omp_set_num_threads); small buffers stay on one
// thread, where starting the team would cost more than the loop.
#include <bit>
#include <cstdint>

#include "core/cpu/cpu_backend.h"

namespace moe {

namespace {
constexpr size_t kParallelMin = 1 << 14;  // elements below which one thread is faster
}  // namespace

void CpuBackend::add(float* out,        // (n)
                     const float* a,    // (n)
                     const float* b,    // (n)
                     size_t n) {
#pragma omp parallel for simd schedule(static) if (parallel : n >= kParallelMin)
  for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

void CpuBackend::accumulate(float* dst,        // (n) +=
                            const float* src,  // (n)
                            size_t n) {
#pragma omp parallel for simd schedule(static) if (parallel : n >= kParallelMin)
  for (size_t i = 0; i < n; i++) dst[i] += src[i];
}

void CpuBackend::scale(float* x,  // (n)
                       float s, size_t n) {
#pragma omp parallel for simd schedule(static) if (parallel : n >= kParallelMin)
  for (size_t i = 0; i < n; i++) x[i] *= s;
}

// The gradient norm: squares summed in double, so millions of small terms do not vanish
// into a large float sum.
double CpuBackend::sum_squares(const float* x,  // (n)
                               size_t n) {
  double sum = 0.0;
#pragma omp parallel for simd schedule(static) reduction(+ : sum) if (parallel : n >= kParallelMin)
  for (size_t i = 0; i < n; i++) sum += static_cast<double>(x[i]) * x[i];
  return sum;
}

// Checked before an optimizer step: one NaN or inf anywhere skips the step.
bool CpuBackend::all_finite(const float* x,  // (n)
                            size_t n) {
  // NaN and inf are the floats whose exponent bits are all ones; testing the bits vectorizes.
  const uint32_t kExponent = 0x7f800000u;
  int num_bad = 0;
#pragma omp parallel for simd schedule(static) reduction(+ : num_bad) \
    if (parallel : n >= kParallelMin)
  for (size_t i = 0; i < n; i++) {
    num_bad += (std::bit_cast<uint32_t>(x[i]) & kExponent) == kExponent;
  }
  return num_bad == 0;
}

void CpuBackend::mul(float* out,        // (n)
                     const float* a,    // (n)
                     const float* b,    // (n)
                     size_t n) {
#pragma omp parallel for simd schedule(static) if (parallel : n >= kParallelMin)
  for (size_t i = 0; i < n; i++) out[i] = a[i] * b[i];
}

}  // namespace moe
