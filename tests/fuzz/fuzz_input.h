// What every fuzz target shares: the input as a file (the parsers read paths, like the
// binaries do), and the rule for a bad input: it may only raise the errors a user sees as one
// line on stderr (moe::UsageError, exit 2; moe::RuntimeError, exit 1). Anything else aborts, and
// libFuzzer saves the input as a crash.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>

#include "core/error.h"

namespace moe::fuzz {

// A finding: print it and abort, so libFuzzer keeps the input.
[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "FUZZ FINDING: %s\n", what.c_str());
  std::abort();
}

inline void check(bool ok, const std::string& what) {
  if (!ok) fail(what);
}

// A file of this process (libFuzzer's -jobs run several) that holds the current input; on
// tmpfs when there is one, since every input is written once. Removed at exit.
class InputFile {
 public:
  explicit InputFile(const std::string& name) {
    const std::string dir = std::filesystem::is_directory("/dev/shm")
                                ? "/dev/shm"
                                : std::filesystem::temp_directory_path().string();
    path_ = dir + "/moe_fuzz_" + std::to_string(getpid()) + "_" + name;
  }
  ~InputFile() { std::remove(path_.c_str()); }

  const std::string& write(const uint8_t* data, size_t size) {
    std::ofstream out(path_, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
    out.close();
    if (!out) fail("cannot write the fuzz input to " + path_);
    return path_;
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Runs `parse` on one input. The expected errors must still be one line, as the binaries print
// them; any other exception is a finding.
template <typename Parse>
void expect_clean_errors(Parse&& parse) {
  try {
    parse();
  } catch (const UsageError& error) {
    check(std::string(error.what()).find('\n') == std::string::npos,
          "UsageError spans several lines: " + std::string(error.what()));
  } catch (const RuntimeError& error) {
    check(std::string(error.what()).find('\n') == std::string::npos,
          "RuntimeError spans several lines: " + std::string(error.what()));
  } catch (const std::exception& other) {
    fail(std::string("unexpected exception: ") + other.what());
  }
}

}  // namespace moe::fuzz
