// MOE_CUDA_PROFILE=1 wraps the CUDA backend in a per-op GPU timer (profiling_backend.cu).
#pragma once

#include <memory>

#include "core/backend.h"

namespace moe {

// `backend` itself unless MOE_CUDA_PROFILE is set (and not 0); then a Backend that forwards
// every call to it, timing each op with CUDA events, and prints the table when destroyed.
std::unique_ptr<Backend> profile_if_asked(std::unique_ptr<Backend> backend);

}  // namespace moe
