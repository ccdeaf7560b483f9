// The token-file reader (launcher/data.h load_tokens) in each format a run can ask for: auto
// (llm.c magic or bytes), llm.c shard, nanoGPT uint16. Any file either gives a non-empty token
// stream whose ids fit the format, cut into windows without reading out of range, or raises one
// RuntimeError line.
#include <cstdint>
#include <string>
#include <vector>

#include "launcher/data.h"
#include "tests/fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static moe::fuzz::InputFile input("tokens.bin");
  const std::string& path = input.write(data, size);
  for (const moe::DataFormat format :
       {moe::DataFormat::kAuto, moe::DataFormat::kLlmc, moe::DataFormat::kUint16}) {
    moe::fuzz::expect_clean_errors([&] {
      moe::TokenStream stream = moe::load_tokens(path, format);
      moe::fuzz::check(!stream.tokens.empty(), "an empty token stream was accepted");
      moe::fuzz::check(stream.max_token >= 0 && stream.max_token < 65536,
                       "token id " + std::to_string(stream.max_token) + " from a 16-bit file");
      // The windows moe-eval would read: the last one ends at the last token.
      const int seq_length = 1 + static_cast<int>(size % 8);
      const moe::DataLoader loader = moe::DataLoader::for_evaluation(std::move(stream), seq_length);
      std::vector<int32_t> inputs(seq_length), targets(seq_length);  // (T) each
      loader.fill_window(inputs.data(), targets.data(), loader.num_windows() - 1);
    });
  }
  return 0;
}
