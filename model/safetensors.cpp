#include "model/safetensors.h"

#include <bit>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"

namespace moe {
namespace {

static_assert(std::endian::native == std::endian::little,
              "safetensors lengths and floats are little-endian; this code copies them raw");

constexpr uint64_t kLengthBytes = 8;  // the u64 header length in front of the JSON
constexpr uint64_t kFloatBytes = sizeof(float);

// Error messages are one line, but a JSON parser may quote a raw newline from the header.
std::string one_line(std::string text) {
  for (char& c : text)
    if (static_cast<unsigned char>(c) < 0x20) c = ' ';
  return text;
}

// A JSON value for a message: scalars as written (cut short), containers by kind only. Never
// dump() a hostile container: its size is the file's, and dump() recurses once per nesting
// level, so a deeply nested array would overflow the stack.
std::string describe(const nlohmann::json& value) {
  if (value.is_array()) return "an array of " + std::to_string(value.size()) + " entries";
  if (value.is_object()) return "an object";
  const std::string text = one_line(value.dump());
  return text.size() <= 40 ? text : text.substr(0, 40) + "...";
}

uint64_t element_count(const std::vector<int64_t>& shape) {
  uint64_t count = 1;
  for (int64_t dim : shape) count *= static_cast<uint64_t>(dim);
  return count;
}

// Whether product(shape) floats fill exactly `bytes`, without overflowing on a hostile shape.
bool fills_exactly(const std::vector<int64_t>& shape, uint64_t bytes) {
  for (int64_t dim : shape)
    if (dim == 0) return bytes == 0;
  uint64_t count = 1;
  for (int64_t dim : shape) {
    const auto d = static_cast<uint64_t>(dim);
    if (count > bytes / kFloatBytes / d) return false;  // count * d would pass bytes / 4
    count *= d;
  }
  return count * kFloatBytes == bytes;
}

}  // namespace

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

void write_safetensors(const std::string& path, const std::map<std::string, std::string>& metadata,
                       const std::vector<TensorView>& tensors) {
  const auto fail = [&path](const std::string& problem) {
    return RuntimeError(path + ": cannot write safetensors: " + problem);
  };

  // The header, in the order of `tensors`, each tensor's bytes right after the previous one's.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::set<std::string> names;
  uint64_t offset = 0;
  for (const TensorView& tensor : tensors) {
    if (tensor.name.empty() || tensor.name == "__metadata__")
      throw fail("invalid tensor name '" + tensor.name + "'");
    if (!names.insert(tensor.name).second) throw fail("tensor '" + tensor.name + "' appears twice");
    for (int64_t dim : tensor.shape)
      if (dim < 0)
        throw fail("tensor '" + tensor.name + "' has shape " + shape_string(tensor.shape));
    const uint64_t bytes = element_count(tensor.shape) * kFloatBytes;
    if (bytes > 0 && tensor.data == nullptr) throw fail("tensor '" + tensor.name + "' has no data");
    header[tensor.name] = {
        {"dtype", "F32"}, {"shape", tensor.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string header_text;
  try {
    header_text = header.dump();
  } catch (const nlohmann::json::exception& error) {  // e.g. a name that is not UTF-8
    throw fail(one_line(error.what()));
  }
  // Spaces (valid JSON whitespace) align the data buffer to 8 bytes.
  header_text.append((kLengthBytes - header_text.size() % kLengthBytes) % kLengthBytes, ' ');
  const uint64_t header_length = header_text.size();

  const std::string temporary = path + ".tmp";
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    if (!out) throw fail("cannot create " + temporary);
    out.write(reinterpret_cast<const char*>(&header_length), kLengthBytes);
    out.write(header_text.data(), static_cast<std::streamsize>(header_text.size()));
    for (const TensorView& tensor : tensors)
      out.write(reinterpret_cast<const char*>(tensor.data),
                static_cast<std::streamsize>(element_count(tensor.shape) * kFloatBytes));
    out.close();
    if (!out) {
      std::filesystem::remove(temporary);
      throw fail("I/O error while writing " + temporary);
    }
  }
  std::error_code error;
  std::filesystem::rename(temporary, path, error);
  if (error) {
    std::filesystem::remove(temporary);
    throw fail("cannot rename " + temporary + ": " + error.message());
  }
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const auto fail = [&path](const std::string& problem) {
    return RuntimeError(path + ": " + problem);
  };

  std::error_code error;
  const auto status = std::filesystem::status(path, error);
  if (!std::filesystem::exists(status)) throw fail("no such file");
  if (!std::filesystem::is_regular_file(status)) throw fail("not a regular file");
  const uint64_t file_size = std::filesystem::file_size(path, error);
  if (error) throw fail("cannot read size: " + error.message());
  std::ifstream in(path, std::ios::binary);
  if (!in) throw fail("cannot open for reading");

  // Header length, capped by the file size before anything is allocated.
  if (file_size < kLengthBytes)
    throw fail("not a safetensors file: " + std::to_string(file_size) +
               " bytes, shorter than the 8-byte header length");
  uint64_t header_length = 0;
  in.read(reinterpret_cast<char*>(&header_length), kLengthBytes);
  if (header_length > file_size - kLengthBytes)
    throw fail("safetensors header length " + std::to_string(header_length) +
               " runs past the end of the file (" + std::to_string(file_size) + " bytes)");
  std::string header_text(header_length, '\0');
  in.read(header_text.data(), static_cast<std::streamsize>(header_length));
  if (!in) throw fail("cannot read the safetensors header");
  const uint64_t data_start = kLengthBytes + header_length;
  const uint64_t data_size = file_size - data_start;  // bytes in the data buffer

  nlohmann::json header;
  try {
    header = nlohmann::json::parse(header_text);
  } catch (const nlohmann::json::exception& parse_error) {
    throw fail("bad JSON in the safetensors header: " + one_line(parse_error.what()));
  }
  if (!header.is_object()) throw fail("the safetensors header is not a JSON object");

  std::map<uint64_t, uint64_t> claimed;  // data_offsets begin -> end of every non-empty tensor

  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) throw fail("__metadata__ is not a JSON object");
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string())
          throw fail(one_line("__metadata__ value of '" + key + "' is not a string"));
        metadata_[key] = value.get<std::string>();
      }
      continue;
    }

    const std::string what = one_line("tensor '" + name + "'");
    if (!entry.is_object()) throw fail(what + " is not a JSON object");
    for (const char* field : {"dtype", "shape", "data_offsets"})
      if (!entry.contains(field)) throw fail(what + " has no " + field);

    const nlohmann::json& dtype = entry["dtype"];
    if (!dtype.is_string()) throw fail(what + " has a dtype that is not a string");
    if (dtype.get<std::string>() != "F32")
      throw fail(what + " has dtype " + one_line(dtype.get<std::string>()) +
                 "; only F32 is supported");

    const nlohmann::json& shape_json = entry["shape"];
    if (!shape_json.is_array()) throw fail(what + " has a shape that is not an array");
    LoadedTensor tensor;
    for (const nlohmann::json& dim : shape_json) {
      if (!dim.is_number_unsigned() ||
          dim.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        throw fail(what + " has a shape entry " + describe(dim) + " that is not a dimension");
      tensor.shape.push_back(dim.get<int64_t>());
    }

    const nlohmann::json& offsets = entry["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned())
      throw fail(what + " has data_offsets " + describe(offsets) + ", not [begin, end]");
    const uint64_t begin = offsets[0].get<uint64_t>();
    const uint64_t end = offsets[1].get<uint64_t>();
    if (begin > end)
      throw fail(what + " has data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                 "] out of order");
    if (end > data_size)
      throw fail(what + " has data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                 "] past the end of the data buffer (" + std::to_string(data_size) + " bytes)");

    const uint64_t bytes = end - begin;
    if (!fills_exactly(tensor.shape, bytes))
      throw fail(what + " has shape " + shape_string(tensor.shape) + " but its data_offsets span " +
                 std::to_string(bytes) + " bytes, not 4 x the element count");
    // Tensors may not share bytes: otherwise a small file could name the same megabytes
    // thousands of times, and the tensors read would outgrow the file without bound.
    if (bytes > 0) {
      const auto next = claimed.lower_bound(begin);  // the first range starting at or after begin
      const bool overlaps_next = next != claimed.end() && next->first < end;
      const bool overlaps_previous = next != claimed.begin() && std::prev(next)->second > begin;
      if (overlaps_next || overlaps_previous)
        throw fail(what + " has data_offsets [" + std::to_string(begin) + ", " +
                   std::to_string(end) + "] overlapping another tensor's");
      claimed.emplace(begin, end);
    }

    tensor.data.resize(bytes / kFloatBytes);  // (product(shape)), at most the file size
    in.seekg(static_cast<std::streamoff>(data_start + begin));
    in.read(reinterpret_cast<char*>(tensor.data.data()), static_cast<std::streamsize>(bytes));
    if (!in) throw fail("cannot read the data of " + what);
    tensors_.emplace(name, std::move(tensor));
  }
}

const LoadedTensor& SafetensorsFile::at(const std::string& name) const {
  const auto found = tensors_.find(name);
  if (found == tensors_.end()) throw RuntimeError(path_ + ": no tensor '" + name + "'");
  return found->second;
}

const std::vector<float>& SafetensorsFile::expect(const std::string& name,
                                                  const std::vector<int64_t>& shape) const {
  const LoadedTensor& tensor = at(name);
  if (tensor.shape != shape)
    throw RuntimeError(path_ + ": tensor '" + name + "' has shape " + shape_string(tensor.shape) +
                       ", expected " + shape_string(shape));
  return tensor.data;
}

const std::string& SafetensorsFile::metadata_value(const std::string& key) const {
  const auto found = metadata_.find(key);
  if (found == metadata_.end())
    throw RuntimeError(path_ + ": no '" + key + "' in the safetensors __metadata__");
  return found->second;
}

}  // namespace moe
