#include "model/optimizer.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.h"

namespace moe {

LrDecayStyle parse_lr_decay_style(const std::string& text) {
  if (text == "constant") return LrDecayStyle::kConstant;
  if (text == "linear") return LrDecayStyle::kLinear;
  if (text == "cosine") return LrDecayStyle::kCosine;
  throw UsageError("--lr-decay-style must be constant, linear or cosine, not \"" + text + "\"");
}

double LrSchedule::at(int64_t iteration) const {
  if (warmup_iters > 0 && iteration <= warmup_iters)
    return lr * static_cast<double>(iteration) / static_cast<double>(warmup_iters);
  if (decay_style == LrDecayStyle::kConstant || train_iters <= warmup_iters) return lr;
  const double progress =
      std::clamp(static_cast<double>(iteration - warmup_iters) /
                     static_cast<double>(train_iters - warmup_iters),
                 0.0, 1.0);
  const double shape = decay_style == LrDecayStyle::kLinear
                           ? 1.0 - progress
                           : 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  return min_lr + (lr - min_lr) * shape;
}

AdamW::AdamW(Backend& backend, const ParamLayout& layout, const AdamWHyper& hyper)
    : backend_(backend), layout_(layout), hyper_(hyper),
      m_(backend, layout.total_floats()), v_(backend, layout.total_floats()) {}

void AdamW::update(float* params, const float* grads, double lr, int64_t step) {
  for (const ParamEntry& entry : layout_.entries()) {
    const double decay = entry.weight_decay() ? hyper_.weight_decay : 0.0;
    backend_.adamw_update(params + entry.offset, grads + entry.offset, m_.data() + entry.offset,
                          v_.data() + entry.offset, entry.numel, static_cast<float>(lr),
                          static_cast<float>(hyper_.beta1), static_cast<float>(hyper_.beta2),
                          static_cast<float>(hyper_.eps), static_cast<float>(decay),
                          static_cast<int>(step));
  }
}

double clip_factor(double norm, double max_norm) {
  if (max_norm <= 0.0) return 1.0;
  return std::min(1.0, max_norm / (norm + 1e-6));
}

}  // namespace moe
