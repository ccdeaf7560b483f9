// Collectives on GPU memory through NCCL, the same Communicator interface as MPI's.
//
// Ordering: the CUDA backend runs every op on the legacy default stream. A device collective
// records an event there, makes the communication stream wait for it, enqueues the NCCL call
// on the communication stream and records a "done" event, which the default stream then waits
// for: backend ops after the collective see its result, and backend ops before it finished
// writing its input. Blocking calls also wait on the host (the watchdog needs to see them
// finish); allreduce_sum_async returns at once and its wait() polls.
//
// Watchdog: communicators are non-blocking (ncclConfig_t.blocking = 0), so no NCCL call can
// block the host indefinitely; every wait polls ncclCommGetAsyncError and the done event, and
// past the timeout calls ncclCommAbort and throws a RuntimeError naming the operation.
//
// Host pointers (routing counts, loss statistics) go to the group's host communicator.
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "dist/communicator.h"
#include "dist/device_groups.h"

namespace moe {
namespace {

using Clock = std::chrono::steady_clock;

void cuda_ok(cudaError_t status, const std::string& what) {
  if (status != cudaSuccess)
    throw RuntimeError("NCCL communicator: " + what + ": " + cudaGetErrorString(status));
}

bool is_device_pointer(const void* ptr) {
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, ptr) != cudaSuccess) {
    cudaGetLastError();  // a plain host pointer on old drivers: clear the sticky error
    return false;
  }
  return attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged;
}

class NcclCommunicator;

// One enqueued collective: done once its event has fired.
class NcclPending final : public PendingCollective {
 public:
  NcclPending(NcclCommunicator* owner, const char* operation, cudaEvent_t done,
              Clock::time_point start)
      : owner_(owner), operation_(operation), done_(done), start_(start) {}
  ~NcclPending() override { cudaEventDestroy(done_); }
  void wait() override;

 private:
  NcclCommunicator* owner_;
  const char* operation_;
  cudaEvent_t done_;
  Clock::time_point start_;
};

class NcclCommunicator final : public Communicator {
 public:
  // Takes a fresh communicator (init or split still possibly in progress).
  NcclCommunicator(std::unique_ptr<Communicator> host, ncclComm_t comm, double timeout_seconds,
                   int world_rank)
      : host_(std::move(host)), comm_(comm), timeout_(timeout_seconds), world_rank_(world_rank) {
    await("communicator set-up", Clock::now(), nullptr);
    int count = 0, rank = 0;
    check(ncclCommCount(comm_, &count), "communicator set-up");
    check(ncclCommUserRank(comm_, &rank), "communicator set-up");
    MOE_CHECK(count == host_->size() && rank == host_->rank(),
              "NCCL and host communicators disagree on the group");
    cuda_ok(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    cuda_ok(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming), "cudaEventCreate");
  }
  ~NcclCommunicator() override {
    if (stream_) cudaStreamSynchronize(stream_);
    if (comm_) ncclCommAbort(comm_);  // all work is done: this only frees the resources
    if (ready_) cudaEventDestroy(ready_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  int rank() const override { return host_->rank(); }
  int size() const override { return host_->size(); }
  ncclComm_t comm() const { return comm_; }
  double timeout() const { return timeout_; }
  int world_rank() const { return world_rank_; }

  void allreduce_sum(float* data, size_t count) override {
    if (!is_device_pointer(data)) return host_->allreduce_sum(data, count);
    device_allreduce(data, count, ncclFloat32, ncclSum);
  }
  void allreduce_sum(double* data, size_t count) override {
    if (!is_device_pointer(data)) return host_->allreduce_sum(data, count);
    device_allreduce(data, count, ncclFloat64, ncclSum);
  }
  void allreduce_sum(long long* data, size_t count) override {
    if (!is_device_pointer(data)) return host_->allreduce_sum(data, count);
    device_allreduce(data, count, ncclInt64, ncclSum);
  }
  void allreduce_max(int* data, size_t count) override {
    if (!is_device_pointer(data)) return host_->allreduce_max(data, count);
    device_allreduce(data, count, ncclInt32, ncclMax);
  }
  std::unique_ptr<PendingCollective> allreduce_sum_async(float* data, size_t count) override {
    if (!is_device_pointer(data)) return host_->allreduce_sum_async(data, count);
    // The default stream does not wait for it yet: backward goes on while it runs.
    return run("all-reduce (non-blocking)", [&] {
      return ncclAllReduce(data, data, count, ncclFloat32, ncclSum, comm_, stream_);
    }, /*order_default_stream=*/false);
  }
  void allgather(float* recv, const float* send, size_t count) override {
    if (!device_pair(recv, send, "all-gather")) return host_->allgather(recv, send, count);
    device_allgather(recv, send, count, ncclFloat32);
  }
  void reduce_scatter_sum(float* recv, const float* send, size_t count) override {
    if (!device_pair(recv, send, "reduce-scatter"))
      return host_->reduce_scatter_sum(recv, send, count);
    run("reduce-scatter", [&] {
      return ncclReduceScatter(send, recv, count, ncclFloat32, ncclSum, comm_, stream_);
    })->wait();
  }
  void alltoallv(float* recv, const std::vector<int64_t>& recv_counts, const float* send,
                 const std::vector<int64_t>& send_counts) override {
    MOE_CHECK(static_cast<int>(send_counts.size()) == size() &&
                  static_cast<int>(recv_counts.size()) == size(),
              "alltoallv: one count per peer");
    std::vector<int64_t> send_displs(size(), 0), recv_displs(size(), 0);
    for (int peer = 1; peer < size(); ++peer) {
      send_displs[peer] = send_displs[peer - 1] + send_counts[peer - 1];
      recv_displs[peer] = recv_displs[peer - 1] + recv_counts[peer - 1];
    }
    alltoallv_placed(recv, recv_counts, recv_displs, send, send_counts, send_displs);
  }
  void alltoallv_placed(float* recv, const std::vector<int64_t>& recv_counts,
                        const std::vector<int64_t>& recv_displs, const float* send,
                        const std::vector<int64_t>& send_counts,
                        const std::vector<int64_t>& send_displs) override {
    if (!device_pair(recv, send, "all-to-all"))
      return host_->alltoallv_placed(recv, recv_counts, recv_displs, send, send_counts,
                                     send_displs);
    device_alltoallv_placed(recv, recv_counts, recv_displs, send, send_counts, send_displs,
                            ncclFloat32, sizeof(float));
  }
  // Activations: the same NCCL calls in the activation type (fp32 or bf16).
  void allreduce_sum(Act* data, size_t count, ActType type) override {
    if (!is_device_pointer(data)) return host_->allreduce_sum(data, count, type);
    device_allreduce(data, count, nccl_type(type), ncclSum);
  }
  void allgather(Act* recv, const Act* send, size_t count, ActType type) override {
    if (!device_pair(recv, send, "all-gather")) return host_->allgather(recv, send, count, type);
    device_allgather(recv, send, count, nccl_type(type));
  }
  void alltoallv_placed(Act* recv, const std::vector<int64_t>& recv_counts,
                        const std::vector<int64_t>& recv_displs, const Act* send,
                        const std::vector<int64_t>& send_counts,
                        const std::vector<int64_t>& send_displs, ActType type) override {
    if (!device_pair(recv, send, "all-to-all"))
      return host_->alltoallv_placed(recv, recv_counts, recv_displs, send, send_counts,
                                     send_displs, type);
    device_alltoallv_placed(recv, recv_counts, recv_displs, send, send_counts, send_displs,
                            nccl_type(type), act_bytes(type));
  }
  void alltoall(int* recv, const int* send, size_t per_peer) override {
    if (!device_pair(recv, send, "all-to-all")) return host_->alltoall(recv, send, per_peer);
    run("all-to-all", [&] {
      ncclResult_t result = ncclGroupStart();
      if (result != ncclSuccess) return result;
      for (int peer = 0; peer < size() && (result == ncclSuccess || result == ncclInProgress);
           ++peer) {
        result = ncclSend(send + peer * per_peer, per_peer, ncclInt32, peer, comm_, stream_);
        if (result == ncclSuccess || result == ncclInProgress)
          result = ncclRecv(recv + peer * per_peer, per_peer, ncclInt32, peer, comm_, stream_);
      }
      const ncclResult_t end = ncclGroupEnd();
      return result != ncclSuccess && result != ncclInProgress ? result : end;
    })->wait();
  }
  void broadcast(void* data, size_t bytes, int root) override {
    if (!is_device_pointer(data)) return host_->broadcast(data, bytes, root);
    run("broadcast", [&] {
      return ncclBroadcast(data, data, bytes, ncclUint8, root, comm_, stream_);
    })->wait();
  }
  std::vector<std::vector<char>> gather_bytes(const void* data, size_t bytes, int root) override {
    if (!is_device_pointer(data)) return host_->gather_bytes(data, bytes, root);
    std::vector<char> staged(bytes);  // rare (checkpoints go through the host already)
    cuda_ok(cudaMemcpy(staged.data(), data, bytes, cudaMemcpyDeviceToHost), "gather (staging)");
    return host_->gather_bytes(staged.data(), bytes, root);
  }
  void barrier() override {
    cuda_ok(cudaStreamSynchronize(stream_), "barrier");
    host_->barrier();
  }

  // Polls until the communicator has no call in progress and `done` (if any) has fired;
  // aborts and throws past the timeout or on an asynchronous NCCL error.
  void await(const char* operation, Clock::time_point start, cudaEvent_t done) {
    for (int spins = 0;; ++spins) {
      ncclResult_t state = ncclSuccess;
      if (comm_ == nullptr) fail(operation, "the communicator was aborted by an earlier failure");
      const ncclResult_t query = ncclCommGetAsyncError(comm_, &state);
      if (query != ncclSuccess) state = query;
      if (state != ncclSuccess && state != ncclInProgress)
        fail(operation, std::string("NCCL error: ") + ncclGetErrorString(state) + " (" +
                            ncclGetLastError(comm_) + ")");
      if (state == ncclSuccess) {
        if (done == nullptr) return;
        const cudaError_t event = cudaEventQuery(done);
        if (event == cudaSuccess) return;
        if (event != cudaErrorNotReady)
          fail(operation, std::string("CUDA error: ") + cudaGetErrorString(event));
      }
      const double waited = std::chrono::duration<double>(Clock::now() - start).count();
      if (waited > timeout_) {
        char seconds[32];
        std::snprintf(seconds, sizeof(seconds), "%.0f", timeout_);
        fail(operation, std::string("did not finish within ") + seconds +
                            " s (--distributed-timeout); a peer rank is stuck or gone");
      }
      if (spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

 private:
  [[noreturn]] void fail(const char* operation, const std::string& why) {
    if (comm_ != nullptr) ncclCommAbort(comm_);  // unblocks the stream; the comm is unusable
    comm_ = nullptr;
    throw RuntimeError("rank " + std::to_string(world_rank_) + ": NCCL " + operation + ": " + why);
  }
  void check(ncclResult_t result, const char* operation) {
    if (result != ncclSuccess && result != ncclInProgress)
      fail(operation, std::string("NCCL error: ") + ncclGetErrorString(result));
  }
  // Both device (NCCL) or both host; a mix is a caller bug.
  bool device_pair(const void* recv, const void* send, const char* operation) {
    const bool recv_device = is_device_pointer(recv), send_device = is_device_pointer(send);
    MOE_CHECK(recv_device == send_device,
              std::string(operation) + ": send and receive buffers must both be device or host memory");
    return recv_device;
  }
  static ncclDataType_t nccl_type(ActType type) {
    return type == ActType::kF32 ? ncclFloat32 : ncclBfloat16;
  }
  // The device halves of the collectives, for any element type: the float and activation
  // overloads differ only in `type` (and its width).
  // data (count) = the reduction `op` over ranks, in place.
  void device_allreduce(void* data, size_t count, ncclDataType_t type, ncclRedOp_t op) {
    run("all-reduce", [&] {
      return ncclAllReduce(data, data, count, type, op, comm_, stream_);
    })->wait();
  }
  // recv (size*count) = every rank's `count` elements of `type`, in rank order.
  void device_allgather(void* recv, const void* send, size_t count, ncclDataType_t type) {
    run("all-gather", [&] {
      return ncclAllGather(send, recv, count, type, comm_, stream_);
    })->wait();
  }
  // Counts and displacements in elements of `type`, `element_bytes` wide.
  void device_alltoallv_placed(void* recv, const std::vector<int64_t>& recv_counts,
                               const std::vector<int64_t>& recv_displs, const void* send,
                               const std::vector<int64_t>& send_counts,
                               const std::vector<int64_t>& send_displs, ncclDataType_t type,
                               size_t element_bytes) {
    char* recv_bytes = static_cast<char*>(recv);
    const char* send_bytes = static_cast<const char*>(send);
    run("all-to-all", [&] {
      // One group of point-to-point calls: NCCL runs them as one all-to-all.
      ncclResult_t result = ncclGroupStart();
      if (result != ncclSuccess) return result;
      for (int peer = 0; peer < size(); ++peer) {
        if (send_counts[peer] > 0)
          result = ncclSend(send_bytes + send_displs[peer] * element_bytes, send_counts[peer],
                            type, peer, comm_, stream_);
        if ((result == ncclSuccess || result == ncclInProgress) && recv_counts[peer] > 0)
          result = ncclRecv(recv_bytes + recv_displs[peer] * element_bytes, recv_counts[peer],
                            type, peer, comm_, stream_);
        if (result != ncclSuccess && result != ncclInProgress) break;
      }
      const ncclResult_t end = ncclGroupEnd();
      return result != ncclSuccess && result != ncclInProgress ? result : end;
    })->wait();
  }
  template <typename Enqueue>
  std::unique_ptr<NcclPending> run(const char* operation, Enqueue&& enqueue,
                                   bool order_default_stream = true) {
    const Clock::time_point start = Clock::now();
    if (comm_ == nullptr) fail(operation, "the communicator was aborted by an earlier failure");
    // The communication stream starts after everything the backend queued so far.
    cuda_ok(cudaEventRecord(ready_, 0), operation);
    cuda_ok(cudaStreamWaitEvent(stream_, ready_, 0), operation);
    check(enqueue(), operation);
    await(operation, start, nullptr);  // non-blocking communicators may still be enqueuing
    cudaEvent_t done = nullptr;
    cuda_ok(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), operation);
    cuda_ok(cudaEventRecord(done, stream_), operation);
    // Backend ops queued after this call (after wait(), for a non-blocking one) wait for it.
    if (order_default_stream) cuda_ok(cudaStreamWaitEvent(0, done, 0), operation);
    return std::make_unique<NcclPending>(this, operation, done, start);
  }

  std::unique_ptr<Communicator> host_;
  ncclComm_t comm_ = nullptr;
  double timeout_;
  int world_rank_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;
};

void NcclPending::wait() {
  owner_->await(operation_, start_, done_);
  cuda_ok(cudaStreamWaitEvent(0, done_, 0), operation_);  // order later backend ops after it
}

// A group of one: every collective is a copy (or nothing), on device memory with cudaMemcpy
// in the default stream's order, on host memory through `host`.
class DeviceSelfCommunicator final : public Communicator {
 public:
  explicit DeviceSelfCommunicator(std::unique_ptr<Communicator> host) : host_(std::move(host)) {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void allreduce_sum(float*, size_t) override {}
  void allreduce_sum(double*, size_t) override {}
  void allreduce_sum(long long*, size_t) override {}
  void allreduce_max(int*, size_t) override {}
  std::unique_ptr<PendingCollective> allreduce_sum_async(float* data, size_t count) override {
    return host_->allreduce_sum_async(data, count);  // the identity, whatever the memory
  }
  void allgather(float* recv, const float* send, size_t count) override {
    copy(recv, send, count * sizeof(float));
  }
  void reduce_scatter_sum(float* recv, const float* send, size_t count) override {
    copy(recv, send, count * sizeof(float));
  }
  void alltoallv(float* recv, const std::vector<int64_t>&, const float* send,
                 const std::vector<int64_t>& send_counts) override {
    copy(recv, send, static_cast<size_t>(send_counts[0]) * sizeof(float));
  }
  void alltoallv_placed(float* recv, const std::vector<int64_t>&,
                        const std::vector<int64_t>& recv_displs, const float* send,
                        const std::vector<int64_t>& send_counts,
                        const std::vector<int64_t>& send_displs) override {
    copy(recv + recv_displs[0], send + send_displs[0],
         static_cast<size_t>(send_counts[0]) * sizeof(float));
  }
  // Activations of any type: the same copies, in bytes.
  void allreduce_sum(Act*, size_t, ActType) override {}
  void allgather(Act* recv, const Act* send, size_t count, ActType type) override {
    copy(recv, send, count * act_bytes(type));
  }
  void alltoallv_placed(Act* recv, const std::vector<int64_t>&,
                        const std::vector<int64_t>& recv_displs, const Act* send,
                        const std::vector<int64_t>& send_counts,
                        const std::vector<int64_t>& send_displs, ActType type) override {
    copy(act_at(recv, static_cast<size_t>(recv_displs[0]), type),
         act_at(send, static_cast<size_t>(send_displs[0]), type),
         static_cast<size_t>(send_counts[0]) * act_bytes(type));
  }
  void alltoall(int* recv, const int* send, size_t per_peer) override {
    copy(recv, send, per_peer * sizeof(int));
  }
  void broadcast(void*, size_t, int) override {}
  std::vector<std::vector<char>> gather_bytes(const void* data, size_t bytes, int root) override {
    if (!is_device_pointer(data)) return host_->gather_bytes(data, bytes, root);
    std::vector<char> staged(bytes);
    cuda_ok(cudaMemcpy(staged.data(), data, bytes, cudaMemcpyDeviceToHost), "gather (staging)");
    return {staged};
  }
  void barrier() override {}

 private:
  static void copy(void* dst, const void* src, size_t bytes) {
    if (bytes == 0 || dst == src) return;
    // cudaMemcpyDefault tells host from device by the pointers (unified addressing).
    cuda_ok(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault), "copy within a group of one");
  }
  std::unique_ptr<Communicator> host_;
};

ncclConfig_t nonblocking_config() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  return config;
}

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(std::unique_ptr<Communicator> host,
                                                     Communicator* nccl_world,
                                                     double timeout_seconds) {
  int world_rank = 0;
  if (nccl_world != nullptr) {
    auto* world = dynamic_cast<NcclCommunicator*>(nccl_world);
    if (world == nullptr) {
      // The world is a group of one: so is every group split from it.
      MOE_CHECK(host->size() == 1, "a group larger than its world");
      return std::make_unique<DeviceSelfCommunicator>(std::move(host));
    }
    world_rank = world->world_rank();
    // The group's color: its lowest world rank, which every member computes the same.
    std::vector<std::vector<char>> ranks = host->gather_bytes(&world_rank, sizeof(int), 0);
    int color = world_rank;
    for (const std::vector<char>& bytes : ranks) {
      int r = 0;
      std::copy(bytes.begin(), bytes.end(), reinterpret_cast<char*>(&r));
      color = std::min(color, r);
    }
    host->broadcast(&color, sizeof(color), 0);
    // Collective over the world: every rank splits, also when its group has one member.
    ncclConfig_t config = nonblocking_config();
    ncclComm_t comm = nullptr;
    const ncclResult_t result =
        ncclCommSplit(world->comm(), color, /*key=*/world_rank, &comm, &config);
    if (result != ncclSuccess && result != ncclInProgress)
      throw RuntimeError("rank " + std::to_string(world_rank) +
                         ": NCCL communicator split: " + ncclGetErrorString(result));
    world->await("communicator split", Clock::now(), nullptr);
    return std::make_unique<NcclCommunicator>(std::move(host), comm, timeout_seconds, world_rank);
  }
  world_rank = host->rank();
  ncclUniqueId id{};
  if (host->rank() == 0) {
    const ncclResult_t result = ncclGetUniqueId(&id);
    if (result != ncclSuccess)
      throw RuntimeError("rank 0: ncclGetUniqueId: " + std::string(ncclGetErrorString(result)));
  }
  host->broadcast(&id, sizeof(id), 0);
  ncclConfig_t config = nonblocking_config();
  ncclComm_t comm = nullptr;
  const ncclResult_t result =
      ncclCommInitRankConfig(&comm, host->size(), id, host->rank(), &config);
  if (result != ncclSuccess && result != ncclInProgress)
    throw RuntimeError("rank " + std::to_string(world_rank) +
                       ": ncclCommInitRank: " + ncclGetErrorString(result));
  return std::make_unique<NcclCommunicator>(std::move(host), comm, timeout_seconds, world_rank);
}

ProcessGroups make_device_process_groups(ProcessGroups host_groups, double timeout_seconds) {
  ProcessGroups groups;
  if (host_groups.world->size() == 1) {
    // One process (one GPU): every group is the identity; no NCCL communicator is needed.
    groups.world = std::make_unique<DeviceSelfCommunicator>(std::move(host_groups.world));
    groups.tp = std::make_unique<DeviceSelfCommunicator>(std::move(host_groups.tp));
    groups.dp = std::make_unique<DeviceSelfCommunicator>(std::move(host_groups.dp));
    groups.ep = std::make_unique<DeviceSelfCommunicator>(std::move(host_groups.ep));
    groups.expert_dp = std::make_unique<DeviceSelfCommunicator>(std::move(host_groups.expert_dp));
    return groups;
  }
  groups.world = make_nccl_communicator(std::move(host_groups.world), nullptr, timeout_seconds);
  groups.tp = make_nccl_communicator(std::move(host_groups.tp), groups.world.get(), timeout_seconds);
  groups.dp = make_nccl_communicator(std::move(host_groups.dp), groups.world.get(), timeout_seconds);
  groups.ep = make_nccl_communicator(std::move(host_groups.ep), groups.world.get(), timeout_seconds);
  groups.expert_dp =
      make_nccl_communicator(std::move(host_groups.expert_dp), groups.world.get(), timeout_seconds);
  return groups;
}

}  // namespace moe
