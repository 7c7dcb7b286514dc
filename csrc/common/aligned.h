// A 64-byte aligned float buffer (packed GEMM panels), without zero-initialisation cost.
#pragma once
#include <cstddef>
#include <cstdlib>
#include <new>

namespace pyknn {

class AlignedFloats {
 public:
  AlignedFloats() = default;
  explicit AlignedFloats(size_t n) { resize(n); }
  ~AlignedFloats() { std::free(p_); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;

  void resize(size_t n) {
    if (n <= cap_) return;
    size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
    void* q = std::aligned_alloc(64, bytes);
    if (!q) throw std::bad_alloc();
    std::free(p_);
    p_ = static_cast<float*>(q);
    cap_ = n;
  }
  float* data() { return p_; }
  const float* data() const { return p_; }

 private:
  float* p_ = nullptr;
  size_t cap_ = 0;
};

}  // namespace pyknn
