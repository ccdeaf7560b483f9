// The pieces of a crash-proof checkpoint: durable writes (whole file or none, no temporary left
// behind) and the manifest (xxHash64 digests, a round trip, every malformed manifest refused).
#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "core/durable_file.h"
#include "core/error.h"
#include "model/checkpoint_manifest.h"
#include "tests/expect_error.h"

namespace moe {
namespace {

namespace fs = std::filesystem;
using testing::error_message;

class ManifestFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "moe_test_manifest_XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  std::string dir_;
};

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

TEST_F(ManifestFiles, DurableWriteLeavesTheWholeFileAndNoTemporary) {
  write_text_durably(path("a.txt"), "first");
  write_text_durably(path("a.txt"), "second version");
  EXPECT_EQ(read_all(path("a.txt")), "second version");
  EXPECT_FALSE(fs::exists(temporary_path_for(path("a.txt"))));
}

TEST_F(ManifestFiles, FailedDurableWriteKeepsTheOldFileAndRemovesTheTemporary) {
  write_text_durably(path("b.txt"), "old");
  const std::string message = error_message<RuntimeError>([&] {
    write_file_durably(path("b.txt"), [](const std::string& temp) {
      std::ofstream(temp) << "half";
      throw RuntimeError("disk full");
    });
  });
  EXPECT_EQ(message, "disk full");
  EXPECT_EQ(read_all(path("b.txt")), "old");
  EXPECT_FALSE(fs::exists(temporary_path_for(path("b.txt"))));
}

TEST_F(ManifestFiles, DigestIsXxh64OfTheBytes) {
  write_text_durably(path("empty"), "");
  // Reference values of XXH64 with seed 0 (xxHash's own test vectors).
  EXPECT_EQ(digest_file(path("empty")), (FileDigest{0, "ef46db3751d8e999"}));
  write_text_durably(path("abc"), "abc");
  EXPECT_EQ(digest_file(path("abc")), (FileDigest{3, "44bc2cf5ad770999"}));
  const std::string missing = error_message<RuntimeError>([&] { digest_file(path("nope")); });
  EXPECT_NE(missing.find(path("nope")), std::string::npos) << missing;
}

TEST(CheckpointManifest, RoundTrip) {
  CheckpointManifest manifest;
  manifest.iteration = 12;
  manifest.files["metadata.json"] = {321, "0123456789abcdef"};
  manifest.files["rank_00000.safetensors"] = {1u << 20, "fedcba9876543210"};
  const CheckpointManifest back =
      parse_checkpoint_manifest(checkpoint_manifest_json(manifest), "manifest.json");
  EXPECT_EQ(back.iteration, 12);
  EXPECT_EQ(back.files, manifest.files);
}

TEST(CheckpointManifest, MalformedManifestsAreOneRuntimeErrorNamingTheFile) {
  const std::string head = R"({"format": "moe-trainer manifest", "version": 1, "hash": "xxh64", )";
  const std::string good_file = R"("a.safetensors": {"bytes": 1, "xxh64": "0123456789abcdef"})";
  const std::string other_format =
      R"({"format": "other", "version": 1, "hash": "xxh64", "iteration": 1, "files": {)";
  auto one_file = [&](const std::string& name, const std::string& bytes, const std::string& hex) {
    return head + R"("iteration": 1, "files": {")" + name + R"(": {"bytes": )" + bytes +
           R"(, "xxh64": ")" + hex + R"("}}})";
  };
  for (const std::string& text : {
           std::string(""),
           std::string("[]"),
           std::string("{"),
           head + R"("iteration": 1})",                                          // no files
           head + R"("iteration": 1, "files": {}})",                            // empty
           head + R"("iteration": -1, "files": {)" + good_file + "}}",          // negative
           head + R"("iteration": "1", "files": {)" + good_file + "}}",         // a string
           one_file("../x", "1", "0123456789abcdef"),                           // a path
           one_file("a", "1", "0123"),                                          // short digest
           one_file("a", "-1", "0123456789abcdef"),                             // negative size
           one_file("a", "1", "0123456789ABCDEG"),                              // not hex
           other_format + good_file + "}}",
       }) {
    const std::string message = error_message<RuntimeError>(
        [&] { parse_checkpoint_manifest(text, "dir/manifest.json"); });
    EXPECT_EQ(message.rfind("dir/manifest.json: ", 0), 0u) << text << " -> " << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  }
  EXPECT_NO_THROW(parse_checkpoint_manifest(one_file("a", "1", "0123456789abcdef"), "m"));
}

}  // namespace
}  // namespace moe
