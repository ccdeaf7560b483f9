// CPU memory: 64-byte aligned host allocations; copies are memcpy.
#include <cstdlib>
#include <cstring>
#include <new>

#include "core/cpu/cpu_backend.h"

namespace moe {

std::string CpuBackend::name() const { return "cpu"; }

void* CpuBackend::alloc_bytes(size_t bytes) {
  size_t rounded = (bytes + 63) / 64 * 64;
  void* ptr = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  if (ptr == nullptr) throw std::bad_alloc();
  std::memset(ptr, 0, rounded);
  return ptr;
}

void CpuBackend::free_bytes(void* ptr) { std::free(ptr); }

// An empty buffer may be a null pointer, which memcpy, memmove and memset must never see.
void CpuBackend::copy_to_host(void* dst_host, const void* src, size_t bytes) {
  if (bytes > 0) std::memcpy(dst_host, src, bytes);
}

void CpuBackend::copy_from_host(void* dst, const void* src_host, size_t bytes) {
  if (bytes > 0) std::memcpy(dst, src_host, bytes);
}

void CpuBackend::copy(void* dst, const void* src, size_t bytes) {
  if (bytes > 0) std::memmove(dst, src, bytes);
}

void CpuBackend::fill_zero(void* ptr, size_t bytes) {
  if (bytes > 0) std::memset(ptr, 0, bytes);
}

void CpuBackend::synchronize() {}

// Activations are fp32 here, so moving them to and from host floats is a plain copy.
ActType CpuBackend::activation_type() const { return ActType::kF32; }

void CpuBackend::copy_act_to_host(float* dst_host,  // (n)
                                  const Act* src,   // (n)
                                  size_t n) {
  copy_to_host(dst_host, src, n * sizeof(float));
}

void CpuBackend::copy_act_from_host(Act* dst,               // (n)
                                    const float* src_host,  // (n)
                                    size_t n) {
  copy_from_host(dst, src_host, n * sizeof(float));
}

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace moe
