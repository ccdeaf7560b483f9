// Typed collectives over one process group. The MPI implementation works on host memory;
// an NCCL one on device memory can implement the same interface, so nothing above dist/
// changes. Every call is collective over the group.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

namespace moe {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // In place: data[i] = sum over ranks of data[i].
  virtual void allreduce_sum(float* data, size_t count) = 0;
  virtual void allreduce_sum(double* data, size_t count) = 0;
  virtual void allreduce_sum(long long* data, size_t count) = 0;
  virtual void allreduce_max(int* data, size_t count) = 0;
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  virtual void barrier() = 0;
};

// The group of one process: every collective is the identity.
std::unique_ptr<Communicator> make_self_communicator();

// Collectives over MPI_COMM_WORLD (host memory).
std::unique_ptr<Communicator> make_mpi_world_communicator();

}  // namespace moe
