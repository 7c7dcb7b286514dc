// Brute-force k-nearest-neighbour search over a row-major float32 matrix: the engine behind
// FlatIndex, and the exact stage of other indexes (k-means assignment, re-ranking).
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/topk.h"
#include "simd/dispatch.h"

namespace pyknn {

struct ExactSearchInput {
  const float* x = nullptr;       // n x d, row-major
  size_t n = 0;
  size_t d = 0;
  bool l2 = false;                // squared L2; otherwise inner product (cosine: normalise first)
  const uint8_t* mask = nullptr;  // optional: rows with mask[row] == 0 are never returned
  const float* query_norms = nullptr;  // optional (L2): the queries' squared norms, if known
};

// For each of the nq queries (row-major, nq x d) writes its k best rows to rows[q * k ...] and
// their scores to scores[q * k ...], best first. Scores are "larger is better": the inner product,
// or the negated squared distance for L2 (always computed as a sum of squared differences for the
// returned rows, so never negative and accurate at any magnitude). Ties go to the smaller row.
// Missing results are padded with row -1 and score -inf. Runs on the thread pool.
void exact_knn(const ExactSearchInput& in, const float* q, size_t nq, size_t k, float* scores,
               int64_t* rows);

// Queries per GEMM call: a multiple of the kernel's register tile, about 64; the score tile
// (this many rows x one block) stays in L2 next to the packed block.
size_t query_tile(const simd::Kernels& K);

// Relative error bound of the expanded L2 form in float32 for dimension d (see the .cc file).
double l2_error_factor(size_t d);

// Moves the candidates of one query's scores against m consecutive rows into its heap: the rows
// row0 .. row0 + m - 1, skipping j where mask[j] == 0 (mask may be null). idx and t are scratch
// of m entries. Shared by exact search and the scans of the IVF indexes.
struct ScoreScan {
  const simd::Kernels* K;
  size_t d;
  double gamma;  // l2_error_factor(d)

  // s: final scores, larger is better. idx: scratch for m positions (both functions).
  void ip(TopK& h, const float* s, size_t m, int64_t row0, const uint8_t* mask,
          uint32_t* idx) const;
  // ip: inner products with the m rows x (row-major), xn: their squared norms, qv/qn: the query
  // and its squared norm. Screens with the expanded form and its error bound, then pushes the
  // survivors' exact squared distances, negated.
  void l2(TopK& h, const float* ip, const float* xn, const float* x, size_t m, int64_t row0,
          const uint8_t* mask, const float* qv, float qn, float* t, uint32_t* idx) const;
};

}  // namespace pyknn
