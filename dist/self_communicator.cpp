// The communicator of a group with one member: collectives leave the data as it is, or copy
// it from the send to the receive buffer.
#include <algorithm>
#include <cstring>

#include "dist/communicator.h"

namespace moe {
namespace {

class DoneCollective final : public PendingCollective {
 public:
  void wait() override {}
};

class SelfCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void allreduce_sum(float*, size_t) override {}
  void allreduce_sum(double*, size_t) override {}
  void allreduce_sum(long long*, size_t) override {}
  void allreduce_max(int*, size_t) override {}
  std::unique_ptr<PendingCollective> allreduce_sum_async(float*, size_t) override {
    return std::make_unique<DoneCollective>();
  }
  void allgather(float* recv, const float* send, size_t count) override {
    std::copy(send, send + count, recv);
  }
  void reduce_scatter_sum(float* recv, const float* send, size_t count) override {
    std::copy(send, send + count, recv);
  }
  void alltoallv(float* recv, const std::vector<int64_t>&, const float* send,
                 const std::vector<int64_t>& send_counts) override {
    std::copy(send, send + send_counts[0], recv);
  }
  void alltoallv_placed(float* recv, const std::vector<int64_t>&,
                        const std::vector<int64_t>& recv_displs, const float* send,
                        const std::vector<int64_t>& send_counts,
                        const std::vector<int64_t>& send_displs) override {
    const float* from = send + send_displs[0];
    std::copy(from, from + send_counts[0], recv + recv_displs[0]);
  }
  // Activations of any type: the same copies, in bytes.
  void allreduce_sum(Act*, size_t, ActType) override {}
  void allgather(Act* recv, const Act* send, size_t count, ActType type) override {
    copy_bytes(recv, send, count * act_bytes(type));
  }
  void alltoallv_placed(Act* recv, const std::vector<int64_t>&,
                        const std::vector<int64_t>& recv_displs, const Act* send,
                        const std::vector<int64_t>& send_counts,
                        const std::vector<int64_t>& send_displs, ActType type) override {
    copy_bytes(act_at(recv, static_cast<size_t>(recv_displs[0]), type),
               act_at(send, static_cast<size_t>(send_displs[0]), type),
               static_cast<size_t>(send_counts[0]) * act_bytes(type));
  }
  void alltoall(int* recv, const int* send, size_t per_peer) override {
    std::copy(send, send + per_peer, recv);
  }
  void broadcast(void*, size_t, int) override {}
  std::vector<std::vector<char>> gather_bytes(const void* data, size_t bytes, int) override {
    const char* begin = static_cast<const char*>(data);
    return {std::vector<char>(begin, begin + bytes)};
  }
  void barrier() override {}

 private:
  static void copy_bytes(void* dst, const void* src, size_t bytes) {
    if (bytes > 0 && dst != src) std::memcpy(dst, src, bytes);  // in place: nothing to move
  }
};

}  // namespace

std::unique_ptr<Communicator> make_self_communicator() {
  return std::make_unique<SelfCommunicator>();
}

}  // namespace moe
