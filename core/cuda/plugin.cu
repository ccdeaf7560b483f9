// The entry points of the CUDA backend plugin (libmoe_cuda_backend.so), which
// core/cuda_loader.cpp opens with dlopen on first use: a process that never asks for a GPU
// never maps cuBLASLt (half a gigabyte, seconds to load on the CI machines). C linkage, and
// no exception crosses the boundary: failures come back as a message.
#include <cstring>
#include <exception>
#include <memory>
#include <string>

#include "core/cuda/cuda_backend.h"
#include "core/cuda/profiling_backend.h"

namespace {

int report(const std::exception& e, char* error, size_t size) {
  std::strncpy(error, e.what(), size - 1);
  error[size - 1] = '\0';
  return 1;
}

}  // namespace

extern "C" {

// Writes "" when a device is usable, else why not.
int moe_cuda_plugin_unavailable_reason(char* reason, size_t size) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  std::string why;
  if (status != cudaSuccess)
    why = std::string("no CUDA device: cudaGetDeviceCount says ") + cudaGetErrorString(status);
  else if (count == 0)
    why = "no CUDA device: the driver sees no GPU";
  std::strncpy(reason, why.c_str(), size - 1);
  reason[size - 1] = '\0';
  return 0;
}

int moe_cuda_plugin_make_backend(int device, moe::Backend** backend, char* error, size_t size) {
  try {
    *backend = moe::profile_if_asked(std::make_unique<moe::CudaBackend>(device)).release();
    return 0;
  } catch (const std::exception& e) {
    return report(e, error, size);
  }
}

int moe_cuda_plugin_gemm_rate(int m, int n, int k, int reps, moe::GemmRate* rate, char* error,
                              size_t size) {
  try {
    *rate = moe::measure_gemm_rate(m, n, k, reps);
    return 0;
  } catch (const std::exception& e) {
    return report(e, error, size);
  }
}

}  // extern "C"
