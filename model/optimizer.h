// AdamW with torch.optim.AdamW semantics and the learning-rate schedule (DESIGN.md,
// Optimizer and schedule). The moments share the parameters' flat layout.
#pragma once

#include <cstdint>
#include <string>

#include "core/backend.h"
#include "core/buffer.h"
#include "model/parameters.h"

namespace moe {

enum class LrDecayStyle { kConstant, kLinear, kCosine };
LrDecayStyle parse_lr_decay_style(const std::string& text);  // UsageError on unknown names

struct LrSchedule {
  double lr = 3e-4;
  double min_lr = 0.0;
  int64_t warmup_iters = 0;
  int64_t train_iters = 1;
  LrDecayStyle decay_style = LrDecayStyle::kCosine;

  // The rate at 1-based iteration k: warmup lr*k/W for k <= W, then the decay from lr down to
  // min_lr at train_iters.
  double at(int64_t iteration) const;
};

struct AdamWHyper {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
};

class AdamW {
 public:
  AdamW(Backend& backend, const ParamLayout& layout, const AdamWHyper& hyper);
  // One update of every tensor; `step` is the 1-based count of updates so far (bias
  // correction). Decay applies to tensors with two or more dimensions only.
  void update(float* params, const float* grads, double lr, int64_t step);
  float* m() { return m_.data(); }  // (layout.total_floats())
  float* v() { return v_.data(); }  // (layout.total_floats())

 private:
  Backend& backend_;
  const ParamLayout& layout_;
  AdamWHyper hyper_;
  Buffer<float> m_;
  Buffer<float> v_;
};

// The factor that brings a gradient of norm `norm` to at most `max_norm` (torch's
// clip_grad_norm_: max_norm / (norm + 1e-6), capped at 1); 1 when max_norm <= 0.
double clip_factor(double norm, double max_norm);

}  // namespace moe
