// A typed allocation in a backend's memory, freed with its owner (RAII).
#pragma once

#include <cstddef>
#include <utility>

#include "core/backend.h"

namespace moe {

template <typename T>
class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend& backend, size_t count)
      : backend_(&backend),
        data_(static_cast<T*>(backend.alloc_bytes(count * sizeof(T)))),
        count_(count) {}
  ~Buffer() { release(); }
  Buffer(Buffer&& other) noexcept { *this = std::move(other); }
  Buffer& operator=(Buffer&& other) noexcept {
    if (this != &other) {
      release();
      backend_ = std::exchange(other.backend_, nullptr);
      data_ = std::exchange(other.data_, nullptr);
      count_ = std::exchange(other.count_, 0);
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }
  void zero() {
    if (data_) backend_->fill_zero(data_, bytes());
  }

 private:
  void release() {
    if (data_) backend_->free_bytes(data_);
    data_ = nullptr;
  }
  Backend* backend_ = nullptr;
  T* data_ = nullptr;
  size_t count_ = 0;
};

// Activation memory (core/activation.h): `count` elements of the backend's activation type.
class ActBuffer {
 public:
  ActBuffer() = default;
  ActBuffer(Backend& backend, size_t count)
      : type_(backend.activation_type()),
        bytes_(backend, count * act_bytes(type_)),
        count_(count) {}

  Act* data() { return reinterpret_cast<Act*>(bytes_.data()); }
  const Act* data() const { return reinterpret_cast<const Act*>(bytes_.data()); }
  size_t size() const { return count_; }
  ActType type() const { return type_; }
  void zero() { bytes_.zero(); }

 private:
  ActType type_ = ActType::kF32;
  Buffer<unsigned char> bytes_;
  size_t count_ = 0;
};

}  // namespace moe
