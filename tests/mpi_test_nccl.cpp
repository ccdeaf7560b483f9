// The NCCL communicator against the MPI one: every collective on device memory through
// make_nccl_communicator (the world from an ncclUniqueId, a split sub-group) must give what
// the MPI communicator gives on the same data in host memory, and a collective that a peer
// never joins must become an error naming the operation within the timeout, not a hang.
// Runs alone and under mpiexec at 2 and 4 ranks; every rank runs every test in order.
//
// Needs one GPU per rank on each node: otherwise every rank skips, naming the reason.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/error.h"
#include "dist/communicator.h"
#include "dist/device_groups.h"
#include "tests/mpi_testing.h"

namespace moe {
namespace {

using moe::testing::world_rank;
using moe::testing::world_size;

class NcclVsMpi : public ::testing::Test {
 protected:
  void SetUp() override {
    // Every rank must agree to run or to skip: the tests call collectives.
    std::string reason = cuda_unavailable_reason();
    if (reason.empty()) {
      try {
        gpu_ = make_cuda_backend(node_local_rank());
      } catch (const RuntimeError& e) {
        reason = std::string("no CUDA device for this rank: ") + e.what();
      }
    }
    int ok = reason.empty() ? 1 : 0, all_ok = 0;
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!all_ok)
      GTEST_SKIP() << (reason.empty() ? "another rank has no CUDA device (one GPU per rank needed)"
                                      : reason);
  }
  void TearDown() override {
    for (void* p : owned_) gpu_->free_bytes(p);
  }
  template <typename T>
  T* up(const std::vector<T>& host) {
    T* dev = static_cast<T*>(gpu_->alloc_bytes(host.size() * sizeof(T) + 4));
    owned_.push_back(dev);
    if (!host.empty()) gpu_->copy_from_host(dev, host.data(), host.size() * sizeof(T));
    return dev;
  }
  template <typename T>
  std::vector<T> down(const T* dev, size_t n) {
    std::vector<T> host(n);
    gpu_->synchronize();
    gpu_->copy_to_host(host.data(), dev, n * sizeof(T));
    return host;
  }
  // Distinct values per rank and element.
  static std::vector<float> rank_values(size_t n, int salt) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; ++i)
      v[i] = std::sin(0.37f * static_cast<float>(i) + 1.3f * world_rank() + salt);
    return v;
  }
  std::unique_ptr<Backend> gpu_;
  std::vector<void*> owned_;
};

// Exact equality where the operation moves bytes, fp32 rounding where it adds them (NCCL
// and MPI may sum in different orders).
void expect_close(const std::string& what, const std::vector<float>& got,
                  const std::vector<float>& want, double tolerance) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i)
    worst = std::max(worst, std::fabs(double{got[i]} - double{want[i]}));
  double all_worst = 0;
  MPI_Allreduce(&worst, &all_worst, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  if (world_rank() == 0)
    std::printf("%-28s worst |nccl-mpi| over %d ranks: %.3g\n", what.c_str(), world_size(),
                all_worst);
  EXPECT_LE(worst, tolerance) << what;
}

TEST_F(NcclVsMpi, CollectivesMatch) {
  const int n = world_size(), r = world_rank();
  std::unique_ptr<Communicator> mpi = n > 1 ? make_mpi_world_communicator() : make_self_communicator();
  std::unique_ptr<Communicator> nccl = make_nccl_communicator(
      n > 1 ? make_mpi_world_communicator() : make_self_communicator(), nullptr, 60.0);
  ASSERT_EQ(nccl->rank(), r);
  ASSERT_EQ(nccl->size(), n);
  const size_t count = 1000;

  std::vector<float> sum = rank_values(count, 1);
  float* dsum = up(sum);
  mpi->allreduce_sum(sum.data(), count);
  nccl->allreduce_sum(dsum, count);
  expect_close("all-reduce", down(dsum, count), sum, 1e-5 * n);

  std::vector<float> async_sum = rank_values(count, 2);
  float* dasync = up(async_sum);
  mpi->allreduce_sum(async_sum.data(), count);
  nccl->allreduce_sum_async(dasync, count)->wait();
  expect_close("all-reduce (non-blocking)", down(dasync, count), async_sum, 1e-5 * n);

  const std::vector<float> part = rank_values(count, 3);
  std::vector<float> gathered(count * n);
  float* dgathered = up(gathered);
  mpi->allgather(gathered.data(), part.data(), count);
  nccl->allgather(dgathered, up(part), count);
  expect_close("all-gather", down(dgathered, gathered.size()), gathered, 0);

  const std::vector<float> full = rank_values(count * n, 4);
  std::vector<float> scattered(count);
  float* dscattered = up(scattered);
  mpi->reduce_scatter_sum(scattered.data(), full.data(), count);
  nccl->reduce_scatter_sum(dscattered, up(full), count);
  expect_close("reduce-scatter", down(dscattered, count), scattered, 1e-5 * n);

  // Uneven per-peer counts, some zero: rank s sends (s + p) % 3 * 5 floats to peer p.
  std::vector<int64_t> send_counts(n), recv_counts(n);
  for (int p = 0; p < n; ++p) {
    send_counts[p] = (r + p) % 3 * 5;
    recv_counts[p] = (p + r) % 3 * 5;
  }
  int64_t send_total = 0, recv_total = 0;
  for (int p = 0; p < n; ++p) {
    send_total += send_counts[p];
    recv_total += recv_counts[p];
  }
  const std::vector<float> send = rank_values(send_total, 5);
  std::vector<float> recv(recv_total);
  float* drecv = up(recv);
  mpi->alltoallv(recv.data(), recv_counts, send.data(), send_counts);
  nccl->alltoallv(drecv, recv_counts, up(send), send_counts);
  expect_close("all-to-all (per-peer counts)", down(drecv, recv.size()), recv, 0);

  std::vector<float> bytes = rank_values(count, 6);
  float* dbytes = up(bytes);
  mpi->broadcast(bytes.data(), count * sizeof(float), n - 1);
  nccl->broadcast(dbytes, count * sizeof(float), n - 1);
  expect_close("broadcast", down(dbytes, count), bytes, 0);

  // Host memory goes through the host communicator.
  double host_sum = r + 1.0;
  nccl->allreduce_sum(&host_sum, 1);
  EXPECT_EQ(host_sum, n * (n + 1) / 2.0);
  std::vector<int> counts(n), counts_back(n);
  for (int p = 0; p < n; ++p) counts[p] = 10 * r + p;
  nccl->alltoall(counts_back.data(), counts.data(), 1);
  for (int p = 0; p < n; ++p) EXPECT_EQ(counts_back[p], 10 * p + r);
}

// bf16 by hand (round to nearest even), so the reference needs no backend: the bits the
// NCCL communicator moves are the bits the test wrote.
uint16_t to_bf16(float x) {
  uint32_t bits = 0;
  std::memcpy(&bits, &x, sizeof bits);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}
float from_bf16(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float x = 0;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}
std::vector<float> from_bf16(const std::vector<uint16_t>& h) {
  std::vector<float> x(h.size());
  for (size_t i = 0; i < h.size(); ++i) x[i] = from_bf16(h[i]);
  return x;
}
// Rank `rank`'s bf16 values: every rank can compute every rank's data for the reference.
std::vector<uint16_t> bf16_values(size_t n, int rank, int salt) {
  std::vector<uint16_t> v(n);
  for (size_t i = 0; i < n; ++i)
    v[i] = to_bf16(std::sin(0.37f * static_cast<float>(i) + 1.3f * rank + salt));
  return v;
}
Act* as_act(uint16_t* p) { return reinterpret_cast<Act*>(p); }

// The bf16 activation overloads on device memory against a host reference computed from the
// same bf16 inputs: exact where bytes move, bf16 rounding (8 significant bits at every partial
// sum) where NCCL adds.
TEST_F(NcclVsMpi, Bf16ActivationsMatchAHostReference) {
  const int n = world_size(), r = world_rank();
  std::unique_ptr<Communicator> nccl = make_nccl_communicator(
      n > 1 ? make_mpi_world_communicator() : make_self_communicator(), nullptr, 60.0);
  const size_t count = 1000;

  // A guard of 16 elements after each output: a count taken in the wrong unit writes past it.
  const size_t guard = 16;
  const uint16_t sentinel = to_bf16(-7.0f);
  std::vector<uint16_t> summed = bf16_values(count, r, 11);
  summed.resize(count + guard, sentinel);
  uint16_t* dsum = up(summed);
  nccl->allreduce_sum(as_act(dsum), count, ActType::kBF16);
  std::vector<double> sum(count, 0.0);
  for (int p = 0; p < n; ++p) {
    const std::vector<float> part = from_bf16(bf16_values(count, p, 11));
    for (size_t i = 0; i < count; ++i) sum[i] += part[i];
  }
  const std::vector<float> want_sum(sum.begin(), sum.end());
  // |values| < 1: n - 1 additions and the result each round by at most 2^-8 of |sum| <= n.
  std::vector<float> want_sum_guarded(want_sum);
  want_sum_guarded.resize(count + guard, -7.0f);
  // (At one rank the sum is the identity: only the guard checks anything there.)
  expect_close("bf16 all-reduce", from_bf16(down(dsum, count + guard)), want_sum_guarded,
               n * n * std::ldexp(1.0, -8));

  std::vector<uint16_t> gathered(count * n + guard, sentinel);
  uint16_t* dgathered = up(gathered);
  nccl->allgather(as_act(dgathered), as_act(up(bf16_values(count, r, 12))), count,
                  ActType::kBF16);
  std::vector<float> want_gathered;
  for (int p = 0; p < n; ++p) {
    const std::vector<float> part = from_bf16(bf16_values(count, p, 12));
    want_gathered.insert(want_gathered.end(), part.begin(), part.end());
  }
  want_gathered.resize(count * n + guard, -7.0f);
  expect_close("bf16 all-gather", from_bf16(down(dgathered, gathered.size())), want_gathered, 0);

  // Uneven blocks, some empty (rank s sends (s + 2p + 1) % 3 * 7 elements to p), in reverse
  // peer order with a gap of 3 after each block on both sides, and the first block at element
  // 5 of send and 3 of recv: displacements (in elements, not bytes) and gaps count, also at
  // one rank.
  auto block = [](int src, int dst) { return static_cast<int64_t>((src + 2 * dst + 1) % 3 * 7); };
  std::vector<int64_t> send_counts(n), recv_counts(n), send_displs(n), recv_displs(n);
  int64_t send_end = 5, recv_end = 3;
  for (int p = n - 1; p >= 0; --p) {
    send_counts[p] = block(r, p);
    recv_counts[p] = block(p, r);
    send_displs[p] = send_end;
    recv_displs[p] = recv_end;
    send_end += send_counts[p] + 3;
    recv_end += recv_counts[p] + 3;
  }
  // Element k of the block from s to p: value k of (s, salt 13 + p); the rest is -7.
  const uint16_t gap = sentinel;
  std::vector<uint16_t> send(send_end, gap);
  for (int p = 0; p < n; ++p) {
    const std::vector<uint16_t> values = bf16_values(send_counts[p], r, 13 + p);
    std::copy(values.begin(), values.end(), send.begin() + send_displs[p]);
  }
  std::vector<uint16_t> placed(recv_end, gap);
  std::vector<float> want_placed(recv_end, -7.0f);
  for (int p = 0; p < n; ++p) {
    const std::vector<float> values = from_bf16(bf16_values(recv_counts[p], p, 13 + r));
    std::copy(values.begin(), values.end(), want_placed.begin() + recv_displs[p]);
  }
  uint16_t* dplaced = up(placed);
  nccl->alltoallv_placed(as_act(dplaced), recv_counts, recv_displs, as_act(up(send)),
                         send_counts, send_displs, ActType::kBF16);
  expect_close("bf16 all-to-all (placed)", from_bf16(down(dplaced, placed.size())), want_placed,
               0);

  // fp32 activations in host memory go through the host communicator.
  std::vector<float> host_sum(8, static_cast<float>(r + 1));
  nccl->allreduce_sum(f32_act(host_sum.data()), host_sum.size(), ActType::kF32);
  for (float x : host_sum) EXPECT_EQ(x, n * (n + 1) / 2.0f);
}

// A group of one split from a world that is no NCCL communicator (one process's device
// groups): bf16 activations are device-to-device copies of 2 bytes per element, all-reduce
// leaves them. No communication: every rank checks its own.
TEST_F(NcclVsMpi, Bf16ActivationsInAGroupOfOneAreCopies) {
  std::unique_ptr<Communicator> host_world = make_self_communicator();
  std::unique_ptr<Communicator> self =
      make_nccl_communicator(make_self_communicator(), host_world.get(), 60.0);
  const std::vector<uint16_t> x = bf16_values(9, world_rank(), 21);
  uint16_t* dx = up(x);
  self->allreduce_sum(as_act(dx), x.size(), ActType::kBF16);
  expect_close("bf16 group of one: all-reduce", from_bf16(down(dx, x.size())), from_bf16(x), 0);

  uint16_t* dgathered = up(std::vector<uint16_t>(x.size() + 2, 0));
  self->allgather(as_act(dgathered), as_act(dx), x.size(), ActType::kBF16);
  std::vector<float> want_gathered = from_bf16(x);
  want_gathered.insert(want_gathered.end(), {0.0f, 0.0f});
  expect_close("bf16 group of one: all-gather", from_bf16(down(dgathered, x.size() + 2)),
               want_gathered, 0);

  // Elements 2..6 of x land at elements 4..8 of the output.
  uint16_t* dplaced = up(std::vector<uint16_t>(x.size() + 1, 0));
  self->alltoallv_placed(as_act(dplaced), {5}, {4}, as_act(dx), {5}, {2}, ActType::kBF16);
  std::vector<float> want_placed(x.size() + 1, 0.0f);
  for (int i = 0; i < 5; ++i) want_placed[4 + i] = from_bf16(x[2 + i]);
  expect_close("bf16 group of one: all-to-all", from_bf16(down(dplaced, x.size() + 1)),
               want_placed, 0);
}

// A sub-group split from the NCCL world (ncclCommSplit): even and odd world ranks.
TEST_F(NcclVsMpi, SplitGroupMatches) {
  const int n = world_size(), r = world_rank();
  if (n == 1) GTEST_SKIP() << "a split needs at least 2 ranks";
  std::unique_ptr<Communicator> nccl_world =
      make_nccl_communicator(make_mpi_world_communicator(), nullptr, 60.0);
  std::unique_ptr<Communicator> mpi_half = make_mpi_split_communicator(r % 2, r);
  std::unique_ptr<Communicator> nccl_half =
      make_nccl_communicator(make_mpi_split_communicator(r % 2, r), nccl_world.get(), 60.0);
  ASSERT_EQ(nccl_half->rank(), mpi_half->rank());
  ASSERT_EQ(nccl_half->size(), mpi_half->size());
  std::vector<float> sum = rank_values(777, 7);
  float* dsum = up(sum);
  mpi_half->allreduce_sum(sum.data(), sum.size());
  nccl_half->allreduce_sum(dsum, sum.size());
  expect_close("split group all-reduce", down(dsum, sum.size()), sum, 1e-5 * n);
}

// Rank 0 never joins: every other rank's all-reduce must fail within the timeout, naming it.
TEST_F(NcclVsMpi, StuckCollectiveBecomesAnError) {
  const int n = world_size(), r = world_rank();
  if (n == 1) GTEST_SKIP() << "a stuck collective needs a peer";
  std::unique_ptr<Communicator> nccl =
      make_nccl_communicator(make_mpi_world_communicator(), nullptr, 3.0);
  std::vector<float> data(64, 1.0f);
  float* ddata = up(data);
  if (r != 0) {
    const auto start = std::chrono::steady_clock::now();
    try {
      nccl->allreduce_sum(ddata, data.size());
      ADD_FAILURE() << "the all-reduce finished without rank 0";
    } catch (const RuntimeError& e) {
      const double waited =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::printf("rank %d after %.1f s: %s\n", r, waited, e.what());
      EXPECT_NE(std::string(e.what()).find("all-reduce"), std::string::npos) << e.what();
      EXPECT_LT(waited, 30.0);
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

}  // namespace
}  // namespace moe
