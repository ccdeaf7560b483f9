// Collectives on MPI, host memory. Every MPI error becomes a RuntimeError naming the
// operation and this rank.
#include <mpi.h>

#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"
#include "dist/communicator.h"
#include "dist/watchdog.h"

namespace moe {
namespace {

class MpiCommunicator final : public Communicator {
  struct MpiPending final : PendingCollective {
    explicit MpiPending(const MpiCommunicator* owner) : owner(owner) {}
    ~MpiPending() override {
      const WatchedCollective watch("all-reduce (wait)");
      if (request != MPI_REQUEST_NULL) MPI_Wait(&request, MPI_STATUS_IGNORE);
    }
    void wait() override {
      const WatchedCollective watch("all-reduce (wait)");
      owner->check(MPI_Wait(&request, MPI_STATUS_IGNORE), "all-reduce (wait)");
    }
    const MpiCommunicator* owner;
    MPI_Request request = MPI_REQUEST_NULL;
  };

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
    const WatchedCollective watch("all-reduce");
    check(MPI_Allreduce(MPI_IN_PLACE, data, checked_count(count), MPI_FLOAT, MPI_SUM, comm_),
          "all-reduce");
  }
  void allreduce_sum(double* data, size_t count) override {
    const WatchedCollective watch("all-reduce");
    check(MPI_Allreduce(MPI_IN_PLACE, data, checked_count(count), MPI_DOUBLE, MPI_SUM, comm_),
          "all-reduce");
  }
  void allreduce_sum(long long* data, size_t count) override {
    const WatchedCollective watch("all-reduce");
    check(MPI_Allreduce(MPI_IN_PLACE, data, checked_count(count), MPI_LONG_LONG, MPI_SUM,
                        comm_),
          "all-reduce");
  }
  void allreduce_max(int* data, size_t count) override {
    const WatchedCollective watch("all-reduce");
    check(MPI_Allreduce(MPI_IN_PLACE, data, checked_count(count), MPI_INT, MPI_MAX, comm_),
          "all-reduce");
  }
  std::unique_ptr<PendingCollective> allreduce_sum_async(float* data, size_t count) override {
    auto pending = std::make_unique<MpiPending>(this);
    check(MPI_Iallreduce(MPI_IN_PLACE, data, checked_count(count), MPI_FLOAT, MPI_SUM, comm_,
                         &pending->request),
          "all-reduce (non-blocking)");
    return pending;
  }
  void allgather(float* recv, const float* send, size_t count) override {
    const WatchedCollective watch("all-gather");
    check(MPI_Allgather(send, checked_count(count), MPI_FLOAT, recv, checked_count(count),
                        MPI_FLOAT, comm_),
          "all-gather");
  }
  void reduce_scatter_sum(float* recv, const float* send, size_t count) override {
    const WatchedCollective watch("reduce-scatter");
    check(MPI_Reduce_scatter_block(send, recv, checked_count(count), MPI_FLOAT, MPI_SUM, comm_),
          "reduce-scatter");
  }
  void alltoallv(float* recv, const std::vector<int64_t>& recv_counts, const float* send,
                 const std::vector<int64_t>& send_counts) override {
    std::vector<int> scounts(size_), sdispls(size_), rcounts(size_), rdispls(size_);
    int64_t soff = 0, roff = 0;
    for (int p = 0; p < size_; ++p) {
      scounts[p] = checked_count(send_counts[p]);
      rcounts[p] = checked_count(recv_counts[p]);
      sdispls[p] = checked_count(soff);
      rdispls[p] = checked_count(roff);
      soff += send_counts[p];
      roff += recv_counts[p];
    }
    const WatchedCollective watch("all-to-all");
    check(MPI_Alltoallv(send, scounts.data(), sdispls.data(), MPI_FLOAT, recv, rcounts.data(),
                        rdispls.data(), MPI_FLOAT, comm_),
          "all-to-all");
  }
  void alltoallv_placed(float* recv, const std::vector<int64_t>& recv_counts,
                        const std::vector<int64_t>& recv_displs, const float* send,
                        const std::vector<int64_t>& send_counts,
                        const std::vector<int64_t>& send_displs) override {
    std::vector<int> scounts(size_), sdispls(size_), rcounts(size_), rdispls(size_);
    for (int p = 0; p < size_; ++p) {
      scounts[p] = checked_count(send_counts[p]);
      rcounts[p] = checked_count(recv_counts[p]);
      sdispls[p] = checked_count(send_displs[p]);
      rdispls[p] = checked_count(recv_displs[p]);
    }
    const WatchedCollective watch("all-to-all");
    check(MPI_Alltoallv(send, scounts.data(), sdispls.data(), MPI_FLOAT, recv, rcounts.data(),
                        rdispls.data(), MPI_FLOAT, comm_),
          "all-to-all");
  }
  // fp32 activations are the float collectives; bf16 ones only exist in device memory.
  void allreduce_sum(Act* data, size_t count, ActType type) override {
    require_f32(type, "all-reduce");
    allreduce_sum(act_f32(data), count);
  }
  void allgather(Act* recv, const Act* send, size_t count, ActType type) override {
    require_f32(type, "all-gather");
    allgather(act_f32(recv), act_f32(send), count);
  }
  void alltoallv_placed(Act* recv, const std::vector<int64_t>& recv_counts,
                        const std::vector<int64_t>& recv_displs, const Act* send,
                        const std::vector<int64_t>& send_counts,
                        const std::vector<int64_t>& send_displs, ActType type) override {
    require_f32(type, "all-to-all");
    alltoallv_placed(act_f32(recv), recv_counts, recv_displs, act_f32(send), send_counts,
                     send_displs);
  }
  void alltoall(int* recv, const int* send, size_t per_peer) override {
    const WatchedCollective watch("all-to-all (counts)");
    check(MPI_Alltoall(send, checked_count(per_peer), MPI_INT, recv, checked_count(per_peer),
                       MPI_INT, comm_),
          "all-to-all (counts)");
  }
  std::vector<std::vector<char>> gather_bytes(const void* data, size_t bytes, int root) override {
    const WatchedCollective watch("gather");
    int mine = checked_count(bytes);
    std::vector<int> sizes(rank_ == root ? size_ : 0);
    check(MPI_Gather(&mine, 1, MPI_INT, sizes.data(), 1, MPI_INT, root, comm_), "gather (sizes)");
    std::vector<int> displs(sizes.size());
    int64_t total = 0;
    for (size_t p = 0; p < sizes.size(); ++p) {
      displs[p] = checked_count(total);
      total += sizes[p];
    }
    std::vector<char> all(static_cast<size_t>(total));
    check(MPI_Gatherv(data, mine, MPI_BYTE, all.data(), sizes.data(), displs.data(), MPI_BYTE,
                      root, comm_),
          "gather");
    std::vector<std::vector<char>> out;
    for (size_t p = 0; p < sizes.size(); ++p)
      out.emplace_back(all.begin() + displs[p], all.begin() + displs[p] + sizes[p]);
    return out;
  }
  void broadcast(void* data, size_t bytes, int root) override {
    const WatchedCollective watch("broadcast");
    check(MPI_Bcast(data, checked_count(bytes), MPI_BYTE, root, comm_), "broadcast");
  }
  void barrier() override {
    const WatchedCollective watch("barrier");
    check(MPI_Barrier(comm_), "barrier");
  }

 private:
  // MPI counts are int: a larger message is an error, not a silent truncation.
  int checked_count(int64_t count) const {
    if (count < 0 || count > INT32_MAX)
      throw RuntimeError("rank " + std::to_string(world_rank_) + ": message of " +
                         std::to_string(count) + " elements is beyond MPI's int counts");
    return static_cast<int>(count);
  }
  int checked_count(size_t count) const { return checked_count(static_cast<int64_t>(count)); }

  void require_f32(ActType type, const char* operation) const {
    if (type != ActType::kF32)
      throw RuntimeError("rank " + std::to_string(world_rank_) + ": MPI " + operation + " of " +
                         act_type_name(type) + " activations: MPI carries the CPU backend's "
                         "fp32 ones; bf16 activations are GPU memory, moved by NCCL");
  }

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

std::unique_ptr<Communicator> make_mpi_split_communicator(int color, int key) {
  MPI_Comm comm;
  const WatchedCollective watch("communicator split");
  if (MPI_Comm_split(MPI_COMM_WORLD, color, key, &comm) != MPI_SUCCESS)
    throw RuntimeError("MPI_Comm_split failed");
  return std::make_unique<MpiCommunicator>(comm, true);
}

}  // namespace moe
