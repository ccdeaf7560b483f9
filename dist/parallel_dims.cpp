#include "dist/parallel_dims.h"

#include <cstdint>
#include <string>

#include "core/error.h"

namespace moe {
namespace {

std::string str(int64_t value) { return std::to_string(value); }

void require(bool ok, const std::string& message) {
  if (!ok) throw UsageError(message);
}

}  // namespace

ParallelDims ParallelDims::build(int world_size, int world_rank, int tp, int ep,
                                 int num_attention_heads, int ffn_hidden_size, int num_experts,
                                 int micro_batch_size, int global_batch_size) {
  // The world comes from MPI, not from a flag: a bad one is a bug, not a usage error.
  MOE_CHECK(world_size >= 1 && world_rank >= 0 && world_rank < world_size,
            "world rank " + str(world_rank) + " of world size " + str(world_size));

  const std::string tp_flag = "--tensor-model-parallel-size " + str(tp);
  require(tp >= 1, "--tensor-model-parallel-size must be at least 1, not " + str(tp));
  require(world_size % tp == 0,
          tp_flag + " does not divide the number of processes " + str(world_size));
  const int dp = world_size / tp;

  const std::string ep_flag = "--expert-model-parallel-size " + str(ep);
  require(ep >= 1, "--expert-model-parallel-size must be at least 1, not " + str(ep));
  require(dp % ep == 0, ep_flag + " does not divide the data-parallel size " + str(dp) + " (" +
                            str(world_size) + " processes / " + tp_flag + ")");
  if (num_experts > 0)
    require(num_experts % ep == 0,
            ep_flag + " does not divide --num-experts " + str(num_experts));
  else
    require(ep == 1, ep_flag + " needs experts to shard, but --num-experts is " +
                         str(num_experts));

  require(num_attention_heads % tp == 0,
          tp_flag + " does not divide --num-attention-heads " + str(num_attention_heads));
  require(ffn_hidden_size % tp == 0,
          tp_flag + " does not divide --ffn-hidden-size " + str(ffn_hidden_size));

  require(micro_batch_size >= 1,
          "--micro-batch-size must be at least 1, not " + str(micro_batch_size));
  require(global_batch_size >= 0,
          "--global-batch-size must be 0 (micro x data-parallel size) or positive, not " +
              str(global_batch_size));
  const int64_t samples_per_step = int64_t{micro_batch_size} * dp;  // one micro-step, all dp
  require(global_batch_size == 0 || global_batch_size % samples_per_step == 0,
          "--global-batch-size " + str(global_batch_size) +
              " is not a multiple of --micro-batch-size " + str(micro_batch_size) +
              " x data-parallel size " + str(dp) + " = " + str(samples_per_step));
  require(samples_per_step <= INT32_MAX,
          "--micro-batch-size " + str(micro_batch_size) + " x data-parallel size " + str(dp) +
              " overflows the global batch size");

  ParallelDims dims;
  dims.world = world_size;
  dims.tp = tp;
  dims.dp = dp;
  dims.ep = ep;
  dims.edp = dp / ep;
  dims.world_rank = world_rank;
  dims.tp_rank = world_rank % tp;
  dims.dp_rank = world_rank / tp;
  dims.ep_rank = dims.dp_rank % ep;
  dims.edp_rank = dims.dp_rank / ep;
  dims.global_batch_size =
      global_batch_size == 0 ? static_cast<int>(samples_per_step) : global_batch_size;
  return dims;
}

}  // namespace moe
