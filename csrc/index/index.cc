#include "index/index.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <mutex>
#include <unordered_set>

#include "common/errors.h"
#include "simd/dispatch.h"
#include "index/flat.h"
#include "index/hnsw.h"
#include "index/ivf_flat.h"
#include "index/ivf_pq.h"

namespace pyknn {

Metric parse_metric(const std::string& name) {
  if (name == "ip" || name == "inner_product" || name == "dot") return Metric::IP;
  if (name == "l2" || name == "euclidean" || name == "sqeuclidean") return Metric::L2;
  if (name == "cosine" || name == "cos" || name == "angular") return Metric::Cosine;
  throw_value("unknown metric '" + name + "' (expected 'ip', 'l2' or 'cosine')");
}

const char* metric_name(Metric m) {
  switch (m) {
    case Metric::IP: return "ip";
    case Metric::L2: return "l2";
    case Metric::Cosine: return "cosine";
  }
  return "unknown";
}

void check_finite(const float* x, size_t n, size_t d, const char* what) {
  for (size_t i = 0; i < n; ++i) {
    const float* row = x + i * d;
    // Integer test of the exponent bits: vectorises, unlike std::isfinite in a reduction.
    uint32_t bad = 0;
    for (size_t j = 0; j < d; ++j) {
      uint32_t bits;
      std::memcpy(&bits, row + j, 4);
      bad |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
    }
    if (bad) {
      size_t j = 0;
      while (j < d && std::isfinite(row[j])) ++j;
      throw_value(std::string(what) + " row " + std::to_string(i) + " contains " +
                  (std::isnan(row[j]) ? "NaN" : "Inf") + " (at column " + std::to_string(j) +
                  "); nothing was changed");
    }
  }
  // Magnitude: squared norms (and so every inner product and squared distance between two
  // accepted vectors) must stay finite in float32.
  const simd::Kernels& K = simd::kernels();
  float norms[256];
  for (size_t i0 = 0; i0 < n; i0 += 256) {
    const size_t m = std::min<size_t>(256, n - i0);
    K.norms_sq(x + i0 * d, m, d, norms);
    for (size_t i = 0; i < m; ++i)
      if (!(norms[i] <= kMaxSquaredNorm)) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%.3g", static_cast<double>(norms[i]));
        throw_value(std::string(what) + " row " + std::to_string(i0 + i) + " has squared norm " +
                    buf + ", beyond the supported 8.5e+37 (its distances would overflow "
                    "float32); scale the data down");
      }
  }
}

void check_finite_loaded(const float* x, size_t n, size_t d, const char* what) {
  try {
    check_finite(x, n, d, what);
  } catch (const Error& e) {
    std::string msg = e.what();
    const std::string tail = "; nothing was changed";
    if (msg.size() >= tail.size() && msg.compare(msg.size() - tail.size(), tail.size(), tail) == 0)
      msg.resize(msg.size() - tail.size());
    throw_format("corrupted index file: " + msg);
  }
}

void normalize_rows(const float* x, size_t n, size_t d, float* out, const char* what) {
  // Check every row first so that a failure leaves `out` untouched.
  std::vector<double> inv(n);
  for (size_t i = 0; i < n; ++i) {
    const float* row = x + i * d;
    double ss = 0.0;
    for (size_t j = 0; j < d; ++j) ss += static_cast<double>(row[j]) * row[j];
    if (!(ss > 0.0))
      throw_value(std::string(what) + " row " + std::to_string(i) +
                  " is a zero vector, which has no direction under the cosine metric");
    inv[i] = 1.0 / std::sqrt(ss);
  }
  for (size_t i = 0; i < n; ++i) scale_row(x + i * d, d, inv[i], out + i * d);
}

void scale_row(const float* x, size_t d, double s, float* out) {
  if (s <= static_cast<double>(std::numeric_limits<float>::max())) {
    const float f = static_cast<float>(s);
    for (size_t j = 0; j < d; ++j) out[j] = x[j] * f;
  } else {  // tiny (subnormal) rows: 1 / norm overflows float32
    for (size_t j = 0; j < d; ++j) out[j] = static_cast<float>(static_cast<double>(x[j]) * s);
  }
}

// ---- IdMap ----------------------------------------------------------------------------------

size_t IdMap::home(int64_t id) const {
  // splitmix64's finaliser spreads sequential ids; the product maps the hash onto [0, capacity)
  // without a power-of-two capacity (which would waste up to half the table).
  uint64_t h = static_cast<uint64_t>(id);
  h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ULL;
  h = (h ^ (h >> 27)) * 0x94d049bb133111ebULL;
  h ^= h >> 31;
  return static_cast<size_t>((static_cast<unsigned __int128>(h) * slots_.size()) >> 64);
}

size_t IdMap::probe(int64_t id) const {
  const size_t cap = slots_.size();
  size_t i = home(id);
  while (slots_[i].id != kEmpty && slots_[i].id != id) i = i + 1 == cap ? 0 : i + 1;
  return i;
}

int64_t IdMap::find(int64_t id) const {
  if (size_ == 0 || id == kEmpty) return -1;
  const Slot& s = slots_[probe(id)];
  return s.id == id ? s.loc : -1;
}

void IdMap::rehash(size_t capacity) {
  std::vector<Slot> old(capacity, Slot{kEmpty, 0});  // may throw: nothing changed yet
  old.swap(slots_);
  for (const Slot& s : old)
    if (s.id != kEmpty) slots_[probe(s.id)] = s;
}

void IdMap::relocate(int64_t id, int64_t location) {
  if (size_ == 0) return;
  Slot& s = slots_[probe(id)];
  if (s.id == id) s.loc = location;
}

void IdMap::erase(int64_t id) {
  if (size_ == 0 || id == kEmpty) return;
  const size_t cap = slots_.size();
  size_t i = probe(id);
  if (slots_[i].id != id) return;
  // Backward-shift deletion: pull later entries of the run into the hole when their home
  // position allows it, so every remaining id stays reachable from its home.
  for (size_t j = i + 1 == cap ? 0 : i + 1; slots_[j].id != kEmpty; j = j + 1 == cap ? 0 : j + 1) {
    const size_t h = home(slots_[j].id);
    const bool movable = i <= j ? (h <= i || h > j) : (h <= i && h > j);
    if (movable) {
      slots_[i] = slots_[j];
      i = j;
    }
  }
  slots_[i].id = kEmpty;
  --size_;
}

void IdMap::check_new(const int64_t* ids, size_t n) const {
  if (!ids) {
    if (n > 0 && next_default_ > INT64_MAX - static_cast<int64_t>(n))
      throw_value("default ids would overflow int64; pass ids explicitly");
    return;
  }
  std::unordered_set<int64_t> batch;
  batch.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t id = ids[i];
    if (id == -1)
      throw_value("id -1 (at position " + std::to_string(i) +
                  ") is reserved for padding missing results");
    if (find(id) != -1)
      throw_value("id " + std::to_string(id) + " (at position " + std::to_string(i) +
                  ") is already in the index; remove it first");
    if (!batch.insert(id).second)
      throw_value("id " + std::to_string(id) + " appears more than once in this batch (again at "
                  "position " + std::to_string(i) + ")");
  }
}

std::vector<int64_t> IdMap::new_ids(const int64_t* ids, size_t n) const {
  std::vector<int64_t> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = ids ? ids[i] : next_default_ + static_cast<int64_t>(i);
  return out;
}

void IdMap::insert(const int64_t* ids, const int64_t* locations, size_t n) {
  // Only the allocation can fail, and it happens before anything changes.
  if ((size_ + n) * 4 > slots_.size() * 3)  // always leaves an empty slot to end a probe
    rehash(std::max(capacity_for(size_ + n), slots_.size() + slots_.size() / 2));
  for (size_t i = 0; i < n; ++i) {
    Slot& s = slots_[probe(ids[i])];
    if (s.id == kEmpty) ++size_;
    s = Slot{ids[i], locations[i]};
  }
  for (size_t i = 0; i < n; ++i)
    if (ids[i] >= next_default_ && ids[i] < INT64_MAX) next_default_ = ids[i] + 1;
}

std::vector<int64_t> IdMap::locations_of(const int64_t* ids, size_t n, bool missing_ok) const {
  std::vector<int64_t> loc(n);
  for (size_t i = 0; i < n; ++i) {
    loc[i] = find(ids[i]);
    if (loc[i] < 0 && !missing_ok)
      throw_key("id " + std::to_string(ids[i]) + " is not in the index");
  }
  return loc;
}

void IdMap::write(Writer& w) const { w.section("NXID", &next_default_, sizeof next_default_); }

void IdMap::read(Reader& r) {
  r.section("NXID", &next_default_, sizeof next_default_);
  // Default ids are non-negative; a negative counter would hand out -1, the padding id.
  if (next_default_ < 0)
    throw_format("corrupted index file: next default id " + std::to_string(next_default_) +
                 " is negative");
}

void IdMap::rebuild(const int64_t* ids, const int64_t* locations, size_t n) {
  std::vector<Slot>().swap(slots_);
  size_ = 0;
  rehash(capacity_for(n));
  for (size_t i = 0; i < n; ++i) {
    if (ids[i] == kEmpty) throw_format("corrupted index file: invalid id -1");
    Slot& s = slots_[probe(ids[i])];
    if (s.id == ids[i])
      throw_format("corrupted index file: repeated id " + std::to_string(ids[i]));
    s = Slot{ids[i], locations[i]};
    ++size_;
  }
}

std::vector<uint8_t> filter_mask(const Filter& f, const IdMap& ids, size_t n) {
  std::vector<uint8_t> mask;
  if (f.mask) {
    if (f.mask_len != n)
      throw_value("filter mask has " + std::to_string(f.mask_len) + " entries, expected one per "
                  "stored vector (" + std::to_string(n) + ")");
    mask.assign(f.mask, f.mask + f.mask_len);
    for (auto& m : mask) m = m != 0;
  } else {
    mask.assign(n, 0);
    for (size_t i = 0; i < f.n_ids; ++i) {
      const int64_t pos = ids.find(f.ids[i]);
      if (pos >= 0) mask[static_cast<size_t>(pos)] = 1;
    }
  }
  return mask;
}

std::vector<int64_t> read_ids(Reader& r, uint64_t count) {
  const uint64_t bytes = checked_mul(count, sizeof(int64_t), "id section");
  if (bytes > r.remaining())
    throw_format("truncated index file: " + std::to_string(count) + " ids need " +
                 std::to_string(bytes) + " bytes, " + std::to_string(r.remaining()) + " remain");
  std::vector<int64_t> ids(count);
  r.section("IDS\0", ids.data(), bytes);
  return ids;
}

// ---- Index ----------------------------------------------------------------------------------

Index::Index(size_t dim, Metric metric) : dim_(dim), metric_(metric) {
  if (dim == 0) throw_value("dim must be at least 1, got 0");
  if (dim > (size_t(1) << 20))
    throw_value("dim " + std::to_string(dim) + " is larger than the supported maximum 1048576");
}

std::string Index::metadata() const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  return metadata_;
}

void Index::set_metadata(const std::string& json) {
  std::unique_lock<std::shared_mutex> lk(mu_);
  metadata_ = json;
}

size_t Index::size() const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  return count();
}

size_t Index::memory_usage() const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  return bytes_used();
}

void Index::write_all(Writer& w) const {
  FileHeader h;
  h.kind = static_cast<uint32_t>(kind());
  h.metric = static_cast<uint32_t>(metric_);
  h.dim = dim_;
  h.count = count();
  w.header(h);
  w.section("META", metadata_.data(), metadata_.size());
  write_body(w);
  w.finish();
}

void Index::save(const std::string& path) const {
  AtomicFileWriter w(path);
  {
    std::shared_lock<std::shared_mutex> lk(mu_);
    write_all(w);
  }
  w.commit();
}

std::string Index::to_bytes() const {
  BytesWriter w;
  std::shared_lock<std::shared_mutex> lk(mu_);
  write_all(w);
  return std::move(w.bytes());
}

const float* Index::prepare_queries(const float* q, size_t nq,
                                    std::vector<float>& storage) const {
  check_finite(q, nq, dim_, "queries");
  if (metric_ != Metric::Cosine) return q;  // no copy: large batches stay where they are
  storage.resize(nq * dim_);
  normalize_rows(q, nq, dim_, storage.data(), "queries");
  return storage.data();
}

std::vector<float> Index::prepare_vectors(const float* x, size_t n) const {
  check_finite(x, n, dim_, "vectors");
  std::vector<float> unit;
  if (metric_ == Metric::Cosine) {
    unit.resize(n * dim_);
    normalize_rows(x, n, dim_, unit.data(), "vectors");
  }
  return unit;
}

namespace {

std::unique_ptr<Index> read_any(Reader& r, bool mapped = false) {
  FileHeader h = r.header();
  if (h.metric > static_cast<uint32_t>(Metric::Cosine))
    throw_format("corrupted index file: unknown metric code " + std::to_string(h.metric));
  if (h.dim == 0 || h.dim > (uint64_t(1) << 20))
    throw_format("corrupted index file: invalid dimension " + std::to_string(h.dim));
  std::string meta = r.section_string("META", uint64_t(1) << 30);
  if (mapped && h.kind != static_cast<uint32_t>(IndexKind::HNSW))
    throw_value("mmap=True is supported for HNSWIndex files only; this file holds index kind " +
                std::to_string(h.kind) + " (load it without mmap)");
  std::unique_ptr<Index> idx;
  switch (static_cast<IndexKind>(h.kind)) {
    case IndexKind::Flat: idx = FlatIndex::read_body(r, h); break;
    case IndexKind::IVFFlat: idx = IVFFlatIndex::read_body(r, h); break;
    case IndexKind::HNSW: idx = HNSWIndex::read_body(r, h); break;
    case IndexKind::IVFPQ: idx = IVFPQIndex::read_body(r, h, false); break;
    case IndexKind::PQ: idx = IVFPQIndex::read_body(r, h, true); break;
    default:
      throw_format("unknown index kind " + std::to_string(h.kind) +
                   " (written by a newer pyknn?)");
  }
  r.finish();
  idx->set_metadata(meta);
  return idx;
}

}  // namespace

std::unique_ptr<Index> load_index(const std::string& path, bool mmap) {
  if (mmap) {
    MappedReader r(path);
    return read_any(r, true);
  }
  FileReader r(path);
  return read_any(r);
}

std::unique_ptr<Index> index_from_bytes(const char* data, size_t len) {
  BytesReader r(data, len);
  return read_any(r);
}

}  // namespace pyknn
