#include "index/ivf_flat.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <mutex>

#include "common/errors.h"
#include "common/threadpool.h"
#include "common/topk.h"
#include "index/exact_search.h"
#include "index/kmeans.h"
#include "simd/dispatch.h"

namespace pyknn {

namespace {
// From this many queries on, a search groups queries by list (one matrix product per list).
constexpr size_t kGroupedMinQueries = 8;
// A list is scanned with a matrix product when at least this many queries probe it: packing a
// list costs about as much as scanning it once per query for a dozen queries (measured on
// 117k x 384, nlist 1024: threshold 4 gave 25.7k QPS at nprobe 4, 12-24 gave 30-31k).
constexpr size_t kGemmMinQueries = 16;
// Multiply-adds below which one query's probes are not split over threads (waking a thread
// costs about as much as scanning this much memory).
constexpr double kMinSplitWork = 2e6;
}  // namespace

IVFFlatIndex::IVFFlatIndex(size_t dim, Metric metric, size_t nlist, size_t nprobe)
    : Index(dim, metric), nlist_(nlist), nprobe_(1) {
  if (nlist < 1) throw_value("nlist must be at least 1, got 0");
  if (nlist > (size_t(1) << 22))
    throw_value("nlist " + std::to_string(nlist) + " is larger than the supported maximum 4194304");
  set_nprobe(nprobe);
}

void IVFFlatIndex::set_nprobe(size_t nprobe) {
  if (nprobe < 1) throw_value("nprobe must be at least 1, got 0");
  nprobe_.store(nprobe);
}

bool IVFFlatIndex::is_trained() const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  return !centroids_.empty();
}

void IVFFlatIndex::require_trained(const char* what) const {
  if (centroids_.empty())
    throw Error(ErrorKind::Runtime, std::string("IVFFlatIndex is not trained: call train(x) before ") +
                                        what);
}

size_t IVFFlatIndex::bytes_used() const {
  size_t b = centroids_.capacity() * sizeof(float) + lists_.capacity() * sizeof(List) +
             ids_.memory_usage();
  for (const List& l : lists_) b += l.x.capacity() * sizeof(float) + l.ids.capacity() * sizeof(int64_t);
  return b;
}

void IVFFlatIndex::train(const float* x, size_t n, int n_iter, uint64_t seed,
                         bool kmeans_plus_plus) {
  if (n < nlist_)
    throw_value("training needs at least nlist points: got " + std::to_string(n) +
                " points for nlist " + std::to_string(nlist_));
  {
    std::shared_lock<std::shared_mutex> lk(mu_);
    if (ntotal_ > 0)
      throw_value("the index already holds " + std::to_string(ntotal_) +
                  " vectors; train a new index instead of retraining this one");
  }
  std::vector<float> unit = prepare_vectors(x, n);
  if (!unit.empty()) x = unit.data();
  KMeansParams p;
  p.n_clusters = nlist_;
  p.n_iter = n_iter;
  p.seed = seed;
  p.kmeans_plus_plus = kmeans_plus_plus;
  p.spherical = coarse_ip();
  KMeansResult r = kmeans_fit(x, n, dim_, p);
  std::unique_lock<std::shared_mutex> lk(mu_);
  if (ntotal_ > 0) throw_value("vectors were added while training; train a new index");
  centroids_ = std::move(r.centroids);
  lists_.assign(nlist_, List());
  ++generation_;
}

void IVFFlatIndex::add(const float* x, size_t n, const int64_t* ids) {
  if (n == 0) return;
  std::vector<float> unit = prepare_vectors(x, n);
  if (!unit.empty()) x = unit.data();
  // Assign cells under the shared lock, so searches go on meanwhile.
  std::vector<int64_t> labels(n);
  std::vector<float> scores(n);
  uint64_t generation;
  {
    std::shared_lock<std::shared_mutex> lk(mu_);
    require_trained("add()");
    ids_.check_new(ids, n);
    kmeans_assign(x, n, dim_, centroids_.data(), nlist_, coarse_ip(), labels.data(), scores.data());
    generation = generation_;
  }
  std::unique_lock<std::shared_mutex> lk(mu_);
  if (generation != generation_)  // retrained in between (only possible while empty)
    kmeans_assign(x, n, dim_, centroids_.data(), nlist_, coarse_ip(), labels.data(), scores.data());
  ids_.check_new(ids, n);  // again: another writer may have added some of these ids meanwhile
  std::vector<int64_t> new_ids = ids_.new_ids(ids, n);
  // Locations and capacity first, so that nothing can fail once data starts moving.
  std::vector<size_t> extra(nlist_, 0);
  std::vector<int64_t> loc(n);
  for (size_t i = 0; i < n; ++i) {
    if (labels[i] < 0 || static_cast<size_t>(labels[i]) >= nlist_)
      throw Error(ErrorKind::Runtime, "vector " + std::to_string(i) + " was not assigned a cell");
    const size_t l = static_cast<size_t>(labels[i]);
    loc[i] = encode(l, lists_[l].ids.size() + extra[l]++);
  }
  for (size_t l = 0; l < nlist_; ++l) {
    if (!extra[l]) continue;
    lists_[l].x.reserve(lists_[l].x.size() + extra[l] * dim_);
    lists_[l].ids.reserve(lists_[l].ids.size() + extra[l]);
  }
  ids_.insert(new_ids.data(), loc.data(), n);
  for (size_t i = 0; i < n; ++i) {
    List& l = lists_[static_cast<size_t>(labels[i])];
    l.x.insert(l.x.end(), x + i * dim_, x + (i + 1) * dim_);
    l.ids.push_back(new_ids[i]);
  }
  ntotal_ += n;
}

void IVFFlatIndex::scan_list_one(const simd::Kernels& K, const ScoreScan& scan, TopK& h,
                                 const float* qv, size_t l, const uint8_t* lmask, float* s,
                                 uint32_t* idx) const {
  const List& list = lists_[l];
  const size_t m = list.ids.size();
  if (metric_ == Metric::L2) {
    K.l2sq_many(qv, list.x.data(), m, dim_, s);
    for (size_t j = 0; j < m; ++j) s[j] = -s[j];
  } else {
    K.dot_many(qv, list.x.data(), m, dim_, s);
  }
  scan.ip(h, s, m, encode(l, 0), lmask, idx);
}

void IVFFlatIndex::scan_list_group(const simd::Kernels& K, const ScoreScan& scan,
                                   std::vector<TopK>& heaps, const float* queries,
                                   const float* qn, const uint32_t* qids, size_t nqs, size_t l,
                                   const uint8_t* lmask, GroupScratch& g) const {
  const List& list = lists_[l];
  const size_t m = list.ids.size(), d = dim_;
  const bool l2 = metric_ == Metric::L2;
  const size_t nr = static_cast<size_t>(K.nr);
  const size_t nb = std::min(m, std::max(nr, (size_t(1) << 17) / d / nr * nr));
  const size_t nbr = (nb + nr - 1) / nr * nr;
  g.s.resize(std::max(nbr, m));
  g.idx.resize(std::max(nbr, m));
  if (nqs < kGemmMinQueries) {
    for (size_t i = 0; i < nqs; ++i)
      scan_list_one(K, scan, heaps[qids[i]], queries + qids[i] * d, l, lmask, g.s.data(),
                    g.idx.data());
    return;
  }
  // Gather the queries of this list into one matrix.
  g.a.resize(nqs * d);
  for (size_t i = 0; i < nqs; ++i)
    std::memcpy(g.a.data() + i * d, queries + qids[i] * d, d * sizeof(float));
  g.packed.resize(nbr * d);
  g.xn.resize(nbr);
  g.t.resize(nbr);
  const size_t qtile = query_tile(K);
  g.tile.resize(qtile * nbr);
  for (size_t r0 = 0; r0 < m; r0 += nb) {
    const size_t mb = std::min(nb, m - r0);
    const float* xb = list.x.data() + r0 * d;
    K.pack(xb, mb, d, g.packed.data());
    if (l2) K.norms_sq(xb, mb, d, g.xn.data());
    const int64_t row0 = encode(l, r0);
    const uint8_t* bmask = lmask ? lmask + r0 : nullptr;
    for (size_t qt = 0; qt < nqs; qt += qtile) {
      const size_t mq = std::min(qtile, nqs - qt);
      K.gemm(g.a.data() + qt * d, d, mq, g.packed.data(), mb, d, g.tile.data(), nbr);
      for (size_t i = 0; i < mq; ++i) {
        const uint32_t qi = qids[qt + i];
        if (l2)
          scan.l2(heaps[qi], g.tile.data() + i * nbr, g.xn.data(), xb, mb, row0, bmask,
                  queries + qi * d, qn[qi], g.t.data(), g.idx.data());
        else
          scan.ip(heaps[qi], g.tile.data() + i * nbr, mb, row0, bmask, g.idx.data());
      }
    }
  }
}

void IVFFlatIndex::search(const float* q, size_t nq, size_t k, size_t nprobe, const Filter& filter,
                          float* distances, int64_t* out_ids) const {
  if (nprobe < 1) throw_value("nprobe must be at least 1, got 0");
  std::vector<float> unit;
  const float* queries = prepare_queries(q, nq, unit);
  std::shared_lock<std::shared_mutex> lk(mu_);
  require_trained("search()");
  const bool l2 = metric_ == Metric::L2;
  const float pad_out = l2 ? std::numeric_limits<float>::infinity()
                           : -std::numeric_limits<float>::infinity();
  nprobe = std::min(nprobe, nlist_);
  if (nq == 0 || k == 0) return;
  const size_t k_out = k;
  k = std::max<size_t>(1, std::min(k, ntotal_));  // heaps never need more than ntotal entries

  // Coarse step: the nprobe nearest centroids of every query, with the batched kernel.
  std::vector<float> cscore(nq * nprobe);
  std::vector<int64_t> probes(nq * nprobe);
  {
    ExactSearchInput cin;
    cin.x = centroids_.data();
    cin.n = nlist_;
    cin.d = dim_;
    cin.l2 = l2;
    exact_knn(cin, queries, nq, nprobe, cscore.data(), probes.data());
  }

  // Filter: a 0/1 mask per stored vector, laid out list by list.
  std::vector<size_t> prefix(nlist_ + 1, 0);
  for (size_t l = 0; l < nlist_; ++l) prefix[l + 1] = prefix[l] + lists_[l].ids.size();
  std::vector<uint8_t> mask;
  if (filter.mask) {
    if (filter.mask_len != ntotal_)
      throw_value("filter mask has " + std::to_string(filter.mask_len) +
                  " entries, expected one per stored vector (" + std::to_string(ntotal_) + ")");
    mask.assign(filter.mask, filter.mask + ntotal_);
  } else if (filter.ids) {
    mask.assign(ntotal_, 0);
    for (size_t i = 0; i < filter.n_ids; ++i) {
      const int64_t loc = ids_.find(filter.ids[i]);
      if (loc >= 0) mask[prefix[list_of(loc)] + offset_of(loc)] = 1;
    }
  }
  const uint8_t* maskp = filter.active() ? mask.data() : nullptr;

  const simd::Kernels& K = simd::kernels();
  const ScoreScan scan{&K, dim_, l2_error_factor(dim_)};
  const size_t threads = static_cast<size_t>(num_threads());
  size_t max_list = 0;
  for (const List& l : lists_) max_list = std::max(max_list, l.ids.size());
  std::vector<float> qn(nq);
  if (l2) K.norms_sq(queries, nq, dim_, qn.data());

  // Heaps per (part, query); parts are merged below. Either the queries' probes are split over
  // the threads (few queries), or the lists are (batches, see below).
  size_t parts;
  std::vector<float> hs;
  std::vector<int64_t> hr;
  std::vector<size_t> hsize;
  auto alloc_heaps = [&](size_t p) {
    parts = p;
    hs.resize(parts * nq * k);
    hr.resize(parts * nq * k);
    hsize.assign(parts * nq, 0);
  };

  if (nq < kGroupedMinQueries) {
    // One query at a time: dot products of the query with each probed list.
    // Splitting a query's probes over threads pays only when there is enough to scan.
    const double to_scan = static_cast<double>(nq) * nprobe * ntotal_ / nlist_;
    const bool split = nq < threads && to_scan * dim_ >= kMinSplitWork;
    alloc_heaps(split ? std::min(nprobe, (threads + nq - 1) / nq) : 1);
    parallel_for(nq * parts, [&](size_t task) {
      const size_t part = task % parts, qi = task / parts;
      std::vector<float> s(max_list);
      std::vector<uint32_t> idx(max_list);
      const size_t slot = part * nq + qi;
      TopK h(hs.data() + slot * k, hr.data() + slot * k, k);
      const float* qv = queries + qi * dim_;
      for (size_t p = nprobe * part / parts; p < nprobe * (part + 1) / parts; ++p) {
        const int64_t l = probes[qi * nprobe + p];
        if (l < 0 || lists_[static_cast<size_t>(l)].ids.empty()) continue;
        scan_list_one(K, scan, h, qv, static_cast<size_t>(l), maskp ? maskp + prefix[l] : nullptr,
                      s.data(), idx.data());
      }
      hsize[slot] = h.size;
    });
  } else {
    // A batch: every list is read once for all the queries that probe it, as a matrix product
    // (compute-bound) instead of one memory-bound scan per query.
    std::vector<size_t> qstart(nlist_ + 1, 0);
    for (size_t i = 0; i < nq * nprobe; ++i)
      if (probes[i] >= 0) ++qstart[static_cast<size_t>(probes[i]) + 1];
    for (size_t l = 0; l < nlist_; ++l) qstart[l + 1] += qstart[l];
    std::vector<uint32_t> qorder(qstart[nlist_]);
    {
      std::vector<size_t> fill(qstart.begin(), qstart.end() - 1);
      for (size_t qi = 0; qi < nq; ++qi)
        for (size_t p = 0; p < nprobe; ++p) {
          const int64_t l = probes[qi * nprobe + p];
          if (l >= 0) qorder[fill[static_cast<size_t>(l)]++] = static_cast<uint32_t>(qi);
        }
    }
    // Contiguous runs of lists with about equal work per thread.
    double total = 0.0;
    for (size_t l = 0; l < nlist_; ++l)
      total += static_cast<double>(qstart[l + 1] - qstart[l]) * lists_[l].ids.size();
    // total counts vectors scanned (times dim_: multiply-adds); split only when two threads
    // would each get at least kMinSplitWork.
    const size_t workers = total * dim_ < kMinSplitWork * 2 ? 1 : threads;
    std::vector<size_t> lbegin(workers + 1, nlist_);
    lbegin[0] = 0;
    {
      double acc = 0.0;
      size_t w = 1;
      for (size_t l = 0; l < nlist_ && w < workers; ++l) {
        acc += static_cast<double>(qstart[l + 1] - qstart[l]) * lists_[l].ids.size();
        while (w < workers && acc >= total * w / workers) lbegin[w++] = l + 1;
      }
    }
    alloc_heaps(workers);
    parallel_for(workers, [&](size_t w) {
      GroupScratch g;
      std::vector<TopK> heaps;
      heaps.reserve(nq);
      for (size_t qi = 0; qi < nq; ++qi)
        heaps.emplace_back(hs.data() + (w * nq + qi) * k, hr.data() + (w * nq + qi) * k, k);
      for (size_t l = lbegin[w]; l < lbegin[w + 1]; ++l) {
        if (lists_[l].ids.empty() || qstart[l] == qstart[l + 1]) continue;
        scan_list_group(K, scan, heaps, queries, qn.data(), qorder.data() + qstart[l],
                        qstart[l + 1] - qstart[l], l, maskp ? maskp + prefix[l] : nullptr, g);
      }
      for (size_t qi = 0; qi < nq; ++qi) hsize[w * nq + qi] = heaps[qi].size;
    });
  }

  for (size_t qi = 0; qi < nq; ++qi) {
    TopK out(distances + qi * k_out, out_ids + qi * k_out, k);
    for (size_t part = 0; part < parts; ++part) {
      const size_t slot = part * nq + qi;
      for (size_t j = 0; j < hsize[slot]; ++j) out.push(hs[slot * k + j], hr[slot * k + j]);
    }
    out.sort_best_first();
    for (size_t j = 0; j < k_out; ++j) {
      float& dist = distances[qi * k_out + j];
      int64_t& id = out_ids[qi * k_out + j];
      if (j >= out.size) {
        dist = pad_out;
        id = -1;
      } else {
        id = lists_[list_of(id)].ids[offset_of(id)];
        if (l2) dist = -dist;
      }
    }
  }
}

void IVFFlatIndex::get(const int64_t* ids, size_t n, float* out) const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  std::vector<int64_t> loc = ids_.locations_of(ids, n, false);
  for (size_t i = 0; i < n; ++i)
    std::memcpy(out + i * dim_, lists_[list_of(loc[i])].x.data() + offset_of(loc[i]) * dim_,
                dim_ * sizeof(float));
}

size_t IVFFlatIndex::remove(const int64_t* ids, size_t n, bool missing_ok) {
  std::unique_lock<std::shared_mutex> lk(mu_);
  ids_.locations_of(ids, n, missing_ok);  // KeyError before anything changes
  size_t removed = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t loc = ids_.find(ids[i]);
    if (loc < 0) continue;
    List& l = lists_[list_of(loc)];
    const size_t off = offset_of(loc), last = l.ids.size() - 1;
    if (off != last) {
      std::memcpy(l.x.data() + off * dim_, l.x.data() + last * dim_, dim_ * sizeof(float));
      l.ids[off] = l.ids[last];
      ids_.relocate(l.ids[off], loc);
    }
    ids_.erase(ids[i]);
    l.ids.pop_back();
    l.x.resize(l.x.size() - dim_);
    --ntotal_;
    ++removed;
  }
  return removed;
}

bool IVFFlatIndex::contains(int64_t id) const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  return ids_.find(id) >= 0;
}

std::vector<int64_t> IVFFlatIndex::ids() const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  std::vector<int64_t> out;
  out.reserve(ntotal_);
  for (const List& l : lists_) out.insert(out.end(), l.ids.begin(), l.ids.end());
  return out;
}

std::vector<size_t> IVFFlatIndex::list_sizes() const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  std::vector<size_t> out(nlist_, 0);
  for (size_t l = 0; l < lists_.size(); ++l) out[l] = lists_[l].ids.size();
  return out;
}

std::vector<float> IVFFlatIndex::centroids() const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  return centroids_;
}

void IVFFlatIndex::write_body(Writer& w) const {
  const uint64_t params[3] = {nlist_, centroids_.empty() ? 0u : 1u, nprobe_.load()};
  w.section("PARM", params, sizeof params);
  w.section("CENT", centroids_.data(), centroids_.size() * sizeof(float));
  std::vector<uint64_t> sizes(nlist_, 0);
  for (size_t l = 0; l < lists_.size(); ++l) sizes[l] = lists_[l].ids.size();
  w.section("LSIZ", sizes.data(), sizes.size() * sizeof(uint64_t));
  w.section_begin("VECS", static_cast<uint64_t>(ntotal_) * dim_ * sizeof(float));
  for (const List& l : lists_) w.raw(l.x.data(), l.x.size() * sizeof(float));
  w.section_begin("IDS\0", static_cast<uint64_t>(ntotal_) * sizeof(int64_t));
  for (const List& l : lists_) w.raw(l.ids.data(), l.ids.size() * sizeof(int64_t));
  ids_.write(w);
}

std::unique_ptr<IVFFlatIndex> IVFFlatIndex::read_body(Reader& r, const FileHeader& h) {
  uint64_t params[3];
  r.section("PARM", params, sizeof params);
  const uint64_t nlist = params[0];
  if (nlist < 1 || nlist > (uint64_t(1) << 22) || params[1] > 1 || params[2] < 1)
    throw_format("corrupted index file: invalid IVF parameters (nlist " + std::to_string(nlist) +
                 ", nprobe " + std::to_string(params[2]) + ")");
  auto idx = std::make_unique<IVFFlatIndex>(h.dim, static_cast<Metric>(h.metric), nlist, params[2]);
  const uint64_t cbytes = params[1] ? nlist * h.dim * sizeof(float) : 0;
  if (cbytes > r.remaining()) throw_format("truncated index file: centroids missing");
  idx->centroids_.resize(cbytes / sizeof(float));
  r.section("CENT", idx->centroids_.data(), cbytes);
  check_finite_loaded(idx->centroids_.data(), cbytes ? nlist : 0, h.dim, "centroids");
  std::vector<uint64_t> sizes(nlist);
  r.section("LSIZ", sizes.data(), nlist * sizeof(uint64_t));
  uint64_t total = 0;
  for (uint64_t s : sizes) {
    if (s > h.count - total) throw_format("corrupted index file: list sizes exceed the vector count");
    total += s;
  }
  if (total != h.count) throw_format("corrupted index file: list sizes do not add up to the count");
  if (!params[1] && total) throw_format("corrupted index file: vectors in an untrained index");
  const uint64_t vbytes = checked_mul(checked_mul(total, h.dim, "vectors"), sizeof(float), "vectors");
  if (vbytes > r.remaining()) throw_format("truncated index file: vectors missing");
  if (r.section_begin("VECS", vbytes) != vbytes)
    throw_format("corrupted index file: vector section has the wrong size");
  idx->lists_.assign(params[1] ? nlist : 0, List());
  for (size_t l = 0; l < idx->lists_.size(); ++l) {
    idx->lists_[l].x.resize(sizes[l] * h.dim);
    r.raw(idx->lists_[l].x.data(), sizes[l] * h.dim * sizeof(float));
  }
  if (r.section_begin("IDS\0", total * sizeof(int64_t)) != total * sizeof(int64_t))
    throw_format("corrupted index file: id section has the wrong size");
  std::vector<int64_t> all_ids, locs;
  all_ids.reserve(total);
  locs.reserve(total);
  for (size_t l = 0; l < idx->lists_.size(); ++l) {
    idx->lists_[l].ids.resize(sizes[l]);
    r.raw(idx->lists_[l].ids.data(), sizes[l] * sizeof(int64_t));
    for (size_t o = 0; o < sizes[l]; ++o) {
      all_ids.push_back(idx->lists_[l].ids[o]);
      locs.push_back(encode(l, o));
    }
  }
  idx->ids_.read(r);
  idx->ids_.rebuild(all_ids.data(), locs.data(), total);
  idx->ntotal_ = total;
  return idx;
}

}  // namespace pyknn
