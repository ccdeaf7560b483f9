// Typed collectives over one process group. The MPI implementation works on host memory;
// an NCCL one on device memory can implement the same interface, so nothing above dist/
// changes. Every call is collective over the group; every failure is a RuntimeError that
// names the operation and this process's world rank.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/activation.h"

namespace moe {

// A collective started without waiting (bucketed gradient reduction overlaps backward).
class PendingCollective {
 public:
  virtual ~PendingCollective() = default;
  virtual void wait() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // In place: data[i] = sum (or max) over ranks of data[i].
  virtual void allreduce_sum(float* data, size_t count) = 0;
  virtual void allreduce_sum(double* data, size_t count) = 0;
  virtual void allreduce_sum(long long* data, size_t count) = 0;
  virtual void allreduce_max(int* data, size_t count) = 0;
  // Starts an in-place sum; the data must stay untouched until wait() returns.
  virtual std::unique_ptr<PendingCollective> allreduce_sum_async(float* data, size_t count) = 0;

  // recv (size*count) = the `count` floats of every rank, in rank order.
  virtual void allgather(float* recv, const float* send, size_t count) = 0;
  // recv (count) = the sum over ranks of send[rank*count .. rank*count+count).  send: (size*count)
  virtual void reduce_scatter_sum(float* recv, const float* send, size_t count) = 0;
  // All-to-all with per-peer counts (in elements): send_counts[p] elements go to peer p from
  // send + sum(send_counts[0..p)); recv likewise. Counts travel first (alltoall_counts).
  virtual void alltoallv(float* recv, const std::vector<int64_t>& recv_counts, const float* send,
                         const std::vector<int64_t>& send_counts) = 0;
  // The same with explicit displacements (in elements): peer p's block is read from
  // send + send_displs[p] and lands at recv + recv_displs[p], so a caller can exchange rows
  // straight from and into their final places (the expert dispatcher, one round per local
  // expert).
  virtual void alltoallv_placed(float* recv, const std::vector<int64_t>& recv_counts,
                                const std::vector<int64_t>& recv_displs, const float* send,
                                const std::vector<int64_t>& send_counts,
                                const std::vector<int64_t>& send_displs) = 0;
  // The same three collectives on activations (core/activation.h) of `type`, counts and
  // displacements in elements. The MPI communicator carries fp32 activations only (the CPU
  // backend's); bf16 ones are device memory and go through NCCL.
  virtual void allreduce_sum(Act* data, size_t count, ActType type) = 0;
  virtual void allgather(Act* recv, const Act* send, size_t count, ActType type) = 0;
  virtual void alltoallv_placed(Act* recv, const std::vector<int64_t>& recv_counts,
                                const std::vector<int64_t>& recv_displs, const Act* send,
                                const std::vector<int64_t>& send_counts,
                                const std::vector<int64_t>& send_displs, ActType type) = 0;
  // recv_counts[p] = the count peer p put at send_counts[rank()]: every rank sends `per_peer`
  // ints to every peer.  send, recv: (size * per_peer)
  virtual void alltoall(int* recv, const int* send, size_t per_peer) = 0;
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  // Every rank's bytes, in rank order, on `root` (empty elsewhere).
  virtual std::vector<std::vector<char>> gather_bytes(const void* data, size_t bytes,
                                                      int root) = 0;
  virtual void barrier() = 0;
};

// The group of one process: every collective is the identity.
std::unique_ptr<Communicator> make_self_communicator();

// Collectives over MPI_COMM_WORLD (host memory).
std::unique_ptr<Communicator> make_mpi_world_communicator();

// The group of the world ranks that pass the same `color`, ordered by `key` (MPI_Comm_split).
// Collective over MPI_COMM_WORLD.
std::unique_ptr<Communicator> make_mpi_split_communicator(int color, int key);

// Collectives on GPU memory through NCCL (dist/nccl_communicator.cpp), for --device cuda.
// Pointers to device memory go through NCCL on the communicator's own stream, ordered against
// the CUDA backend's stream with events; host pointers go through `host`, the MPI (or self)
// communicator of the same group. With nccl_world == nullptr the group is a world of its own
// (its ncclUniqueId broadcast over `host`); otherwise it is ncclCommSplit from nccl_world,
// which is collective over nccl_world (a group of one is an NCCL communicator of one rank). A
// collective that does not finish within timeout_seconds aborts the NCCL communicator and
// throws a RuntimeError naming the operation and the rank. Throws in a build without CUDA.
std::unique_ptr<Communicator> make_nccl_communicator(std::unique_ptr<Communicator> host,
                                                     Communicator* nccl_world,
                                                     double timeout_seconds);

}  // namespace moe
