// Device memory, copies (activations too), scratch slots, the bf16 weight cache and the
// backend's construction.
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/cuda/act.cuh"
#include "core/cuda/cuda_backend.h"

namespace moe {

void cuda_check(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess) return;
  throw RuntimeError(std::string("CUDA error ") + cudaGetErrorName(status) + " (" +
                     cudaGetErrorString(status) + ") in " + call + " at " + file + ":" +
                     std::to_string(line));
}

void cublas_check(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw RuntimeError(std::string("cuBLASLt error ") + cublasLtGetStatusName(status) + " (" +
                     cublasLtGetStatusString(status) + ") in " + call + " at " + file + ":" +
                     std::to_string(line));
}

CudaBackend::CudaBackend(int device) : device_(device) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0)
    throw RuntimeError("--device cuda: " + (status != cudaSuccess
                                                ? std::string("no CUDA device (") +
                                                      cudaGetErrorString(status) + ")"
                                                : std::string("no CUDA device")));
  if (device < 0 || device >= count)
    throw RuntimeError("--device cuda: this rank's node-local index is " + std::to_string(device) +
                       " but the node has " + std::to_string(count) +
                       " GPU(s); run one rank per GPU");
  CUDA_CHECK(cudaSetDevice(device));
  cudaDeviceProp props{};
  CUDA_CHECK(cudaGetDeviceProperties(&props, device));
  device_name_ = props.name;
  CUBLAS_CHECK(cublasLtCreate(&lt_));
  lt_workspace_bytes_ = size_t{32} << 20;  // cuBLASLt's recommendation for Hopper
  CUDA_CHECK(cudaMalloc(&lt_workspace_, lt_workspace_bytes_));
  const char* fused_gelu = std::getenv("MOE_FUSED_GELU");
  fused_gelu_ = fused_gelu == nullptr || std::strcmp(fused_gelu, "0") != 0;
}

CudaBackend::~CudaBackend() {
  // No throwing from a destructor: errors here are ignored (the process is ending anyway).
  cudaDeviceSynchronize();
  for (ScratchBuffer& s : scratch_) cudaFree(s.ptr);
  for (auto& slot : staging_)
    for (PinnedStaging& staging : slot) {
      cudaFreeHost(staging.host);
      if (staging.copied) cudaEventDestroy(staging.copied);
    }
  for (auto& [base, a] : allocations_) {
    cudaFree(a.shadow);
    cudaFree(reinterpret_cast<void*>(base));
  }
  cudaFree(lt_workspace_);
  if (lt_) cublasLtDestroy(lt_);
}

std::string CudaBackend::name() const { return "cuda:" + std::to_string(device_) + " " + device_name_; }

void* CudaBackend::alloc_bytes(size_t bytes) {
  void* ptr = nullptr;
  const size_t rounded = bytes == 0 ? 64 : (bytes + 63) / 64 * 64;  // cudaMalloc aligns to 256
  CUDA_CHECK(cudaMalloc(&ptr, rounded));
  CUDA_CHECK(cudaMemset(ptr, 0, rounded));
  allocations_[reinterpret_cast<uintptr_t>(ptr)] = Allocation{rounded, nullptr, false};
  return ptr;
}

void CudaBackend::free_bytes(void* ptr) {
  if (ptr == nullptr) return;
  auto it = allocations_.find(reinterpret_cast<uintptr_t>(ptr));
  MOE_CHECK(it != allocations_.end(), "free_bytes: not an allocation of this backend");
  CUDA_CHECK(cudaFree(it->second.shadow));
  allocations_.erase(it);
  CUDA_CHECK(cudaFree(ptr));
}

CudaBackend::Allocation* CudaBackend::find_allocation(const void* ptr, uintptr_t* base) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
  auto it = allocations_.upper_bound(p);
  if (it == allocations_.begin()) return nullptr;
  --it;
  if (p >= it->first + it->second.bytes) return nullptr;
  if (base) *base = it->first;
  return &it->second;
}

void CudaBackend::note_write(const void* ptr) {
  if (ptr == nullptr) return;
  Allocation* a = find_allocation(ptr);
  if (a != nullptr) a->shadow_valid = false;
}

const __nv_bfloat16* CudaBackend::bf16_weight(const float* w, size_t n) {
  uintptr_t base = 0;
  Allocation* a = find_allocation(w, &base);
  MOE_CHECK(a != nullptr, "GEMM weight is not memory of this CUDA backend");
  const size_t offset = (reinterpret_cast<uintptr_t>(w) - base) / sizeof(float);
  MOE_CHECK((offset + n) * sizeof(float) <= a->bytes, "GEMM weight runs past its allocation");
  const size_t floats = a->bytes / sizeof(float);  // (floats) the whole allocation
  if (a->shadow == nullptr) CUDA_CHECK(cudaMalloc(&a->shadow, floats * sizeof(__nv_bfloat16)));
  if (!a->shadow_valid) {
    launch_to_bf16(a->shadow, reinterpret_cast<const float*>(base), floats);
    a->shadow_valid = true;
  }
  return a->shadow + offset;
}

void* CudaBackend::scratch(Slot slot, size_t bytes) {
  ScratchBuffer& s = scratch_[slot];
  if (s.bytes < bytes) {
    // cudaFree waits for the device, so no queued op still uses the old buffer.
    CUDA_CHECK(cudaFree(s.ptr));
    s.ptr = nullptr;
    s.bytes = 0;  // consistent even if the allocation below throws
    const size_t grown = bytes + bytes / 4;
    CUDA_CHECK(cudaMalloc(&s.ptr, grown));
    s.bytes = grown;
  }
  return s.ptr;
}

// cudaMemcpyAsync from pageable host memory may synchronize with the stream (CUDA's "API
// synchronization behavior": the driver may stage it through pinned memory after a stream
// sync), which would drain the GPU's queue at every op with a host argument. From pinned
// memory the copy is truly asynchronous. So the bytes go to the slot's next pinned staging
// buffer first (round robin over kStagingDepth), and an event after the copy says when that
// buffer may be rewritten: by its next turn the copy is normally long done (the host waits
// only when the GPU is more than kStagingDepth uploads of this slot behind).
const void* CudaBackend::upload_bytes(Slot slot, const void* host, size_t bytes) {
  void* dev = scratch(slot, bytes + 4);
  if (bytes == 0) return dev;
  PinnedStaging& staging = staging_[slot][staging_turn_[slot]];
  staging_turn_[slot] = (staging_turn_[slot] + 1) % kStagingDepth;
  if (staging.copied == nullptr)
    CUDA_CHECK(cudaEventCreateWithFlags(&staging.copied, cudaEventDisableTiming));
  else
    CUDA_CHECK(cudaEventSynchronize(staging.copied));  // its previous copy has left it
  if (staging.bytes < bytes) {
    CUDA_CHECK(cudaFreeHost(staging.host));
    staging.host = nullptr;
    staging.bytes = 0;  // consistent even if the allocation below throws
    const size_t grown = bytes + bytes / 4;
    CUDA_CHECK(cudaMallocHost(&staging.host, grown));
    staging.bytes = grown;
  }
  std::memcpy(staging.host, host, bytes);
  CUDA_CHECK(cudaMemcpyAsync(dev, staging.host, bytes, cudaMemcpyHostToDevice, 0));
  CUDA_CHECK(cudaEventRecord(staging.copied, 0));
  return dev;
}

const int* CudaBackend::upload(Slot slot, const int* host, size_t count) {
  return static_cast<const int*>(upload_bytes(slot, host, count * sizeof(int)));
}

const __nv_bfloat16* CudaBackend::to_bf16(Slot slot, const float* x, size_t n) {
  auto* out = static_cast<__nv_bfloat16*>(scratch(slot, n * sizeof(__nv_bfloat16) + 16));
  launch_to_bf16(out, x, n);
  return out;
}

void CudaBackend::copy_to_host(void* dst_host, const void* src, size_t bytes) {
  CUDA_CHECK(cudaMemcpy(dst_host, src, bytes, cudaMemcpyDeviceToHost));
}

void CudaBackend::copy_from_host(void* dst, const void* src_host, size_t bytes) {
  note_write(dst);
  CUDA_CHECK(cudaMemcpy(dst, src_host, bytes, cudaMemcpyHostToDevice));
}

void CudaBackend::copy(void* dst, const void* src, size_t bytes) {
  note_write(dst);
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, 0));
}

void CudaBackend::fill_zero(void* ptr, size_t bytes) {
  note_write(ptr);
  CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, 0));
}

void CudaBackend::synchronize() { CUDA_CHECK(cudaDeviceSynchronize()); }

// Activations are bf16 here (act.cuh): host floats are rounded to nearest even on the host
// (NaN stays NaN) and widened back exactly, so the bytes that cross PCIe are the 2-byte ones.
ActType CudaBackend::activation_type() const { return ActType::kBF16; }

void CudaBackend::copy_act_to_host(float* dst_host,  // (n)
                                   const Act* src,   // (n)
                                   size_t n) {
  std::vector<act_t> staged(n);  // (n)
  copy_to_host(staged.data(), src, n * sizeof(act_t));
  for (size_t i = 0; i < n; ++i) dst_host[i] = __bfloat162float(staged[i]);
}

void CudaBackend::copy_act_from_host(Act* dst,               // (n)
                                     const float* src_host,  // (n)
                                     size_t n) {
  std::vector<act_t> staged(n);  // (n)
  for (size_t i = 0; i < n; ++i) staged[i] = __float2bfloat16_rn(src_host[i]);
  copy_from_host(dst, staged.data(), n * sizeof(act_t));  // note_write(dst) too
}

}  // namespace moe
