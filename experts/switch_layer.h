// One Switch FFN layer (DESIGN.md, Router and Losses): a router picks top-k experts per token,
// capacity drops the overflow, the tokens are permuted into expert order, the local experts run
// as one grouped GEMM pass, and the results are combined gate-weighted back into token order.
//
//   x_TD --router--> probs_TE --topk--> expert_idx_TK, gates_TK --capacity--> row_TK
//        --gather--> x_RD --dispatch--> x_LD --expert FFN--> y_LD --combine--> y_RD
//        --combine(gates)--> out_TD
//
// With tensor parallelism the tp ranks hold the same N tokens; each routes its 1/tp slice, so no
// expert work is duplicated, and the outputs are all-gathered afterwards.
//
// N = tokens of the micro-batch, T = N/tp = this rank's routing group, D = hidden size,
// E = experts, K = top-k, R = kept choices (rows in global expert order), L = rows this rank's
// experts received (in local expert order), F = expert FFN width.
#pragma once

#include <cstdint>
#include <vector>

#include "core/backend.h"
#include "core/buffer.h"
#include "core/phase_times.h"
#include "dist/communicator.h"
#include "experts/dispatcher.h"

namespace moe {

struct SwitchShape {
  int max_tokens;     // N_max: the most tokens a micro-batch will bring
  int hidden;         // D
  int ffn;            // F
  int num_experts;    // E
  int top_k;          // K
  int layer;          // the model layer index, for the jitter's random key
};

struct RoutingOptions {
  double capacity_factor = 1.0;  // the factor in effect (training or evaluation); 0 = dropless
  DropPolicy drop_policy = DropPolicy::kPosition;
  double jitter_eps = 0.0;       // router-input jitter U[1-eps, 1+eps]; 0 = off
  uint64_t seed = 0;
  int64_t iteration = 0;         // 1-based training iteration, for the jitter's key
  int64_t first_token = 0;       // global index of this micro-batch's first token
};

// The local experts' weights: E_local = E / ep experts with contiguous global ids.
struct SwitchWeights {
  const float* router;   // (E, D)
  const float* fc_w;     // (E_local, F, D)
  const float* fc_b;     // (E_local, F)
  const float* proj_w;   // (E_local, D, F)
  const float* proj_b;   // (E_local, D)
};

struct SwitchGrads {
  float* router;   // (E, D)
  float* fc_w;     // (E_local, F, D)
  float* fc_b;     // (E_local, F)
  float* proj_w;   // (E_local, D, F)
  float* proj_b;   // (E_local, D)
};

// The process groups a Switch layer talks to.
struct SwitchGroups {
  Communicator& tp;     // ranks holding the same tokens: each routes a 1/tp slice
  Communicator& ep;     // ranks exchanging tokens for each other's experts
  Communicator& stats;  // every rank of the micro-step: routing statistics are summed here
};

// Routing statistics of one micro-step, summed over every rank that shares it.
struct RouterStats {
  std::vector<double> prob_sums;  // (E) sum over tokens of p_i
  std::vector<double> choices;    // (E) top-k choices of expert i, before capacity
  std::vector<double> kept;       // (E) choices kept after capacity
  double tokens = 0;              // S
  double lse_squared_sum = 0;     // sum over tokens of logsumexp(logits)^2

  // (E/k) * sum_i P_i f_i: 1.0 under perfect balance.
  double load_balancing_loss(int top_k) const;
  // mean over tokens of logsumexp^2
  double z_loss() const;
  double dropped_fraction() const;
};

class SwitchLayer {
 public:
  // `times` receives the wall time of each phase (router, permute, all-to-all, expert GEMM,
  // combine) of every forward and backward.
  SwitchLayer(Backend& backend, const SwitchShape& shape, const SwitchGroups& groups,
              PhaseTimes& times);

  // out = sum over kept choices of g * expert(x), for all N tokens. The routing statistics are
  // summed over the stats group, so the losses do not depend on the layout.
  void forward(Act* out,              // (N, D)
               const Act* x,          // (N, D) the ln_2 output
               const SwitchWeights& w, int num_tokens, const RoutingOptions& options);

  // Accumulates dx and every weight gradient. aux_scale and z_scale are d(total loss)/d(lb)
  // and d(total loss)/d(z) for this micro-step (coefficient / number of micro-steps).
  void backward(Act* dx,              // (N, D) +=
                const SwitchGrads& g,
                const Act* dout,      // (N, D)
                const Act* x,         // (N, D)
                const SwitchWeights& w, float aux_scale, float z_scale);

  const RouterStats& stats() const { return stats_; }
  // Which expert each choice went to and its gate (host copies), for analysis tools.
  const std::vector<int>& expert_idx_host() const { return expert_idx_host_; }
  const std::vector<int>& row_host() const { return row_TK_; }

 private:
  void route(const Act* x, const SwitchWeights& w, const RoutingOptions& options);
  void permute(const RoutingOptions& options);
  void sum_statistics();

  Backend& backend_;
  SwitchShape shape_;
  SwitchGroups groups_;
  PhaseTimes* times_;
  ExpertDispatcher dispatcher_;
  DispatchHandle handle_;
  int num_tokens_ = 0;   // N
  int num_routed_ = 0;   // T = N / tp
  bool jitter_ = false;
  RouterStats stats_;

  // forward, saved for backward
  Buffer<float> noise_TD_;       // (T, D) jitter multipliers
  ActBuffer x_router_TD_;        // (T, D) the jittered router input
  Buffer<float> logits_TE_;      // (T, E)
  Buffer<float> probs_TE_;       // (T, E)
  Buffer<float> lse_T_;          // (T)
  Buffer<int> expert_idx_TK_;    // (T, K)
  Buffer<float> gates_TK_;       // (T, K)
  ActBuffer x_RD_;               // (T*K, D) tokens in global expert order
  ActBuffer x_LD_;               // (ep*T*K, D) rows received for the local experts
  ActBuffer h_LF_;               // (ep*T*K, F) c_fc output
  ActBuffer a_LF_;               // (ep*T*K, F) gelu output
  ActBuffer y_LD_;               // (ep*T*K, D) local expert outputs
  ActBuffer y_RD_;               // (T*K, D) expert outputs back home, global expert order
  ActBuffer out_TD_;             // (T, D) this rank's slice of the output (tp > 1)
  // host-side routing layout
  std::vector<int> expert_idx_host_;  // (T, K)
  std::vector<int> slot_TK_;          // (T, K) position within the expert, -1 dropped
  std::vector<int> row_TK_;           // (T, K) row of the choice in expert order, -1 dropped
  std::vector<int> token_of_row_;     // (R) source token of each row
  std::vector<int> counts_E_;         // (E) kept rows per expert
  std::vector<int> choices_E_;        // (E) choices before capacity
  std::vector<int> offsets_E_;        // (E+1) first row of each expert
  int num_rows_ = 0;                  // R

  // backward scratch
  ActBuffer dy_RD_;              // (T*K, D)
  ActBuffer dy_LD_;              // (ep*T*K, D)
  ActBuffer dh_LF_;              // (ep*T*K, F)
  ActBuffer dx_LD_;              // (ep*T*K, D)
  ActBuffer dx_RD_;              // (T*K, D)
  ActBuffer dx_TD_;              // (T, D) this rank's slice of dx (tp > 1)
  ActBuffer dx_ND_;              // (N, D) the gathered dx (tp > 1)
  Buffer<float> dgates_TK_;      // (T, K)
  Buffer<float> dprobs_TE_;      // (T, E)
  Buffer<float> dlogits_TE_;     // (T, E)
  ActBuffer dx_router_TD_;       // (T, D)
};

}  // namespace moe
