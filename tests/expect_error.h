// error_message<Error>(action): what a test expects an action to throw, shared by the suites.
#pragma once

#include <gtest/gtest.h>

#include <exception>
#include <string>

namespace moe::testing {

// The message of the `Error` that `action` throws; a test failure if it throws nothing or
// something else.
template <typename Error, typename Action>
std::string error_message(Action&& action) {
  try {
    action();
  } catch (const Error& error) {
    return error.what();
  } catch (const std::exception& other) {
    ADD_FAILURE() << "threw the wrong type: " << other.what();
    return "";
  }
  ADD_FAILURE() << "threw nothing";
  return "";
}

}  // namespace moe::testing
