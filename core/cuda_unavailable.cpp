// The CUDA entry points of a build without CUDA (MOE_ENABLE_CUDA=OFF, or AUTO without nvcc):
// they say so, and GPU tests skip with that reason.
#include "core/backend.h"
#include "core/cuda_gemm_rate.h"
#include "core/error.h"

namespace moe {

std::string cuda_unavailable_reason() {
  return "no CUDA device: this build has no CUDA backend (configured with MOE_ENABLE_CUDA=OFF, "
         "or AUTO without nvcc)";
}

std::unique_ptr<Backend> make_cuda_backend(int) {
  throw RuntimeError("--device cuda: this build has no CUDA backend (reconfigure with "
                     "MOE_ENABLE_CUDA=ON on a machine with nvcc)");
}

GemmRate measure_cuda_gemm_rate(int, int, int, int) {
  throw RuntimeError("measure_cuda_gemm_rate: this build has no CUDA backend");
}

}  // namespace moe
