// Streaming 64-bit checksum (the XXH64 algorithm) for index files.
#pragma once
#include <cstddef>
#include <cstdint>

namespace pyknn {

class Hasher64 {
 public:
  explicit Hasher64(uint64_t seed = 0);
  void update(const void* data, size_t len);
  uint64_t digest() const;

 private:
  uint64_t v_[4];
  uint64_t seed_;
  uint64_t total_ = 0;
  unsigned char buf_[32];
  size_t buf_len_ = 0;
};

}  // namespace pyknn
