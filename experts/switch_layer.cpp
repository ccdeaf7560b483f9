#include "experts/switch_layer.h"

#include <algorithm>

#include "core/error.h"
#include "core/random.h"
#include "experts/capacity.h"

namespace moe {

double RouterStats::load_balancing_loss(int top_k) const {
  if (tokens <= 0) return 0.0;
  const double num_experts = static_cast<double>(prob_sums.size());
  double sum = 0.0;
  for (size_t i = 0; i < prob_sums.size(); ++i)
    sum += (prob_sums[i] / tokens) * (choices[i] / tokens);
  return num_experts / top_k * sum;
}

double RouterStats::z_loss() const { return tokens > 0 ? lse_squared_sum / tokens : 0.0; }

double RouterStats::dropped_fraction() const {
  double total = 0.0, kept_total = 0.0;
  for (size_t i = 0; i < choices.size(); ++i) {
    total += choices[i];
    kept_total += kept[i];
  }
  return total > 0 ? 1.0 - kept_total / total : 0.0;
}

SwitchLayer::SwitchLayer(Backend& backend, const SwitchShape& shape, const SwitchGroups& groups,
                         PhaseTimes& times)
    : backend_(backend),
      shape_(shape),
      groups_(groups),
      times_(&times),
      dispatcher_(backend, groups.ep, shape.num_experts) {
  const size_t N = shape.max_tokens, D = shape.hidden, F = shape.ffn, E = shape.num_experts,
               K = shape.top_k, T = (N + groups.tp.size() - 1) / groups.tp.size(), R = T * K,
               L = R * groups.ep.size();  // at most every EP peer's rows land here
  noise_TD_ = Buffer<float>(backend, T * D);
  x_router_TD_ = ActBuffer(backend, T * D);
  logits_TE_ = Buffer<float>(backend, T * E);
  probs_TE_ = Buffer<float>(backend, T * E);
  lse_T_ = Buffer<float>(backend, T);
  expert_idx_TK_ = Buffer<int>(backend, T * K);
  gates_TK_ = Buffer<float>(backend, T * K);
  x_RD_ = ActBuffer(backend, R * D);
  x_LD_ = ActBuffer(backend, L * D);
  h_LF_ = ActBuffer(backend, L * F);
  a_LF_ = ActBuffer(backend, L * F);
  y_LD_ = ActBuffer(backend, L * D);
  y_RD_ = ActBuffer(backend, R * D);
  dy_RD_ = ActBuffer(backend, R * D);
  dy_LD_ = ActBuffer(backend, L * D);
  dh_LF_ = ActBuffer(backend, L * F);
  dx_LD_ = ActBuffer(backend, L * D);
  dx_RD_ = ActBuffer(backend, R * D);
  dgates_TK_ = Buffer<float>(backend, T * K);
  dprobs_TE_ = Buffer<float>(backend, T * E);
  dlogits_TE_ = Buffer<float>(backend, T * E);
  dx_router_TD_ = ActBuffer(backend, T * D);
  if (groups.tp.size() > 1) {
    out_TD_ = ActBuffer(backend, T * D);
    dx_TD_ = ActBuffer(backend, T * D);
    dx_ND_ = ActBuffer(backend, N * D);
  }
  expert_idx_host_.resize(T * K);
  slot_TK_.resize(T * K);
  row_TK_.resize(T * K);
  token_of_row_.resize(R);
  counts_E_.resize(E);
  choices_E_.resize(E);
  offsets_E_.resize(E + 1);
}

// Router: logits = x_router @ W_r^T in fp32, softmax, top-k, capacity.
void SwitchLayer::route(const Act* x, const SwitchWeights& w, const RoutingOptions& options) {
  const int T = num_routed_, D = shape_.hidden, E = shape_.num_experts, K = shape_.top_k;
  const Act* router_input = x;
  jitter_ = options.jitter_eps > 0.0;
  if (jitter_) {
    // The jitter multiplies the router's input alone; the experts see the clean x. Each
    // multiplier is a pure function of (seed, iteration, layer, global token, channel).
    std::vector<float> noise(static_cast<size_t>(T) * D);
    const uint64_t key = random_key({options.seed, hash_string("jitter"),
                                     static_cast<uint64_t>(options.iteration),
                                     static_cast<uint64_t>(shape_.layer)});
    const double lo = 1.0 - options.jitter_eps, width = 2.0 * options.jitter_eps;
    // This rank routes tokens [tp_rank*T, tp_rank*T + T) of the micro-batch.
    const int64_t first = options.first_token + static_cast<int64_t>(groups_.tp.rank()) * T;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; ++t) {
      const uint64_t token_key = random_key({key, static_cast<uint64_t>(first + t)});
      for (int d = 0; d < D; ++d)
        noise[static_cast<size_t>(t) * D + d] =
            static_cast<float>(lo + width * uniform_double(random_key({token_key,
                                                                       static_cast<uint64_t>(d)})));
    }
    backend_.copy_from_host(noise_TD_.data(), noise.data(), noise.size() * sizeof(float));
    backend_.mul(x_router_TD_.data(), x, noise_TD_.data(), static_cast<size_t>(T) * D);
    router_input = x_router_TD_.data();
  }
  backend_.router_logits_forward(logits_TE_.data(), router_input, w.router, T, D, E);
  backend_.softmax_forward(probs_TE_.data(), lse_T_.data(), logits_TE_.data(), T, E);
  backend_.topk_forward(expert_idx_TK_.data(), gates_TK_.data(), probs_TE_.data(), T, E, K);
  const int capacity = expert_capacity(options.capacity_factor, T, K, E);
  backend_.capacity_assign(slot_TK_.data(), counts_E_.data(), choices_E_.data(),
                           expert_idx_TK_.data(), gates_TK_.data(), T, E, K, capacity,
                           options.drop_policy);
}

// Statistics for the auxiliary losses, summed over every rank of the micro-step, packed in one
// buffer so that it is one all-reduce: [prob_sums(E), choices(E), kept(E), S, sum lse^2].
// Called right after routing, while the host waits for the capacity result anyway: the copies
// to the host then wait on the router's small kernels only, not on the experts' work, which a
// GPU runs while the host goes on to the next layer.
void SwitchLayer::sum_statistics() {
  const int T = num_routed_, E = shape_.num_experts;
  std::vector<double> packed(3 * E + 2);
  backend_.column_sums(packed.data(), probs_TE_.data(), T, E);
  for (int e = 0; e < E; ++e) {
    packed[E + e] = choices_E_[e];
    packed[2 * E + e] = counts_E_[e];
  }
  packed[3 * E] = T;
  packed[3 * E + 1] = backend_.sum_squares(lse_T_.data(), T);
  groups_.stats.allreduce_sum(packed.data(), packed.size());
  stats_.prob_sums.assign(packed.begin(), packed.begin() + E);
  stats_.choices.assign(packed.begin() + E, packed.begin() + 2 * E);
  stats_.kept.assign(packed.begin() + 2 * E, packed.begin() + 3 * E);
  stats_.tokens = packed[3 * E];
  stats_.lse_squared_sum = packed[3 * E + 1];
}

// Lays the kept choices out in expert order: expert e owns rows [offsets[e], offsets[e+1]).
void SwitchLayer::permute(const RoutingOptions&) {
  const int T = num_routed_, E = shape_.num_experts, K = shape_.top_k;
  offsets_E_[0] = 0;
  for (int e = 0; e < E; ++e) offsets_E_[e + 1] = offsets_E_[e] + counts_E_[e];
  num_rows_ = offsets_E_[E];
  backend_.copy_to_host(expert_idx_host_.data(), expert_idx_TK_.data(),
                        static_cast<size_t>(T) * K * sizeof(int));
  for (int t = 0; t < T; ++t) {
    for (int k = 0; k < K; ++k) {
      const int choice = t * K + k;
      const int slot = slot_TK_[choice];
      if (slot < 0) {
        row_TK_[choice] = -1;
        continue;
      }
      const int row = offsets_E_[expert_idx_host_[choice]] + slot;
      row_TK_[choice] = row;
      token_of_row_[row] = t;
    }
  }
}

void SwitchLayer::forward(Act* out, const Act* x_ND, const SwitchWeights& w, int num_tokens,
                          const RoutingOptions& options) {
  const int tp = groups_.tp.size();
  MOE_CHECK(num_tokens <= shape_.max_tokens, "micro-batch larger than the layer was sized for");
  MOE_CHECK(num_tokens % tp == 0, "tensor-parallel size must divide the micro-batch's tokens");
  num_tokens_ = num_tokens;
  num_routed_ = num_tokens / tp;
  const int T = num_routed_, D = shape_.hidden, F = shape_.ffn, K = shape_.top_k;
  const ActType type = backend_.activation_type();
  const Act* x = act_at(x_ND, static_cast<size_t>(groups_.tp.rank()) * T * D, type);  // (T, D) mine
  {
    ScopedPhase phase(*times_, Phase::kRouter);
    route(x, w, options);
    sum_statistics();
  }
  {
    ScopedPhase phase(*times_, Phase::kPermute);
    permute(options);
    backend_.gather_rows(x_RD_.data(), x, token_of_row_.data(), num_rows_, D);
  }
  // Rows to the ranks of their experts, one grouped GEMM pass per projection over the local
  // experts, and back.
  {
    ScopedPhase phase(*times_, Phase::kAllToAll);
    handle_ = dispatcher_.plan(counts_E_.data());
    dispatcher_.dispatch(handle_, x_LD_.data(), x_RD_.data(), D);
  }
  const int E_local = dispatcher_.num_local_experts();
  const int* local_offsets = handle_.local_offsets.data();
  {
    ScopedPhase phase(*times_, Phase::kExpertGemm);
    backend_.grouped_linear_gelu_forward(h_LF_.data(), a_LF_.data(), x_LD_.data(), w.fc_w,
                                         w.fc_b, local_offsets, E_local, D, F);
    backend_.grouped_linear_forward(y_LD_.data(), a_LF_.data(), w.proj_w, w.proj_b,
                                    local_offsets, E_local, F, D);
  }
  {
    ScopedPhase phase(*times_, Phase::kAllToAll);
    dispatcher_.combine(handle_, y_RD_.data(), y_LD_.data(), D);
  }
  {
    ScopedPhase phase(*times_, Phase::kCombine);
    Act* out_TD = tp > 1 ? out_TD_.data() : out;
    backend_.combine_forward(out_TD, y_RD_.data(), gates_TK_.data(), row_TK_.data(), T, K, D);
    if (tp > 1) groups_.tp.allgather(out, out_TD, static_cast<size_t>(T) * D, type);
  }
}

void SwitchLayer::backward(Act* dx_ND, const SwitchGrads& g, const Act* dout_ND,
                           const Act* x_ND, const SwitchWeights& w, float aux_scale,
                           float z_scale) {
  const int tp = groups_.tp.size(), N = num_tokens_, T = num_routed_, D = shape_.hidden,
            F = shape_.ffn, E = shape_.num_experts, K = shape_.top_k, R = num_rows_,
            E_local = dispatcher_.num_local_experts();
  const int* local_offsets = handle_.local_offsets.data();
  const ActType type = backend_.activation_type();
  const size_t slice = static_cast<size_t>(groups_.tp.rank()) * T * D;
  const Act* dout = act_at(dout_ND, slice, type);  // (T, D)
  const Act* x = act_at(x_ND, slice, type);        // (T, D)
  Act* dx = dx_ND;                                 // (T, D) +=, my slice of dx
  if (tp > 1) {
    dx_TD_.zero();
    dx = dx_TD_.data();
  }

  // combine -> expert FFN -> dispatch -> gather, in reverse: the backward of combine is
  // dispatch and the backward of dispatch is combine.
  {
    ScopedPhase phase(*times_, Phase::kCombine);
    dy_RD_.zero();
    dgates_TK_.zero();
    backend_.combine_backward(dy_RD_.data(), dgates_TK_.data(), dout, y_RD_.data(),
                              gates_TK_.data(), row_TK_.data(), T, K, D);
  }
  {
    ScopedPhase phase(*times_, Phase::kAllToAll);
    dispatcher_.dispatch(handle_, dy_LD_.data(), dy_RD_.data(), D);
  }
  {
    ScopedPhase phase(*times_, Phase::kExpertGemm);
    backend_.gelu_grouped_linear_backward(dh_LF_.data(), g.proj_w, g.proj_b, dy_LD_.data(),
                                          a_LF_.data(), w.proj_w, h_LF_.data(), local_offsets,
                                          E_local, F, D);
    dx_LD_.zero();
    backend_.grouped_linear_backward(dx_LD_.data(), g.fc_w, g.fc_b, dh_LF_.data(), x_LD_.data(),
                                     w.fc_w, local_offsets, E_local, D, F);
  }
  {
    ScopedPhase phase(*times_, Phase::kAllToAll);
    dispatcher_.combine(handle_, dx_RD_.data(), dx_LD_.data(), D);
  }
  {
    ScopedPhase phase(*times_, Phase::kPermute);
    backend_.scatter_add_rows(dx, dx_RD_.data(), token_of_row_.data(), R, D);
  }
  ScopedPhase router_phase(*times_, Phase::kRouter);

  // Router: gates -> probs, plus the load-balancing loss, which reaches the router through
  // P_i = mean_t p_ti only: d lb / d p_ti = (E/k) f_i / S. Each rank divides by the tokens of
  // one data-parallel replica (N): summing router gradients over tp and averaging over dp
  // then gives the global mean.
  dprobs_TE_.zero();
  backend_.topk_backward(dprobs_TE_.data(), dgates_TK_.data(), expert_idx_TK_.data(),
                         probs_TE_.data(), T, E, K);
  std::vector<float> dlb_dp(E);
  for (int e = 0; e < E; ++e)
    dlb_dp[e] = static_cast<float>(aux_scale * (static_cast<double>(E) / K) *
                                   (stats_.choices[e] / stats_.tokens) / N);
  backend_.add_row_vector(dprobs_TE_.data(), dlb_dp.data(), T, E);
  dlogits_TE_.zero();
  backend_.softmax_backward(dlogits_TE_.data(), dprobs_TE_.data(), probs_TE_.data(), T, E);
  // z-loss = mean_t lse_t^2: d/dlogits = 2 lse p / S.
  backend_.zloss_backward(dlogits_TE_.data(), probs_TE_.data(), lse_T_.data(),
                          z_scale / static_cast<float>(N), T, E);

  // logits = x_router @ W_r^T, and x_router = x * noise when jittered.
  if (!jitter_) {
    backend_.router_logits_backward(dx, g.router, dlogits_TE_.data(), x, w.router, T, D, E);
  } else {
    dx_router_TD_.zero();
    backend_.router_logits_backward(dx_router_TD_.data(), g.router, dlogits_TE_.data(),
                                    x_router_TD_.data(), w.router, T, D, E);
    backend_.mul(dx_router_TD_.data(), dx_router_TD_.data(), noise_TD_.data(),
                 static_cast<size_t>(T) * D);
    backend_.accumulate(dx, dx_router_TD_.data(), static_cast<size_t>(T) * D);
  }
  if (tp > 1) {
    // Every tp rank needs the whole dx: it continues into the replicated ln_2.
    groups_.tp.allgather(dx_ND_.data(), dx, static_cast<size_t>(T) * D, type);
    backend_.accumulate(dx_ND, dx_ND_.data(), static_cast<size_t>(N) * D);
  }
}

}  // namespace moe
