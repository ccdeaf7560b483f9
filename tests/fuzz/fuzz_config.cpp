// The config-file parser (launcher/options.cpp, --config FILE): the input is the INI file of
// `moe-train --config FILE` and of `moe-eval --config FILE`. Any file either gives options
// that passed validation or raises one UsageError line.
#include <cstdint>
#include <string>
#include <vector>

#include "launcher/options.h"
#include "tests/fuzz/fuzz_input.h"

namespace {

template <typename Parse>
void parse_with_config(Parse&& parse, const char* program, const std::string& path) {
  std::vector<std::string> args = {program, "--config", path};
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  moe::fuzz::expect_clean_errors([&] { parse(static_cast<int>(args.size()), argv.data()); });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static moe::fuzz::InputFile input("config.ini");
  const std::string& path = input.write(data, size);
  // One program per input, picked by the input's length, so both see every kind of file at
  // half the cost (each parse builds Boost's whole option table).
  if (size % 2 == 0)
    parse_with_config(moe::parse_train_options, "moe-train", path);
  else
    parse_with_config(moe::parse_eval_options, "moe-eval", path);
  return 0;
}
