// safetensors: a bit-exact round trip, the on-disk layout, and one RuntimeError naming the
// file for every kind of damaged or hostile file (DESIGN.md, Formats).
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "core/error.h"
#include "model/safetensors.h"

namespace moe {
namespace {

// A fresh directory per test, removed afterwards (tests may run in parallel).
class SafetensorsFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "moe_test_safetensors_XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string path(const std::string& name) const { return dir_ + "/" + name; }

  std::string write_raw(const std::string& name, const std::string& bytes) {
    std::ofstream out(path(name), std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    return path(name);
  }

  // A hand-made file: the length field (the header's size unless given), the header, the data.
  std::string write_file(const std::string& name, const std::string& header,
                         const std::string& data, uint64_t header_length = ~0ull) {
    if (header_length == ~0ull) header_length = header.size();
    std::string bytes(8, '\0');
    std::memcpy(bytes.data(), &header_length, 8);
    return write_raw(name, bytes + header + data);
  }

  // The RuntimeError reading `file` throws; checks it is one line naming the file and `problem`.
  void expect_rejected(const std::string& file, const std::string& problem) {
    try {
      SafetensorsFile loaded(file);
      ADD_FAILURE() << file << " was accepted; expected an error about: " << problem;
    } catch (const RuntimeError& error) {
      const std::string message = error.what();
      EXPECT_NE(message.find(file), std::string::npos) << "does not name the file: " << message;
      EXPECT_NE(message.find(problem), std::string::npos)
          << "does not say '" << problem << "': " << message;
      EXPECT_EQ(message.find('\n'), std::string::npos) << "spans lines: " << message;
    } catch (const std::exception& other) {
      ADD_FAILURE() << "wrong exception type for " << file << ": " << other.what();
    }
  }

  std::string dir_;
};

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST_F(SafetensorsFiles, RoundTripIsBitExact) {
  const std::vector<float> matrix = {1.0f,
                                     -0.0f,
                                     std::numeric_limits<float>::quiet_NaN(),
                                     std::numeric_limits<float>::infinity(),
                                     std::numeric_limits<float>::denorm_min(),
                                     3.14159274f};  // (2, 3)
  const std::vector<float> bias = {0.5f, -2.25f};   // (2)
  const std::vector<float> scalar = {42.0f};        // ()
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"num_layers", "2"}};
  const std::string file = path("model.safetensors");
  // Deliberately not in name order: the file keeps the given order.
  write_safetensors(file, metadata,
                    {{"h.0.mlp.c_fc.weight", {2, 3}, matrix.data()},
                     {"h.0.mlp.c_fc.bias", {2}, bias.data()},
                     {"empty", {0, 4}, nullptr},
                     {"scale", {}, scalar.data()}});
  EXPECT_FALSE(std::filesystem::exists(file + ".tmp"));

  const SafetensorsFile loaded(file);
  EXPECT_EQ(loaded.metadata(), metadata);
  EXPECT_EQ(loaded.metadata_value("format"), "pt");
  ASSERT_EQ(loaded.tensors().size(), 4u);
  EXPECT_TRUE(same_bits(loaded.expect("h.0.mlp.c_fc.weight", {2, 3}), matrix));
  EXPECT_TRUE(same_bits(loaded.expect("h.0.mlp.c_fc.bias", {2}), bias));
  EXPECT_TRUE(loaded.expect("empty", {0, 4}).empty());
  EXPECT_TRUE(same_bits(loaded.expect("scale", {}), scalar));

  // The layout: an 8-byte length, a header padded to 8 bytes, tensors back to back in order.
  std::ifstream in(file, std::ios::binary);
  uint64_t header_length = 0;
  in.read(reinterpret_cast<char*>(&header_length), 8);
  EXPECT_EQ(header_length % 8, 0u);
  std::string header(header_length, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_length));
  EXPECT_LT(header.find("__metadata__"), header.find("h.0.mlp.c_fc.weight"));
  EXPECT_LT(header.find("h.0.mlp.c_fc.weight"), header.find("h.0.mlp.c_fc.bias"));
  EXPECT_NE(header.find("\"data_offsets\":[0,24]"), std::string::npos) << header;
  EXPECT_NE(header.find("\"data_offsets\":[24,32]"), std::string::npos) << header;
  EXPECT_NE(header.find("\"data_offsets\":[32,32]"), std::string::npos) << header;
  EXPECT_NE(header.find("\"data_offsets\":[32,36]"), std::string::npos) << header;
  EXPECT_EQ(std::filesystem::file_size(file), 8 + header_length + 36);
}

TEST_F(SafetensorsFiles, OverwritesAnExistingFile) {
  const std::string file = path("model.safetensors");
  const std::vector<float> first = {1, 2, 3}, second = {4, 5};
  write_safetensors(file, {}, {{"w", {3}, first.data()}});
  write_safetensors(file, {}, {{"w", {2}, second.data()}});
  const SafetensorsFile loaded(file);
  EXPECT_TRUE(loaded.metadata().empty());
  EXPECT_TRUE(same_bits(loaded.expect("w", {2}), second));
}

TEST_F(SafetensorsFiles, LookupsNameTheFile) {
  const std::string file = path("model.safetensors");
  const std::vector<float> values = {1, 2, 3, 4};
  write_safetensors(file, {{"format", "pt"}}, {{"w", {2, 2}, values.data()}});
  const SafetensorsFile loaded(file);
  EXPECT_TRUE(loaded.contains("w"));
  EXPECT_FALSE(loaded.contains("v"));
  for (const auto& lookup :
       std::vector<std::function<void()>>{[&] { loaded.at("v"); }, [&] { loaded.expect("w", {4}); },
                                          [&] { loaded.metadata_value("num_layers"); }}) {
    try {
      lookup();
      ADD_FAILURE() << "lookup succeeded";
    } catch (const RuntimeError& error) {
      EXPECT_NE(std::string(error.what()).find(file), std::string::npos) << error.what();
    }
  }
}

TEST_F(SafetensorsFiles, WriterRejectsBadInput) {
  const std::vector<float> values = {1, 2};
  EXPECT_THROW(write_safetensors(path("dup.safetensors"), {},
                                 {{"w", {2}, values.data()}, {"w", {2}, values.data()}}),
               RuntimeError);
  EXPECT_THROW(write_safetensors(path("neg.safetensors"), {}, {{"w", {-2}, values.data()}}),
               RuntimeError);
  EXPECT_THROW(
      write_safetensors(path("no/such/dir/x.safetensors"), {}, {{"w", {2}, values.data()}}),
      RuntimeError);
}

TEST_F(SafetensorsFiles, RejectsTruncatedFiles) {
  expect_rejected(path("missing.safetensors"), "no such file");
  expect_rejected(write_raw("tiny.safetensors", "abc"), "shorter than the 8-byte");
  expect_rejected(write_raw("empty.safetensors", ""), "shorter than the 8-byte");
  // The length field claims far more than the file holds (and more than memory could).
  expect_rejected(write_file("long.safetensors", "{}", "", 1000), "past the end of the file");
  expect_rejected(write_file("huge.safetensors", "{}", "", ~0ull - 1), "past the end of the file");
}

TEST_F(SafetensorsFiles, RejectsBadHeaders) {
  expect_rejected(write_file("json.safetensors", "{\"w\": {\n\"dtype\"", ""), "bad JSON");
  expect_rejected(write_file("zero.safetensors", "", ""), "bad JSON");
  expect_rejected(write_file("array.safetensors", "[1, 2]", ""), "not a JSON object");
  expect_rejected(write_file("entry.safetensors", "{\"w\": 5}", ""),
                  "tensor 'w' is not a JSON object");
  expect_rejected(write_file("meta.safetensors", "{\"__metadata__\": {\"n\": 2}}", ""),
                  "not a string");
  const std::string data(16, '\0');
  expect_rejected(
      write_file("no_dtype.safetensors", R"({"w": {"shape": [4], "data_offsets": [0, 16]}})", data),
      "has no dtype");
  expect_rejected(write_file("no_shape.safetensors",
                             R"({"w": {"dtype": "F32", "data_offsets": [0, 16]}})", data),
                  "has no shape");
  expect_rejected(
      write_file("no_offsets.safetensors", R"({"w": {"dtype": "F32", "shape": [4]}})", data),
      "has no data_offsets");
  expect_rejected(
      write_file("negative.safetensors",
                 R"({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}})", data),
      "not a dimension");
  expect_rejected(write_file("offsets.safetensors",
                             R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0]}})", data),
                  "not [begin, end]");
}

TEST_F(SafetensorsFiles, RejectsUnsupportedDtypes) {
  expect_rejected(write_file("bf16.safetensors",
                             R"({"w": {"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]}})",
                             std::string(16, '\0')),
                  "dtype BF16");
}

TEST_F(SafetensorsFiles, RejectsBadDataOffsets) {
  const std::string data(16, '\0');
  expect_rejected(
      write_file("order.safetensors",
                 R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})", data),
      "out of order");
  expect_rejected(
      write_file("past.safetensors",
                 R"({"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}})", data),
      "past the end of the data buffer");
  expect_rejected(
      write_file("size.safetensors",
                 R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}})", data),
      "has shape [3]");
  // (2^62 + 1) x 4 elements wrap around 64 bits to exactly 4: must not pass for 16 bytes.
  expect_rejected(
      write_file(
          "overflow.safetensors",
          R"({"w": {"dtype": "F32", "shape": [4611686018427387905, 4], "data_offsets": [0, 16]}})",
          data),
      "has shape");
  expect_rejected(
      write_file("zero_dim.safetensors",
                 R"({"w": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 16]}})", data),
      "has shape [0, 4]");
}

}  // namespace
}  // namespace moe
