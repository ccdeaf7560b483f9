#include "dist/process_groups.h"

#include <string>

#include "core/error.h"

namespace moe {
namespace {

// MPI_Comm_split is collective over the world: whether to call it depends only on the group
// size, which every rank agrees on, so ranks skip it together.
std::unique_ptr<Communicator> split(int group_size, int color, int world_rank) {
  if (group_size == 1) return make_self_communicator();
  return make_mpi_split_communicator(color, world_rank);  // key: members in world-rank order
}

}  // namespace

ProcessGroups make_single_process_groups() {
  ProcessGroups groups;
  groups.world = make_self_communicator();
  groups.tp = make_self_communicator();
  groups.dp = make_self_communicator();
  groups.ep = make_self_communicator();
  groups.expert_dp = make_self_communicator();
  return groups;
}

ProcessGroups make_process_groups(const ParallelDims& dims) {
  if (dims.world == 1) return make_single_process_groups();

  ProcessGroups groups;
  groups.world = make_mpi_world_communicator();
  if (groups.world->size() != dims.world || groups.world->rank() != dims.world_rank)
    throw RuntimeError("rank " + std::to_string(groups.world->rank()) +
                       ": the layout was built for world rank " +
                       std::to_string(dims.world_rank) + " of " + std::to_string(dims.world) +
                       " processes, but MPI runs " + std::to_string(groups.world->size()));

  const int r = dims.world_rank;
  groups.tp = split(dims.tp, dims.dp_rank, r);
  groups.dp = split(dims.dp, dims.tp_rank, r);
  groups.ep = split(dims.ep, dims.edp_rank * dims.tp + dims.tp_rank, r);
  groups.expert_dp = split(dims.tp * dims.edp, dims.ep_rank, r);
  return groups;
}

}  // namespace moe
