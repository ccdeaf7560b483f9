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
  // Received rows arrive as (source, expert); the local order is (expert, source).
  std::vector<int> recv_start(static_cast<size_t>(ep) * L);  // first received row of (s, j)
  int row = 0;
  for (int s = 0; s < ep; ++s)
    for (int j = 0; j < L; ++j) {
      recv_start[s * L + j] = row;
      row += recv_counts[s * L + j];
    }
  h.num_local_rows = row;
  h.local_offsets.assign(L + 1, 0);
  h.local_from_recv.resize(row);
  int local = 0;
  for (int j = 0; j < L; ++j) {
    h.local_offsets[j] = local;
    for (int s = 0; s < ep; ++s)
      for (int r = 0; r < recv_counts[s * L + j]; ++r)
        h.local_from_recv[local++] = recv_start[s * L + j] + r;
  }
  h.local_offsets[L] = local;
  return h;
}

void ExpertDispatcher::reserve_staging(size_t floats) {
  if (staging_.size() < floats) staging_ = Buffer<float>(backend_, floats);
}

void ExpertDispatcher::dispatch(const DispatchHandle& h, float* x_local, const float* x_RD, int D) {
  const int ep = ep_group_.size();
  std::vector<int64_t> send(ep), recv(ep);
  for (int p = 0; p < ep; ++p) {
    send[p] = h.send_rows[p] * D;
    recv[p] = h.recv_rows[p] * D;
  }
  reserve_staging(static_cast<size_t>(h.num_local_rows) * D);
  ep_group_.alltoallv(staging_.data(), recv, x_RD, send);
  backend_.gather_rows(x_local, staging_.data(), h.local_from_recv.data(), h.num_local_rows, D);
}

void ExpertDispatcher::combine(const DispatchHandle& h, float* y_RD, const float* y_local, int D) {
  const int ep = ep_group_.size();
  std::vector<int64_t> send(ep), recv(ep);
  for (int p = 0; p < ep; ++p) {
    send[p] = h.recv_rows[p] * D;
    recv[p] = h.send_rows[p] * D;
  }
  // Back to (source, expert) order, then each row home.
  reserve_staging(static_cast<size_t>(h.num_local_rows) * D);
  backend_.fill_zero(staging_.data(), static_cast<size_t>(h.num_local_rows) * D * sizeof(float));
  backend_.scatter_add_rows(staging_.data(), y_local, h.local_from_recv.data(), h.num_local_rows,
                            D);
  ep_group_.alltoallv(y_RD, recv, staging_.data(), send);
}

}  // namespace moe
