// --device: the backend a process runs its ops on.
#pragma once

#include <memory>
#include <string>

#include "core/backend.h"

namespace moe {

// "cpu", or "cuda": the GPU of this rank's node-local rank (one rank per GPU). UsageError (exit
// 2) for any other name; RuntimeError (exit 1) when this build or machine has no CUDA device.
std::unique_ptr<Backend> make_backend(const std::string& device);

}  // namespace moe
