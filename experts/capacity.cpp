#include "experts/capacity.h"

#include <cmath>

namespace moe {

int expert_capacity(double capacity_factor, int num_tokens, int top_k, int num_experts) {
  if (capacity_factor <= 0.0) return -1;  // dropless
  return static_cast<int>(std::ceil(capacity_factor * num_tokens * top_k / num_experts));
}

}  // namespace moe
