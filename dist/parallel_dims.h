// The parallel layout of one run, validated once at start-up (torchtitan's ParallelDims).
//
// world = tp x dp, and ep divides dp (DESIGN.md, Parallel layout). Rank order, as in
// Megatron-LM, with tensor-parallel ranks consecutive because they talk the most:
//
//   world_rank = dp_rank * tp + tp_rank      tp_rank = world_rank % tp, dp_rank = world_rank / tp
//   ep_rank    = dp_rank % ep                ep consecutive dp ranks form one expert-parallel group
//   edp_rank   = dp_rank / ep                which expert-parallel group; edp = dp / ep of them
//
// Example, world 8, tp 2, ep 2 (dp 4, edp 2):
//   world_rank  0 1 2 3 4 5 6 7
//   tp_rank     0 1 0 1 0 1 0 1
//   dp_rank     0 0 1 1 2 2 3 3
//   ep_rank     0 0 1 1 0 0 1 1
//   edp_rank    0 0 0 0 1 1 1 1
// The expert-parallel rank ep_rank holds experts [ep_rank*E/ep, (ep_rank+1)*E/ep).
#pragma once

namespace moe {

struct ParallelDims {
  int world = 1;  // processes in the run
  int tp = 1;     // tensor-parallel size (--tensor-model-parallel-size)
  int dp = 1;     // data-parallel size = world / tp
  int ep = 1;     // expert-parallel size (--expert-model-parallel-size), divides dp
  int edp = 1;    // expert-parallel groups within one data-parallel group = dp / ep

  int world_rank = 0, tp_rank = 0, dp_rank = 0, ep_rank = 0, edp_rank = 0;

  int global_batch_size = 1;  // resolved: 0 on the command line means micro x dp

  // Checks every constraint before any work; each violation is a one-line UsageError that
  // names the flag and the numbers. global_batch_size 0 means micro_batch_size x dp.
  static ParallelDims build(int world_size, int world_rank, int tp, int ep,
                            int num_attention_heads, int ffn_hidden_size, int num_experts,
                            int micro_batch_size, int global_batch_size);

  // The experts this rank holds: contiguous global ids [first_expert, first + num_local).
  int num_local_experts(int num_experts) const { return num_experts / ep; }
  int first_expert(int num_experts) const { return ep_rank * (num_experts / ep); }
};

}  // namespace moe
