// Expert-parallel token exchange (DeepEP's shape): dispatch sends each row to the rank of the
// expert group that holds its expert and returns a handle; combine uses the handle to send the
// expert outputs back. Counts travel before tokens. The backward of dispatch is combine and the
// backward of combine is dispatch, with the same handle.
//
// Rank p of the EP group holds experts [p*L, (p+1)*L), L = E/ep. Rows leave in global expert
// order (x_RD, expert e at offsets[e]) and land in local-expert, then source-rank order, so that
// one grouped GEMM walks them.
#pragma once

#include <cstdint>
#include <vector>

#include "core/backend.h"
#include "core/buffer.h"
#include "dist/communicator.h"

namespace moe {

// Rows move in one all-to-all round per local expert j: in round j peer p's rows of its expert
// p*L+j go straight from their place in x_RD to theirs in x_local, so neither side copies.
struct DispatchHandle {
  std::vector<int64_t> send_rows;   // (ep) rows sent to each peer
  std::vector<int64_t> recv_rows;   // (ep) rows received from each peer
  std::vector<int> local_offsets;   // (L+1) first local row of each local expert
  int num_local_rows = 0;           // R_local
  struct Round {
    std::vector<int64_t> send_rows, send_first;  // (ep) rows for peer p's expert j, first in x_RD
    std::vector<int64_t> recv_rows, recv_first;  // (ep) rows from peer s for expert j, first local
  };
  std::vector<Round> rounds;  // (L)
};

class ExpertDispatcher {
 public:
  ExpertDispatcher(Backend& backend, Communicator& ep_group, int num_experts);

  // Exchanges the per-expert counts (E, this rank's kept rows of every expert) and plans the
  // row exchange.
  DispatchHandle plan(const int* counts_E) const;
  // x_local (R_local, D) in local-expert order <- x_RD (R, D) in global expert order.
  void dispatch(const DispatchHandle& handle, Act* x_local, const Act* x_RD, int D);
  // y_RD (R, D) in global expert order <- y_local (R_local, D): the reverse exchange.
  void combine(const DispatchHandle& handle, Act* y_RD, const Act* y_local, int D);

  int num_local_experts() const { return num_local_experts_; }
  int ep_size() const { return ep_group_.size(); }

 private:
  Backend& backend_;
  Communicator& ep_group_;
  int num_experts_;
  int num_local_experts_;
};

}  // namespace moe
