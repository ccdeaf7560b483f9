#include "launcher/device.h"

#include "core/error.h"
#include "dist/device_groups.h"

namespace moe {

std::unique_ptr<Backend> make_backend(const std::string& device) {
  if (device == "cpu") return make_cpu_backend();
  if (device == "cuda") return make_cuda_backend(node_local_rank());
  throw UsageError("--device " + device + ": expected cpu or cuda");
}

}  // namespace moe
