// Bounded top-k selection: a binary heap whose root is the worst kept candidate.
// Scores are "larger is better" (the L2 path stores negated distances); equal scores keep the
// smaller row, so results do not depend on how the work was split across threads.
#pragma once
#include <cstddef>
#include <cstdint>
#include <limits>

namespace pyknn {

struct TopK {
  float* s;      // k scores
  int64_t* r;    // k rows
  size_t k;
  size_t size = 0;

  TopK(float* scores, int64_t* rows, size_t kk) : s(scores), r(rows), k(kk) {}

  static bool worse(float sa, int64_t ra, float sb, int64_t rb) {
    return sa < sb || (sa == sb && ra > rb);
  }
  // Scores below this cannot enter (-inf while the heap is not full).
  float threshold() const {
    return size < k ? -std::numeric_limits<float>::infinity() : s[0];
  }
  void push(float score, int64_t row) {
    if (size < k) {
      size_t i = size++;
      while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!worse(score, row, s[p], r[p])) break;
        s[i] = s[p];
        r[i] = r[p];
        i = p;
      }
      s[i] = score;
      r[i] = row;
    } else if (k > 0 && worse(s[0], r[0], score, row)) {
      sift_down_from_root(score, row, size);
    }
  }
  // Sorts in place, best first; the heap is unusable afterwards.
  void sort_best_first() {
    for (size_t n = size; n > 1; --n) {
      float ls = s[n - 1];
      int64_t lr = r[n - 1];
      s[n - 1] = s[0];
      r[n - 1] = r[0];
      sift_down_from_root(ls, lr, n - 1);
    }
  }

 private:
  void sift_down_from_root(float score, int64_t row, size_t n) {
    size_t i = 0;
    for (;;) {
      size_t c = 2 * i + 1;
      if (c >= n) break;
      if (c + 1 < n && worse(s[c + 1], r[c + 1], s[c], r[c])) ++c;
      if (!worse(s[c], r[c], score, row)) break;
      s[i] = s[c];
      r[i] = r[c];
      i = c;
    }
    s[i] = score;
    r[i] = row;
  }
};

}  // namespace pyknn
