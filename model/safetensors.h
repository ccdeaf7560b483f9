// safetensors, F32 only (DESIGN.md, Formats): an 8-byte little-endian header length N, N bytes
// of JSON, then the data buffer. The JSON maps each tensor name to
// {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]} (byte offsets into the data
// buffer) and may hold "__metadata__", an object of string -> string.
//
// The reader trusts nothing in the file: every length is checked against the file size before
// anything is allocated, and every problem is a one-line RuntimeError naming the file.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace moe {

// A tensor to write: `data` holds product(shape) floats, row-major.
struct TensorView {
  std::string name;
  std::vector<int64_t> shape;
  const float* data = nullptr;
};

// Writes the tensors in the given order (the JSON lists them in the same order, after
// __metadata__), the header padded with spaces to a multiple of 8 bytes. Writes path + ".tmp"
// and renames it over `path`, so a crash never leaves a half-written file under the real name.
// RuntimeError on an I/O failure, a duplicate or empty name, or a negative dimension.
void write_safetensors(const std::string& path, const std::map<std::string, std::string>& metadata,
                       const std::vector<TensorView>& tensors);

// A tensor read back from a file.
struct LoadedTensor {
  std::vector<int64_t> shape;
  std::vector<float> data;  // product(shape) floats, row-major
};

// A whole safetensors file in memory.
class SafetensorsFile {
 public:
  // Reads and validates `path`; RuntimeError naming the file and the problem.
  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::map<std::string, LoadedTensor>& tensors() const { return tensors_; }

  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  // RuntimeError naming the file when the tensor is absent.
  const LoadedTensor& at(const std::string& name) const;
  // The tensor's data, after checking that it exists with exactly this shape.
  const std::vector<float>& expect(const std::string& name,
                                   const std::vector<int64_t>& shape) const;
  // RuntimeError naming the file when the metadata key is absent.
  const std::string& metadata_value(const std::string& key) const;

 private:
  std::string path_;
  std::map<std::string, std::string> metadata_;
  std::map<std::string, LoadedTensor> tensors_;
};

// "[3, 4]": for messages.
std::string shape_string(const std::vector<int64_t>& shape);

}  // namespace moe
