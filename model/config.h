// The model's shape (DESIGN.md, Model) and the checks that make it buildable.
#pragma once

#include <map>
#include <string>

namespace moe {

struct ModelConfig {
  int num_layers = 4;
  int hidden_size = 256;               // C
  int num_attention_heads = 4;         // NH
  int ffn_hidden_size = 1024;          // F
  int num_experts = 8;                 // E; 0 = dense model
  int moe_layer_freq = 2;
  int moe_router_topk = 1;             // k
  int vocab_size = 256;                // V
  int max_position_embeddings = 1024;  // Tmax

  // Layer l is a Switch layer iff E > 0, freq > 0 and l % freq == freq - 1.
  bool is_switch_layer(int layer) const {
    return num_experts > 0 && moe_layer_freq > 0 &&
           layer % moe_layer_freq == moe_layer_freq - 1;
  }
  int num_switch_layers() const;
  int head_dim() const { return hidden_size / num_attention_heads; }

  // Throws UsageError naming the first inconsistent field.
  void validate() const;

  // The config as the strings stored in a safetensors __metadata__ (DESIGN.md, Formats).
  std::map<std::string, std::string> to_metadata() const;
  // Reads the config back; throws RuntimeError naming `source` on a missing or bad key.
  static ModelConfig from_metadata(const std::map<std::string, std::string>& metadata,
                                   const std::string& source);
};

}  // namespace moe
