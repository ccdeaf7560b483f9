// The checkpoint manifest reader (model/checkpoint_manifest.h parse_checkpoint_manifest:
// manifest.json, checked before a checkpoint is loaded). Any text either gives plain file names
// with 16-hex-digit digests, or raises one RuntimeError line.
#include <cstdint>
#include <string>

#include "model/checkpoint_manifest.h"
#include "tests/fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  moe::fuzz::expect_clean_errors([&] {
    const moe::CheckpointManifest manifest =
        moe::parse_checkpoint_manifest(text, "iter_0000010/manifest.json");
    moe::fuzz::check(!manifest.files.empty(), "a manifest without files was accepted");
    for (const auto& [name, digest] : manifest.files) {
      moe::fuzz::check(!name.empty() && name.find('/') == std::string::npos && name[0] != '.',
                       "a file name that is a path was accepted: " + name);
      moe::fuzz::check(digest.xxh64.size() == 16, "a digest of the wrong length was accepted");
    }
  });
  return 0;
}
