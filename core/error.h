// Errors that reach the user as one line on stderr. UsageError exits 2 (bad flag, value,
// configuration or combination); RuntimeError exits 1 (a file that is missing or damaged,
// a failure while running). MOE_CHECK adds file:line for internal invariants.
#pragma once

#include <stdexcept>
#include <string>

namespace moe {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct RuntimeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#define MOE_CHECK(cond, msg)                                                                 \
  do {                                                                                       \
    if (!(cond))                                                                             \
      throw ::moe::RuntimeError(std::string(__FILE__) + ":" + std::to_string(__LINE__) +     \
                                ": " + (msg));                                               \
  } while (0)

}  // namespace moe
