// Test helpers for gradients: central finite differences in double, and an elementwise
// comparison that always prints the worst difference it saw.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace moe::test {

// d loss / d x[i] for every i by central differences: (loss(x + h e_i) - loss(x - h e_i)) / 2h.
// loss(x) returns a double; it is called with x perturbed in place (one element at a time),
// and x is restored afterwards. The step is the one fp32 can actually represent, so the
// quotient divides by the true perturbation, not the intended one.
template <class Loss>
std::vector<double> finite_differences(Loss&& loss, std::vector<float>& x, double eps = 1e-3) {
  std::vector<double> grad(x.size());
  for (size_t i = 0; i < x.size(); i++) {
    const float saved = x[i];
    const float plus = static_cast<float>(saved + eps);
    const float minus = static_cast<float>(saved - eps);
    x[i] = plus;
    const double loss_plus = loss(x);
    x[i] = minus;
    const double loss_minus = loss(x);
    x[i] = saved;
    grad[i] = (loss_plus - loss_minus) / (static_cast<double>(plus) - minus);
  }
  return grad;
}

// sum(w * y) in double: the random scalar loss whose gradient with respect to y is w.
template <class W, class Y>
double dot(const std::vector<W>& w, const std::vector<Y>& y) {
  double sum = 0.0;
  for (size_t i = 0; i < y.size(); i++) sum += static_cast<double>(w[i]) * y[i];
  return sum;
}

// Passes when |got - want| <= abs_tol + rel_tol * |want| for every element. Prints
// "<what>: worst abs diff X at i (got, want), worst rel diff Y at j" either way.
template <class Got, class Want>
::testing::AssertionResult expect_close(const std::string& what, const std::vector<Got>& got,
                                        const std::vector<Want>& want, double abs_tol,
                                        double rel_tol) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << what << ": size " << got.size() << " vs "
                                         << want.size();
  }
  double worst_abs = 0.0, worst_rel = 0.0;
  size_t worst_abs_i = 0, worst_rel_i = 0;
  size_t num_bad = 0, first_bad = 0;
  for (size_t i = 0; i < got.size(); i++) {
    const double g = static_cast<double>(got[i]);
    const double w = static_cast<double>(want[i]);
    const double diff = std::fabs(g - w);
    const double rel = diff / std::max(std::fabs(w), 1e-30);
    // NaN compares false everywhere, so test for "not within" rather than "beyond".
    const bool ok = diff <= abs_tol + rel_tol * std::fabs(w);
    if (!ok && num_bad++ == 0) first_bad = i;
    if (!(diff <= worst_abs)) { worst_abs = diff; worst_abs_i = i; }
    if (diff > abs_tol && !(rel <= worst_rel)) { worst_rel = rel; worst_rel_i = i; }
  }
  std::printf("  %-28s n=%-5zu worst abs diff %.3e at %zu (got %.7g, want %.7g)",
              what.c_str(), got.size(), worst_abs, worst_abs_i,
              got.empty() ? 0.0 : static_cast<double>(got[worst_abs_i]),
              want.empty() ? 0.0 : static_cast<double>(want[worst_abs_i]));
  if (worst_rel > 0.0) std::printf(", worst rel diff %.3e at %zu", worst_rel, worst_rel_i);
  std::printf("\n");
  if (num_bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << ": " << num_bad << " of " << got.size() << " elements differ beyond abs "
         << abs_tol << " + rel " << rel_tol << "; first at " << first_bad << ": got "
         << static_cast<double>(got[first_bad]) << ", want "
         << static_cast<double>(want[first_bad]);
}

// Uniform random floats in [lo, hi), from a fixed seed so failures reproduce.
inline std::vector<float> random_vector(size_t n, std::mt19937& rng, float lo = -1.0f,
                                        float hi = 1.0f) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

}  // namespace moe::test
