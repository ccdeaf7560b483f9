// Router and expert ops of the CPU backend: grouped linear, router logits, softmax, top-k,
// capacity, the auxiliary-loss helpers, token permutation and combine. Gradients are checked
// against central finite differences (loss accumulated in double), forwards against plain double
// references, capacity against layouts written out by hand. Every test prints the worst
// difference it saw. The CPU backend's activations are fp32, so float buffers pass as
// activations (as_act, core/activation.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <numbers>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/activation.h"
#include "core/backend.h"

namespace moe {
namespace {

// A backend buffer with a host mirror `h`: tests edit h, upload, run an op, download.
template <typename T>
class Buf {
 public:
  Buf(Backend& be, std::vector<T> init) : be_(be), h(std::move(init)) {
    d = static_cast<T*>(be_.alloc_bytes(sizeof(T) * h.size()));
    upload();
  }
  Buf(Backend& be, size_t n) : Buf(be, std::vector<T>(n, T(0))) {}
  ~Buf() { be_.free_bytes(d); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  void upload() { be_.copy_from_host(d, h.data(), sizeof(T) * h.size()); }
  std::vector<T>& download() {
    be_.copy_to_host(h.data(), d, sizeof(T) * h.size());
    return h;
  }
  size_t size() const { return h.size(); }

 private:
  Backend& be_;

 public:
  std::vector<T> h;  // host mirror
  T* d = nullptr;    // backend memory
};

// A float buffer as CPU-backend activations (fp32 there).
Act* as_act(Buf<float>& b) { return f32_act(b.d); }

std::vector<float> random_vec(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// sum_i w[i] * x[i] in double: the scalar loss whose gradient w.r.t. x is w.
double weighted_sum(const std::vector<float>& w, const std::vector<float>& x) {
  double s = 0.0;
  for (size_t i = 0; i < x.size(); i++) s += (double)w[i] * x[i];
  return s;
}

// Central differences of loss() w.r.t. every element of p. The step actually taken in fp32
// is used as the denominator, so rounding of x +- h does not bias the estimate.
std::vector<double> numeric_grad(Buf<float>& p, const std::function<double()>& loss,
                                 float h = 1e-3f) {
  std::vector<double> g(p.size());
  for (size_t i = 0; i < p.size(); i++) {
    float x0 = p.h[i];
    float xp = x0 + h, xm = x0 - h;
    p.h[i] = xp;
    p.upload();
    double lp = loss();
    p.h[i] = xm;
    p.upload();
    double lm = loss();
    p.h[i] = x0;
    p.upload();
    g[i] = (lp - lm) / ((double)xp - (double)xm);
  }
  return g;
}

// Asserts |got - want| <= atol + rtol*|want| elementwise; prints and returns the worst |diff|.
double expect_close(const std::string& what, const std::vector<double>& got,
                    const std::vector<double>& want, double atol, double rtol) {
  EXPECT_EQ(got.size(), want.size()) << what;
  double worst = 0.0;
  int failures = 0;
  for (size_t i = 0; i < std::min(got.size(), want.size()); i++) {
    double diff = std::fabs(got[i] - want[i]);
    if (!(diff <= worst)) worst = diff;  // also catches NaN
    if (!(diff <= atol + rtol * std::fabs(want[i])) && failures++ < 5)
      ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << ", want " << want[i];
  }
  std::printf("  %-40s worst |diff| = %.3e\n", what.c_str(), worst);
  return worst;
}

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// The gradient an op accumulated: buffer after backward minus what it held before.
std::vector<double> accumulated(const std::vector<float>& after, const std::vector<float>& base) {
  std::vector<double> g(after.size());
  for (size_t i = 0; i < g.size(); i++) g[i] = (double)after[i] - (double)base[i];
  return g;
}

constexpr double kGradAtol = 1e-3;  // fp32 forward, step 1e-3: differences are ~1e-4
constexpr double kGradRtol = 1e-2;

// ---- grouped linear ----------------------------------------------------------------------

struct GroupedProblem {
  static constexpr int E = 3, IC = 5, OC = 6;
  std::vector<int> offsets{0, 4, 4, 9};  // expert 1 receives no rows
  int rows() const { return offsets[E]; }
};

std::vector<double> grouped_linear_ref(const std::vector<float>& inp, const std::vector<float>& w,
                                       const std::vector<float>* b, const std::vector<int>& offs,
                                       int E, int IC, int OC) {
  std::vector<double> out((size_t)offs[E] * OC);
  for (int e = 0; e < E; e++)
    for (int r = offs[e]; r < offs[e + 1]; r++)
      for (int o = 0; o < OC; o++) {
        double s = b ? (*b)[(size_t)e * OC + o] : 0.0;
        for (int i = 0; i < IC; i++)
          s += (double)inp[(size_t)r * IC + i] * w[((size_t)e * OC + o) * IC + i];
        out[(size_t)r * OC + o] = s;
      }
  return out;
}

TEST(RouterOps, GroupedLinearForwardMatchesReference) {
  auto be = make_cpu_backend();
  GroupedProblem P;
  const int E = P.E, IC = P.IC, OC = P.OC, rows = P.rows();
  Buf<float> inp(*be, random_vec((size_t)rows * IC, 1));  // (rows,IC)
  Buf<float> w(*be, random_vec((size_t)E * OC * IC, 2));  // (E,OC,IC)
  Buf<float> b(*be, random_vec((size_t)E * OC, 3));       // (E,OC)
  // Forward writes: stale values in out must not leak into the result.
  Buf<float> out(*be, std::vector<float>((size_t)rows * OC, 123.0f));  // (rows,OC)
  be->grouped_linear_forward(as_act(out), as_act(inp), w.d, b.d, P.offsets.data(), E, IC, OC);
  expect_close("grouped_linear out", to_double(out.download()),
               grouped_linear_ref(inp.h, w.h, &b.h, P.offsets, E, IC, OC), 1e-5, 1e-5);
  out.h.assign(out.size(), 123.0f);
  out.upload();
  be->grouped_linear_forward(as_act(out), as_act(inp), w.d, nullptr, P.offsets.data(), E, IC, OC);
  expect_close("grouped_linear out (no bias)", to_double(out.download()),
               grouped_linear_ref(inp.h, w.h, nullptr, P.offsets, E, IC, OC), 1e-5, 1e-5);
}

TEST(RouterOps, GroupedLinearGradients) {
  auto be = make_cpu_backend();
  GroupedProblem P;
  const int E = P.E, IC = P.IC, OC = P.OC, rows = P.rows();
  Buf<float> inp(*be, random_vec((size_t)rows * IC, 11));  // (rows,IC)
  Buf<float> w(*be, random_vec((size_t)E * OC * IC, 12));  // (E,OC,IC)
  Buf<float> b(*be, random_vec((size_t)E * OC, 13));       // (E,OC)
  Buf<float> out(*be, (size_t)rows * OC);                  // (rows,OC)
  std::vector<float> wout = random_vec((size_t)rows * OC, 14);  // loss weights = dout
  Buf<float> dout(*be, wout);                                   // (rows,OC)
  auto loss = [&] {
    be->grouped_linear_forward(as_act(out), as_act(inp), w.d, b.d, P.offsets.data(), E, IC, OC);
    return weighted_sum(wout, out.download());
  };
  // Gradient buffers start non-zero: backward must add to them.
  std::vector<float> dinp0 = random_vec(inp.size(), 15), dw0 = random_vec(w.size(), 16),
                     db0 = random_vec(b.size(), 17);
  Buf<float> dinp(*be, dinp0), dw(*be, dw0), db(*be, db0);
  be->grouped_linear_backward(as_act(dinp), dw.d, db.d, as_act(dout), as_act(inp), w.d,
                              P.offsets.data(), E, IC, OC);
  expect_close("grouped_linear dinp", accumulated(dinp.download(), dinp0),
               numeric_grad(inp, loss), kGradAtol, kGradRtol);
  expect_close("grouped_linear dweight", accumulated(dw.download(), dw0), numeric_grad(w, loss),
               kGradAtol, kGradRtol);
  expect_close("grouped_linear dbias", accumulated(db.download(), db0), numeric_grad(b, loss),
               kGradAtol, kGradRtol);
  // The expert with no rows keeps its gradients bit for bit.
  for (int i = 0; i < OC * IC; i++) EXPECT_EQ(dw.h[(size_t)1 * OC * IC + i], dw0[(size_t)OC * IC + i]);
  for (int o = 0; o < OC; o++) EXPECT_EQ(db.h[(size_t)OC + o], db0[(size_t)OC + o]);

  // dinp and dbias are optional: the weight gradient must not change without them.
  Buf<float> dw_only(*be, dw0);
  be->grouped_linear_backward(nullptr, dw_only.d, nullptr, as_act(dout), as_act(inp), w.d,
                              P.offsets.data(), E, IC, OC);
  expect_close("grouped_linear dweight (no dinp/dbias)", to_double(dw_only.download()),
               to_double(dw.h), 0.0, 0.0);
}

// The experts' c_fc + GELU and c_proj's input gradient through the GELU. The expert rows
// start at row 2 of a 13-row buffer: rows outside [offsets[0], offsets[E]) must keep their
// contents bit for bit.
struct GroupedGeluProblem {
  static constexpr int E = 3, IC = 5, OC = 6, kBufferRows = 13;
  std::vector<int> offsets{2, 6, 6, 11};  // expert 1 receives no rows
};

double gelu_ref(double x) {
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / std::numbers::pi) * (x + 0.044715 * x * x * x)));
}

// Rows of `got` outside [first, last) against `before`, exactly.
void expect_rows_untouched(const std::string& what, const std::vector<float>& got,
                           const std::vector<float>& before, int first, int last, int width) {
  for (size_t i = 0; i < got.size(); i++) {
    const int row = static_cast<int>(i / width);
    if (row < first || row >= last) {
      EXPECT_EQ(got[i], before[i]) << what << " row " << row;
    }
  }
}

TEST(RouterOps, GroupedLinearGeluForwardMatchesReference) {
  auto be = make_cpu_backend();
  GroupedGeluProblem P;
  const int E = P.E, IC = P.IC, OC = P.OC, rows = P.kBufferRows;
  Buf<float> inp(*be, random_vec((size_t)rows * IC, 51, -2.0f, 2.0f));  // (rows,IC)
  Buf<float> w(*be, random_vec((size_t)E * OC * IC, 52));                // (E,OC,IC)
  Buf<float> b(*be, random_vec((size_t)E * OC, 53));                     // (E,OC)
  const std::vector<float> pre0 = random_vec((size_t)rows * OC, 54),
                           out0 = random_vec((size_t)rows * OC, 55);
  Buf<float> pre(*be, pre0), out(*be, out0);  // (rows,OC) each
  be->grouped_linear_gelu_forward(as_act(pre), as_act(out), as_act(inp), w.d, b.d,
                                  P.offsets.data(), E, IC, OC);
  const std::vector<double> want_pre = grouped_linear_ref(inp.h, w.h, &b.h, P.offsets, E, IC, OC);
  std::vector<double> got_pre, got_out, want_out;
  pre.download();
  out.download();
  for (size_t i = (size_t)P.offsets[0] * OC; i < (size_t)P.offsets[E] * OC; i++) {
    got_pre.push_back(pre.h[i]);
    got_out.push_back(out.h[i]);
    want_out.push_back(gelu_ref(want_pre[i]));
  }
  expect_close("grouped_linear_gelu pre",
               got_pre, {want_pre.begin() + (size_t)P.offsets[0] * OC, want_pre.end()}, 1e-5, 1e-5);
  expect_close("grouped_linear_gelu out", got_out, want_out, 1e-5, 1e-5);
  expect_rows_untouched("grouped_linear_gelu pre", pre.h, pre0, P.offsets[0], P.offsets[E], OC);
  expect_rows_untouched("grouped_linear_gelu out", out.h, out0, P.offsets[0], P.offsets[E], OC);
}

// y = grouped_linear(gelu(pre)) + b: dpre, dweight and dbias against finite differences of
// sum(dout * y). dpre starts as garbage (the op writes it) and rows outside the experts' keep
// theirs; dweight and dbias start random (the op adds to them).
TEST(RouterOps, GeluGroupedLinearBackwardMatchesFiniteDifferences) {
  auto be = make_cpu_backend();
  GroupedGeluProblem P;
  const int E = P.E, F = P.OC, D = P.IC, rows = P.kBufferRows;  // c_proj: (E, D, F)
  Buf<float> pre(*be, random_vec((size_t)rows * F, 61, -3.0f, 3.0f));  // (rows,F)
  Buf<float> w(*be, random_vec((size_t)E * D * F, 62));                // (E,D,F)
  Buf<float> b(*be, random_vec((size_t)E * D, 65));                    // (E,D)
  Buf<float> act(*be, (size_t)rows * F), y(*be, (size_t)rows * D);
  std::vector<float> wout = random_vec((size_t)rows * D, 63);
  for (int i = 0; i < P.offsets[0] * D; i++) wout[i] = 0.0f;  // rows outside: no loss
  for (size_t i = (size_t)P.offsets[E] * D; i < wout.size(); i++) wout[i] = 0.0f;
  Buf<float> dout(*be, wout);  // (rows,D)
  auto loss = [&] {
    be->gelu_forward(as_act(act), as_act(pre), act.size());
    be->grouped_linear_forward(as_act(y), as_act(act), w.d, b.d, P.offsets.data(), E, F, D);
    return weighted_sum(wout, y.download());
  };
  loss();  // act = gelu(pre), the op's input
  const std::vector<float> dpre0 = random_vec((size_t)rows * F, 64, 50.0f, 60.0f),
                           dw0 = random_vec(w.size(), 66), db0 = random_vec(b.size(), 67);
  Buf<float> dpre(*be, dpre0), dw(*be, dw0), db(*be, db0);
  be->gelu_grouped_linear_backward(as_act(dpre), dw.d, db.d, as_act(dout), as_act(act), w.d,
                                   as_act(pre), P.offsets.data(), E, F, D);
  dpre.download();
  const std::vector<double> want = numeric_grad(pre, loss);
  std::vector<double> got_in, want_in;
  for (size_t i = (size_t)P.offsets[0] * F; i < (size_t)P.offsets[E] * F; i++) {
    got_in.push_back(dpre.h[i]);
    want_in.push_back(want[i]);
  }
  expect_close("gelu_grouped_linear dpre", got_in, want_in, kGradAtol, kGradRtol);
  expect_rows_untouched("gelu_grouped_linear dpre", dpre.h, dpre0, P.offsets[0], P.offsets[E], F);
  expect_close("gelu_grouped_linear dweight", accumulated(dw.download(), dw0),
               numeric_grad(w, loss), kGradAtol, kGradRtol);
  expect_close("gelu_grouped_linear dbias", accumulated(db.download(), db0),
               numeric_grad(b, loss), kGradAtol, kGradRtol);
}

// ---- router logits: logits = inp @ weight^T in fp32, no bias -----------------------------

std::vector<double> router_logits_ref(const std::vector<float>& inp, const std::vector<float>& w,
                                      int N, int D, int E) {
  std::vector<double> logits((size_t)N * E);
  for (int n = 0; n < N; n++)
    for (int e = 0; e < E; e++) {
      double s = 0.0;
      for (int d = 0; d < D; d++) s += (double)inp[(size_t)n * D + d] * w[(size_t)e * D + d];
      logits[(size_t)n * E + e] = s;
    }
  return logits;
}

TEST(RouterOps, RouterLogitsForwardMatchesReference) {
  auto be = make_cpu_backend();
  const int N = 37, D = 70, E = 8;  // odd sizes: a swapped transpose or stride cannot pass
  Buf<float> inp(*be, random_vec((size_t)N * D, 141));                // (N,D)
  Buf<float> w(*be, random_vec((size_t)E * D, 142));                  // (E,D)
  Buf<float> logits(*be, std::vector<float>((size_t)N * E, 123.0f));  // (N,E) overwritten
  be->router_logits_forward(logits.d, as_act(inp), w.d, N, D, E);
  expect_close("router_logits logits", to_double(logits.download()),
               router_logits_ref(inp.h, w.h, N, D, E), 1e-5, 1e-5);
  // The router used to go through linear_forward without a bias: on the CPU the logits must
  // not move by a bit.
  Buf<float> via_linear(*be, (size_t)N * E);  // (N,E)
  be->linear_forward(as_act(via_linear), as_act(inp), w.d, nullptr, N, D, E);
  expect_close("router_logits == linear (no bias)", to_double(logits.h),
               to_double(via_linear.download()), 0.0, 0.0);
}

TEST(RouterOps, RouterLogitsBackwardMatchesFiniteDifferences) {
  auto be = make_cpu_backend();
  const int N = 10, D = 8, E = 6;
  Buf<float> inp(*be, random_vec((size_t)N * D, 151));  // (N,D)
  Buf<float> w(*be, random_vec((size_t)E * D, 152));    // (E,D)
  Buf<float> logits(*be, (size_t)N * E);                // (N,E)
  std::vector<float> wl = random_vec((size_t)N * E, 153);  // loss weights = dlogits
  Buf<float> dlogits(*be, wl);                             // (N,E)
  auto loss = [&] {
    be->router_logits_forward(logits.d, as_act(inp), w.d, N, D, E);
    return weighted_sum(wl, logits.download());
  };
  // Gradient buffers start non-zero: backward must add to them.
  const std::vector<float> dinp0 = random_vec(inp.size(), 154), dw0 = random_vec(w.size(), 155);
  Buf<float> dinp(*be, dinp0), dw(*be, dw0);
  be->router_logits_backward(as_act(dinp), dw.d, dlogits.d, as_act(inp), w.d, N, D, E);
  expect_close("router_logits dinp", accumulated(dinp.download(), dinp0),
               numeric_grad(inp, loss), kGradAtol, kGradRtol);
  expect_close("router_logits dweight", accumulated(dw.download(), dw0), numeric_grad(w, loss),
               kGradAtol, kGradRtol);

  // dinp is optional (the router's input gradient may not be wanted): the weight gradient is
  // the same without it.
  Buf<float> dw_only(*be, dw0);
  be->router_logits_backward(nullptr, dw_only.d, dlogits.d, as_act(inp), w.d, N, D, E);
  expect_close("router_logits dweight (no dinp)", to_double(dw_only.download()), to_double(dw.h),
               0.0, 0.0);
  // As for the forward: the same bits as linear_backward without a bias gradient.
  Buf<float> dinp_linear(*be, dinp0), dw_linear(*be, dw0);
  be->linear_backward(as_act(dinp_linear), dw_linear.d, nullptr, as_act(dlogits), as_act(inp),
                      w.d, N, D, E);
  expect_close("router_logits dinp == linear", to_double(dinp.h),
               to_double(dinp_linear.download()), 0.0, 0.0);
  expect_close("router_logits dweight == linear", to_double(dw.h),
               to_double(dw_linear.download()), 0.0, 0.0);
}

// ---- softmax -----------------------------------------------------------------------------

TEST(RouterOps, SoftmaxForwardMatchesReference) {
  auto be = make_cpu_backend();
  const int N = 7, E = 5;
  std::vector<float> x = random_vec((size_t)N * E, 21, -3.0f, 3.0f);
  for (int e = 0; e < E; e++) {  // huge logits: the max subtraction must keep exp finite
    x[(size_t)1 * E + e] += 1000.0f;
    x[(size_t)2 * E + e] -= 1000.0f;
  }
  Buf<float> logits(*be, x), probs(*be, (size_t)N * E), lse(*be, (size_t)N);
  be->softmax_forward(probs.d, lse.d, logits.d, N, E);
  std::vector<double> p_ref((size_t)N * E), lse_ref(N);
  for (int n = 0; n < N; n++) {
    double m = *std::max_element(&x[(size_t)n * E], &x[(size_t)n * E] + E), s = 0.0;
    for (int e = 0; e < E; e++) s += std::exp((double)x[(size_t)n * E + e] - m);
    lse_ref[n] = m + std::log(s);
    for (int e = 0; e < E; e++) p_ref[(size_t)n * E + e] = std::exp(x[(size_t)n * E + e] - lse_ref[n]);
  }
  expect_close("softmax probs", to_double(probs.download()), p_ref, 1e-6, 1e-5);
  expect_close("softmax lse", to_double(lse.download()), lse_ref, 1e-5, 1e-6);
}

TEST(RouterOps, SoftmaxBackwardFiniteDifference) {
  auto be = make_cpu_backend();
  const int N = 6, E = 5;
  Buf<float> logits(*be, random_vec((size_t)N * E, 31, -2.0f, 2.0f));  // (N,E)
  Buf<float> probs(*be, (size_t)N * E), lse(*be, (size_t)N);
  std::vector<float> wp = random_vec((size_t)N * E, 32);
  Buf<float> dprobs(*be, wp);  // (N,E)
  auto loss = [&] {
    be->softmax_forward(probs.d, lse.d, logits.d, N, E);
    return weighted_sum(wp, probs.download());
  };
  loss();  // probs at the unperturbed point
  std::vector<float> base = random_vec((size_t)N * E, 33);
  Buf<float> dlogits(*be, base);
  be->softmax_backward(dlogits.d, dprobs.d, probs.d, N, E);
  expect_close("softmax dlogits", accumulated(dlogits.download(), base),
               numeric_grad(logits, loss), kGradAtol, kGradRtol);
}

// ---- top-k -------------------------------------------------------------------------------

TEST(RouterOps, TopkForwardMatchesReference) {
  auto be = make_cpu_backend();
  const int N = 9, E = 6;
  // Softmax of random logits, plus a row with exact ties: lower ids must win them.
  std::vector<float> x = random_vec((size_t)N * E, 41, -2.0f, 2.0f);
  Buf<float> logits(*be, x), probs(*be, (size_t)N * E), lse(*be, (size_t)N);
  be->softmax_forward(probs.d, lse.d, logits.d, N, E);
  probs.download();
  const float tie_row[E] = {0.1f, 0.25f, 0.1f, 0.25f, 0.2f, 0.1f};
  std::copy(tie_row, tie_row + E, probs.h.begin());
  probs.upload();
  for (int K : {1, 2, 3}) {
    Buf<int> idx(*be, (size_t)N * K);
    Buf<float> gates(*be, (size_t)N * K);
    be->topk_forward(idx.d, gates.d, probs.d, N, E, K);
    idx.download();
    std::vector<double> g_ref((size_t)N * K);
    int wrong = 0;
    for (int n = 0; n < N; n++) {
      const float* p = &probs.h[(size_t)n * E];
      std::vector<int> order(E);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
      double s = 0.0;
      for (int k = 0; k < K; k++) s += p[order[k]];
      for (int k = 0; k < K; k++) {
        wrong += idx.h[(size_t)n * K + k] != order[k];
        g_ref[(size_t)n * K + k] = K == 1 ? p[order[k]] : p[order[k]] / s;
      }
    }
    std::printf("  topk K=%d wrong indices = %d\n", K, wrong);
    EXPECT_EQ(wrong, 0);
    // The tie row, written out: 0.25 at ids 1 and 3, then 0.2 at 4.
    const int tie_want[3] = {1, 3, 4};
    for (int k = 0; k < K; k++) EXPECT_EQ(idx.h[k], tie_want[k]) << "K=" << K << " k=" << k;
    expect_close("topk gates K=" + std::to_string(K), to_double(gates.download()), g_ref, 1e-6,
                 1e-5);
  }
}

TEST(RouterOps, TopkBackwardFiniteDifference) {
  auto be = make_cpu_backend();
  const int N = 5, E = 6;
  // Each row is a shuffle of well separated values (gaps 0.05 >> step 1e-3), so the chosen
  // experts never change under the perturbation.
  std::mt19937 rng(51);
  std::vector<float> p((size_t)N * E);
  for (int n = 0; n < N; n++) {
    std::vector<int> perm(E);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int e = 0; e < E; e++) p[(size_t)n * E + e] = 0.05f + 0.05f * perm[e];
  }
  for (int K : {1, 2, 3}) {
    Buf<float> probs(*be, p);  // (N,E)
    Buf<int> idx(*be, (size_t)N * K);
    Buf<float> gates(*be, (size_t)N * K);
    std::vector<float> wg = random_vec((size_t)N * K, 52 + K);
    Buf<float> dgates(*be, wg);
    auto loss = [&] {
      be->topk_forward(idx.d, gates.d, probs.d, N, E, K);
      return weighted_sum(wg, gates.download());
    };
    loss();
    std::vector<float> base = random_vec((size_t)N * E, 60 + K);
    Buf<float> dprobs(*be, base);
    be->topk_backward(dprobs.d, dgates.d, idx.d, probs.d, N, E, K);
    expect_close("topk dprobs K=" + std::to_string(K), accumulated(dprobs.download(), base),
                 numeric_grad(probs, loss), kGradAtol, kGradRtol);
  }
}

// ---- capacity ----------------------------------------------------------------------------

struct CapacityResult {
  std::vector<int> slot, counts, choices;
};

CapacityResult run_capacity(Backend& be, const std::vector<int>& expert_idx,
                            const std::vector<float>& gates, int N, int E, int K, int capacity,
                            DropPolicy policy) {
  Buf<int> idx(be, expert_idx);  // (N,K)
  Buf<float> g(be, gates);       // (N,K)
  CapacityResult r{std::vector<int>((size_t)N * K, 99), std::vector<int>(E, 99),
                   std::vector<int>(E, 99)};
  be.capacity_assign(r.slot.data(), r.counts.data(), r.choices.data(), idx.d, g.d, N, E, K,
                     capacity, policy);
  return r;
}

// Compares against the layout written by hand; prints the number of mismatching entries.
void expect_capacity(const std::string& what, const CapacityResult& got,
                     const std::vector<int>& slot, const std::vector<int>& counts,
                     const std::vector<int>& choices) {
  auto mismatches = [](const std::vector<int>& a, const std::vector<int>& b) {
    if (a.size() != b.size()) return (int)std::max(a.size(), b.size());
    int m = 0;
    for (size_t i = 0; i < a.size(); i++) m += a[i] != b[i];
    return m;
  };
  int ms = mismatches(got.slot, slot), mc = mismatches(got.counts, counts),
      mh = mismatches(got.choices, choices);
  std::printf("  %-40s mismatches slot/counts/choices = %d/%d/%d\n", what.c_str(), ms, mc, mh);
  EXPECT_EQ(got.slot, slot) << what;
  EXPECT_EQ(got.counts, counts) << what;
  EXPECT_EQ(got.choices, choices) << what;
}

TEST(RouterCapacity, CapacityOneAllTokensToOneExpert) {
  auto be = make_cpu_backend();
  // 4 tokens, top-1, all to expert 1 of 3.
  std::vector<int> idx{1, 1, 1, 1};
  std::vector<float> g{0.3f, 0.9f, 0.5f, 0.9f};
  expect_capacity("position, C=1", run_capacity(*be, idx, g, 4, 3, 1, 1, DropPolicy::kPosition),
                  {0, -1, -1, -1}, {0, 1, 0}, {0, 4, 0});
  // probs: the highest gate wins; the 0.9 tie goes to the earlier token.
  expect_capacity("probs, C=1", run_capacity(*be, idx, g, 4, 3, 1, 1, DropPolicy::kProbs),
                  {-1, 0, -1, -1}, {0, 1, 0}, {0, 4, 0});
  expect_capacity("position, C=0", run_capacity(*be, idx, g, 4, 3, 1, 0, DropPolicy::kPosition),
                  {-1, -1, -1, -1}, {0, 0, 0}, {0, 4, 0});
}

TEST(RouterCapacity, PositionPolicyPlacesFirstChoicesFirst) {
  auto be = make_cpu_backend();
  // 4 tokens, top-2 over 2 experts, capacity 2. First choices: t0,t1 -> e0; t2,t3 -> e1: they
  // fill both experts, so every second choice is dropped (in token order t0's second choice
  // would have taken a place of e1 instead).
  std::vector<int> idx{0, 1, 0, 1, 1, 0, 1, 0};  // (4,2)
  std::vector<float> g{0.6f, 0.4f, 0.7f, 0.3f, 0.8f, 0.2f, 0.55f, 0.45f};
  expect_capacity("position, first choices fill",
                  run_capacity(*be, idx, g, 4, 2, 2, 2, DropPolicy::kPosition),
                  {0, -1, 1, -1, 0, -1, 1, -1}, {2, 2}, {4, 4});
  // 3 tokens over 3 experts, capacity 2: rank 0 places t0->e0 (0), t1->e0 (1), t2->e1 (0);
  // rank 1 places t0->e1 (1), t1->e2 (0), and t2->e0 finds e0 full.
  std::vector<int> idx2{0, 1, 0, 2, 1, 0};
  std::vector<float> g2{0.6f, 0.4f, 0.5f, 0.5f, 0.9f, 0.1f};
  expect_capacity("position, mixed", run_capacity(*be, idx2, g2, 3, 3, 2, 2, DropPolicy::kPosition),
                  {0, 1, 1, 0, 0, -1}, {2, 2, 1}, {3, 2, 1});
}

TEST(RouterCapacity, ProbsPolicyKeepsHighestGates) {
  auto be = make_cpu_backend();
  // Top-1, all to e0, capacity 2: the later tokens carry the higher gates and are kept,
  // numbered in token order.
  std::vector<int> idx{0, 0, 0, 0};
  std::vector<float> g{0.1f, 0.2f, 0.9f, 0.8f};
  expect_capacity("probs, later tokens win", run_capacity(*be, idx, g, 4, 2, 1, 2, DropPolicy::kProbs),
                  {-1, -1, 0, 1}, {2, 0}, {4, 0});
  expect_capacity("position, same input", run_capacity(*be, idx, g, 4, 2, 1, 2, DropPolicy::kPosition),
                  {0, 1, -1, -1}, {2, 0}, {4, 0});
  // Top-2: a second choice with a high gate beats a first choice with a low one.
  //   e0 gets t0k0 (0.55), t1k1 (0.1), t2k1 (0.4): keeps t0k0, t2k1.
  //   e1 gets t1k0 (0.9), t2k0 (0.6), t0k1 (0.45): keeps t1k0, t2k0.
  // Kept choices are numbered rank 0 first, then rank 1.
  std::vector<int> idx2{0, 1, 1, 0, 1, 0};
  std::vector<float> g2{0.55f, 0.45f, 0.9f, 0.1f, 0.6f, 0.4f};
  expect_capacity("probs, top-2", run_capacity(*be, idx2, g2, 3, 2, 2, 2, DropPolicy::kProbs),
                  {0, -1, 0, -1, 1, 1}, {2, 2}, {3, 3});
  expect_capacity("position, top-2", run_capacity(*be, idx2, g2, 3, 2, 2, 2, DropPolicy::kPosition),
                  {0, -1, 0, 1, 1, -1}, {2, 2}, {3, 3});
}

TEST(RouterCapacity, DroplessAndExactCapacityKeepEverything) {
  auto be = make_cpu_backend();
  std::vector<int> idx{0, 1, 1, 0, 1, 0};  // (3,2)
  std::vector<float> g{0.55f, 0.45f, 0.9f, 0.1f, 0.6f, 0.4f};
  // e0: t0k0 -> 0, t1k1 -> 1, t2k1 -> 2; e1: t1k0 -> 0, t2k0 -> 1, t0k1 -> 2.
  const std::vector<int> all{0, 2, 0, 1, 1, 2};
  for (DropPolicy pol : {DropPolicy::kPosition, DropPolicy::kProbs}) {
    std::string name = pol == DropPolicy::kPosition ? "position" : "probs";
    expect_capacity(name + ", dropless", run_capacity(*be, idx, g, 3, 2, 2, -1, pol), all, {3, 3},
                    {3, 3});
    expect_capacity(name + ", C = demand", run_capacity(*be, idx, g, 3, 2, 2, 3, pol), all,
                    {3, 3}, {3, 3});
  }
  // A large dropless case: counts add up to N*K and each expert's slots are 0..counts-1.
  const int N = 50, E = 4, K = 2;
  std::vector<int> big((size_t)N * K);
  for (int t = 0; t < N; t++) {
    big[(size_t)t * K] = (t * 7) % E;
    big[(size_t)t * K + 1] = (t * 7 + 1 + t % 3) % E;
  }
  auto r = run_capacity(*be, big, random_vec((size_t)N * K, 71, 0.0f, 1.0f), N, E, K, -1,
                        DropPolicy::kProbs);
  std::vector<std::vector<int>> seen(E);
  for (int i = 0; i < N * K; i++) seen[big[i]].push_back(r.slot[i]);
  int bad = 0;
  for (int e = 0; e < E; e++) {
    std::sort(seen[e].begin(), seen[e].end());
    bad += r.counts[e] != (int)seen[e].size() || r.choices[e] != r.counts[e];
    for (int j = 0; j < (int)seen[e].size(); j++) bad += seen[e][j] != j;
  }
  std::printf("  dropless N=%d bad slots/counts = %d\n", N, bad);
  EXPECT_EQ(bad, 0);
}

// ---- auxiliary-loss helpers --------------------------------------------------------------

TEST(RouterOps, ColumnSumsAndAddRowVector) {
  auto be = make_cpu_backend();
  const int N = 600, E = 4;  // more rows than one summation block
  Buf<float> x(*be, random_vec((size_t)N * E, 81));
  std::vector<double> sums(E, -1.0), ref(E, 0.0);
  be->column_sums(sums.data(), x.d, N, E);
  for (int n = 0; n < N; n++)
    for (int e = 0; e < E; e++) ref[e] += x.h[(size_t)n * E + e];
  expect_close("column_sums", sums, ref, 1e-10, 1e-12);

  std::vector<float> v = random_vec(E, 82);
  be->add_row_vector(x.d, v.data(), N, E);
  std::vector<double> want((size_t)N * E);
  for (int n = 0; n < N; n++)
    for (int e = 0; e < E; e++) want[(size_t)n * E + e] = x.h[(size_t)n * E + e] + v[e];
  expect_close("add_row_vector", to_double(x.download()), want, 1e-6, 1e-6);
}

TEST(RouterOps, ZlossBackwardFiniteDifference) {
  auto be = make_cpu_backend();
  const int N = 6, E = 5;
  const float scale = 0.37f;
  Buf<float> logits(*be, random_vec((size_t)N * E, 91, -2.0f, 3.0f));  // (N,E)
  Buf<float> probs(*be, (size_t)N * E), lse(*be, (size_t)N);
  auto loss = [&] {  // scale * sum_n lse_n^2
    be->softmax_forward(probs.d, lse.d, logits.d, N, E);
    double s = 0.0;
    for (float l : lse.download()) s += (double)l * l;
    return scale * s;
  };
  loss();
  std::vector<float> base = random_vec((size_t)N * E, 92);
  Buf<float> dlogits(*be, base);
  be->zloss_backward(dlogits.d, probs.d, lse.d, scale, N, E);
  expect_close("zloss dlogits", accumulated(dlogits.download(), base), numeric_grad(logits, loss),
               kGradAtol, kGradRtol);
}

// ---- permutation and combine -------------------------------------------------------------

TEST(RouterOps, GatherScatterAdjoint) {
  auto be = make_cpu_backend();
  const int N = 5, D = 37;  // D spans several column blocks, the last one partial
  // Token 2 appears three times, token 4 never: repeated destinations in the scatter.
  std::vector<int> rows_idx{2, 0, 2, 3, 1, 2, 0, 3};
  const int R = (int)rows_idx.size();
  Buf<float> x(*be, random_vec((size_t)N * D, 101));  // (N,D)
  Buf<float> g(*be, (size_t)R * D);                   // (R,D)
  be->gather_rows(as_act(g), as_act(x), rows_idx.data(), R, D);
  std::vector<double> g_ref((size_t)R * D);
  for (int r = 0; r < R; r++)
    for (int c = 0; c < D; c++) g_ref[(size_t)r * D + c] = x.h[(size_t)rows_idx[r] * D + c];
  expect_close("gather_rows", to_double(g.download()), g_ref, 0.0, 0.0);

  Buf<float> y(*be, random_vec((size_t)R * D, 102));  // (R,D)
  std::vector<float> base = random_vec((size_t)N * D, 103);
  Buf<float> dx(*be, base);  // (N,D)
  be->scatter_add_rows(as_act(dx), as_act(y), rows_idx.data(), R, D);
  std::vector<double> s_ref((size_t)N * D, 0.0);
  for (int r = 0; r < R; r++)
    for (int c = 0; c < D; c++) s_ref[(size_t)rows_idx[r] * D + c] += y.h[(size_t)r * D + c];
  expect_close("scatter_add_rows", accumulated(dx.download(), base), s_ref, 1e-6, 1e-6);

  // Adjointness: <gather(x), y> == <x, scatter(y)>.
  Buf<float> sy(*be, (size_t)N * D);
  be->scatter_add_rows(as_act(sy), as_act(y), rows_idx.data(), R, D);
  double lhs = weighted_sum(g.h, y.h), rhs = weighted_sum(x.h, sy.download());
  expect_close("<gather x, y> - <x, scatter y>", {lhs}, {rhs}, 1e-5, 1e-6);
}

std::vector<double> combine_ref(const std::vector<float>& y, const std::vector<float>& gates,
                                const std::vector<int>& row, int N, int K, int D) {
  std::vector<double> out((size_t)N * D, 0.0);
  for (int t = 0; t < N; t++)
    for (int k = 0; k < K; k++) {
      int r = row[(size_t)t * K + k];
      if (r < 0) continue;
      for (int c = 0; c < D; c++)
        out[(size_t)t * D + c] += (double)gates[(size_t)t * K + k] * y[(size_t)r * D + c];
    }
  return out;
}

struct CombineProblem {
  static constexpr int N = 6, K = 2, D = 37, R = 9;
  // Token 3 lost both choices (outputs 0); tokens 1 and 5 lost one; y row 8 is unused.
  std::vector<int> row{0, 4, 1, -1, 2, 5, -1, -1, 3, 6, -1, 7};  // (N,K)
};

TEST(RouterOps, CombineForwardMatchesReference) {
  auto be = make_cpu_backend();
  CombineProblem P;
  const int N = P.N, K = P.K, D = P.D, R = P.R;
  Buf<float> y(*be, random_vec((size_t)R * D, 111));                // (R,D)
  Buf<float> gates(*be, random_vec((size_t)N * K, 112, 0.0f, 1.0f));  // (N,K)
  Buf<float> out(*be, std::vector<float>((size_t)N * D, 123.0f));    // (N,D) stale values
  be->combine_forward(as_act(out), as_act(y), gates.d, P.row.data(), N, K, D);
  expect_close("combine out", to_double(out.download()), combine_ref(y.h, gates.h, P.row, N, K, D),
               1e-6, 1e-6);
  for (int c = 0; c < D; c++) EXPECT_EQ(out.h[(size_t)3 * D + c], 0.0f);  // fully dropped token
}

TEST(RouterOps, CombineBackwardFiniteDifference) {
  auto be = make_cpu_backend();
  CombineProblem P;
  const int N = P.N, K = P.K, D = P.D, R = P.R;
  Buf<float> y(*be, random_vec((size_t)R * D, 121));                  // (R,D)
  Buf<float> gates(*be, random_vec((size_t)N * K, 122, 0.0f, 1.0f));  // (N,K)
  Buf<float> out(*be, (size_t)N * D);                                 // (N,D)
  std::vector<float> wout = random_vec((size_t)N * D, 123);
  Buf<float> dout(*be, wout);
  auto loss = [&] {
    be->combine_forward(as_act(out), as_act(y), gates.d, P.row.data(), N, K, D);
    return weighted_sum(wout, out.download());
  };
  std::vector<float> dy0 = random_vec(y.size(), 124), dg0 = random_vec(gates.size(), 125);
  Buf<float> dy(*be, dy0), dg(*be, dg0);
  be->combine_backward(as_act(dy), dg.d, as_act(dout), as_act(y), gates.d, P.row.data(), N, K, D);
  expect_close("combine dy", accumulated(dy.download(), dy0), numeric_grad(y, loss), kGradAtol,
               kGradRtol);
  expect_close("combine dgates", accumulated(dg.download(), dg0), numeric_grad(gates, loss),
               kGradAtol, kGradRtol);
  // Dropped choices get no gradient at all, bit for bit.
  for (int i = 0; i < N * K; i++) {
    if (P.row[i] < 0) {
      EXPECT_EQ(dg.h[i], dg0[i]) << "dropped choice " << i;
    }
  }
}

}  // namespace
}  // namespace moe
