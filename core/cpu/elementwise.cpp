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

void CpuBackend::add(Act* out_act,      // (n)
                     const Act* a_act,  // (n)
                     const Act* b_act,  // (n)
                     size_t n) {
  float* out = act_f32(out_act);
  const float* a = act_f32(a_act);
  const float* b = act_f32(b_act);
#pragma omp parallel for simd schedule(static) if (parallel : n >= kParallelMin)
  for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

void CpuBackend::accumulate(Act* dst_act,        // (n) +=
                            const Act* src_act,  // (n)
                            size_t n) {
  float* dst = act_f32(dst_act);
  const float* src = act_f32(src_act);
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

// out may alias a (the router scales its input gradient in place).
void CpuBackend::mul(Act* out_act,          // (n)
                     const Act* a_act,      // (n)
                     const float* factors,  // (n)
                     size_t n) {
  float* out = act_f32(out_act);
  const float* a = act_f32(a_act);
#pragma omp parallel for simd schedule(static) if (parallel : n >= kParallelMin)
  for (size_t i = 0; i < n; i++) out[i] = a[i] * factors[i];
}

}  // namespace moe
