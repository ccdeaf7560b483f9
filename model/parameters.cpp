#include "model/parameters.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/random.h"

namespace moe {

size_t ParamEntry::full_index(size_t local_index) const {
  if (!is_sharded()) return local_index;
  // Split the index into (outer, along dim, inner) around the shard dimension.
  size_t inner = 1;
  for (size_t d = shard.dim + 1; d < shape.size(); ++d) inner *= static_cast<size_t>(shape[d]);
  const size_t local_dim = static_cast<size_t>(shape[shard.dim]);
  const size_t full_dim = static_cast<size_t>(full_shape[shard.dim]);
  const size_t outer = local_index / (local_dim * inner);
  const size_t along = local_index / inner % local_dim;
  const size_t within = local_index % inner;
  const size_t piece = local_dim / shard.blocks;  // this rank's piece of one block
  const size_t block = along / piece;
  const size_t full_along = block * (full_dim / shard.blocks) + shard.part * piece + along % piece;
  return (outer * full_dim + full_along) * inner + within;
}

ParamLayout::ParamLayout(const ModelConfig& config, int tp_rank, int tp_size, int first_expert,
                         int num_local_experts)
    : config_(config),
      tp_rank_(tp_rank),
      tp_size_(tp_size),
      first_expert_(first_expert),
      num_local_experts_(num_local_experts < 0 ? config.num_experts : num_local_experts) {
  const int64_t C = config.hidden_size, F = config.ffn_hidden_size, V = config.vocab_size;
  add("wte.weight", {V, C}, InitKind::kEmbedding);
  add("wpe.weight", {config.max_position_embeddings, C}, InitKind::kEmbedding);
  // Megatron's split: c_attn and c_fc by output rows (q, k, v each by heads), the projections
  // after them by input columns; their biases are added once, after the all-reduce.
  const ShardSpec qkv_rows{0, 3, tp_rank, tp_size}, rows{0, 1, tp_rank, tp_size},
      columns{1, 1, tp_rank, tp_size};
  for (int l = 0; l < config.num_layers; ++l) {
    const std::string h = "h." + std::to_string(l) + ".";
    add(h + "ln_1.weight", {C}, InitKind::kOnes);
    add(h + "ln_1.bias", {C}, InitKind::kZeros);
    add(h + "attn.c_attn.weight", {3 * C, C}, InitKind::kLinear, qkv_rows);
    add(h + "attn.c_attn.bias", {3 * C}, InitKind::kZeros, qkv_rows);
    add(h + "attn.c_proj.weight", {C, C}, InitKind::kLinear, columns);
    add(h + "attn.c_proj.bias", {C}, InitKind::kZeros);
    add(h + "ln_2.weight", {C}, InitKind::kOnes);
    add(h + "ln_2.bias", {C}, InitKind::kZeros);
    if (!config.is_switch_layer(l)) {
      add(h + "mlp.c_fc.weight", {F, C}, InitKind::kLinear, rows);
      add(h + "mlp.c_fc.bias", {F}, InitKind::kZeros, rows);
      add(h + "mlp.c_proj.weight", {C, F}, InitKind::kLinear, columns);
      add(h + "mlp.c_proj.bias", {C}, InitKind::kZeros);
      continue;
    }
    add(h + "moe.router.weight", {config.num_experts, C}, InitKind::kLinear);
    // Each family of expert tensors is contiguous over the local experts, so one grouped
    // GEMM walks one (E_local, out, in) block.
    auto experts = [&](const char* suffix, std::vector<int64_t> shape, InitKind init) {
      for (int e = first_expert_; e < first_expert_ + num_local_experts_; ++e)
        add(h + "moe.experts." + std::to_string(e) + "." + suffix, shape, init, {}, true,
            /*continues_family=*/e != first_expert_);
    };
    experts("c_fc.weight", {F, C}, InitKind::kLinear);
    experts("c_fc.bias", {F}, InitKind::kZeros);
    experts("c_proj.weight", {C, F}, InitKind::kLinear);
    experts("c_proj.bias", {C}, InitKind::kZeros);
  }
  add("ln_f.weight", {C}, InitKind::kOnes);
  add("ln_f.bias", {C}, InitKind::kZeros);
  total_floats_ = (total_floats_ + 15) / 16 * 16;
}

size_t ParamLayout::add(const std::string& name, std::vector<int64_t> full_shape, InitKind init,
                        ShardSpec shard, bool is_expert, bool continues_family) {
  ParamEntry entry;
  entry.name = name;
  entry.shard = shard;
  entry.shape = full_shape;
  if (entry.is_sharded()) entry.shape[shard.dim] /= shard.parts;
  entry.numel = 1;
  for (int64_t d : entry.shape) entry.numel *= static_cast<size_t>(d);
  // fan_in of the whole tensor: the init's sigma does not depend on the layout.
  entry.fan_in = full_shape.size() >= 2 ? static_cast<int>(full_shape.back()) : 0;
  entry.full_shape = std::move(full_shape);
  entry.init = init;
  entry.is_expert = is_expert;
  // Start every tensor 64-byte aligned for the GEMMs and vector loads, except inside a family
  // of expert tensors, which must stay exactly (E_local, out, in) contiguous.
  if (!continues_family) total_floats_ = (total_floats_ + 15) / 16 * 16;
  entry.offset = total_floats_;
  total_floats_ += entry.numel;
  entries_.push_back(std::move(entry));
  return entries_.back().offset;
}

const ParamEntry* ParamLayout::find(const std::string& name) const {
  for (const auto& entry : entries_)
    if (entry.name == name) return &entry;
  return nullptr;
}

ModelTensors ParamLayout::bind(float* base) const {
  auto at = [&](const std::string& name) -> float* {
    const ParamEntry* entry = find(name);
    return entry ? base + entry->offset : nullptr;
  };
  ModelTensors t{};
  t.wte = at("wte.weight");
  t.wpe = at("wpe.weight");
  t.lnf_w = at("ln_f.weight");
  t.lnf_b = at("ln_f.bias");
  for (int l = 0; l < config_.num_layers; ++l) {
    const std::string h = "h." + std::to_string(l) + ".";
    BlockTensors b{};
    b.ln1_w = at(h + "ln_1.weight");
    b.ln1_b = at(h + "ln_1.bias");
    b.qkv_w = at(h + "attn.c_attn.weight");
    b.qkv_b = at(h + "attn.c_attn.bias");
    b.attn_proj_w = at(h + "attn.c_proj.weight");
    b.attn_proj_b = at(h + "attn.c_proj.bias");
    b.ln2_w = at(h + "ln_2.weight");
    b.ln2_b = at(h + "ln_2.bias");
    b.fc_w = at(h + "mlp.c_fc.weight");
    b.fc_b = at(h + "mlp.c_fc.bias");
    b.proj_w = at(h + "mlp.c_proj.weight");
    b.proj_b = at(h + "mlp.c_proj.bias");
    b.router_w = at(h + "moe.router.weight");
    const std::string first = h + "moe.experts." + std::to_string(first_expert_) + ".";
    b.experts_fc_w = at(first + "c_fc.weight");
    b.experts_fc_b = at(first + "c_fc.bias");
    b.experts_proj_w = at(first + "c_proj.weight");
    b.experts_proj_b = at(first + "c_proj.bias");
    t.blocks.push_back(b);
  }
  return t;
}

void initialize_parameters(const ParamLayout& layout, uint64_t seed, double init_scale,
                           float* host_params) {
  static constexpr float kTruncation = 2.0f;  // cut at +-2 sigma
  for (const ParamEntry& entry : layout.entries()) {
    float* values = host_params + entry.offset;
    switch (entry.init) {
      case InitKind::kZeros:
        std::fill(values, values + entry.numel, 0.0f);
        continue;
      case InitKind::kOnes:
        std::fill(values, values + entry.numel, 1.0f);
        continue;
      case InitKind::kEmbedding:
      case InitKind::kLinear:
        break;
    }
    const double sigma = entry.init == InitKind::kEmbedding
                             ? 0.02
                             : std::sqrt(init_scale / static_cast<double>(entry.fan_in));
    // Keyed by the tensor's name and the element's index in the whole (unsharded) tensor, so
    // any shard of it, on any layout, holds the same values.
    const uint64_t tensor_key = random_key({seed, hash_string("init"), hash_string(entry.name)});
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < entry.numel; ++i)
      values[i] = static_cast<float>(sigma) *
                  truncated_normal(random_key({tensor_key, entry.full_index(i)}), kTruncation);
  }
}

}  // namespace moe
