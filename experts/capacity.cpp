#include "experts/capacity.h"

#include <cmath>

namespace moe {

int expert_capacity(double capacity_factor, int num_tokens, int top_k, int num_experts) {
  if (capacity_factor <= 0.0) return -1;  // dropless
  // An expert never receives more than one choice per token, so capping at S changes nothing
  // and keeps a huge factor from overflowing int.
  const double capacity = std::ceil(capacity_factor * num_tokens * top_k / num_experts);
  return capacity >= num_tokens ? num_tokens : static_cast<int>(capacity);
}

}  // namespace moe
