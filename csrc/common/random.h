// A small seeded generator whose streams are identical on every platform and compiler (the
// standard library's distributions are implementation-defined), so seeded builds reproduce.
#pragma once
#include <cstdint>
#include <vector>

namespace pyknn {

class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  // splitmix64
  uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n), unbiased (Lemire's multiply-and-reject); n > 0.
  uint64_t below(uint64_t n) {
    unsigned __int128 m = static_cast<unsigned __int128>(next()) * n;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < n) {
      const uint64_t t = (0 - n) % n;
      while (low < t) {
        m = static_cast<unsigned __int128>(next()) * n;
        low = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }
  // Uniform in [0, 1).
  double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }

 private:
  uint64_t state_;
};

// m distinct indices from [0, n), sorted ascending (m <= n).
std::vector<int64_t> sample_without_replacement(uint64_t n, uint64_t m, Rng& rng);

}  // namespace pyknn
