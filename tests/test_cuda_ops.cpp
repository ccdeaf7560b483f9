// Every op of the CUDA backend against the CPU backend (the ground truth) on the same random
// inputs. The CUDA backend's activations are bf16 (checked by ActivationsAreBf16); they go to
// and from the GPU through copy_act_from_host / copy_act_to_host, and the CPU backend's are
// fp32, so every activation input is rounded to bf16 on the host first (random_act,
// bf16_values): both backends then see the same values and a comparison measures the op, not
// the rounding of its inputs. Tolerances by dtype:
//   fp32 outputs (weight gradients, router, losses, statistics): fp32 rounding (the GPU's fast
//     exp and another summation order);
//   activations computed in fp32 and stored in bf16: that plus one bf16 rounding, 2^-8 of the
//     value at most (8 significant bits, round to nearest);
//   activations accumulated (+=) in bf16: one more rounding, of an increment or a partial sum
//     (bf16 atomics round every add);
//   products on bf16 tensor cores (linear, grouped linear, attention; weights rounded to bf16
//     on the GPU only): bf16's ~3 significant digits, as a relative norm of the difference
//     plus a bound on the worst element.
// Index results (top-k, capacity) must be identical. Every comparison prints the worst
// difference it saw.
//
// Without a GPU (or in a build without CUDA) every test is skipped, naming the reason.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/backend.h"

namespace moe {
namespace {

struct Tolerance {
  double abs;       // |gpu - cpu| <= abs + rel * |cpu| per element ...
  double rel;
  double norm_rel;  // ... and ||gpu - cpu|| / ||cpu|| <= norm_rel (0: not checked)
};
constexpr Tolerance kFp32{2e-5, 2e-4, 0};
// bf16 keeps 8 significant bits: rounding to the nearest moves a value by at most 2^-8 of it.
constexpr double kBf16Rounding = 1.0 / 256;
// An activation computed in fp32 and stored in bf16 once.
constexpr Tolerance kBf16Stored{kFp32.abs, kFp32.rel + kBf16Rounding, 0};
// bf16 operands (8 significant bits), fp32 accumulation, bf16 outputs: the norm carries the
// claim; the per-element bound only catches gross errors on elements that cancel to near zero.
constexpr Tolerance kBf16{2e-2, 5e-2, 2e-2};

float max_abs(const std::vector<float>& v) {
  float m = 0;
  for (const float x : v) m = std::max(m, std::fabs(x));
  return m;
}

// An activation accumulated in bf16 from `initial` to (the CPU's) `result`: the rounding of the
// result, and one more of an increment or a partial sum, which is at most max|initial| +
// max|increment| in magnitude.
Tolerance bf16_accumulated(const std::vector<float>& initial, const std::vector<float>& result) {
  float increment = 0;
  for (size_t i = 0; i < initial.size(); ++i)
    increment = std::max(increment, std::fabs(result[i] - initial[i]));
  return {kFp32.abs + kBf16Rounding * (max_abs(initial) + increment),
          kFp32.rel + kBf16Rounding, 0};
}

// x rounded to bf16 (to the nearest, ties to even) and widened back: the value a bf16
// activation holds. Overflow rounds to infinity; NaN stays NaN.
float round_to_bf16(float x) {
  if (std::isnan(x)) return x;
  uint32_t bits = std::bit_cast<uint32_t>(x);
  bits += 0x7fffu + ((bits >> 16) & 1u);  // past half of the dropped 16 bits, or half and odd
  return std::bit_cast<float>(bits & 0xffff0000u);
}
std::vector<float> bf16_values(std::vector<float> v) {
  for (float& x : v) x = round_to_bf16(x);
  return v;
}

void expect_match(const std::string& what, const std::vector<float>& gpu,
                  const std::vector<float>& cpu, Tolerance tol) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  double worst = 0, diff_sq = 0, ref_sq = 0, max_ref = 0;
  size_t worst_at = 0, num_bad = 0;
  for (const float x : cpu) max_ref = std::max(max_ref, std::fabs(double{x}));
  for (size_t i = 0; i < cpu.size(); ++i) {
    const double d = std::fabs(double{gpu[i]} - double{cpu[i]});
    diff_sq += d * d;
    ref_sq += double{cpu[i]} * cpu[i];
    if (!(d <= worst)) {  // NaN counts as worst
      worst = std::isnan(d) ? INFINITY : d;
      worst_at = i;
    }
    const double scale = tol.norm_rel > 0 ? max_ref : std::fabs(double{cpu[i]});
    if (!(d <= tol.abs + tol.rel * scale)) ++num_bad;
  }
  const double norm_rel = ref_sq > 0 ? std::sqrt(diff_sq / ref_sq) : std::sqrt(diff_sq);
  std::printf("%-36s worst |gpu-cpu| %.3g at %zu (cpu %.6g), relative norm %.3g, n=%zu\n",
              what.c_str(), worst, worst_at, cpu.empty() ? 0.0 : double{cpu[worst_at]}, norm_rel,
              cpu.size());
  EXPECT_EQ(num_bad, 0u) << what << ": elements outside the tolerance; worst " << worst;
  if (tol.norm_rel > 0) {
    EXPECT_LE(norm_rel, tol.norm_rel) << what;
  }
}

template <typename T>
void expect_identical(const std::string& what, const std::vector<T>& gpu, const std::vector<T>& cpu) {
  size_t mismatches = 0, first = cpu.size();
  for (size_t i = 0; i < cpu.size(); ++i)
    if (gpu[i] != cpu[i]) {
      ++mismatches;
      first = std::min(first, i);
    }
  std::printf("%-36s %zu of %zu differ\n", what.c_str(), mismatches, cpu.size());
  EXPECT_EQ(mismatches, 0u) << what << ": first difference at " << first;
}

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string reason = cuda_unavailable_reason();
    if (!reason.empty()) GTEST_SKIP() << reason;
    gpu_ = make_cuda_backend(0);
    cpu_ = make_cpu_backend();
  }
  void TearDown() override {
    for (void* p : owned_) gpu_->free_bytes(p);
  }
  std::vector<float> random(size_t n, float lo = -1.0f, float hi = 1.0f) {
    std::uniform_real_distribution<float> u(lo, hi);
    std::vector<float> v(n);
    for (float& x : v) x = u(rng_);
    return v;
  }
  // Random activations: values bf16 holds exactly, so the CPU sees what the GPU sees.
  std::vector<float> random_act(size_t n, float lo = -1.0f, float hi = 1.0f) {
    return bf16_values(random(n, lo, hi));
  }
  std::vector<int> random_ints(size_t n, int hi) {
    std::uniform_int_distribution<int> u(0, hi - 1);
    std::vector<int> v(n);
    for (int& x : v) x = u(rng_);
    return v;
  }
  // A device copy of host data, freed after the test.
  template <typename T>
  T* up(const std::vector<T>& host) {
    T* dev = static_cast<T*>(gpu_->alloc_bytes(host.size() * sizeof(T)));
    owned_.push_back(dev);
    gpu_->copy_from_host(dev, host.data(), host.size() * sizeof(T));
    return dev;
  }
  template <typename T>
  std::vector<T> down(const T* dev, size_t n) {
    std::vector<T> host(n);
    gpu_->copy_to_host(host.data(), dev, n * sizeof(T));
    return host;
  }
  // Activations: a device copy in the GPU backend's activation type, freed after the test,
  // and back to host floats.
  Act* up_act(const std::vector<float>& host) {
    auto* dev = static_cast<Act*>(
        gpu_->alloc_bytes(host.size() * act_bytes(gpu_->activation_type())));
    owned_.push_back(dev);
    gpu_->copy_act_from_host(dev, host.data(), host.size());
    return dev;
  }
  std::vector<float> down_act(const Act* dev, size_t n) {
    std::vector<float> host(n);
    gpu_->copy_act_to_host(host.data(), dev, n);
    return host;
  }
  Backend& gpu() { return *gpu_; }
  Backend& cpu() { return *cpu_; }

 private:
  std::unique_ptr<Backend> gpu_, cpu_;
  std::vector<void*> owned_;
  std::mt19937 rng_{4};
};

// The CUDA backend's activations are bf16, and the copies to and from the host convert: values
// bf16 holds come back bit for bit, others rounded to the nearest (ties to even), overflow to
// infinity, NaN as NaN. The expected roundings are worked out by hand (bf16 near 1 steps by
// 2^-7), which also checks round_to_bf16, the rounding every other test relies on.
TEST_F(CudaOps, ActivationsAreBf16) {
  ASSERT_EQ(gpu().activation_type(), ActType::kBF16)
      << "the CUDA backend's activations are " << act_type_name(gpu().activation_type());
  const float p7 = std::ldexp(1.0f, -7), p8 = std::ldexp(1.0f, -8), p10 = std::ldexp(1.0f, -10);
  const float max_float = std::numeric_limits<float>::max();
  const float max_bf16 = std::bit_cast<float>(0x7f7f0000u);  // (2 - 2^-7) * 2^127
  // {input, what bf16 holds}
  const std::vector<std::pair<float, float>> cases = {
      {0.0f, 0.0f}, {-0.0f, -0.0f}, {1.0f, 1.0f}, {-2.5f, -2.5f}, {1 + p7, 1 + p7},
      {std::ldexp(1.0f, -126), std::ldexp(1.0f, -126)},  // smallest normal
      {std::ldexp(1.0f, -133), std::ldexp(1.0f, -133)},  // smallest subnormal
      {max_bf16, max_bf16}, {INFINITY, INFINITY}, {-INFINITY, -INFINITY},
      {1 + p8, 1.0f},                  // a tie: to the even neighbour, 1
      {1 + 3 * p8, 1 + 2 * p7},        // a tie: to the even neighbour, 1 + 2^-6
      {1 + p8 + p10, 1 + p7},          // past the tie: up
      {-(1 + p8 + p10), -(1 + p7)},
      {1 + p8 - p10, 1.0f},            // short of the tie: down
      {3 * p8 * p8, 3 * p8 * p8},
      {max_float, INFINITY},           // past max_bf16 + half a step: overflows
      {-max_float, -INFINITY}};
  std::vector<float> in, want;
  for (const auto& [x, bf16] : cases) {
    EXPECT_EQ(std::bit_cast<uint32_t>(round_to_bf16(x)), std::bit_cast<uint32_t>(bf16))
        << "round_to_bf16(" << x << ")";
    in.push_back(x);
    want.push_back(bf16);
  }
  // Random values over many binades, as they are and already rounded (which must survive).
  std::vector<float> values = random(1000, -1, 1);
  for (size_t i = 0; i < values.size(); ++i)
    values[i] = std::ldexp(values[i], static_cast<int>(i % 60) - 30);  // 2^-30 .. 2^30
  for (const float x : values) {
    in.push_back(x);
    want.push_back(round_to_bf16(x));
  }
  for (const float x : bf16_values(values)) {
    in.push_back(x);
    want.push_back(x);
  }
  in.push_back(std::numeric_limits<float>::quiet_NaN());
  const std::vector<float> got = down_act(up_act(in), in.size());
  ASSERT_EQ(got.size(), in.size());
  size_t mismatches = 0;
  for (size_t i = 0; i + 1 < in.size(); ++i)
    if (std::bit_cast<uint32_t>(got[i]) != std::bit_cast<uint32_t>(want[i]) && mismatches++ < 10)
      ADD_FAILURE() << "activation " << in[i] << " came back as " << got[i] << ", want "
                    << want[i];
  std::printf("%-36s %zu of %zu differ from round to nearest even\n", "copy_act round trip",
              mismatches, in.size() - 1);
  EXPECT_EQ(mismatches, 0u);
  EXPECT_TRUE(std::isnan(got.back())) << "NaN came back as " << got.back();
}

TEST_F(CudaOps, Elementwise) {
  const size_t n = 100003;
  std::vector<float> a = random_act(n), b = random_act(n), acc = random_act(n);
  const std::vector<float> factors = random(n);  // fp32: mul must not round them
  std::vector<float> x = random(n);
  Act *ga = up_act(a), *gb = up_act(b), *gacc = up_act(acc), *gout = up_act(std::vector<float>(n));
  std::vector<float> out(n);
  cpu().add(f32_act(out.data()), f32_act(a.data()), f32_act(b.data()), n);
  gpu().add(gout, ga, gb, n);
  expect_match("add", down_act(gout, n), out, kBf16Stored);
  float* gfactors = up(factors);
  cpu().mul(f32_act(out.data()), f32_act(a.data()), factors.data(), n);
  gpu().mul(gout, ga, gfactors, n);
  expect_match("mul", down_act(gout, n), out, kBf16Stored);
  cpu().mul(f32_act(a.data()), f32_act(a.data()), factors.data(), n);  // in place
  gpu().mul(ga, ga, gfactors, n);
  expect_match("mul in place", down_act(ga, n), a, kBf16Stored);
  // Both sides add the same bf16 values: the product as bf16 holds it.
  a = bf16_values(a);
  ga = up_act(a);
  const std::vector<float> acc0 = acc;
  cpu().accumulate(f32_act(acc.data()), f32_act(a.data()), n);
  gpu().accumulate(gacc, ga, n);
  expect_match("accumulate", down_act(gacc, n), acc, bf16_accumulated(acc0, acc));
  // scale, sum_squares and all_finite work on fp32 buffers (gradients), not activations.
  float* gx = up(x);
  cpu().scale(x.data(), 0.37f, n);
  gpu().scale(gx, 0.37f, n);
  expect_match("scale", down(gx, n), x, kFp32);
  const double want = cpu().sum_squares(x.data(), n), got = gpu().sum_squares(gx, n);
  std::printf("sum_squares gpu %.10g cpu %.10g\n", got, want);
  EXPECT_NEAR(got, want, 1e-9 * want);
  EXPECT_TRUE(gpu().all_finite(gx, n));
  x[n / 2] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_FALSE(gpu().all_finite(up(x), n));
  x[n / 2] = INFINITY;
  EXPECT_FALSE(gpu().all_finite(up(x), n));
}

TEST_F(CudaOps, Embedding) {
  const int B = 3, T = 17, C = 96, V = 50, Tmax = 32;
  std::vector<int> idx = random_ints(B * T, V);
  idx[0] = idx[5] = idx[40] = 7;  // repeated tokens: the backward must add
  std::vector<float> wte = random(V * C), wpe = random(Tmax * C), dout = random_act(B * T * C);
  std::vector<float> out(B * T * C), dwte = random(V * C), dwpe = random(Tmax * C);
  Act* gout = up_act(out);
  float *gdwte = up(dwte), *gdwpe = up(dwpe);
  const int* gidx = up(idx);
  cpu().embedding_forward(f32_act(out.data()), idx.data(), wte.data(), wpe.data(), B, T, C);
  gpu().embedding_forward(gout, gidx, up(wte), up(wpe), B, T, C);
  expect_match("embedding_forward", down_act(gout, out.size()), out, kBf16Stored);
  cpu().embedding_backward(dwte.data(), dwpe.data(), f32_act(dout.data()), idx.data(), B, T, C);
  gpu().embedding_backward(gdwte, gdwpe, up_act(dout), gidx, B, T, C);
  expect_match("embedding_backward dwte", down(gdwte, dwte.size()), dwte, kFp32);
  expect_match("embedding_backward dwpe", down(gdwpe, dwpe.size()), dwpe, kFp32);
}

TEST_F(CudaOps, Layernorm) {
  const int N = 301, C = 768;
  std::vector<float> x = random_act(N * C, -3, 3), w = random(C, 0.5, 1.5), b = random(C);
  std::vector<float> out(N * C), mean(N), rstd(N), dout = random_act(N * C);
  std::vector<float> dx = random_act(N * C), dw = random(C), db = random(C);
  const std::vector<float> dx0 = dx;
  Act *gx = up_act(x), *gout = up_act(out), *gdx = up_act(dx);
  float *gw = up(w), *gmean = up(mean), *grstd = up(rstd), *gdw = up(dw), *gdb = up(db);
  cpu().layernorm_forward(f32_act(out.data()), mean.data(), rstd.data(), f32_act(x.data()),
                          w.data(), b.data(), N, C);
  gpu().layernorm_forward(gout, gmean, grstd, gx, gw, up(b), N, C);
  expect_match("layernorm_forward", down_act(gout, out.size()), out, kBf16Stored);
  expect_match("layernorm_forward rstd", down(grstd, N), rstd, kFp32);
  cpu().layernorm_backward(f32_act(dx.data()), dw.data(), db.data(), f32_act(dout.data()),
                           f32_act(x.data()), w.data(), mean.data(), rstd.data(), N, C);
  gpu().layernorm_backward(gdx, gdw, gdb, up_act(dout), gx, gw, gmean, grstd, N, C);
  expect_match("layernorm_backward dinp", down_act(gdx, dx.size()), dx,
               bf16_accumulated(dx0, dx));
  // Sums over 301 rows in another order: fp32 rounding of the sum, not of each term.
  expect_match("layernorm_backward dweight", down(gdw, C), dw, {1e-4, 1e-4, 0});
  expect_match("layernorm_backward dbias", down(gdb, C), db, {1e-4, 1e-4, 0});
}

// Every linear runs in bf16, narrow ones (OC = 64) too.
TEST_F(CudaOps, Linear) {
  for (const int OC : {320, 64}) {
    const Tolerance tol = kBf16;
    const std::string tag = " (OC=" + std::to_string(OC) + ")";
    const int N = 257, IC = 192;
    std::vector<float> x = random_act(N * IC), w = random(OC * IC, -0.1, 0.1), b = random(OC);
    std::vector<float> out(N * OC), dout = random_act(N * OC);
    std::vector<float> dx = random_act(N * IC), dw = random(OC * IC), db = random(OC);
    Act *gx = up_act(x), *gout = up_act(out), *gdx = up_act(dx);
    float *gw = up(w), *gdw = up(dw), *gdb = up(db);
    cpu().linear_forward(f32_act(out.data()), f32_act(x.data()), w.data(), b.data(), N, IC, OC);
    gpu().linear_forward(gout, gx, gw, up(b), N, IC, OC);
    expect_match("linear_forward" + tag, down_act(gout, out.size()), out, tol);
    cpu().linear_backward(f32_act(dx.data()), dw.data(), db.data(), f32_act(dout.data()),
                          f32_act(x.data()), w.data(), N, IC, OC);
    gpu().linear_backward(gdx, gdw, gdb, up_act(dout), gx, gw, N, IC, OC);
    expect_match("linear_backward dinp" + tag, down_act(gdx, dx.size()), dx, tol);
    expect_match("linear_backward dweight" + tag, down(gdw, dw.size()), dw, tol);
    expect_match("linear_backward dbias" + tag, down(gdb, OC), db, {1e-4, 1e-4, 0});
    // No bias.
    cpu().linear_forward(f32_act(out.data()), f32_act(x.data()), w.data(), nullptr, N, IC, OC);
    gpu().linear_forward(gout, gx, gw, nullptr, N, IC, OC);
    expect_match("linear_forward no bias" + tag, down_act(gout, out.size()), out, tol);
  }
}

// The bf16 copy of a weight must follow every change of the weight: AdamW (refreshes it in
// place) and a load from the host (invalidates it).
TEST_F(CudaOps, LinearSeesUpdatedWeights) {
  const int N = 64, IC = 128, OC = 256;
  std::vector<float> x = random_act(N * IC), w = random(OC * IC, -0.1, 0.1), out(N * OC);
  std::vector<float> grad = random(OC * IC), m(OC * IC), v(OC * IC);
  Act *gx = up_act(x), *gout = up_act(out);
  float *gw = up(w), *gm = up(m), *gv = up(v);
  gpu().linear_forward(gout, gx, gw, nullptr, N, IC, OC);  // makes the bf16 copy
  for (int step = 1; step <= 3; ++step) {
    cpu().adamw_update(w.data(), grad.data(), m.data(), v.data(), w.size(), 0.05f, 0.9f, 0.95f,
                       1e-8f, 0.1f, step);
    gpu().adamw_update(gw, up(grad), gm, gv, w.size(), 0.05f, 0.9f, 0.95f, 1e-8f, 0.1f, step);
  }
  cpu().linear_forward(f32_act(out.data()), f32_act(x.data()), w.data(), nullptr, N, IC, OC);
  gpu().linear_forward(gout, gx, gw, nullptr, N, IC, OC);
  expect_match("linear after adamw", down_act(gout, out.size()), out, kBf16);
  w = random(OC * IC, -0.1, 0.1);
  gpu().copy_from_host(gw, w.data(), w.size() * sizeof(float));
  cpu().linear_forward(f32_act(out.data()), f32_act(x.data()), w.data(), nullptr, N, IC, OC);
  gpu().linear_forward(gout, gx, gw, nullptr, N, IC, OC);
  expect_match("linear after a new weight", down_act(gout, out.size()), out, kBf16);
}

// One grouped linear forward and backward from host data to host results, on any backend, so
// that the CPU backend and two CUDA backends (grouped GEMM on and off) run the same case.
// Activations travel through copy_act_*, so any activation type works.
struct GroupedLinearCase {
  std::string name;
  int E, IC, OC;
  int buffer_rows;           // rows of every (rows, *) buffer; rows outside
  std::vector<int> offsets;  // (E+1) [offsets[0], offsets[E]) must stay as they were
  bool with_bias;            // false: bias and dbias are nullptr
};
struct GroupedLinearTensors {
  std::vector<float> out;  // (buffer_rows,OC) initial contents, then the result
  std::vector<float> dx;   // (buffer_rows,IC) +=
  std::vector<float> dw;   // (E,OC,IC)        +=
  std::vector<float> db;   // (E,OC)           += (untouched without bias)
  // The GELU variants: grouped_linear_gelu_forward's pre and out (initial contents: out), and
  // gelu_grouped_linear_backward's dpre (initial contents: dx), dweight and dbias (initial
  // contents: dw, db) with x as GELU's input and act.
  std::vector<float> gelu_pre, gelu_out;  // (buffer_rows,OC)
  std::vector<float> dpre;                // (buffer_rows,IC) written
  std::vector<float> gelu_dw, gelu_db;    // (E,OC,IC), (E,OC) +=
};

GroupedLinearTensors run_grouped_linear(Backend& backend, const GroupedLinearCase& c,
                                        const std::vector<float>& x,     // (buffer_rows,IC)
                                        const std::vector<float>& w,     // (E,OC,IC)
                                        const std::vector<float>& b,     // (E,OC)
                                        const std::vector<float>& dout,  // (buffer_rows,OC)
                                        GroupedLinearTensors t) {
  std::vector<void*> owned;
  auto up = [&](const std::vector<float>& host) {
    auto* dev = static_cast<float*>(backend.alloc_bytes(host.size() * sizeof(float)));
    owned.push_back(dev);
    backend.copy_from_host(dev, host.data(), host.size() * sizeof(float));
    return dev;
  };
  auto up_act = [&](const std::vector<float>& host) {
    auto* dev = static_cast<Act*>(
        backend.alloc_bytes(host.size() * act_bytes(backend.activation_type())));
    owned.push_back(dev);
    backend.copy_act_from_host(dev, host.data(), host.size());
    return dev;
  };
  auto down = [&](std::vector<float>& host, const float* dev) {
    backend.copy_to_host(host.data(), dev, host.size() * sizeof(float));
  };
  auto down_act = [&](std::vector<float>& host, const Act* dev) {
    backend.copy_act_to_host(host.data(), dev, host.size());
  };
  Act *gx = up_act(x), *gdout = up_act(dout), *gout = up_act(t.out), *gdx = up_act(t.dx);
  float *gw = up(w), *gdw = up(t.dw);
  float* gb = c.with_bias ? up(b) : nullptr;
  float* gdb = c.with_bias ? up(t.db) : nullptr;
  backend.grouped_linear_forward(gout, gx, gw, gb, c.offsets.data(), c.E, c.IC, c.OC);
  Act *gpre = up_act(t.out), *gact = up_act(t.out), *gdpre = up_act(t.dx);
  float* ggelu_dw = up(t.dw);
  float* ggelu_db = c.with_bias ? up(t.db) : nullptr;
  backend.grouped_linear_backward(gdx, gdw, gdb, gdout, gx, gw, c.offsets.data(), c.E, c.IC,
                                  c.OC);
  backend.grouped_linear_gelu_forward(gpre, gact, gx, gw, gb, c.offsets.data(), c.E, c.IC, c.OC);
  backend.gelu_grouped_linear_backward(gdpre, ggelu_dw, ggelu_db, gdout, gx, gw, gx,
                                       c.offsets.data(), c.E, c.IC, c.OC);
  down_act(t.out, gout);
  down_act(t.dx, gdx);
  down(t.dw, gdw);
  if (c.with_bias) down(t.db, gdb);
  t.gelu_pre = t.gelu_out = t.out;
  t.dpre = t.dx;
  t.gelu_dw = t.dw;
  t.gelu_db = t.db;
  down_act(t.gelu_pre, gpre);
  down_act(t.gelu_out, gact);
  down_act(t.dpre, gdpre);
  down(t.gelu_dw, ggelu_dw);
  if (c.with_bias) down(t.gelu_db, ggelu_db);
  for (void* p : owned) backend.free_bytes(p);
  return t;
}

// A CUDA backend created with the environment variable `name` set to `value` (unset when
// nullptr): the backends read their switches when created. The variable is restored after.
std::unique_ptr<Backend> backend_with_env(const char* name, const char* value) {
  const char* before = std::getenv(name);
  const std::string saved = before ? before : "";
  if (value)
    setenv(name, value, 1);
  else
    unsetenv(name);
  std::unique_ptr<Backend> backend = make_cuda_backend(0);
  if (before)
    setenv(name, saved.c_str(), 1);
  else
    unsetenv(name);
  return backend;
}

// Captures stderr while it lives (the backends' one-line notes) and passes it on.
class StderrNotes {
 public:
  StderrNotes() { testing::internal::CaptureStderr(); }
  ~StderrNotes() { finish(); }
  std::string finish() {
    if (!capturing_) return notes_;
    capturing_ = false;
    notes_ = testing::internal::GetCapturedStderr();
    std::fputs(notes_.c_str(), stderr);
    return notes_;
  }

 private:
  bool capturing_ = true;
  std::string notes_;
};

// The grouped linear (and its GELU variants) against the CPU, with the grouped cuBLAS GEMM (the
// default) and with the per-expert loop (MOE_GROUPED_GEMM=0, read when a backend is created), and the two against
// each other. The cases: empty experts (equal neighbouring offsets, at the start and the end
// too); rows before offsets[0] and after offsets[E], which must stay as they were; no bias;
// and rows that are not whole 16-byte multiples in bf16, which the grouped call must decline
// (they run per expert in both backends).
TEST_F(CudaOps, GroupedLinear) {
  const std::vector<GroupedLinearCase> cases = {
      {"", 4, 160, 224, 131, {0, 37, 37, 120, 131}, true},
      {" offset, no bias", 6, 128, 96, 80, {9, 9, 9, 40, 41, 41, 75}, false},
      {" unaligned", 3, 100, 60, 60, {3, 20, 20, 51}, true},
  };
  StderrNotes notes;
  std::unique_ptr<Backend> grouped = backend_with_env("MOE_GROUPED_GEMM", nullptr);
  std::unique_ptr<Backend> per_expert = backend_with_env("MOE_GROUPED_GEMM", "0");

  for (const GroupedLinearCase& c : cases) {
    const size_t rows = c.buffer_rows, weights = static_cast<size_t>(c.E) * c.OC * c.IC;
    const std::vector<float> x = random_act(rows * c.IC), w = random(weights, -0.1, 0.1),
                             b = random(c.E * c.OC), dout = random_act(rows * c.OC);
    GroupedLinearTensors initial;  // activations as bf16 holds them: rows outside stay exact
    initial.out = random_act(rows * c.OC);
    initial.dx = random_act(rows * c.IC);
    initial.dw = random(weights);
    initial.db = random(c.E * c.OC);
    const GroupedLinearTensors want = run_grouped_linear(cpu(), c, x, w, b, dout, initial);
    const GroupedLinearTensors with_grouped =
        run_grouped_linear(*grouped, c, x, w, b, dout, initial);
    const GroupedLinearTensors with_loop =
        run_grouped_linear(*per_expert, c, x, w, b, dout, initial);
    for (const auto& [path, got] : {std::pair<std::string, const GroupedLinearTensors*>{
                                        " grouped", &with_grouped},
                                    {" per-expert", &with_loop}}) {
      const std::string tag = c.name + path;
      expect_match("grouped_linear_forward" + tag, got->out, want.out, kBf16);
      expect_match("grouped_linear_backward dinp" + tag, got->dx, want.dx, kBf16);
      expect_match("grouped_linear_backward dweight" + tag, got->dw, want.dw, kBf16);
      expect_match("grouped_linear_backward dbias" + tag, got->db, want.db, {1e-4, 1e-4, 0});
      expect_match("grouped_linear_gelu_forward pre" + tag, got->gelu_pre, want.gelu_pre, kBf16);
      expect_match("grouped_linear_gelu_forward out" + tag, got->gelu_out, want.gelu_out, kBf16);
      expect_match("gelu_grouped_linear_backward dpre" + tag, got->dpre, want.dpre, kBf16);
      expect_match("gelu_grouped_linear_backward dweight" + tag, got->gelu_dw, want.gelu_dw,
                   kBf16);
      expect_match("gelu_grouped_linear_backward dbias" + tag, got->gelu_db, want.gelu_db,
                   {1e-4, 1e-4, 0});
    }
    expect_match("grouped_linear_forward" + c.name + " grouped vs per-expert", with_grouped.out,
                 with_loop.out, kBf16);
    expect_match("grouped_linear_backward dinp" + c.name + " grouped vs per-expert",
                 with_grouped.dx, with_loop.dx, kBf16);
  }
  const bool refused =
      notes.finish().find("cublasGemmGroupedBatchedEx unavailable") != std::string::npos;
  std::printf("grouped_linear: cublasGemmGroupedBatchedEx %s\n",
              refused ? "REFUSED by cuBLAS here: only the per-expert path ran"
                      : "ran the aligned cases");
}

TEST_F(CudaOps, Gelu) {
  const size_t n = 50001;
  std::vector<float> x = random_act(n, -6, 6), out(n), dout = random_act(n), dx = random_act(n);
  const std::vector<float> dx0 = dx;
  Act *gx = up_act(x), *gout = up_act(out), *gdx = up_act(dx);
  cpu().gelu_forward(f32_act(out.data()), f32_act(x.data()), n);
  gpu().gelu_forward(gout, gx, n);
  expect_match("gelu_forward", down_act(gout, n), out, kBf16Stored);
  cpu().gelu_backward(f32_act(dx.data()), f32_act(x.data()), f32_act(dout.data()), n);
  gpu().gelu_backward(gdx, gx, up_act(dout), n);
  expect_match("gelu_backward", down_act(gdx, n), dx, bf16_accumulated(dx0, dx));
}

// c_fc + GELU and c_proj's backward through the GELU, with the GELU in cuBLASLt's
// epilogue (the default) and unfused (MOE_FUSED_GELU=0), both against the CPU. The shapes:
// epilogue-eligible (bf16, leading dimensions multiples of 8), OC not a multiple of 8 (the
// forward must fall back), no bias, and a narrow layer (OC <= 128, bf16 like the rest). dpre
// starts as garbage: the backward writes it.
TEST_F(CudaOps, LinearGelu) {
  struct Case {
    const char* name;
    int N, IC, OC, OC2;  // c_fc (OC,IC), c_proj (OC2,OC)
    bool with_bias;
  };
  const Case cases[] = {{"", 257, 192, 320, 200, true},
                        {" OC%8!=0", 100, 64, 300, 136, true},
                        {" no bias", 64, 128, 256, 192, false},
                        {" narrow", 50, 96, 64, 40, true}};
  std::unique_ptr<Backend> fused = backend_with_env("MOE_FUSED_GELU", nullptr);
  std::unique_ptr<Backend> unfused = backend_with_env("MOE_FUSED_GELU", "0");
  for (const Case& c : cases) {
    const std::vector<float> x = random_act(c.N * c.IC), w = random(c.OC * c.IC, -0.1, 0.1),
                             b = random(c.OC), w2 = random(c.OC2 * c.OC, -0.1, 0.1),
                             dout = random_act(c.N * c.OC2);
    const std::vector<float> dw2_0 = random(c.OC2 * c.OC), db2_0 = random(c.OC2);
    std::vector<float> pre(c.N * c.OC), out(c.N * c.OC), dpre(c.N * c.OC), dw2 = dw2_0,
                       db2 = db2_0;
    const float* bias = c.with_bias ? b.data() : nullptr;
    cpu().linear_gelu_forward(f32_act(pre.data()), f32_act(out.data()), f32_act(x.data()),
                              w.data(), bias, c.N, c.IC, c.OC);
    // The backward's inputs pre and act: the CPU's, as bf16 holds them, on both sides.
    const std::vector<float> pre_in = bf16_values(pre), act_in = bf16_values(out);
    cpu().gelu_linear_backward(f32_act(dpre.data()), dw2.data(), db2.data(),
                               f32_act(dout.data()), f32_act(act_in.data()), w2.data(),
                               f32_act(pre_in.data()), c.N, c.OC, c.OC2);
    const Tolerance tol = kBf16;
    for (const auto& [path, backend] :
         {std::pair<std::string, Backend*>{" fused", fused.get()}, {" unfused", unfused.get()}}) {
      std::vector<void*> owned;
      auto dev = [&](const std::vector<float>& host) {
        auto* p = static_cast<float*>(backend->alloc_bytes(host.size() * sizeof(float)));
        owned.push_back(p);
        backend->copy_from_host(p, host.data(), host.size() * sizeof(float));
        return p;
      };
      auto dev_act = [&](const std::vector<float>& host) {
        auto* p = static_cast<Act*>(
            backend->alloc_bytes(host.size() * act_bytes(backend->activation_type())));
        owned.push_back(p);
        backend->copy_act_from_host(p, host.data(), host.size());
        return p;
      };
      auto host = [&](const float* p, size_t n) {
        std::vector<float> h(n);
        backend->copy_to_host(h.data(), p, n * sizeof(float));
        return h;
      };
      auto host_act = [&](const Act* p, size_t n) {
        std::vector<float> h(n);
        backend->copy_act_to_host(h.data(), p, n);
        return h;
      };
      Act *gpre = dev_act(random(pre.size())), *gout = dev_act(random(out.size())),
          *gdpre = dev_act(random(dpre.size(), 50, 60));  // garbage: written, not read
      backend->linear_gelu_forward(gpre, gout, dev_act(x), dev(w),
                                   c.with_bias ? dev(b) : nullptr, c.N, c.IC, c.OC);
      const std::string tag = std::string(c.name) + path;
      expect_match("linear_gelu_forward pre" + tag, host_act(gpre, pre.size()), pre, tol);
      expect_match("linear_gelu_forward out" + tag, host_act(gout, out.size()), out, tol);
      // The backward reads the CPU's pre and act, so only its own rounding is measured.
      float *gdw2 = dev(dw2_0), *gdb2 = dev(db2_0);
      backend->gelu_linear_backward(gdpre, gdw2, gdb2, dev_act(dout), dev_act(act_in), dev(w2),
                                    dev_act(pre_in), c.N, c.OC, c.OC2);
      expect_match("gelu_linear_backward dpre" + tag, host_act(gdpre, dpre.size()), dpre, tol);
      expect_match("gelu_linear_backward dweight" + tag, host(gdw2, dw2.size()), dw2, tol);
      expect_match("gelu_linear_backward dbias" + tag, host(gdb2, db2.size()), db2,
                   {1e-4, 1e-4, 0});
      for (void* p : owned) backend->free_bytes(p);
    }
  }
}

// The fused kernels work on 64-row tiles with the head dim padded to 16, 32, 64 or 128: the
// shapes cover partial tiles (T not a multiple of 64), several tiles, every padding and the
// GPT head dims 64 and 128.
TEST_F(CudaOps, Attention) {
  auto check = [&](int B, int T, int C, int NH) {
    const std::string tag = " (B=" + std::to_string(B) + " T=" + std::to_string(T) +
                            " hd=" + std::to_string(C / NH) + ")";
    const std::vector<float> qkv = random_act(B * T * 3 * C), dout = random_act(B * T * C);
    std::vector<float> out(B * T * C), lse(B * NH * T);
    Act *gqkv = up_act(qkv), *gout = up_act(out);
    float* glse = up(lse);
    cpu().attention_forward(f32_act(out.data()), lse.data(), f32_act(qkv.data()), B, T, C, NH);
    gpu().attention_forward(gout, glse, gqkv, B, T, C, NH);
    expect_match("attention_forward out" + tag, down_act(gout, out.size()), out, kBf16);
    expect_match("attention_forward lse" + tag, down(glse, lse.size()), lse, kBf16);
    // The backward on both sides from the same out (the CPU's, as bf16 holds it) and lse.
    const std::vector<float> out_in = bf16_values(out);
    const Act* gout_in = up_act(out_in);
    const float* glse_in = up(lse);
    const Act* gdout = up_act(dout);
    auto backward = [&](std::vector<float> dqkv, const std::string& what) {
      Act* gdqkv = up_act(dqkv);
      cpu().attention_backward(f32_act(dqkv.data()), f32_act(dout.data()),
                               f32_act(out_in.data()), f32_act(qkv.data()), lse.data(), B, T,
                               C, NH);
      gpu().attention_backward(gdqkv, gdout, gout_in, gqkv, glse_in, B, T, C, NH);
      expect_match(what + tag, down_act(gdqkv, dqkv.size()), dqkv, kBf16);
    };
    // From zeros, the gradient alone (on random starting values their norm would dilute the
    // relative norm, and their rounding would dominate it: the gradient is 11-42% of them).
    backward(std::vector<float>(qkv.size()), "attention_backward dqkv");
    // It accumulates: a backward that overwrote dqkv would miss by the starting values.
    backward(random_act(qkv.size()), "attention_backward dqkv +=");
  };
  check(2, 77, 128, 4);    // hd 32: one full tile and a partial one
  check(1, 5, 12, 1);      // hd 12 padded to 16: a single partial tile
  check(2, 200, 768, 12);  // hd 64 (Switch-Base): four tiles
  check(1, 130, 256, 2);   // hd 128
  check(1, 64, 120, 3);    // hd 40 padded to 64: exactly one tile
}

TEST_F(CudaOps, CrossEntropy) {
  const int N = 33, V = 50257;
  std::vector<float> logits = random_act(N * V, -4, 4), losses(N);
  std::vector<int> targets = random_ints(N, V);
  Act* glogits = up_act(logits);
  float* glosses = up(losses);
  const int* gtargets = up(targets);
  Act* logits_cpu = f32_act(logits.data());
  // Probabilities down to ~5e-8: relative tolerances (bf16 has fp32's exponent range).
  const Tolerance probs_tol{1e-8, 1e-4 + kBf16Rounding, 0};
  cpu().crossentropy_forward(losses.data(), logits_cpu, logits_cpu, targets.data(), N, V);
  gpu().crossentropy_forward(glosses, glogits, glogits, gtargets, N, V);  // in place, as the model
  expect_match("crossentropy_forward losses", down(glosses, N), losses, kFp32);
  expect_match("crossentropy_forward probs", down_act(glogits, logits.size()), logits,
               probs_tol);
  // The backward on both sides from the same probabilities: the CPU's, as bf16 holds them.
  for (float& p : logits) p = round_to_bf16(p);  // in place: logits_cpu points here
  glogits = up_act(logits);
  cpu().crossentropy_backward(logits_cpu, logits_cpu, targets.data(), 0.25f, N, V);
  gpu().crossentropy_backward(glogits, glogits, gtargets, 0.25f, N, V);
  expect_match("crossentropy_backward", down_act(glogits, logits.size()), logits, probs_tol);
}

// Confident rows (p_target ~ 0.99 and ~ 0.9998): the target's gradient p - 1 must keep its
// relative precision, though p itself is within 2^-9 of 1 in bf16 (computed from the other
// probabilities). Against the CPU's fp32 probabilities, not bf16-rounded ones.
TEST_F(CudaOps, CrossEntropyConfidentTarget) {
  const int N = 2, V = 1000;
  std::vector<float> logits = random_act(N * V);
  std::vector<int> targets = {17, 901};
  logits[0 * V + 17] = 9.0f;    // 1 - p ~ 1e-1 .. 1e-2
  logits[1 * V + 901] = 16.0f;  // 1 - p ~ 1e-4: p rounds to 1.0 in bf16
  std::vector<float> losses(N);
  Act* glogits = up_act(logits);
  float* glosses = up(losses);
  const int* gtargets = up(targets);
  Act* logits_cpu = f32_act(logits.data());
  cpu().crossentropy_forward(losses.data(), logits_cpu, logits_cpu, targets.data(), N, V);
  cpu().crossentropy_backward(logits_cpu, logits_cpu, targets.data(), 1.0f, N, V);
  gpu().crossentropy_forward(glosses, glogits, glogits, gtargets, N, V);
  gpu().crossentropy_backward(glogits, glogits, gtargets, 1.0f, N, V);
  const std::vector<float> got = down_act(glogits, logits.size());
  for (int i = 0; i < N; ++i) {
    const size_t t = static_cast<size_t>(i) * V + targets[i];
    const double rel = std::fabs(got[t] - logits[t]) / std::fabs(logits[t]);
    std::printf("crossentropy_backward confident row %d: p - 1 = %.4e, gpu %.4e, rel diff %.2e\n",
                i, logits[t], got[t], rel);
    EXPECT_LT(rel, 1e-2) << "row " << i;
  }
}

// The router's logits from the (bf16) activations, fp32 throughout: held to fp32 rounding for
// every E, also wide ones (E = 200), and rows not a multiple of 16 bytes (E = 5, D = 100).
// dinp is an activation: accumulated in bf16. The backward with and without dinp.
TEST_F(CudaOps, RouterLogits) {
  struct Case {
    int N, D, E;
  };
  for (const Case c : {Case{300, 192, 16}, Case{77, 100, 5}, Case{260, 192, 200}}) {
    const std::string tag = " (E=" + std::to_string(c.E) + " D=" + std::to_string(c.D) + ")";
    const Tolerance tol{1e-4, 1e-4, 0};
    const std::vector<float> x = random_act(c.N * c.D), w = random(c.E * c.D, -0.1, 0.1),
                             dlogits = random(c.N * c.E);
    std::vector<float> logits(c.N * c.E), dx = random_act(c.N * c.D), dw = random(c.E * c.D);
    const std::vector<float> dx0 = dx;
    Act *gx = up_act(x), *gdx = up_act(dx);
    float *gw = up(w), *glogits = up(logits), *gdlogits = up(dlogits), *gdw = up(dw);
    cpu().router_logits_forward(logits.data(), f32_act(x.data()), w.data(), c.N, c.D, c.E);
    gpu().router_logits_forward(glogits, gx, gw, c.N, c.D, c.E);
    expect_match("router_logits_forward" + tag, down(glogits, logits.size()), logits, tol);
    cpu().router_logits_backward(f32_act(dx.data()), dw.data(), dlogits.data(),
                                 f32_act(x.data()), w.data(), c.N, c.D, c.E);
    gpu().router_logits_backward(gdx, gdw, gdlogits, gx, gw, c.N, c.D, c.E);
    expect_match("router_logits_backward dinp" + tag, down_act(gdx, dx.size()), dx,
                 bf16_accumulated(dx0, dx));
    expect_match("router_logits_backward dweight" + tag, down(gdw, dw.size()), dw, tol);
    // No dinp: dweight accumulates a second time.
    cpu().router_logits_backward(nullptr, dw.data(), dlogits.data(), f32_act(x.data()), w.data(),
                                 c.N, c.D, c.E);
    gpu().router_logits_backward(nullptr, gdw, gdlogits, gx, gw, c.N, c.D, c.E);
    expect_match("router_logits_backward no dinp" + tag, down(gdw, dw.size()), dw, tol);
  }
}

// The router in fp32: softmax, top-k, capacity, the auxiliary-loss pieces.
TEST_F(CudaOps, RouterSoftmaxTopkAndLosses) {
  const int N = 500, E = 16;
  for (const int K : {1, 2}) {
    std::vector<float> logits = random(N * E, -3, 3), probs(N * E), lse(N);
    float *gprobs = up(probs), *glse = up(lse);
    cpu().softmax_forward(probs.data(), lse.data(), logits.data(), N, E);
    gpu().softmax_forward(gprobs, glse, up(logits), N, E);
    expect_match("softmax_forward probs", down(gprobs, probs.size()), probs, kFp32);
    expect_match("softmax_forward lse", down(glse, N), lse, kFp32);
    // Top-k and capacity on the same probabilities on both sides (the CPU's), so the choices
    // can be compared exactly.
    gprobs = up(probs);
    std::vector<int> idx(N * K), gidx_host;
    std::vector<float> gates(N * K);
    int* gidx = up(idx);
    float* ggates = up(gates);
    cpu().topk_forward(idx.data(), gates.data(), probs.data(), N, E, K);
    gpu().topk_forward(gidx, ggates, gprobs, N, E, K);
    expect_identical("topk_forward K=" + std::to_string(K), down(gidx, idx.size()), idx);
    expect_match("topk_forward gates", down(ggates, gates.size()), gates, kFp32);
    std::vector<float> dgates = random(N * K), dprobs = random(N * E);
    float* gdprobs = up(dprobs);
    cpu().topk_backward(dprobs.data(), dgates.data(), idx.data(), probs.data(), N, E, K);
    gpu().topk_backward(gdprobs, up(dgates), gidx, gprobs, N, E, K);
    expect_match("topk_backward", down(gdprobs, dprobs.size()), dprobs, kFp32);
    for (const DropPolicy policy : {DropPolicy::kPosition, DropPolicy::kProbs})
      for (const int capacity : {-1, 0, 20, 45}) {
        std::vector<int> slot(N * K), counts(E), choices(E), gslot(N * K), gcounts(E), gchoices(E);
        cpu().capacity_assign(slot.data(), counts.data(), choices.data(), idx.data(),
                              gates.data(), N, E, K, capacity, policy);
        gpu().capacity_assign(gslot.data(), gcounts.data(), gchoices.data(), up(idx),
                              up(gates), N, E, K, capacity, policy);
        const std::string tag = std::string(policy == DropPolicy::kProbs ? " probs" : " position") +
                                " cap " + std::to_string(capacity);
        expect_identical("capacity slots" + tag, gslot, slot);
        expect_identical("capacity counts" + tag, gcounts, counts);
        expect_identical("capacity choices" + tag, gchoices, choices);
      }
    std::vector<float> dlogits = random(N * E);
    float* gdlogits = up(dlogits);
    cpu().softmax_backward(dlogits.data(), dprobs.data(), probs.data(), N, E);
    gpu().softmax_backward(gdlogits, up(dprobs), gprobs, N, E);
    expect_match("softmax_backward", down(gdlogits, dlogits.size()), dlogits, kFp32);
    cpu().zloss_backward(dlogits.data(), probs.data(), lse.data(), 0.01f, N, E);
    gpu().zloss_backward(gdlogits, gprobs, up(lse), 0.01f, N, E);
    expect_match("zloss_backward", down(gdlogits, dlogits.size()), dlogits, kFp32);
    const std::vector<float> v = random(E);
    cpu().add_row_vector(dlogits.data(), v.data(), N, E);
    gpu().add_row_vector(gdlogits, v.data(), N, E);
    expect_match("add_row_vector", down(gdlogits, dlogits.size()), dlogits, kFp32);
    std::vector<double> sums(E), gsums(E);
    cpu().column_sums(sums.data(), probs.data(), N, E);
    gpu().column_sums(gsums.data(), gprobs, N, E);
    double worst = 0;
    for (int e = 0; e < E; ++e) worst = std::max(worst, std::fabs(gsums[e] - sums[e]));
    std::printf("%-36s worst |gpu-cpu| %.3g\n", "column_sums", worst);
    EXPECT_LE(worst, 1e-9 * N);
  }
}

TEST_F(CudaOps, PermuteAndCombine) {
  const int N = 300, K = 2, D = 96, rows = 450;
  // Every row is one kept choice; some choices are dropped (-1).
  std::vector<int> row(N * K, -1), token_of_row(rows);
  std::vector<int> order(N * K);
  for (int i = 0; i < N * K; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), std::mt19937(9));
  for (int r = 0; r < rows; ++r) {
    row[order[r]] = r;
    token_of_row[r] = order[r] / K;
  }
  std::vector<float> x = random_act(N * D), xr(rows * D), dxr = random_act(rows * D),
                     dx = random_act(N * D);
  const std::vector<float> dx0 = dx;
  Act *gx = up_act(x), *gxr = up_act(xr), *gdx = up_act(dx);
  cpu().gather_rows(f32_act(xr.data()), f32_act(x.data()), token_of_row.data(), rows, D);
  gpu().gather_rows(gxr, gx, token_of_row.data(), rows, D);
  expect_match("gather_rows", down_act(gxr, xr.size()), xr, {0, 0, 0});  // a copy: exact
  cpu().scatter_add_rows(f32_act(dx.data()), f32_act(dxr.data()), token_of_row.data(), rows, D);
  gpu().scatter_add_rows(gdx, up_act(dxr), token_of_row.data(), rows, D);
  expect_match("scatter_add_rows", down_act(gdx, dx.size()), dx, bf16_accumulated(dx0, dx));
  std::vector<float> y = random_act(rows * D), gates = random(N * K, 0, 1), out(N * D);
  std::vector<float> dout = random_act(N * D), dy = random_act(rows * D), dgates = random(N * K);
  const std::vector<float> dy0 = dy;
  Act *gy = up_act(y), *gout = up_act(out), *gdy = up_act(dy);
  float *ggates = up(gates), *gdgates = up(dgates);
  cpu().combine_forward(f32_act(out.data()), f32_act(y.data()), gates.data(), row.data(), N, K,
                        D);
  gpu().combine_forward(gout, gy, ggates, row.data(), N, K, D);
  expect_match("combine_forward", down_act(gout, out.size()), out, kBf16Stored);
  cpu().combine_backward(f32_act(dy.data()), dgates.data(), f32_act(dout.data()),
                         f32_act(y.data()), gates.data(), row.data(), N, K, D);
  gpu().combine_backward(gdy, gdgates, up_act(dout), gy, ggates, row.data(), N, K, D);
  expect_match("combine_backward dy", down_act(gdy, dy.size()), dy, bf16_accumulated(dy0, dy));
  expect_match("combine_backward dgates", down(gdgates, dgates.size()), dgates, {1e-4, 1e-4, 0});
}

TEST_F(CudaOps, AdamW) {
  const size_t n = 10007;
  std::vector<float> p = random(n), g = random(n), m = random(n, 0, 0.1), v = random(n, 0, 0.1);
  float *gp = up(p), *gg = up(g), *gm = up(m), *gv = up(v);
  for (int step = 1; step <= 5; ++step) {
    cpu().adamw_update(p.data(), g.data(), m.data(), v.data(), n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f,
                       step);
    gpu().adamw_update(gp, gg, gm, gv, n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, step);
  }
  expect_match("adamw params", down(gp, n), p, kFp32);
  expect_match("adamw exp_avg", down(gm, n), m, kFp32);
  expect_match("adamw exp_avg_sq", down(gv, n), v, kFp32);
}

// MOE_CUDA_PROFILE=1 (read when a backend is created) wraps the backend in the per-op timer:
// the ops still compute the same results, and destroying it prints a table with one row per op
// that ran, with its number of calls.
TEST_F(CudaOps, ProfileTableCountsTheOps) {
  std::unique_ptr<Backend> profiled = backend_with_env("MOE_CUDA_PROFILE", "1");
  const size_t n = 4099;
  const std::vector<float> a = random_act(n), b = random_act(n);
  std::vector<float> want(n), got(n);
  std::string table;
  {
    StderrNotes notes;
    const size_t bytes = n * act_bytes(profiled->activation_type());
    auto* ga = static_cast<Act*>(profiled->alloc_bytes(bytes));
    auto* gb = static_cast<Act*>(profiled->alloc_bytes(bytes));
    profiled->copy_act_from_host(ga, a.data(), n);
    profiled->copy_act_from_host(gb, b.data(), n);
    for (int i = 0; i < 3; ++i) profiled->add(gb, ga, gb, n);  // b + 3a
    profiled->copy_act_to_host(got.data(), gb, n);
    profiled->free_bytes(ga);
    profiled->free_bytes(gb);
    profiled.reset();
    table = notes.finish();
  }
  for (size_t i = 0; i < n; ++i) {  // each add rounds to bf16
    want[i] = b[i];
    for (int k = 0; k < 3; ++k) want[i] = round_to_bf16(want[i] + a[i]);
  }
  expect_match("profiled add", got, want, kBf16Stored);
  EXPECT_NE(table.find("CUDA op profile"), std::string::npos) << table;
  const size_t add_row = table.find("moe:   add ");
  ASSERT_NE(add_row, std::string::npos) << table;
  EXPECT_EQ(std::stoll(table.substr(table.find_first_not_of(' ', add_row + 10))), 3) << table;
  EXPECT_NE(table.find("moe:   copy_act_from_host "), std::string::npos) << table;
}

}  // namespace
}  // namespace moe
