// Activations: the tensors that flow between ops (layer inputs and outputs, their gradients,
// the rows the experts exchange), stored in the backend's activation type: fp32 on the CPU
// backend (the ground truth), bf16 on the CUDA backend (half the bytes of every elementwise
// pass, GEMM operand and all-to-all). Weights, gradients, optimizer state, the router and the
// losses stay fp32 (`float*`) on every backend.
//
// `Act` is an incomplete type: outside a backend, activation memory can be passed around but
// not read, written or indexed by mistake; offsets go through act_at with the element width.
#pragma once

#include <cstddef>

namespace moe {

struct Act;

enum class ActType { kF32, kBF16 };

inline size_t act_bytes(ActType type) { return type == ActType::kF32 ? 4 : 2; }
inline const char* act_type_name(ActType type) { return type == ActType::kF32 ? "fp32" : "bf16"; }

// Element `index` of activation memory whose elements are `type`.
inline Act* act_at(Act* base, size_t index, ActType type) {
  return reinterpret_cast<Act*>(reinterpret_cast<char*>(base) + index * act_bytes(type));
}
inline const Act* act_at(const Act* base, size_t index, ActType type) {
  return reinterpret_cast<const Act*>(reinterpret_cast<const char*>(base) +
                                      index * act_bytes(type));
}

// fp32 memory seen as activations, and back: only where the activation type is kF32 (inside
// the CPU backend, and tests that hand the CPU backend host vectors).
inline Act* f32_act(float* p) { return reinterpret_cast<Act*>(p); }
inline const Act* f32_act(const float* p) { return reinterpret_cast<const Act*>(p); }
inline float* act_f32(Act* p) { return reinterpret_cast<float*>(p); }
inline const float* act_f32(const Act* p) { return reinterpret_cast<const float*>(p); }

}  // namespace moe
