#include "model/config.h"

#include <charconv>

#include "core/error.h"

namespace moe {

int ModelConfig::num_switch_layers() const {
  int count = 0;
  for (int l = 0; l < num_layers; ++l) count += is_switch_layer(l) ? 1 : 0;
  return count;
}

void ModelConfig::validate() const {
  auto require = [](bool ok, const std::string& what) {
    if (!ok) throw UsageError(what);
  };
  require(num_layers >= 1, "--num-layers must be at least 1");
  require(hidden_size >= 1, "--hidden-size must be at least 1");
  require(num_attention_heads >= 1, "--num-attention-heads must be at least 1");
  require(hidden_size % num_attention_heads == 0,
          "--num-attention-heads (" + std::to_string(num_attention_heads) +
              ") must divide --hidden-size (" + std::to_string(hidden_size) + ")");
  require(ffn_hidden_size >= 1, "--ffn-hidden-size must be at least 1");
  require(num_experts >= 0, "--num-experts must not be negative");
  require(moe_layer_freq >= 0, "--moe-layer-freq must not be negative");
  require(vocab_size >= 2, "--vocab-size must be at least 2");
  require(max_position_embeddings >= 1, "--max-position-embeddings must be at least 1");
  if (num_experts > 0) {
    require(moe_router_topk >= 1, "--moe-router-topk must be at least 1");
    require(moe_router_topk <= num_experts,
            "--moe-router-topk (" + std::to_string(moe_router_topk) +
                ") must not exceed --num-experts (" + std::to_string(num_experts) + ")");
  }
}

std::map<std::string, std::string> ModelConfig::to_metadata() const {
  return {{"num_layers", std::to_string(num_layers)},
          {"hidden_size", std::to_string(hidden_size)},
          {"num_attention_heads", std::to_string(num_attention_heads)},
          {"ffn_hidden_size", std::to_string(ffn_hidden_size)},
          {"num_experts", std::to_string(num_experts)},
          {"moe_layer_freq", std::to_string(moe_layer_freq)},
          {"moe_router_topk", std::to_string(moe_router_topk)},
          {"vocab_size", std::to_string(vocab_size)},
          {"max_position_embeddings", std::to_string(max_position_embeddings)}};
}

ModelConfig ModelConfig::from_metadata(const std::map<std::string, std::string>& metadata,
                                       const std::string& source) {
  auto read = [&](const char* key, int& field) {
    auto it = metadata.find(key);
    if (it == metadata.end())
      throw RuntimeError(source + ": __metadata__ lacks \"" + key + "\"");
    const std::string& text = it->second;
    auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), field);
    if (ec != std::errc() || end != text.data() + text.size()) {
      // The file's text, cut short and on one line: an error is one line on stderr.
      std::string shown = text.substr(0, 40) + (text.size() > 40 ? "..." : "");
      for (char& c : shown)
        if (static_cast<unsigned char>(c) < 0x20) c = ' ';
      throw RuntimeError(source + ": __metadata__ \"" + key + "\" is not an integer: \"" +
                         shown + "\"");
    }
  };
  ModelConfig config;
  read("num_layers", config.num_layers);
  read("hidden_size", config.hidden_size);
  read("num_attention_heads", config.num_attention_heads);
  read("ffn_hidden_size", config.ffn_hidden_size);
  read("num_experts", config.num_experts);
  read("moe_layer_freq", config.moe_layer_freq);
  read("moe_router_topk", config.moe_router_topk);
  read("vocab_size", config.vocab_size);
  read("max_position_embeddings", config.max_position_embeddings);
  try {
    config.validate();
  } catch (const UsageError& e) {
    throw RuntimeError(source + ": inconsistent config in __metadata__: " + e.what());
  }
  return config;
}

}  // namespace moe
