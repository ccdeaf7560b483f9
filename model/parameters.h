// Every trainable tensor of the model in one flat allocation (llm.c): parameters, gradients
// and the two AdamW moments share one layout, so a checkpoint is one read and a gradient
// reduction is one buffer. Names and shapes are DESIGN.md's safetensors names.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"

namespace moe {

enum class InitKind {
  kEmbedding,  // truncated normal, sigma 0.02
  kLinear,     // truncated normal, sigma sqrt(init_scale / fan_in)
  kZeros,      // biases
  kOnes,       // LayerNorm weights
};

// How a tensor is split over the tensor-parallel ranks (Megatron's column/row split). `dim` is
// the split dimension (-1: every rank holds the whole tensor). The dimension is cut into
// `blocks` equal blocks (3 for c_attn: q, k, v) and each block into `parts` equal pieces;
// rank `part` holds piece `part` of every block, blocks in order.
struct ShardSpec {
  int dim = -1;
  int blocks = 1;
  int part = 0;
  int parts = 1;
};

struct ParamEntry {
  std::string name;            // e.g. "h.1.moe.experts.3.c_fc.weight"
  std::vector<int64_t> shape;  // this rank's shape, [out, in] for weights
  std::vector<int64_t> full_shape;  // the unsharded tensor's shape (DESIGN.md's)
  ShardSpec shard;
  size_t offset = 0;           // in floats, into the flat buffer
  size_t numel = 0;
  InitKind init = InitKind::kZeros;
  int fan_in = 0;
  bool is_expert = false;      // expert weights are reduced over the expert-data-parallel group
  // AdamW decays tensors with two or more dimensions only (DESIGN.md, Optimizer).
  bool weight_decay() const { return shape.size() >= 2; }
  bool is_sharded() const { return shard.dim >= 0 && shard.parts > 1; }
  // The row-major index in the full tensor of this shard's element `local_index`.
  size_t full_index(size_t local_index) const;
};

// Pointers into one flat buffer (parameters, or gradients, laid out identically).
struct BlockTensors {
  float* ln1_w;   // (C)
  float* ln1_b;   // (C)
  float* qkv_w;   // (3C, C)
  float* qkv_b;   // (3C)
  float* attn_proj_w;  // (C, C)
  float* attn_proj_b;  // (C)
  float* ln2_w;   // (C)
  float* ln2_b;   // (C)
  // dense FFN (null in a Switch layer)
  float* fc_w;    // (F, C)
  float* fc_b;    // (F)
  float* proj_w;  // (C, F)
  float* proj_b;  // (C)
  // Switch FFN (null in a dense layer); experts are the local ones, contiguous
  float* router_w;        // (E, C)
  float* experts_fc_w;    // (E_local, F, C)
  float* experts_fc_b;    // (E_local, F)
  float* experts_proj_w;  // (E_local, C, F)
  float* experts_proj_b;  // (E_local, C)
};

struct ModelTensors {
  float* wte;    // (V, C)
  float* wpe;    // (Tmax, C)
  float* lnf_w;  // (C)
  float* lnf_b;  // (C)
  std::vector<BlockTensors> blocks;  // (L)
};

class ParamLayout {
 public:
  // The layout of one rank: tensor-parallel rank tp_rank of tp_size, holding the experts
  // [first_expert, first_expert + num_local_experts) of each Switch layer (-1: all of them).
  explicit ParamLayout(const ModelConfig& config, int tp_rank = 0, int tp_size = 1,
                       int first_expert = 0, int num_local_experts = -1);

  const std::vector<ParamEntry>& entries() const { return entries_; }
  size_t total_floats() const { return total_floats_; }
  const ParamEntry* find(const std::string& name) const;
  // Pointers to every tensor inside a buffer of total_floats() floats.
  ModelTensors bind(float* base) const;
  int first_expert() const { return first_expert_; }
  int num_local_experts() const { return num_local_experts_; }
  int tp_rank() const { return tp_rank_; }
  int tp_size() const { return tp_size_; }

 private:
  size_t add(const std::string& name, std::vector<int64_t> full_shape, InitKind init,
             ShardSpec shard = {}, bool is_expert = false, bool continues_family = false);

  ModelConfig config_;
  int tp_rank_;
  int tp_size_;
  int first_expert_;
  int num_local_experts_;
  std::vector<ParamEntry> entries_;
  size_t total_floats_ = 0;
};

// Fills `host_params` (layout.total_floats()) with the initial values (DESIGN.md,
// Initialization): each element a pure function of (seed, tensor name, element index).
void initialize_parameters(const ParamLayout& layout, uint64_t seed, double init_scale,
                           float* host_params);

}  // namespace moe
