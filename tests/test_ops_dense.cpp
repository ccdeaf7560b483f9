// Dense ops of the CPU backend: elementwise, embedding, layernorm, linear, gelu, attention,
// cross-entropy and AdamW.
//
// Each forward is checked against a plain double-precision reference written here; each
// backward against central finite differences of the random scalar loss sum(dout * forward)
// with respect to every input, weight and bias. Gradient buffers start out holding random
// values, so the checks also prove the backward accumulates (+=) rather than writes.
// Every comparison prints the worst difference it saw.
//
// The CPU backend's memory is host memory, so the tests hand it std::vector storage directly;
// its activations are fp32, so float vectors pass as activations (as_act, core/activation.h).
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include "core/activation.h"
#include "core/backend.h"
#include "core/buffer.h"
#include "gradcheck.h"

namespace moe {
namespace {

using test::dot;
using test::expect_close;
using test::finite_differences;
using test::random_vector;

constexpr double kFdAbs = 1e-3;   // analytic vs finite-difference gradient of an fp32 op
constexpr double kFdRel = 5e-3;
constexpr double kRefAbs = 1e-5;  // fp32 forward vs double reference
constexpr double kRefRel = 1e-5;

// A host float vector as CPU-backend activations (fp32 there).
Act* as_act(std::vector<float>& v) { return f32_act(v.data()); }

// The gradient a backward added: the buffer after it minus what it held before.
std::vector<double> accumulated(const std::vector<float>& after, const std::vector<float>& before) {
  std::vector<double> diff(after.size());
  for (size_t i = 0; i < after.size(); i++) diff[i] = double{after[i]} - double{before[i]};
  return diff;
}

class DenseOps : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> be = make_cpu_backend();
  std::mt19937 rng{20240520};
  std::vector<float> random(size_t n, float lo = -1.0f, float hi = 1.0f) {
    return random_vector(n, rng, lo, hi);
  }
};

// ---- elementwise -------------------------------------------------------------------------

TEST_F(DenseOps, ElementwiseMatchReference) {
  // 7 stays on one thread, 100003 takes the parallel path with a ragged tail.
  for (size_t n : {size_t{7}, size_t{100003}}) {
    std::vector<float> a = random(n), b = random(n);
    std::vector<float> out(n);
    std::vector<double> want(n);
    const std::string tag = " n=" + std::to_string(n);

    be->add(as_act(out), as_act(a), as_act(b), n);
    for (size_t i = 0; i < n; i++) want[i] = a[i] + b[i];
    EXPECT_TRUE(expect_close("add" + tag, out, want, 0.0, 0.0));

    be->mul(as_act(out), as_act(a), b.data(), n);
    for (size_t i = 0; i < n; i++) want[i] = a[i] * b[i];
    EXPECT_TRUE(expect_close("mul" + tag, out, want, 0.0, 0.0));

    std::vector<float> in_place = a;  // out may alias a (the router scales a gradient in place)
    be->mul(as_act(in_place), as_act(in_place), b.data(), n);
    EXPECT_TRUE(expect_close("mul in place" + tag, in_place, want, 0.0, 0.0));

    std::vector<float> acc = a;
    be->accumulate(as_act(acc), as_act(b), n);
    for (size_t i = 0; i < n; i++) want[i] = a[i] + b[i];
    EXPECT_TRUE(expect_close("accumulate" + tag, acc, want, 0.0, 0.0));

    std::vector<float> scaled = a;
    be->scale(scaled.data(), 0.37f, n);
    for (size_t i = 0; i < n; i++) want[i] = a[i] * 0.37f;
    EXPECT_TRUE(expect_close("scale" + tag, scaled, want, 0.0, 0.0));

    double sum_sq = 0.0;
    for (float x : a) sum_sq += double{x} * x;
    EXPECT_TRUE(expect_close("sum_squares" + tag, std::vector<double>{be->sum_squares(a.data(), n)},
                             std::vector<double>{sum_sq}, 0.0, 1e-12));
  }
}

TEST_F(DenseOps, SumSquaresKeepsSmallTermsInDouble) {
  // 2^24 + many ones: a float accumulator would stop growing at 2^24.
  const size_t n = 1 << 20;
  std::vector<float> x(n, 1.0f);
  x[0] = 4096.0f;  // 4096^2 = 2^24
  const double want = 16777216.0 + double(n - 1);
  const double got = be->sum_squares(x.data(), n);
  std::printf("  sum_squares: got %.1f want %.1f\n", got, want);
  EXPECT_EQ(got, want);
}

TEST_F(DenseOps, AllFiniteFindsNanAndInf) {
  const size_t n = 100003;
  std::vector<float> x = random(n, -1e30f, 1e30f);
  EXPECT_TRUE(be->all_finite(x.data(), n));
  EXPECT_TRUE(be->all_finite(x.data(), 0));
  const float bad_values[] = {std::numeric_limits<float>::quiet_NaN(),
                              std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity()};
  for (float bad : bad_values) {
    for (size_t at : {size_t{0}, size_t{5000}, n - 1}) {
      std::vector<float> y = x;
      y[at] = bad;
      EXPECT_FALSE(be->all_finite(y.data(), n)) << bad << " at " << at;
      EXPECT_FALSE(be->all_finite(y.data() + at, 1)) << bad << " alone";
    }
  }
  std::vector<float> big = {std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(),
                            std::numeric_limits<float>::denorm_min()};
  EXPECT_TRUE(be->all_finite(big.data(), big.size()));
}

// ---- activations: fp32 on the CPU, the host copies plain copies --------------------------

// Elements whose bits differ (NaN == NaN here, -0 != +0).
size_t bitwise_mismatches(const float* a, const float* b, size_t n) {
  size_t count = 0;
  for (size_t i = 0; i < n; i++) count += std::memcmp(a + i, b + i, sizeof(float)) != 0;
  return count;
}

TEST_F(DenseOps, ActivationsAreFp32AndCopiesRoundTrip) {
  EXPECT_EQ(be->activation_type(), ActType::kF32);
  const size_t n = 1037;
  std::vector<float> host = random(n);
  host[5] = std::numeric_limits<float>::quiet_NaN();  // every bit pattern survives
  host[6] = -0.0f;
  host[7] = std::numeric_limits<float>::denorm_min();
  ActBuffer dev(*be, n);
  EXPECT_EQ(dev.type(), ActType::kF32);
  be->copy_act_from_host(dev.data(), host.data(), n);
  // In backend memory the elements are the floats themselves.
  const size_t in_memory = bitwise_mismatches(act_f32(dev.data()), host.data(), n);
  std::vector<float> back(n, 7.0f);
  be->copy_act_to_host(back.data(), dev.data(), n);
  const size_t round_trip = bitwise_mismatches(back.data(), host.data(), n);
  std::printf("  copy_act n=%zu: %zu differ in backend memory, %zu after the round trip\n", n,
              in_memory, round_trip);
  EXPECT_EQ(in_memory, 0u);
  EXPECT_EQ(round_trip, 0u);
  std::vector<float> untouched(3, 7.0f);  // n = 0 copies nothing
  be->copy_act_to_host(untouched.data(), nullptr, 0);
  be->copy_act_from_host(nullptr, untouched.data(), 0);
  EXPECT_EQ(untouched, std::vector<float>(3, 7.0f));
}

// ---- embedding ---------------------------------------------------------------------------

TEST_F(DenseOps, EmbeddingForwardMatchesReference) {
  const int B = 2, T = 5, C = 8, V = 7, Tmax = 9;
  std::vector<int> idx = {0, 3, 3, 6, 1, 3, 0, 2, 5, 3};  // (B,T) with repeats
  std::vector<float> wte = random(V * C), wpe = random(Tmax * C);
  std::vector<float> out(B * T * C);
  be->embedding_forward(as_act(out), idx.data(), wte.data(), wpe.data(), B, T, C);
  std::vector<double> want(out.size());
  for (int b = 0; b < B; b++)
    for (int t = 0; t < T; t++)
      for (int c = 0; c < C; c++)
        want[(b * T + t) * C + c] = double{wte[idx[b * T + t] * C + c]} + wpe[t * C + c];
  EXPECT_TRUE(expect_close("embedding out", out, want, kRefAbs, kRefRel));
}

TEST_F(DenseOps, EmbeddingBackwardMatchesFiniteDifferences) {
  const int B = 2, T = 5, C = 8, V = 7, Tmax = 9;  // rows T..Tmax-1 of wpe get no gradient
  std::vector<int> idx = {0, 3, 3, 6, 1, 3, 0, 2, 5, 3};  // (B,T); token 4 never appears
  std::vector<float> wte = random(V * C), wpe = random(Tmax * C);
  std::vector<float> dout = random(B * T * C);
  std::vector<float> out(B * T * C);
  auto loss = [&](const std::vector<float>&) {
    be->embedding_forward(as_act(out), idx.data(), wte.data(), wpe.data(), B, T, C);
    return dot(dout, out);
  };
  const std::vector<float> dwte0 = random(V * C), dwpe0 = random(Tmax * C);
  std::vector<float> dwte = dwte0, dwpe = dwpe0;
  be->embedding_backward(dwte.data(), dwpe.data(), as_act(dout), idx.data(), B, T, C);
  EXPECT_TRUE(expect_close("embedding dwte", accumulated(dwte, dwte0),
                           finite_differences(loss, wte), kFdAbs, kFdRel));
  EXPECT_TRUE(expect_close("embedding dwpe", accumulated(dwpe, dwpe0),
                           finite_differences(loss, wpe), kFdAbs, kFdRel));
}

// Wider than one channel block and not a multiple of it, many repeated ids: the parallel split
// over channels must still give every element the serial sum.
TEST_F(DenseOps, EmbeddingBackwardMatchesSerialSumOnRaggedBlocks) {
  const int B = 4, T = 16, C = 70, V = 5;
  std::vector<int> idx(B * T);
  for (int i = 0; i < B * T; i++) idx[i] = (i * 7 + i / 3) % V;
  std::vector<float> dout = random(B * T * C);
  std::vector<float> dwte(V * C), dwpe(T * C);
  be->embedding_backward(dwte.data(), dwpe.data(), as_act(dout), idx.data(), B, T, C);
  std::vector<double> want_wte(V * C), want_wpe(T * C);
  for (int bt = 0; bt < B * T; bt++)
    for (int c = 0; c < C; c++) {
      want_wte[idx[bt] * C + c] += dout[bt * C + c];
      want_wpe[(bt % T) * C + c] += dout[bt * C + c];
    }
  EXPECT_TRUE(expect_close("embedding dwte (C=70)", dwte, want_wte, kRefAbs, kRefRel));
  EXPECT_TRUE(expect_close("embedding dwpe (C=70)", dwpe, want_wpe, kRefAbs, kRefRel));
}

// ---- layernorm ---------------------------------------------------------------------------

void layernorm_reference(std::vector<double>& out, std::vector<double>& mean,
                         std::vector<double>& rstd, const std::vector<float>& inp,
                         const std::vector<float>& weight, const std::vector<float>& bias, int N,
                         int C) {
  out.assign(N * C, 0.0);
  mean.assign(N, 0.0);
  rstd.assign(N, 0.0);
  for (int n = 0; n < N; n++) {
    double m = 0.0, var = 0.0;
    for (int c = 0; c < C; c++) m += inp[n * C + c];
    m /= C;
    for (int c = 0; c < C; c++) var += (inp[n * C + c] - m) * (inp[n * C + c] - m);
    const double s = 1.0 / std::sqrt(var / C + 1e-5);
    for (int c = 0; c < C; c++) out[n * C + c] = (inp[n * C + c] - m) * s * weight[c] + bias[c];
    mean[n] = m;
    rstd[n] = s;
  }
}

// Rows with an offset and a spread of their own, so mean and rstd matter.
std::vector<float> layernorm_input(int N, int C, std::mt19937& rng) {
  std::vector<float> inp = random_vector(N * C, rng);
  std::vector<float> shift = random_vector(N, rng, -2.0f, 2.0f);
  std::vector<float> spread = random_vector(N, rng, 0.5f, 2.0f);
  for (int n = 0; n < N; n++)
    for (int c = 0; c < C; c++) inp[n * C + c] = shift[n] + spread[n] * inp[n * C + c];
  return inp;
}

TEST_F(DenseOps, LayernormForwardMatchesReference) {
  const int N = 10, C = 40;
  std::vector<float> inp = layernorm_input(N, C, rng);
  std::vector<float> weight = random(C, 0.5f, 1.5f), bias = random(C);
  std::vector<float> out(N * C), mean(N), rstd(N);
  be->layernorm_forward(as_act(out), mean.data(), rstd.data(), as_act(inp), weight.data(),
                        bias.data(), N, C);
  std::vector<double> want_out, want_mean, want_rstd;
  layernorm_reference(want_out, want_mean, want_rstd, inp, weight, bias, N, C);
  EXPECT_TRUE(expect_close("layernorm out", out, want_out, kRefAbs, kRefRel));
  EXPECT_TRUE(expect_close("layernorm mean", mean, want_mean, kRefAbs, kRefRel));
  EXPECT_TRUE(expect_close("layernorm rstd", rstd, want_rstd, kRefAbs, kRefRel));
}

TEST_F(DenseOps, LayernormBackwardMatchesFiniteDifferences) {
  const int N = 10, C = 8;
  std::vector<float> inp = layernorm_input(N, C, rng);
  std::vector<float> weight = random(C, 0.5f, 1.5f), bias = random(C);
  std::vector<float> dout = random(N * C);
  std::vector<float> out(N * C), mean(N), rstd(N);
  auto loss = [&](const std::vector<float>&) {
    be->layernorm_forward(as_act(out), mean.data(), rstd.data(), as_act(inp), weight.data(),
                          bias.data(), N, C);
    return dot(dout, out);
  };
  loss(inp);  // saves mean and rstd for the backward
  const std::vector<float> dinp0 = random(N * C), dweight0 = random(C), dbias0 = random(C);
  std::vector<float> dinp = dinp0, dweight = dweight0, dbias = dbias0;
  be->layernorm_backward(as_act(dinp), dweight.data(), dbias.data(), as_act(dout), as_act(inp),
                         weight.data(), mean.data(), rstd.data(), N, C);
  EXPECT_TRUE(expect_close("layernorm dinp", accumulated(dinp, dinp0),
                           finite_differences(loss, inp), kFdAbs, kFdRel));
  EXPECT_TRUE(expect_close("layernorm dweight", accumulated(dweight, dweight0),
                           finite_differences(loss, weight), kFdAbs, kFdRel));
  EXPECT_TRUE(expect_close("layernorm dbias", accumulated(dbias, dbias0),
                           finite_differences(loss, bias), kFdAbs, kFdRel));
}

// ---- linear ------------------------------------------------------------------------------

std::vector<double> linear_reference(const std::vector<float>& inp, const std::vector<float>& w,
                                     const float* bias, int N, int IC, int OC) {
  std::vector<double> out(N * OC);
  for (int n = 0; n < N; n++)
    for (int o = 0; o < OC; o++) {
      double sum = bias ? bias[o] : 0.0;
      for (int i = 0; i < IC; i++) sum += double{inp[n * IC + i]} * w[o * IC + i];
      out[n * OC + o] = sum;
    }
  return out;
}

TEST_F(DenseOps, LinearForwardMatchesReference) {
  // Non-square, odd sizes, so a swapped transpose or leading dimension cannot pass.
  const int N = 37, IC = 70, OC = 45;
  std::vector<float> inp = random(N * IC), weight = random(OC * IC), bias = random(OC);
  std::vector<float> out(N * OC, 123.0f);  // the forward must overwrite, not add
  be->linear_forward(as_act(out), as_act(inp), weight.data(), bias.data(), N, IC, OC);
  EXPECT_TRUE(expect_close("linear out", out,
                           linear_reference(inp, weight, bias.data(), N, IC, OC), kRefAbs,
                           kRefRel));
  std::fill(out.begin(), out.end(), 123.0f);
  be->linear_forward(as_act(out), as_act(inp), weight.data(), nullptr, N, IC, OC);
  EXPECT_TRUE(expect_close("linear out (no bias)", out,
                           linear_reference(inp, weight, nullptr, N, IC, OC), kRefAbs, kRefRel));
}

TEST_F(DenseOps, LinearBackwardMatchesFiniteDifferences) {
  const int N = 10, IC = 8, OC = 6;
  std::vector<float> inp = random(N * IC), weight = random(OC * IC), bias = random(OC);
  std::vector<float> dout = random(N * OC);
  std::vector<float> out(N * OC);
  auto loss = [&](const std::vector<float>&) {
    be->linear_forward(as_act(out), as_act(inp), weight.data(), bias.data(), N, IC, OC);
    return dot(dout, out);
  };
  const std::vector<float> dinp0 = random(N * IC), dweight0 = random(OC * IC), dbias0 = random(OC);
  std::vector<float> dinp = dinp0, dweight = dweight0, dbias = dbias0;
  be->linear_backward(as_act(dinp), dweight.data(), dbias.data(), as_act(dout), as_act(inp),
                      weight.data(), N, IC, OC);
  EXPECT_TRUE(expect_close("linear dinp", accumulated(dinp, dinp0), finite_differences(loss, inp),
                           kFdAbs, kFdRel));
  EXPECT_TRUE(expect_close("linear dweight", accumulated(dweight, dweight0),
                           finite_differences(loss, weight), kFdAbs, kFdRel));
  EXPECT_TRUE(expect_close("linear dbias", accumulated(dbias, dbias0),
                           finite_differences(loss, bias), kFdAbs, kFdRel));
}

// Bigger, ragged shapes against the exact formulas in double: dinp = dout W, dW = dout^T inp,
// dbias = column sums (wider than one column block). Also the optional dinp and dbias.
TEST_F(DenseOps, LinearBackwardMatchesReferenceAndSkipsNullGradients) {
  const int N = 37, IC = 70, OC = 45;
  std::vector<float> inp = random(N * IC), weight = random(OC * IC), dout = random(N * OC);
  std::vector<double> want_dinp(N * IC), want_dweight(OC * IC), want_dbias(OC);
  for (int n = 0; n < N; n++)
    for (int o = 0; o < OC; o++) {
      const double g = dout[n * OC + o];
      want_dbias[o] += g;
      for (int i = 0; i < IC; i++) {
        want_dinp[n * IC + i] += g * weight[o * IC + i];
        want_dweight[o * IC + i] += g * inp[n * IC + i];
      }
    }
  std::vector<float> dinp(N * IC), dweight(OC * IC), dbias(OC);
  be->linear_backward(as_act(dinp), dweight.data(), dbias.data(), as_act(dout), as_act(inp),
                      weight.data(), N, IC, OC);
  EXPECT_TRUE(expect_close("linear dinp (ref)", dinp, want_dinp, 1e-4, kRefRel));
  EXPECT_TRUE(expect_close("linear dweight (ref)", dweight, want_dweight, 1e-4, kRefRel));
  EXPECT_TRUE(expect_close("linear dbias (ref)", dbias, want_dbias, 1e-4, kRefRel));

  std::vector<float> dweight_only(OC * IC);
  be->linear_backward(nullptr, dweight_only.data(), nullptr, as_act(dout), as_act(inp),
                      weight.data(), N, IC, OC);
  EXPECT_TRUE(expect_close("linear dweight (null dinp, dbias)", dweight_only, want_dweight, 1e-4,
                           kRefRel));
}

// ---- gelu --------------------------------------------------------------------------------

double gelu_reference(double x) {
  const double u = std::sqrt(2.0 / std::numbers::pi) * (x + 0.044715 * x * x * x);
  return 0.5 * x * (1.0 + std::tanh(u));
}

double gelu_derivative_reference(double x) {
  const double s = std::sqrt(2.0 / std::numbers::pi);
  const double u = s * (x + 0.044715 * x * x * x);
  const double sech = 1.0 / std::cosh(u);
  return 0.5 * (1.0 + std::tanh(u)) + 0.5 * x * sech * sech * s * (1.0 + 3.0 * 0.044715 * x * x);
}

TEST_F(DenseOps, GeluForwardMatchesReference) {
  // A dense sweep of [-12, 12], past where the exponential saturates on either side, plus the
  // extremes; 20001 elements take the parallel path.
  std::vector<float> inp;
  for (int i = -10000; i <= 10000; i++) inp.push_back(i * 0.0012f);
  for (float x : {-1e4f, -100.0f, -30.0f, 30.0f, 100.0f, 1e4f}) inp.push_back(x);
  std::vector<float> out(inp.size());
  be->gelu_forward(as_act(out), as_act(inp), inp.size());
  std::vector<double> want(inp.size());
  for (size_t i = 0; i < inp.size(); i++) want[i] = gelu_reference(inp[i]);
  EXPECT_TRUE(expect_close("gelu out", out, want, kRefAbs, kRefRel));
  std::vector<float> dinp(inp.size()), ones(inp.size(), 1.0f);
  be->gelu_backward(as_act(dinp), as_act(inp), as_act(ones), inp.size());
  for (size_t i = 0; i < inp.size(); i++) want[i] = gelu_derivative_reference(inp[i]);
  EXPECT_TRUE(expect_close("gelu derivative", dinp, want, kRefAbs, kRefRel));
}

TEST_F(DenseOps, GeluBackwardMatchesFiniteDifferences) {
  const size_t n = 64;
  std::vector<float> inp = random(n, -4.0f, 4.0f), dout = random(n), out(n);
  auto loss = [&](const std::vector<float>&) {
    be->gelu_forward(as_act(out), as_act(inp), n);
    return dot(dout, out);
  };
  const std::vector<float> dinp0 = random(n);
  std::vector<float> dinp = dinp0;
  be->gelu_backward(as_act(dinp), as_act(inp), as_act(dout), n);
  EXPECT_TRUE(expect_close("gelu dinp", accumulated(dinp, dinp0), finite_differences(loss, inp),
                           kFdAbs, kFdRel));
}

// ---- linear + GELU (the dense FFN's c_fc, and c_proj's input gradient through the GELU) ---

TEST_F(DenseOps, LinearGeluForwardMatchesReference) {
  const int N = 37, IC = 70, OC = 45;
  std::vector<float> inp = random(N * IC), weight = random(OC * IC), bias = random(OC);
  std::vector<float> pre(N * OC, 123.0f), out(N * OC, 123.0f);  // both overwritten
  be->linear_gelu_forward(as_act(pre), as_act(out), as_act(inp), weight.data(), bias.data(), N, IC,
                          OC);
  const std::vector<double> want_pre = linear_reference(inp, weight, bias.data(), N, IC, OC);
  std::vector<double> want_out(want_pre.size());
  for (size_t i = 0; i < want_pre.size(); i++) want_out[i] = gelu_reference(want_pre[i]);
  EXPECT_TRUE(expect_close("linear_gelu pre", pre, want_pre, kRefAbs, kRefRel));
  EXPECT_TRUE(expect_close("linear_gelu out", out, want_out, kRefAbs, kRefRel));
}

// y = gelu(pre) @ W^T + b: dpre, dweight and dbias against finite differences of
// sum(dout * y). dpre starts as garbage (the op writes it); dweight and dbias start random
// (the op adds to them).
TEST_F(DenseOps, GeluLinearBackwardMatchesFiniteDifferences) {
  const int N = 9, IC = 12, OC = 7;
  std::vector<float> pre = random(N * IC, -3.0f, 3.0f), weight = random(OC * IC),
                     bias = random(OC);
  std::vector<float> dout = random(N * OC), act(N * IC), y(N * OC);
  auto loss = [&](const std::vector<float>&) {
    be->gelu_forward(as_act(act), as_act(pre), act.size());
    be->linear_forward(as_act(y), as_act(act), weight.data(), bias.data(), N, IC, OC);
    return dot(dout, y);
  };
  loss(pre);  // act = gelu(pre), the op's input
  std::vector<float> dpre = random(N * IC, 50.0f, 60.0f);
  const std::vector<float> dweight0 = random(OC * IC), dbias0 = random(OC);
  std::vector<float> dweight = dweight0, dbias = dbias0;
  be->gelu_linear_backward(as_act(dpre), dweight.data(), dbias.data(), as_act(dout), as_act(act),
                           weight.data(), as_act(pre), N, IC, OC);
  EXPECT_TRUE(expect_close("gelu_linear dpre", dpre, finite_differences(loss, pre), kFdAbs,
                           kFdRel));
  EXPECT_TRUE(expect_close("gelu_linear dweight", accumulated(dweight, dweight0),
                           finite_differences(loss, weight), kFdAbs, kFdRel));
  EXPECT_TRUE(expect_close("gelu_linear dbias", accumulated(dbias, dbias0),
                           finite_differences(loss, bias), kFdAbs, kFdRel));
  be->gelu_linear_backward(as_act(dpre), dweight.data(), nullptr, as_act(dout), as_act(act),
                           weight.data(), as_act(pre), N, IC, 0);
  EXPECT_TRUE(expect_close("gelu_linear dpre (no outputs)", dpre,
                           std::vector<double>(N * IC, 0.0), 0.0, 0.0));
}

// ---- attention ---------------------------------------------------------------------------

// The model's attention written out in double: causal softmax of q k^T / sqrt(hd), then att v;
// lse is each row's logsumexp of the scaled scores over keys 0..t.
void attention_reference(std::vector<double>& out, std::vector<double>& lse,
                         const std::vector<float>& qkv, int B, int T, int C, int NH) {
  const int hd = C / NH;
  out.assign(B * T * C, 0.0);
  lse.assign(B * NH * T, 0.0);
  std::vector<double> row(T);  // (T)
  for (int b = 0; b < B; b++)
    for (int h = 0; h < NH; h++)
      for (int t = 0; t < T; t++) {
        const float* q = &qkv[(b * T + t) * 3 * C + h * hd];
        double max = -1e300;
        for (int j = 0; j <= t; j++) {
          const float* k = &qkv[(b * T + j) * 3 * C + C + h * hd];
          double s = 0.0;
          for (int d = 0; d < hd; d++) s += double{q[d]} * k[d];
          row[j] = s / std::sqrt(double(hd));
          max = std::max(max, row[j]);
        }
        double sum = 0.0;
        for (int j = 0; j <= t; j++) sum += row[j] = std::exp(row[j] - max);
        for (int j = 0; j <= t; j++) row[j] /= sum;
        lse[(b * NH + h) * T + t] = max + std::log(sum);
        for (int d = 0; d < hd; d++) {
          double o = 0.0;
          for (int j = 0; j <= t; j++) o += row[j] * qkv[(b * T + j) * 3 * C + 2 * C + h * hd + d];
          out[(b * T + t) * C + h * hd + d] = o;
        }
      }
}

void check_attention_forward(Backend& be, std::mt19937& rng, int B, int T, int C, int NH) {
  const std::string tag = " (B=" + std::to_string(B) + " T=" + std::to_string(T) +
                          " C=" + std::to_string(C) + " NH=" + std::to_string(NH) + ")";
  std::vector<float> qkv = random_vector(B * T * 3 * C, rng, -2.0f, 2.0f);
  std::vector<float> out(B * T * C, 7.0f), lse(B * NH * T, 7.0f);  // both must be fully written
  be.attention_forward(as_act(out), lse.data(), as_act(qkv), B, T, C, NH);
  std::vector<double> want_out, want_lse;
  attention_reference(want_out, want_lse, qkv, B, T, C, NH);
  EXPECT_TRUE(expect_close("attention out" + tag, out, want_out, kRefAbs, kRefRel));
  EXPECT_TRUE(expect_close("attention lse" + tag, lse, want_lse, kRefAbs, kRefRel));
}

TEST_F(DenseOps, AttentionForwardMatchesReference) {
  check_attention_forward(*be, rng, 2, 5, 8, 2);
  check_attention_forward(*be, rng, 3, 33, 48, 4);  // more (b,h) pairs than threads, hd 12
  check_attention_forward(*be, rng, 1, 1, 4, 1);    // a single token attends to itself
  check_attention_forward(*be, rng, 2, 150, 16, 2);  // query blocks of 64: two full, one partial
}

void check_attention_backward(Backend& be, std::mt19937& rng, int B, int T, int C, int NH) {
  const std::string tag = " (B=" + std::to_string(B) + " T=" + std::to_string(T) +
                          " C=" + std::to_string(C) + " NH=" + std::to_string(NH) + ")";
  std::vector<float> qkv = random_vector(B * T * 3 * C, rng, -2.0f, 2.0f);
  std::vector<float> dout = random_vector(B * T * C, rng, -1.0f, 1.0f);
  std::vector<float> out(B * T * C), lse(B * NH * T);
  auto loss = [&](const std::vector<float>&) {
    be.attention_forward(as_act(out), lse.data(), as_act(qkv), B, T, C, NH);
    return dot(dout, out);
  };
  loss(qkv);  // saves out and lse for the backward
  const std::vector<float> dqkv0 = random_vector(B * T * 3 * C, rng, -1.0f, 1.0f);
  std::vector<float> dqkv = dqkv0;
  be.attention_backward(as_act(dqkv), as_act(dout), as_act(out), as_act(qkv), lse.data(), B, T, C,
                        NH);
  EXPECT_TRUE(expect_close("attention dqkv" + tag, accumulated(dqkv, dqkv0),
                           finite_differences(loss, qkv), kFdAbs, kFdRel));
}

TEST_F(DenseOps, AttentionBackwardMatchesFiniteDifferences) {
  check_attention_backward(*be, rng, 2, 5, 8, 2);
  check_attention_backward(*be, rng, 1, 70, 4, 1);  // a second, partial query block of 6
}

// ---- cross-entropy -----------------------------------------------------------------------

TEST_F(DenseOps, CrossentropyForwardMatchesReferenceAlsoInPlace) {
  const int N = 6, V = 11;
  std::vector<float> logits = random(N * V, -3.0f, 3.0f);
  logits[2 * V + 4] = 80.0f;  // large logits must not overflow the exponential
  logits[3 * V + 0] = -80.0f;
  std::vector<int> targets = {0, 10, 4, 0, 5, 5};
  std::vector<double> want_losses(N), want_probs(N * V);
  for (int i = 0; i < N; i++) {
    double max = -1e300, sum = 0.0;
    for (int j = 0; j < V; j++) max = std::max(max, double{logits[i * V + j]});
    for (int j = 0; j < V; j++) sum += std::exp(logits[i * V + j] - max);
    for (int j = 0; j < V; j++) want_probs[i * V + j] = std::exp(logits[i * V + j] - max) / sum;
    want_losses[i] = std::log(sum) + max - logits[i * V + targets[i]];
  }
  std::vector<float> losses(N), probs(N * V);
  be->crossentropy_forward(losses.data(), as_act(probs), as_act(logits), targets.data(), N, V);
  EXPECT_TRUE(expect_close("crossentropy losses", losses, want_losses, kRefAbs, kRefRel));
  EXPECT_TRUE(expect_close("crossentropy probs", probs, want_probs, kRefAbs, kRefRel));

  std::vector<float> in_place = logits, in_place_losses(N);  // probs written over the logits
  be->crossentropy_forward(in_place_losses.data(), as_act(in_place), as_act(in_place),
                           targets.data(), N, V);
  EXPECT_TRUE(expect_close("crossentropy losses (in place)", in_place_losses, want_losses,
                           kRefAbs, kRefRel));
  EXPECT_TRUE(expect_close("crossentropy probs (in place)", in_place, want_probs, kRefAbs,
                           kRefRel));
}

TEST_F(DenseOps, CrossentropyBackwardMatchesFiniteDifferencesAlsoInPlace) {
  const int N = 6, V = 11;
  const float dloss = 1.0f / N;  // the mean over tokens, as the model uses it
  std::vector<float> logits = random(N * V, -3.0f, 3.0f);
  std::vector<int> targets = {0, 10, 4, 0, 5, 5};
  std::vector<float> losses(N), probs(N * V);
  auto loss = [&](const std::vector<float>&) {
    be->crossentropy_forward(losses.data(), as_act(probs), as_act(logits), targets.data(), N, V);
    double sum = 0.0;
    for (float l : losses) sum += double{dloss} * l;
    return sum;
  };
  loss(logits);
  const std::vector<double> want = finite_differences(loss, logits);
  loss(logits);  // probs again for the unperturbed logits

  std::vector<float> dlogits = random(N * V, 100.0f, 200.0f);  // written, not accumulated
  be->crossentropy_backward(as_act(dlogits), as_act(probs), targets.data(), dloss, N, V);
  EXPECT_TRUE(expect_close("crossentropy dlogits", dlogits, want, kFdAbs, kFdRel));

  // The model's path: forward in place over the logits, then backward in place over probs.
  std::vector<float> buffer = logits, in_place_losses(N);
  be->crossentropy_forward(in_place_losses.data(), as_act(buffer), as_act(buffer), targets.data(),
                           N, V);
  be->crossentropy_backward(as_act(buffer), as_act(buffer), targets.data(), dloss, N, V);
  EXPECT_TRUE(expect_close("crossentropy dlogits (in place)", buffer, want, kFdAbs, kFdRel));
  EXPECT_TRUE(expect_close("crossentropy in place == separate", buffer,
                           std::vector<double>(dlogits.begin(), dlogits.end()), 0.0, 0.0));
}

// ---- AdamW -------------------------------------------------------------------------------

TEST_F(DenseOps, AdamwMatchesTorchFormulaForThreeSteps) {
  const size_t n = 100003;  // parallel path with a ragged tail
  const float lr = 1e-2f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  for (float weight_decay : {0.1f, 0.0f}) {
    std::vector<float> params = random(n), m(n), v(n);
    std::vector<double> want_p(params.begin(), params.end()), want_m(n), want_v(n);
    for (int step = 1; step <= 3; step++) {
      std::vector<float> grads = random(n, -0.1f, 0.1f);
      grads[0] = 0.0f;  // a zero gradient: only the decay moves this weight
      grads[1] = 1e-6f;
      be->adamw_update(params.data(), grads.data(), m.data(), v.data(), n, lr, beta1, beta2, eps,
                       weight_decay, step);
      // torch.optim.AdamW, step by step in double.
      const double bc1 = 1.0 - std::pow(double{beta1}, step);
      const double bc2 = 1.0 - std::pow(double{beta2}, step);
      for (size_t i = 0; i < n; i++) {
        const double g = grads[i];
        want_p[i] *= 1.0 - double{lr} * weight_decay;
        want_m[i] = beta1 * want_m[i] + (1.0 - beta1) * g;
        want_v[i] = beta2 * want_v[i] + (1.0 - beta2) * g * g;
        want_p[i] -= lr * (want_m[i] / bc1) / (std::sqrt(want_v[i] / bc2) + eps);
      }
      const std::string tag = " wd=" + std::to_string(weight_decay).substr(0, 3) +
                              " step " + std::to_string(step);
      EXPECT_TRUE(expect_close("adamw params" + tag, params, want_p, 1e-6, 1e-5));
      EXPECT_TRUE(expect_close("adamw m" + tag, m, want_m, 1e-9, 1e-5));
      EXPECT_TRUE(expect_close("adamw v" + tag, v, want_v, 1e-12, 1e-5));
    }
  }
}

// ---- accumulation and threads ------------------------------------------------------------

// Running a backward into gradients that already hold values must add exactly what it would
// have written into zeros: the optimizer step sees the sum over micro-batches and layers.
TEST_F(DenseOps, BackwardsAddToWhatTheGradientsHold) {
  const int B = 2, T = 5, C = 8, NH = 2, V = 7, N = B * T;
  std::vector<int> idx = {0, 3, 3, 6, 1, 3, 0, 2, 5, 3};
  std::vector<float> x = layernorm_input(N, C, rng), w = random(C), b = random(C);
  std::vector<float> wl = random(3 * C * C), qkv = random(N * 3 * C);
  std::vector<float> dout = random(N * C), dout3 = random(N * 3 * C);
  std::vector<float> mean(N), rstd(N), out(N * C), lse(B * NH * T), att_out(N * C);
  be->layernorm_forward(as_act(out), mean.data(), rstd.data(), as_act(x), w.data(), b.data(), N, C);
  be->attention_forward(as_act(att_out), lse.data(), as_act(qkv), B, T, C, NH);

  // run(grads) calls one backward into the given buffers.
  auto check = [&](const std::string& what, std::vector<std::vector<float>> shapes,
                   auto run) {
    std::vector<std::vector<float>> from_zero = shapes, base = shapes;
    for (auto& g : from_zero) std::fill(g.begin(), g.end(), 0.0f);
    for (auto& g : base) g = random(g.size());
    std::vector<std::vector<float>> onto_base = base;
    run(from_zero);
    run(onto_base);
    for (size_t k = 0; k < base.size(); k++) {
      EXPECT_TRUE(expect_close(what + " grad " + std::to_string(k),
                               accumulated(onto_base[k], base[k]),
                               std::vector<double>(from_zero[k].begin(), from_zero[k].end()),
                               1e-6, 1e-6));
    }
  };
  using Grads = std::vector<std::vector<float>>;
  check("embedding", {std::vector<float>(V * C), std::vector<float>(T * C)}, [&](Grads& g) {
    be->embedding_backward(g[0].data(), g[1].data(), as_act(dout), idx.data(), B, T, C);
  });
  check("layernorm", {std::vector<float>(N * C), std::vector<float>(C), std::vector<float>(C)},
        [&](Grads& g) {
          be->layernorm_backward(as_act(g[0]), g[1].data(), g[2].data(), as_act(dout), as_act(x),
                                 w.data(), mean.data(), rstd.data(), N, C);
        });
  check("linear",
        {std::vector<float>(N * C), std::vector<float>(3 * C * C), std::vector<float>(3 * C)},
        [&](Grads& g) {
          be->linear_backward(as_act(g[0]), g[1].data(), g[2].data(), as_act(dout3), as_act(x),
                              wl.data(), N, C, 3 * C);
        });
  check("gelu", {std::vector<float>(N * C)}, [&](Grads& g) {
    be->gelu_backward(as_act(g[0]), as_act(x), as_act(dout), N * C);
  });
  check("attention", {std::vector<float>(N * 3 * C)}, [&](Grads& g) {
    be->attention_backward(as_act(g[0]), as_act(dout), as_act(att_out), as_act(qkv), lse.data(), B,
                           T, C, NH);
  });
}

// The ops that sum over rows split the work over columns, with sums in a fixed order: one
// thread and several give bit-identical gradients.
TEST_F(DenseOps, ReductionsDoNotDependOnThreadCount) {
  const int B = 4, T = 32, C = 96, V = 11, N = B * T;
  std::vector<int> idx(N);
  for (int i = 0; i < N; i++) idx[i] = (i * 5) % V;
  std::vector<float> x = layernorm_input(N, C, rng), w = random(C), b = random(C);
  std::vector<float> dout = random(N * C), mean(N), rstd(N), out(N * C);
  be->layernorm_forward(as_act(out), mean.data(), rstd.data(), as_act(x), w.data(), b.data(), N, C);

  auto run = [&](int threads) {
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    std::vector<float> dx(N * C), dw(C), db(C), dwte(V * C), dwpe(T * C);
    be->layernorm_backward(as_act(dx), dw.data(), db.data(), as_act(dout), as_act(x), w.data(),
                           mean.data(), rstd.data(), N, C);
    be->embedding_backward(dwte.data(), dwpe.data(), as_act(dout), idx.data(), B, T, C);
    omp_set_num_threads(saved);
    std::vector<float> all;
    for (auto* g : {&dx, &dw, &db, &dwte, &dwpe}) all.insert(all.end(), g->begin(), g->end());
    return all;
  };
  const std::vector<float> one = run(1), three = run(3);
  EXPECT_TRUE(expect_close("1 thread vs 3 threads", three,
                           std::vector<double>(one.begin(), one.end()), 0.0, 0.0));
}

}  // namespace
}  // namespace moe
