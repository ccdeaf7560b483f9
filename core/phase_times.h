// Wall time per phase of a training step, for the time breakdowns of the scaling benchmarks.
// A ScopedPhase adds the time of its scope to one phase; the owner reads and resets the sums.
#pragma once

#include <array>
#include <chrono>

namespace moe {

enum class Phase { kRouter, kPermute, kAllToAll, kExpertGemm, kCombine, kGradReduce, kCount };

inline const char* phase_name(Phase phase) {
  static constexpr const char* kNames[] = {"router",      "permute", "all_to_all",
                                           "expert_gemm", "combine", "grad_allreduce"};
  return kNames[static_cast<int>(phase)];
}

class PhaseTimes {
 public:
  void add(Phase phase, double ms) { ms_[static_cast<int>(phase)] += ms; }
  double ms(Phase phase) const { return ms_[static_cast<int>(phase)]; }
  void reset() { ms_.fill(0.0); }

 private:
  std::array<double, static_cast<int>(Phase::kCount)> ms_{};
};

class ScopedPhase {
 public:
  ScopedPhase(PhaseTimes& times, Phase phase)
      : times_(times), phase_(phase), start_(std::chrono::steady_clock::now()) {}
  ~ScopedPhase() {
    times_.add(phase_, std::chrono::duration<double, std::milli>(
                           std::chrono::steady_clock::now() - start_).count());
  }
  ScopedPhase(const ScopedPhase&) = delete;
  ScopedPhase& operator=(const ScopedPhase&) = delete;

 private:
  PhaseTimes& times_;
  Phase phase_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace moe
