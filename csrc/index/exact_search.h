// Brute-force k-nearest-neighbour search over a row-major float32 matrix: the engine behind
// FlatIndex, and the exact stage of other indexes (k-means assignment, re-ranking).
#pragma once
#include <cstddef>
#include <cstdint>

namespace pyknn {

struct ExactSearchInput {
  const float* x = nullptr;       // n x d, row-major
  size_t n = 0;
  size_t d = 0;
  bool l2 = false;                // squared L2; otherwise inner product (cosine: normalise first)
  const uint8_t* mask = nullptr;  // optional: rows with mask[row] == 0 are never returned
};

// For each of the nq queries (row-major, nq x d) writes its k best rows to rows[q * k ...] and
// their scores to scores[q * k ...], best first. Scores are "larger is better": the inner product,
// or the negated squared distance for L2 (always computed as a sum of squared differences for the
// returned rows, so never negative and accurate at any magnitude). Ties go to the smaller row.
// Missing results are padded with row -1 and score -inf. Runs on the thread pool.
void exact_knn(const ExactSearchInput& in, const float* q, size_t nq, size_t k, float* scores,
               int64_t* rows);

}  // namespace pyknn
