// The real llm.c shard of ../shared/data (shared/README.md) through load_tokens. CMake registers
// this check only when the shard sits beside the checkout, so a machine without the data runs
// no such test instead of reporting a skip.
#include <gtest/gtest.h>

#include <string>

#include "launcher/data.h"

namespace moe {
namespace {

TEST(RealData, LoadsTheTinyShakespeareValidationShard) {
  const TokenStream stream = load_tokens(MOE_REAL_SHARD, DataFormat::kAuto);
  EXPECT_EQ(stream.format, DataFormat::kLlmc);
  ASSERT_EQ(stream.tokens.size(), 32768u);
  EXPECT_EQ(stream.tokens.front(), 50256);  // <|endoftext|>
  EXPECT_LT(stream.max_token, 50257);
}

}  // namespace
}  // namespace moe
