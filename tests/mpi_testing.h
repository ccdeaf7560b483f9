// Small helpers shared by the MPI test suites (tests/mpi_test_*.cpp).
#pragma once

#include <mpi.h>

#include "launcher/options.h"

namespace moe::testing {

inline int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

inline int world_size() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

// The tiny Switch model of the MPI trainer suites: 2 layers (the second with 4 experts, top-1),
// hidden 32, 4 heads, byte vocabulary, windows of 16 tokens, dropless, one thread, no
// held-out windows. Each suite sets its own batch, schedule, layout and data.
inline TrainOptions tiny_train_options() {
  TrainOptions o;
  o.model.num_layers = 2;
  o.model.hidden_size = 32;
  o.model.num_attention_heads = 4;
  o.model.ffn_hidden_size = 64;
  o.model.num_experts = 4;
  o.model.moe_layer_freq = 2;
  o.model.moe_router_topk = 1;
  o.model.vocab_size = 256;
  o.model.max_position_embeddings = 16;
  o.seq_length = 16;
  o.capacity_factor = 0.0;  // dropless
  o.valid_fraction = 0.0;
  o.threads = 1;
  return o;
}

}  // namespace moe::testing
