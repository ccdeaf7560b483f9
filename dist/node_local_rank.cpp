// The node-local rank: ranks sharing a node (MPI_COMM_TYPE_SHARED) numbered from 0, which
// picks each rank's GPU when every node runs one rank per GPU.
#include <mpi.h>

#include "dist/device_groups.h"

namespace moe {

int node_local_rank() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) return 0;
  MPI_Comm node = MPI_COMM_NULL;
  if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) !=
      MPI_SUCCESS)
    return 0;
  int rank = 0;
  MPI_Comm_rank(node, &rank);
  MPI_Comm_free(&node);
  return rank;
}

}  // namespace moe
