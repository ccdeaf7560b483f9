// Counter-based randomness: every draw is a pure function of a key, never of a hidden state.
//
// DESIGN.md wants initialization to depend only on (seed, tensor name, element index) and the
// data shuffle and router jitter only on (seed, iteration, layer, global token or window index),
// so that every layout draws the same numbers and a restart needs no saved generator. The
// recipe: hash the tuple that names a draw into a 64-bit key with `random_key`, then turn the
// key into a number with `uniform_double`, `uniform_below`, `standard_normal`, ...
//
//   uint64_t tensor_key = random_key({seed, hash_string("h.0.attn.c_attn.weight")});
//   float w = sigma * truncated_normal(random_key({tensor_key, element_index}), 2.0f);
//
// Give each purpose its own tag (a `hash_string` of a name) so two purposes with the same
// numbers in their tuple never share draws. The hashes are splitmix64 (Steele et al.) and
// FNV-1a; they are fast and well mixed, not cryptographic.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string_view>

namespace moe {

// splitmix64: adds the golden-ratio increment, then the avalanche finaliser; a bijection on
// 64-bit values in which every input bit flips about half the output bits.
constexpr uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Folds `value` into the running hash `seed`. Order matters: combine(combine(s, a), b) differs
// from combine(combine(s, b), a).
constexpr uint64_t hash_combine(uint64_t seed, uint64_t value) {
  return mix64(seed ^ mix64(value));
}

// FNV-1a, 64-bit: turns a name (a tensor name, a purpose tag) into a key component.
constexpr uint64_t hash_string(std::string_view text) {
  uint64_t hash = 0xcbf29ce484222325ull;
  for (char c : text) {
    hash ^= static_cast<unsigned char>(c);
    hash *= 0x100000001b3ull;
  }
  return hash;
}

// The key of a draw named by a tuple, e.g. random_key({seed, tag, epoch, i}). Tuples of
// different lengths give different keys ({a} vs {a, 0}).
constexpr uint64_t random_key(std::initializer_list<uint64_t> parts) {
  uint64_t hash = 0x6a09e667f3bcc909ull;  // sqrt(2) bits: any fixed non-zero start
  for (uint64_t part : parts) hash = hash_combine(hash, part);
  return hash;
}

// The key's 64 random bits. Mixed once more so that raw counters (key, key+1, ...) are fine too.
constexpr uint64_t random_bits(uint64_t key) { return mix64(key ^ 0xd1b54a32d192ed03ull); }

// Uniform in [0, 1) from 53 random bits: every double of the form m * 2^-53.
constexpr double uniform_double(uint64_t key) {
  return static_cast<double>(random_bits(key) >> 11) * 0x1.0p-53;
}

// Uniform in [0, 1) from 24 random bits: every float of the form m * 2^-24.
constexpr float uniform_float(uint64_t key) {
  return static_cast<float>(random_bits(key) >> 40) * 0x1.0p-24f;
}

// Uniform integer in [0, bound), bound >= 1, by Lemire's multiply-high. The bias is below
// bound / 2^64, far under anything a test or a training run could detect.
constexpr uint64_t uniform_below(uint64_t key, uint64_t bound) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(random_bits(key)) * bound) >> 64);
}

// Standard normal N(0, 1) by Box-Muller on two uniforms derived from the key.
double standard_normal(uint64_t key);

// N(0, 1) conditioned on |x| <= cut (cut > 0, in standard deviations), by rejection: attempt
// a draws standard_normal(random_key({key, a})) until one lands inside. Exactly the truncated
// normal in distribution (like torch.nn.init.trunc_normal_ with a = -cut, b = cut).
float truncated_normal(uint64_t key, float cut);

}  // namespace moe
