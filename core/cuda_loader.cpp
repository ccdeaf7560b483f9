// make_cuda_backend and friends: they open the CUDA backend plugin (core/cuda/plugin.cu, built
// as libmoe_cuda_backend.so when CMake finds nvcc) the first time a GPU is asked for, so CPU
// runs and every test that never touches a GPU do not pay for loading cuBLASLt. The plugin's
// path is fixed at build time (MOE_CUDA_BACKEND_PLUGIN, empty in a build without CUDA); the
// environment variable MOE_CUDA_BACKEND_PLUGIN overrides it.
#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <string>

#include "core/backend.h"
#include "core/cuda_gemm_rate.h"
#include "core/error.h"

namespace moe {
namespace {

using UnavailableReasonFn = int (*)(char*, size_t);
using MakeBackendFn = int (*)(int, Backend**, char*, size_t);
using GemmRateFn = int (*)(int, int, int, int, GemmRate*, char*, size_t);

struct Plugin {
  std::string error;  // why it could not be used; empty when loaded
  UnavailableReasonFn unavailable_reason = nullptr;
  MakeBackendFn make_backend = nullptr;
  GemmRateFn gemm_rate = nullptr;
};

const Plugin& plugin() {
  static Plugin p;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* override_path = std::getenv("MOE_CUDA_BACKEND_PLUGIN");
    const std::string path = override_path ? override_path : MOE_CUDA_BACKEND_PLUGIN;
    if (path.empty()) {
      p.error = "this build has no CUDA backend (configured with MOE_ENABLE_CUDA=OFF, or AUTO "
                "without nvcc)";
      return;
    }
    // Never closed: the backend objects it makes live in it.
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* why = dlerror();
      p.error = "cannot load the CUDA backend " + path + ": " + (why ? why : "dlopen failed");
      return;
    }
    p.unavailable_reason =
        reinterpret_cast<UnavailableReasonFn>(dlsym(handle, "moe_cuda_plugin_unavailable_reason"));
    p.make_backend = reinterpret_cast<MakeBackendFn>(dlsym(handle, "moe_cuda_plugin_make_backend"));
    p.gemm_rate = reinterpret_cast<GemmRateFn>(dlsym(handle, "moe_cuda_plugin_gemm_rate"));
    if (!p.unavailable_reason || !p.make_backend || !p.gemm_rate)
      p.error = path + " is not a CUDA backend plugin of this build (missing entry points)";
  });
  return p;
}

}  // namespace

std::string cuda_unavailable_reason() {
  const Plugin& p = plugin();
  if (!p.error.empty()) return "no CUDA device: " + p.error;
  char reason[512];
  p.unavailable_reason(reason, sizeof(reason));
  return reason;
}

std::unique_ptr<Backend> make_cuda_backend(int device) {
  const Plugin& p = plugin();
  if (!p.error.empty()) throw RuntimeError("--device cuda: " + p.error);
  Backend* backend = nullptr;
  char error[1024];
  if (p.make_backend(device, &backend, error, sizeof(error)) != 0) throw RuntimeError(error);
  return std::unique_ptr<Backend>(backend);
}

GemmRate measure_cuda_gemm_rate(int m, int n, int k, int reps) {
  const Plugin& p = plugin();
  if (!p.error.empty()) throw RuntimeError("measure_cuda_gemm_rate: " + p.error);
  GemmRate rate;
  char error[1024];
  if (p.gemm_rate(m, n, k, reps, &rate, error, sizeof(error)) != 0) throw RuntimeError(error);
  return rate;
}

}  // namespace moe
