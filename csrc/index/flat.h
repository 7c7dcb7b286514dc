// FlatIndex: exact search over all stored vectors.
#pragma once
#include <vector>

#include "index/index.h"

namespace pyknn {

class FlatIndex : public Index {
 public:
  FlatIndex(size_t dim, Metric metric) : Index(dim, metric) {}

  IndexKind kind() const override { return IndexKind::Flat; }

  // x: n x dim. ids: n ids or null for defaults. Cosine stores unit vectors.
  void add(const float* x, size_t n, const int64_t* ids);
  // distances/ids: nq x k, best first; padded with -1 and -inf (ip, cosine) or +inf (l2).
  void search(const float* q, size_t nq, size_t k, const Filter& filter, float* distances,
              int64_t* ids) const;
  // Exact re-ranking of a shortlist: for each query, the candidate ids cand[q * r ...] (-1 and
  // ids not stored are skipped) are scored against the stored vectors and the best k written,
  // best first, padded as search() pads. The RefineIndex step.
  void rerank(const float* q, size_t nq, const int64_t* cand, size_t r, size_t k,
              float* distances, int64_t* ids) const;
  // out: n x dim, the stored vectors of the given ids; KeyError for unknown ids.
  void get(const int64_t* ids, size_t n, float* out) const;
  // Returns the number removed; KeyError for unknown ids unless missing_ok.
  size_t remove(const int64_t* ids, size_t n, bool missing_ok);
  bool contains(int64_t id) const;
  std::vector<int64_t> ids() const;

  static std::unique_ptr<FlatIndex> read_body(Reader& r, const FileHeader& h);

 protected:
  size_t count() const override { return row_ids_.size(); }
  size_t bytes_used() const override;
  void write_body(Writer& w) const override;

 private:
  std::vector<float> data_;      // row-major, one row per stored vector
  std::vector<int64_t> row_ids_;  // user id of each row
  IdMap ids_;                     // user id -> row
};

}  // namespace pyknn
