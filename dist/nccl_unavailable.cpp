// The NCCL entry points of a build without CUDA: they say so.
#include "core/error.h"
#include "dist/communicator.h"
#include "dist/device_groups.h"

namespace moe {

std::unique_ptr<Communicator> make_nccl_communicator(std::unique_ptr<Communicator>, Communicator*,
                                                     double) {
  throw RuntimeError("NCCL communicator: this build has no CUDA (MOE_ENABLE_CUDA=OFF, or AUTO "
                     "without nvcc)");
}

ProcessGroups make_device_process_groups(ProcessGroups, double) {
  throw RuntimeError("--device cuda: this build has no CUDA (MOE_ENABLE_CUDA=OFF, or AUTO "
                     "without nvcc)");
}

}  // namespace moe
