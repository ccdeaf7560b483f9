#pragma once

namespace moe {

// Capacity per expert, C = ceil(cf * S * k / E) (DESIGN.md, Router); -1 when cf == 0 (dropless).
int expert_capacity(double capacity_factor, int num_tokens, int top_k, int num_experts);

}  // namespace moe
