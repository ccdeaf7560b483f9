#include "model/weights_io.h"

#include <algorithm>

#include "core/error.h"
#include "model/grad_sync.h"
#include "model/safetensors.h"

#include <cstring>
#include <nlohmann/json.hpp>

namespace moe {

void export_safetensors(const std::string& path, const ModelConfig& config,
                        const ParamLayout& layout, const float* host_params) {
  std::map<std::string, std::string> metadata = config.to_metadata();
  metadata["format"] = "pt";
  std::vector<TensorView> views;
  for (const ParamEntry& entry : layout.entries())
    views.push_back({entry.name, entry.shape, host_params + entry.offset});
  write_safetensors(path, metadata, views);
}

void export_safetensors_gathered(const std::string& path, const ModelConfig& config,
                                 const ParamLayout& layout, const float* host_params,
                                 const ParallelDims& dims, Communicator& world) {
  if (world.size() == 1) return export_safetensors(path, config, layout, host_params);
  // Pack: a JSON index of this rank's canonical tensors, then their floats.
  nlohmann::json index = nlohmann::json::array();
  std::vector<float> values;
  for (const ParamEntry& entry : layout.entries()) {
    if (!holds_canonical_copy(entry, dims)) continue;
    index.push_back({{"name", entry.name},
                     {"shape", entry.shape},
                     {"shard", {entry.shard.dim, entry.shard.blocks, entry.shard.part, entry.shard.parts}},
                     {"first", values.size()}});
    values.insert(values.end(), host_params + entry.offset, host_params + entry.offset + entry.numel);
  }
  const std::string header = index.dump();
  std::vector<char> packed(sizeof(uint64_t) + header.size() + values.size() * sizeof(float));
  const uint64_t header_size = header.size();
  std::memcpy(packed.data(), &header_size, sizeof header_size);
  std::memcpy(packed.data() + sizeof header_size, header.data(), header.size());
  if (!values.empty())  // an empty vector's data() may be null, which memcpy must never see
    std::memcpy(packed.data() + sizeof header_size + header.size(), values.data(),
                values.size() * sizeof(float));
  const auto pieces = world.gather_bytes(packed.data(), packed.size(), 0);
  if (world.rank() != 0) return;

  // Rank 0: place every piece into the unsharded tensors of the one-rank layout.
  const ParamLayout full(config);
  std::vector<float> assembled(full.total_floats(), 0.0f);
  for (const std::vector<char>& piece : pieces) {
    uint64_t size = 0;
    std::memcpy(&size, piece.data(), sizeof size);
    const auto piece_index = nlohmann::json::parse(piece.begin() + sizeof size, piece.begin() + sizeof size + size);
    std::vector<float> floats((piece.size() - sizeof size - size) / sizeof(float));
    if (!floats.empty())  // a rank that holds no canonical tensor sends none
      std::memcpy(floats.data(), piece.data() + sizeof size + size, floats.size() * sizeof(float));
    for (const auto& item : piece_index) {
      const ParamEntry* target = full.find(item["name"].get<std::string>());
      MOE_CHECK(target != nullptr, "gathered tensor not in the model: " + item["name"].get<std::string>());
      ParamEntry shard_entry = *target;  // the sender's view of the same tensor
      shard_entry.shape = item["shape"].get<std::vector<int64_t>>();
      const auto spec = item["shard"].get<std::vector<int>>();
      shard_entry.shard = {spec[0], spec[1], spec[2], spec[3]};
      size_t numel = 1;
      for (int64_t d : shard_entry.shape) numel *= static_cast<size_t>(d);
      const float* source = floats.data() + item["first"].get<size_t>();
      for (size_t i = 0; i < numel; ++i)
        assembled[target->offset + shard_entry.full_index(i)] = source[i];
    }
  }
  export_safetensors(path, config, full, assembled.data());
}

ModelConfig read_safetensors_config(const std::string& path) {
  SafetensorsFile file(path);
  ModelConfig config = ModelConfig::from_metadata(file.metadata(), path);
  // The metadata sizes everything after it (the layout, the activations): it must describe the
  // tensors this file holds, or a damaged value would size the model instead of being refused.
  // Every layer has tensors, so the layer count is bounded by the tensors there are.
  if (static_cast<size_t>(config.num_layers) > file.tensors().size())
    throw RuntimeError(path + ": __metadata__ says num_layers " +
                       std::to_string(config.num_layers) + ", but the file holds only " +
                       std::to_string(file.tensors().size()) + " tensors");
  const ParamLayout layout(config);
  for (const ParamEntry& entry : layout.entries()) file.expect(entry.name, entry.shape);
  return config;
}

void import_safetensors(const std::string& path, const ParamLayout& layout, float* host_params) {
  SafetensorsFile file(path);
  for (const ParamEntry& entry : layout.entries()) {
    const std::vector<float>& values = file.expect(entry.name, entry.shape);
    std::copy(values.begin(), values.end(), host_params + entry.offset);
  }
}

}  // namespace moe
