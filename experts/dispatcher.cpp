#include "experts/dispatcher.h"

#include "core/error.h"

namespace moe {

ExpertDispatcher::ExpertDispatcher(Backend& backend, Communicator& ep_group, int num_experts)
    : backend_(backend),
      ep_group_(ep_group),
      num_experts_(num_experts),
      num_local_experts_(num_experts / ep_group.size()) {
  MOE_CHECK(num_experts % ep_group.size() == 0, "expert-parallel size must divide the experts");
}

DispatchHandle ExpertDispatcher::plan(const int* counts_E) const {
  const int ep = ep_group_.size(), L = num_local_experts_;
  // recv_counts[s*L + j]: rows source s sends to my local expert j.
  std::vector<int> recv_counts(static_cast<size_t>(ep) * L);
  ep_group_.alltoall(recv_counts.data(), counts_E, L);

  DispatchHandle h;
  h.send_rows.assign(ep, 0);
  h.recv_rows.assign(ep, 0);
  for (int p = 0; p < ep; ++p)
    for (int j = 0; j < L; ++j) {
      h.send_rows[p] += counts_E[p * L + j];
      h.recv_rows[p] += recv_counts[p * L + j];
    }
  // Sent rows sit in global expert order: expert e's first row is the sum of the counts before.
  std::vector<int64_t> first_of_expert(static_cast<size_t>(ep) * L + 1, 0);
  for (int e = 0; e < ep * L; ++e) first_of_expert[e + 1] = first_of_expert[e] + counts_E[e];
  h.local_offsets.assign(L + 1, 0);
  h.rounds.resize(L);
  int local = 0;
  for (int j = 0; j < L; ++j) {
    DispatchHandle::Round& round = h.rounds[j];
    round.send_rows.resize(ep);
    round.send_first.resize(ep);
    round.recv_rows.resize(ep);
    round.recv_first.resize(ep);
    h.local_offsets[j] = local;
    for (int p = 0; p < ep; ++p) {
      round.send_rows[p] = counts_E[p * L + j];
      round.send_first[p] = first_of_expert[p * L + j];
      round.recv_rows[p] = recv_counts[p * L + j];
      round.recv_first[p] = local;
      local += recv_counts[p * L + j];
    }
  }
  h.local_offsets[L] = local;
  h.num_local_rows = local;
  return h;
}

namespace {

std::vector<int64_t> times(const std::vector<int64_t>& rows, int D) {
  std::vector<int64_t> elements(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) elements[i] = rows[i] * D;
  return elements;
}

}  // namespace

void ExpertDispatcher::dispatch(const DispatchHandle& h, Act* x_local, const Act* x_RD, int D) {
  const ActType type = backend_.activation_type();
  for (const DispatchHandle::Round& round : h.rounds)
    ep_group_.alltoallv_placed(x_local, times(round.recv_rows, D), times(round.recv_first, D),
                               x_RD, times(round.send_rows, D), times(round.send_first, D), type);
}

void ExpertDispatcher::combine(const DispatchHandle& h, Act* y_RD, const Act* y_local, int D) {
  const ActType type = backend_.activation_type();
  for (const DispatchHandle::Round& round : h.rounds)
    ep_group_.alltoallv_placed(y_RD, times(round.send_rows, D), times(round.send_first, D),
                               y_local, times(round.recv_rows, D), times(round.recv_first, D),
                               type);
}

}  // namespace moe
