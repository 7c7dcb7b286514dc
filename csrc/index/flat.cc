#include "index/flat.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <mutex>

#include "common/errors.h"
#include "index/exact_search.h"
#include "common/threadpool.h"
#include "common/topk.h"
#include "simd/dispatch.h"

namespace pyknn {

size_t FlatIndex::bytes_used() const {
  return data_.capacity() * sizeof(float) + row_ids_.capacity() * sizeof(int64_t) +
         ids_.memory_usage();
}

void FlatIndex::add(const float* x, size_t n, const int64_t* ids) {
  if (n == 0) return;
  // Validate and convert before taking the lock or touching any state.
  std::vector<float> unit = prepare_vectors(x, n);
  if (!unit.empty()) x = unit.data();
  std::unique_lock<std::shared_mutex> lk(mu_);
  ids_.check_new(ids, n);
  std::vector<int64_t> new_ids = ids_.new_ids(ids, n);
  std::vector<int64_t> rows(n);
  for (size_t i = 0; i < n; ++i) rows[i] = static_cast<int64_t>(row_ids_.size() + i);
  // Allocate everything first so that nothing below can fail half-way.
  const size_t old = data_.size();
  if (data_.capacity() < old + n * dim_)
    data_.reserve(std::max(old + n * dim_, data_.capacity() + data_.capacity() / 2));
  row_ids_.reserve(row_ids_.size() + n);
  ids_.insert(new_ids.data(), rows.data(), n);  // strong guarantee
  data_.insert(data_.end(), x, x + n * dim_);
  row_ids_.insert(row_ids_.end(), new_ids.begin(), new_ids.end());
}

void FlatIndex::search(const float* q, size_t nq, size_t k, const Filter& filter,
                       float* distances, int64_t* ids) const {
  std::vector<float> unit;
  const float* queries = prepare_queries(q, nq, unit);
  std::shared_lock<std::shared_mutex> lk(mu_);
  std::vector<uint8_t> mask;
  if (filter.active()) mask = filter_mask(filter, ids_, row_ids_.size());
  ExactSearchInput in;
  in.x = data_.data();
  in.n = row_ids_.size();
  in.d = dim_;
  in.l2 = metric_ == Metric::L2;
  in.mask = filter.active() ? mask.data() : nullptr;
  exact_knn(in, queries, nq, k, distances, ids);
  const float pad = in.l2 ? std::numeric_limits<float>::infinity()
                          : -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < nq * k; ++i) {
    if (ids[i] < 0) {
      distances[i] = pad;
    } else {
      ids[i] = row_ids_[static_cast<size_t>(ids[i])];
      if (in.l2) distances[i] = -distances[i];
    }
  }
}

void FlatIndex::rerank(const float* q, size_t nq, const int64_t* cand, size_t r, size_t k,
                       float* distances, int64_t* ids) const {
  std::vector<float> unit;
  const float* queries = prepare_queries(q, nq, unit);
  std::shared_lock<std::shared_mutex> lk(mu_);
  const simd::Kernels& K = simd::kernels();
  const bool l2 = metric_ == Metric::L2;
  const float pad = l2 ? std::numeric_limits<float>::infinity()
                       : -std::numeric_limits<float>::infinity();
  parallel_for(nq, [&](size_t qi) {
    const float* qv = queries + qi * dim_;
    TopK h(distances + qi * k, ids + qi * k, k);
    for (size_t j = 0; j < r; ++j) {
      const int64_t id = cand[qi * r + j];
      if (id == -1) continue;
      const int64_t row = ids_.find(id);
      if (row < 0) continue;
      const float* v = data_.data() + static_cast<size_t>(row) * dim_;
      h.push(l2 ? -K.l2sq(qv, v, dim_) : K.dot(qv, v, dim_), row);
    }
    h.sort_best_first();
    for (size_t j = 0; j < k; ++j) {
      float& d = distances[qi * k + j];
      int64_t& i = ids[qi * k + j];
      if (j >= h.size) {
        d = pad;
        i = -1;
      } else {
        i = row_ids_[static_cast<size_t>(i)];
        if (l2) d = -d;
      }
    }
  });
}

void FlatIndex::get(const int64_t* ids, size_t n, float* out) const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  std::vector<int64_t> rows = ids_.locations_of(ids, n, false);
  for (size_t i = 0; i < n; ++i)
    std::memcpy(out + i * dim_, data_.data() + rows[i] * dim_, dim_ * sizeof(float));
}

size_t FlatIndex::remove(const int64_t* ids, size_t n, bool missing_ok) {
  std::unique_lock<std::shared_mutex> lk(mu_);
  ids_.locations_of(ids, n, missing_ok);  // KeyError before anything changes
  size_t removed = 0;
  for (size_t i = 0; i < n; ++i) {
    // Look up again: an earlier removal may have moved this id, and ids may repeat.
    const int64_t row = ids_.find(ids[i]);
    if (row < 0) continue;
    // The last row moves into the hole.
    const size_t last = row_ids_.size() - 1;
    if (static_cast<size_t>(row) != last) {
      std::memcpy(data_.data() + row * dim_, data_.data() + last * dim_, dim_ * sizeof(float));
      row_ids_[row] = row_ids_[last];
      ids_.relocate(row_ids_[row], row);
    }
    ids_.erase(ids[i]);
    row_ids_.pop_back();
    data_.resize(data_.size() - dim_);
    ++removed;
  }
  return removed;
}

bool FlatIndex::contains(int64_t id) const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  return ids_.find(id) >= 0;
}

std::vector<int64_t> FlatIndex::ids() const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  return row_ids_;
}

void FlatIndex::write_body(Writer& w) const {
  w.section("VECS", data_.data(), data_.size() * sizeof(float));
  w.section("IDS\0", row_ids_.data(), row_ids_.size() * sizeof(int64_t));
  ids_.write(w);
}

std::unique_ptr<FlatIndex> FlatIndex::read_body(Reader& r, const FileHeader& h) {
  auto idx = std::make_unique<FlatIndex>(h.dim, static_cast<Metric>(h.metric));
  const uint64_t floats = checked_mul(h.count, h.dim, "vector count x dim");
  const uint64_t bytes = checked_mul(floats, sizeof(float), "vector section");
  if (bytes > r.remaining())
    throw_format("truncated index file: " + std::to_string(h.count) + " vectors of dim " +
                 std::to_string(h.dim) + " need " + std::to_string(bytes) + " bytes, " +
                 std::to_string(r.remaining()) + " remain");
  idx->data_.resize(floats);
  r.section("VECS", idx->data_.data(), bytes);
  idx->row_ids_ = read_ids(r, h.count);
  idx->ids_.read(r);
  std::vector<int64_t> rows(h.count);
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<int64_t>(i);
  idx->ids_.rebuild(idx->row_ids_.data(), rows.data(), h.count);
  return idx;
}

}  // namespace pyknn
