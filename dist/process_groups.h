// The communicators of one parallel layout (see dist/parallel_dims.h for the rank order).
// Each group lists its members in world-rank order, so a communicator's rank() is the
// matching ParallelDims rank (tp_rank, dp_rank, ep_rank).
#pragma once

#include <memory>

#include "dist/communicator.h"
#include "dist/parallel_dims.h"

namespace moe {

struct ProcessGroups {
  // Every process: losses and metrics summed over the run, checkpoints gathered on rank 0.
  std::unique_ptr<Communicator> world;
  // Same dp_rank (size tp, rank = tp_rank): the Megatron column/row split of attention and
  // dense FFN weights; the all-reduce after each row-parallel layer.
  std::unique_ptr<Communicator> tp;
  // Same tp_rank (size dp, rank = dp_rank): averages the dense (non-expert) gradients and
  // sums the routing statistics of the load-balancing loss.
  std::unique_ptr<Communicator> dp;
  // Same tp_rank and edp_rank (size ep, rank = ep_rank): the all-to-all that dispatches tokens
  // to the ranks holding their experts and combines the results back.
  std::unique_ptr<Communicator> ep;
  // Same ep_rank, over every tp_rank and edp_rank (size tp x edp): every rank holding the
  // same experts; summing over it gives the expert weights' gradient.
  std::unique_ptr<Communicator> expert_dp;
};

// Splits MPI_COMM_WORLD (collective over it: every rank calls this with the same layout).
// A group of one process gets a self communicator, and world 1 makes no MPI calls.
ProcessGroups make_process_groups(const ParallelDims& dims);

// Every group a self communicator: one process, no MPI calls.
ProcessGroups make_single_process_groups();

}  // namespace moe
