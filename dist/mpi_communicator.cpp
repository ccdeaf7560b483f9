// Collectives on MPI, host memory. Every MPI error becomes a RuntimeError naming the
// operation and this rank.
#include <mpi.h>

#include <string>

#include "core/error.h"
#include "dist/communicator.h"

namespace moe {
namespace {

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm, bool owned) : comm_(comm), owned_(owned) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_);
  }
  ~MpiCommunicator() override {
    if (owned_) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void allreduce_sum(float* data, size_t count) override {
    check(MPI_Allreduce(MPI_IN_PLACE, data, static_cast<int>(count), MPI_FLOAT, MPI_SUM, comm_),
          "all-reduce");
  }
  void allreduce_sum(double* data, size_t count) override {
    check(MPI_Allreduce(MPI_IN_PLACE, data, static_cast<int>(count), MPI_DOUBLE, MPI_SUM, comm_),
          "all-reduce");
  }
  void allreduce_sum(long long* data, size_t count) override {
    check(MPI_Allreduce(MPI_IN_PLACE, data, static_cast<int>(count), MPI_LONG_LONG, MPI_SUM,
                        comm_),
          "all-reduce");
  }
  void allreduce_max(int* data, size_t count) override {
    check(MPI_Allreduce(MPI_IN_PLACE, data, static_cast<int>(count), MPI_INT, MPI_MAX, comm_),
          "all-reduce");
  }
  void broadcast(void* data, size_t bytes, int root) override {
    check(MPI_Bcast(data, static_cast<int>(bytes), MPI_BYTE, root, comm_), "broadcast");
  }
  void barrier() override { check(MPI_Barrier(comm_), "barrier"); }

 private:
  void check(int code, const char* operation) const {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(code, text, &length);
    throw RuntimeError("rank " + std::to_string(world_rank_) + ": MPI " + operation +
                       " failed: " + std::string(text, length));
  }

  MPI_Comm comm_;
  bool owned_;
  int rank_ = 0, size_ = 1, world_rank_ = 0;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_world_communicator() {
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, false);
}

}  // namespace moe
