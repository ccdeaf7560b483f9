#include "model/weights_io.h"

#include <algorithm>

#include "core/error.h"
#include "model/safetensors.h"

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

ModelConfig read_safetensors_config(const std::string& path) {
  SafetensorsFile file(path);
  return ModelConfig::from_metadata(file.metadata(), path);
}

void import_safetensors(const std::string& path, const ParamLayout& layout, float* host_params) {
  SafetensorsFile file(path);
  for (const ParamEntry& entry : layout.entries()) {
    const std::vector<float>& values = file.expect(entry.name, entry.shape);
    std::copy(values.begin(), values.end(), host_params + entry.offset);
  }
}

}  // namespace moe
