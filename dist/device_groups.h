// What --device cuda needs from dist/: which GPU this rank drives, and process groups whose
// collectives work on device memory.
#pragma once

#include "dist/process_groups.h"

namespace moe {

// This process's index among the ranks on its node (MPI_Comm_split_type shared); 0 without
// MPI initialised. With one rank per GPU it is the rank's device.
int node_local_rank();

// The same groups as `host_groups` (same members and ranks), each wrapped by
// make_nccl_communicator: the world from an ncclUniqueId, the rest split from it. A world of
// one process needs no NCCL: its groups copy device memory with cudaMemcpy. Collective over
// every rank. Throws RuntimeError in a build without CUDA.
ProcessGroups make_device_process_groups(ProcessGroups host_groups, double timeout_seconds);

}  // namespace moe
