#include "common/random.h"

#include <algorithm>
#include <unordered_set>

namespace pyknn {

std::vector<int64_t> sample_without_replacement(uint64_t n, uint64_t m, Rng& rng) {
  std::vector<int64_t> out;
  out.reserve(m);
  if (m * 4 < n) {
    // Floyd's algorithm: memory in m, not n.
    std::unordered_set<int64_t> chosen;
    chosen.reserve(m * 2);
    for (uint64_t j = n - m; j < n; ++j) {
      int64_t t = static_cast<int64_t>(rng.below(j + 1));
      if (!chosen.insert(t).second) {
        chosen.insert(static_cast<int64_t>(j));
        t = static_cast<int64_t>(j);
      }
      out.push_back(t);
    }
  } else {
    std::vector<int64_t> all(n);
    for (uint64_t i = 0; i < n; ++i) all[i] = static_cast<int64_t>(i);
    for (uint64_t i = 0; i < m; ++i) std::swap(all[i], all[i + rng.below(n - i)]);
    out.assign(all.begin(), all.begin() + m);
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace pyknn
