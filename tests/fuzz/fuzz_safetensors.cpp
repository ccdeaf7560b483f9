// The safetensors reader (model/safetensors.h) and the model config in its __metadata__ (what
// moe-eval --model and moe-train --init-from read first): any file either loads, with every
// tensor holding product(shape) floats, or raises one RuntimeError line.
#include <cstdint>
#include <string>

#include "model/config.h"
#include "model/safetensors.h"
#include "tests/fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static moe::fuzz::InputFile input("model.safetensors");
  const std::string& path = input.write(data, size);
  moe::fuzz::expect_clean_errors([&] {
    const moe::SafetensorsFile file(path);
    for (const auto& [name, tensor] : file.tensors()) {
      uint64_t count = 1;
      for (int64_t dim : tensor.shape) count *= static_cast<uint64_t>(dim);
      moe::fuzz::check(count == tensor.data.size(),
                       "tensor '" + name + "' holds " + std::to_string(tensor.data.size()) +
                           " floats for shape " + moe::shape_string(tensor.shape));
    }
    moe::ModelConfig::from_metadata(file.metadata(), path);
  });
  return 0;
}
