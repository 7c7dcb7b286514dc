#include "index/flat.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <mutex>

#include "common/errors.h"
#include "index/exact_search.h"

namespace pyknn {

size_t FlatIndex::bytes_used() const {
  return data_.capacity() * sizeof(float) + ids_.memory_usage();
}

void FlatIndex::add(const float* x, size_t n, const int64_t* ids) {
  if (n == 0) return;
  // Validate and convert before taking the lock or touching any state.
  std::vector<float> unit = prepare_vectors(x, n);
  if (!unit.empty()) x = unit.data();
  std::unique_lock<std::shared_mutex> lk(mu_);
  ids_.check_new(ids, n);
  const size_t old = data_.size();
  if (data_.capacity() < old + n * dim_)
    data_.reserve(std::max(old + n * dim_, data_.capacity() + data_.capacity() / 2));
  ids_.append(ids, n);  // strong guarantee; the reserve above already succeeded
  data_.insert(data_.end(), x, x + n * dim_);
}

void FlatIndex::search(const float* q, size_t nq, size_t k, const Filter& filter,
                       float* distances, int64_t* ids) const {
  std::vector<float> queries = prepare_queries(q, nq);
  std::shared_lock<std::shared_mutex> lk(mu_);
  std::vector<uint8_t> mask;
  if (filter.active()) mask = ids_.filter_mask(filter);
  ExactSearchInput in;
  in.x = data_.data();
  in.n = ids_.size();
  in.d = dim_;
  in.l2 = metric_ == Metric::L2;
  in.mask = filter.active() ? mask.data() : nullptr;
  exact_knn(in, queries.data(), nq, k, distances, ids);
  const float pad = in.l2 ? std::numeric_limits<float>::infinity()
                          : -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < nq * k; ++i) {
    if (ids[i] < 0) {
      distances[i] = pad;
    } else {
      ids[i] = ids_.id_at(static_cast<size_t>(ids[i]));
      if (in.l2) distances[i] = -distances[i];
    }
  }
}

void FlatIndex::get(const int64_t* ids, size_t n, float* out) const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  std::vector<int64_t> rows = ids_.rows_of(ids, n, false);
  for (size_t i = 0; i < n; ++i)
    std::memcpy(out + i * dim_, data_.data() + rows[i] * dim_, dim_ * sizeof(float));
}

size_t FlatIndex::remove(const int64_t* ids, size_t n, bool missing_ok) {
  std::unique_lock<std::shared_mutex> lk(mu_);
  std::vector<int64_t> rows = ids_.rows_of(ids, n, missing_ok);
  size_t removed = 0;
  for (size_t i = 0; i < n; ++i) {
    // Look up again: an earlier removal may have moved this id, and ids may repeat.
    const int64_t row = ids_.find(ids[i]);
    if (row < 0) continue;
    const size_t last = ids_.size() - 1;
    if (static_cast<size_t>(row) != last)
      std::memcpy(data_.data() + row * dim_, data_.data() + last * dim_, dim_ * sizeof(float));
    ids_.remove_swap(static_cast<size_t>(row));
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
  return ids_.row_ids();
}

void FlatIndex::write_body(Writer& w) const {
  w.section("VECS", data_.data(), data_.size() * sizeof(float));
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
  idx->ids_.read(r, h.count);
  return idx;
}

}  // namespace pyknn
