// The checkpoint metadata reader (model/checkpoint.h parse_checkpoint_info: metadata.json, what
// moe-train --load and moe-eval --load read first). Any text either gives a consistent layout
// (one rank file per rank, tp x dp = world) and a valid model config, or raises one
// RuntimeError line.
#include <cstdint>
#include <string>

#include "model/checkpoint.h"
#include "tests/fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  moe::fuzz::expect_clean_errors([&] {
    const moe::CheckpointInfo info = moe::parse_checkpoint_info(text, "iter_0000010/metadata.json");
    moe::fuzz::check(static_cast<int>(info.ranks.size()) == info.world &&
                         info.tp * info.dp == info.world,
                     "an inconsistent layout was accepted");
    moe::fuzz::check(info.optimizer_steps >= 0 && info.optimizer_steps <= info.iteration,
                     "inconsistent step counts were accepted");
    try {
      info.config.validate();
    } catch (const moe::UsageError& error) {
      moe::fuzz::fail(std::string("an invalid model config was accepted: ") + error.what());
    }
  });
  return 0;
}
