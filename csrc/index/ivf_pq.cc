#include "index/ivf_pq.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <mutex>

#include "common/errors.h"
#include "common/half.h"
#include "common/random.h"
#include "common/threadpool.h"
#include "common/topk.h"
#include "index/kmeans.h"
#include "simd/dispatch.h"

namespace pyknn {

namespace {
constexpr size_t kBlock = 32;  // vectors per 4-bit fast-scan block
// Codes below which one query's probes are not split over threads (waking a thread costs about
// as much as scanning this many codes).
constexpr double kMinSplitCodes = 2e5;
// Largest value of a half-precision float: larger vectors cannot be stored as float16.
constexpr float kHalfMax = 65504.f;

// Table quantisation of the 4-bit scan: entries (t - min_m) / delta rounded to 0..255, with one
// delta for all sub-quantizers such that any sum of pq_m entries fits in uint16.
struct QuantTable {
  float delta = 1.f, offset = 0.f;
};
QuantTable quantise_table(const float* t, size_t M, uint8_t* out) {
  QuantTable qt;
  float max_range = 0.f;
  double sum_range = 0.0, sum_min = 0.0;
  float mins[4096];
  for (size_t m = 0; m < M; ++m) {
    float lo = t[m * 16], hi = lo;
    for (size_t j = 1; j < 16; ++j) {
      lo = std::min(lo, t[m * 16 + j]);
      hi = std::max(hi, t[m * 16 + j]);
    }
    mins[m] = lo;
    max_range = std::max(max_range, hi - lo);
    sum_range += hi - lo;
    sum_min += lo;
  }
  // Each entry rounds to at most range / delta + 0.5, so the sum of the M largest is at most
  // sum_range / delta + M / 2: keep that within 65535 (M <= 4096, so the divisor stays positive).
  float delta = std::max(max_range / 255.f,
                         static_cast<float>(sum_range / (65535.0 - 0.5 * static_cast<double>(M))));
  if (!(delta > 0.f)) delta = 1.f;
  const float inv = 1.f / delta;
  // Round half up by truncation (the values are >= 0): std::nearbyint is a library call per entry
  // at the baseline instruction set (a tenth of a 4-bit search at nprobe 4); this loop vectorises.
  for (size_t m = 0; m < M; ++m)
    for (size_t j = 0; j < 16; ++j) {
      const float v = (t[m * 16 + j] - mins[m]) * inv + 0.5f;
      out[m * 16 + j] = static_cast<uint8_t>(static_cast<int>(std::min(255.f, std::max(0.f, v))));
    }
  qt.delta = delta;
  qt.offset = static_cast<float>(sum_min);
  return qt;
}
}  // namespace

IVFPQIndex::IVFPQIndex(size_t dim, Metric metric, size_t nlist, size_t pq_m, size_t nbits,
                       bool by_residual, RerankStorage rerank, size_t nprobe, bool single_list)
    : Index(dim, metric), nlist_(nlist), pq_(dim, pq_m, nbits), by_residual_(by_residual),
      rerank_(rerank), single_(single_list), nprobe_(1) {
  if (nlist < 1) throw_value("nlist must be at least 1, got 0");
  if (nlist > (size_t(1) << 22))
    throw_value("nlist " + std::to_string(nlist) + " is larger than the supported maximum 4194304");
  if (nbits == 4 && pq_m % 2 != 0)
    throw_value("nbits 4 stores two codes per byte: pq_m must be even, got " + std::to_string(pq_m));
  if (pq_m > 4096) throw_value("pq_m must be at most 4096, got " + std::to_string(pq_m));
  if (static_cast<uint32_t>(rerank) > 2) throw_value("unknown re-rank storage");
  if (single_ && (nlist != 1 || by_residual))
    throw_value("a PQIndex has one list and no residuals");
  set_nprobe(nprobe);
}

void IVFPQIndex::set_nprobe(size_t nprobe) {
  if (nprobe < 1) throw_value("nprobe must be at least 1, got 0");
  nprobe_.store(nprobe);
}

bool IVFPQIndex::is_trained() const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  return !centroids_.empty();
}

void IVFPQIndex::require_trained(const char* what) const {
  if (centroids_.empty())
    throw Error(ErrorKind::Runtime, std::string(single_ ? "PQIndex" : "IVFPQIndex") +
                                        " is not trained: call train(x) before " + what);
}

size_t IVFPQIndex::code_bytes(size_t n) const {
  return pq_.nbits() == 8 ? n * pq_.pq_m() : (n + kBlock - 1) / kBlock * pq_.pq_m() * 16;
}

void IVFPQIndex::put_code(List& L, size_t off, const uint8_t* code) const {
  const size_t M = pq_.pq_m();
  if (pq_.nbits() == 8) {
    std::memcpy(L.codes.data() + off * M, code, M);
    return;
  }
  uint8_t* b = L.codes.data() + off / kBlock * M * 16 + off % 16;
  const int shift = (off % kBlock) >= 16 ? 4 : 0;
  const uint8_t keep = shift ? 0x0f : 0xf0;
  for (size_t m = 0; m < M; ++m)
    b[m * 16] = static_cast<uint8_t>((b[m * 16] & keep) | ((code[m] & 15) << shift));
}

void IVFPQIndex::read_code(const List& L, size_t off, uint8_t* code) const {
  const size_t M = pq_.pq_m();
  if (pq_.nbits() == 8) {
    std::memcpy(code, L.codes.data() + off * M, M);
    return;
  }
  const uint8_t* b = L.codes.data() + off / kBlock * M * 16 + off % 16;
  const int shift = (off % kBlock) >= 16 ? 4 : 0;
  for (size_t m = 0; m < M; ++m) code[m] = (b[m * 16] >> shift) & 15;
}

size_t IVFPQIndex::bytes_used() const {
  size_t b = (centroids_.capacity() + term2_.capacity() + pq_.centroids().capacity() +
              pq_.centroid_norms().capacity()) * sizeof(float) +
             lists_.capacity() * sizeof(List) + ids_.memory_usage();
  for (const List& l : lists_)
    b += l.codes.capacity() + l.ids.capacity() * sizeof(int64_t) +
         l.xf.capacity() * sizeof(float) + l.xh.capacity() * sizeof(uint16_t);
  return b;
}

void IVFPQIndex::compute_term2() {
  term2_.clear();
  if (!l2_residual() || centroids_.empty()) return;
  const size_t M = pq_.pq_m(), ks = pq_.ksub();
  term2_.resize(nlist_ * M * ks);
  std::vector<float> ip(nlist_ * M * ks);
  // <c_lm, r_mj> for every cell and sub-quantizer: the same matrix products as a query table.
  pq_.inner_product_tables(simd::kernels(), centroids_.data(), nlist_, ip.data());
  const float* cn = pq_.centroid_norms().data();
  for (size_t l = 0; l < nlist_; ++l)
    for (size_t i = 0; i < M * ks; ++i) term2_[l * M * ks + i] = cn[i] + 2.f * ip[l * M * ks + i];
}

void IVFPQIndex::train(const float* x, size_t n, int n_iter, int pq_n_iter, uint64_t seed,
                       bool kmeans_plus_plus) {
  if (n < nlist_)
    throw_value("training needs at least nlist points: got " + std::to_string(n) +
                " points for nlist " + std::to_string(nlist_));
  if (n < pq_.ksub())
    throw_value("training the product quantizer with nbits " + std::to_string(pq_.nbits()) +
                " needs at least 2**nbits = " + std::to_string(pq_.ksub()) + " points, got " +
                std::to_string(n));
  {
    std::shared_lock<std::shared_mutex> lk(mu_);
    if (ntotal_ > 0)
      throw_value("the index already holds " + std::to_string(ntotal_) +
                  " vectors; train a new index instead of retraining this one");
  }
  std::vector<float> unit = prepare_vectors(x, n);
  if (!unit.empty()) x = unit.data();
  std::vector<float> cent;
  if (single_) {
    cent.assign(dim_, 0.f);
  } else {
    KMeansParams p;
    p.n_clusters = nlist_;
    p.n_iter = n_iter;
    p.seed = seed;
    p.kmeans_plus_plus = kmeans_plus_plus;
    p.spherical = coarse_ip();
    cent = kmeans_fit(x, n, dim_, p).centroids;
  }
  ProductQuantizer pq(dim_, pq_.pq_m(), pq_.nbits());
  if (by_residual_) {
    // The quantizer learns the residuals x - c(x) (at most 256 * ksub of them are used).
    const size_t m = std::min(n, 256 * pq_.ksub());
    std::vector<int64_t> labels(m);
    std::vector<float> scores(m), res(x, x + m * dim_);
    // A seeded subsample when there are more points than the quantizer uses.
    if (m < n) {
      Rng rng(seed ^ 0x5851f42d4c957f2dULL);
      std::vector<int64_t> rows = sample_without_replacement(n, m, rng);
      for (size_t i = 0; i < m; ++i)
        std::memcpy(res.data() + i * dim_, x + rows[i] * dim_, dim_ * sizeof(float));
    }
    kmeans_assign(res.data(), m, dim_, cent.data(), nlist_, coarse_ip(), labels.data(), scores.data());
    for (size_t i = 0; i < m; ++i)
      for (size_t j = 0; j < dim_; ++j) res[i * dim_ + j] -= cent[labels[i] * dim_ + j];
    pq.train(res.data(), m, pq_n_iter, seed + 1);
  } else {
    pq.train(x, n, pq_n_iter, seed + 1);
  }
  std::unique_lock<std::shared_mutex> lk(mu_);
  if (ntotal_ > 0) throw_value("vectors were added while training; train a new index");
  pq_.set_centroids(pq.centroids());
  centroids_ = std::move(cent);
  lists_.assign(nlist_, List());
  compute_term2();
  ++generation_;
}

void IVFPQIndex::add(const float* x, size_t n, const int64_t* ids) {
  if (n == 0) return;
  std::vector<float> unit = prepare_vectors(x, n);
  if (!unit.empty()) x = unit.data();
  if (rerank_ == RerankStorage::Float16)
    for (size_t i = 0; i < n; ++i)
      for (size_t j = 0; j < dim_; ++j)
        if (std::fabs(x[i * dim_ + j]) > kHalfMax)
          throw_value("vectors row " + std::to_string(i) + " has a value beyond the float16 "
                      "range (+-65504) of the re-rank store; use rerank_dtype='float32'");
  const size_t M = pq_.pq_m();
  std::vector<int64_t> labels(n, 0);
  std::vector<float> scores(n);
  std::vector<uint8_t> codes(n * M);
  uint64_t generation;
  // Assignment and encoding under the shared lock: searches go on meanwhile.
  auto assign_and_encode = [&] {
    if (!single_)
      kmeans_assign(x, n, dim_, centroids_.data(), nlist_, coarse_ip(), labels.data(), scores.data());
    if (by_residual_) {
      const size_t bs = 16384;
      std::vector<float> res;
      for (size_t i0 = 0; i0 < n; i0 += bs) {
        const size_t nb = std::min(bs, n - i0);
        res.resize(nb * dim_);
        for (size_t i = 0; i < nb; ++i) {
          const float* c = centroids_.data() + labels[i0 + i] * dim_;
          for (size_t j = 0; j < dim_; ++j) res[i * dim_ + j] = x[(i0 + i) * dim_ + j] - c[j];
        }
        pq_.encode(res.data(), nb, codes.data() + i0 * M);
      }
    } else {
      pq_.encode(x, n, codes.data());
    }
  };
  {
    std::shared_lock<std::shared_mutex> lk(mu_);
    require_trained("add()");
    ids_.check_new(ids, n);
    assign_and_encode();
    generation = generation_;
  }
  std::unique_lock<std::shared_mutex> lk(mu_);
  if (generation != generation_) assign_and_encode();
  ids_.check_new(ids, n);
  std::vector<int64_t> new_ids = ids_.new_ids(ids, n);
  std::vector<size_t> extra(nlist_, 0);
  std::vector<int64_t> loc(n);
  for (size_t i = 0; i < n; ++i) {
    if (labels[i] < 0 || static_cast<size_t>(labels[i]) >= nlist_)
      throw Error(ErrorKind::Runtime, "vector " + std::to_string(i) + " was not assigned a cell");
    const size_t l = static_cast<size_t>(labels[i]);
    loc[i] = encode_loc(l, lists_[l].ids.size() + extra[l]++);
  }
  for (size_t l = 0; l < nlist_; ++l) {
    if (!extra[l]) continue;
    List& L = lists_[l];
    const size_t m = L.ids.size() + extra[l];
    L.codes.reserve(code_bytes(m));
    L.ids.reserve(m);
    if (rerank_ == RerankStorage::Float32) L.xf.reserve(m * dim_);
    if (rerank_ == RerankStorage::Float16) L.xh.reserve(m * dim_);
  }
  ids_.insert(new_ids.data(), loc.data(), n);
  for (size_t i = 0; i < n; ++i) {
    List& L = lists_[static_cast<size_t>(labels[i])];
    const size_t off = L.ids.size();
    L.codes.resize(code_bytes(off + 1), 0);
    put_code(L, off, codes.data() + i * M);
    L.ids.push_back(new_ids[i]);
    const float* v = x + i * dim_;
    if (rerank_ == RerankStorage::Float32) L.xf.insert(L.xf.end(), v, v + dim_);
    if (rerank_ == RerankStorage::Float16)
      for (size_t j = 0; j < dim_; ++j) L.xh.push_back(float_to_half(v[j]));
  }
  ntotal_ += n;
}

void IVFPQIndex::base_table(const float* ip, const float* qv, float* out) const {
  const size_t M = pq_.pq_m(), ks = pq_.ksub(), ds = pq_.dsub();
  if (metric_ != Metric::L2) {
    std::memcpy(out, ip, M * ks * sizeof(float));
  } else if (by_residual_) {
    for (size_t i = 0; i < M * ks; ++i) out[i] = 2.f * ip[i];
  } else {
    const float* cn = pq_.centroid_norms().data();
    for (size_t m = 0; m < M; ++m) {
      float qn = 0.f;
      for (size_t j = 0; j < ds; ++j) qn += qv[m * ds + j] * qv[m * ds + j];
      for (size_t j = 0; j < ks; ++j)
        out[m * ks + j] = -(qn + cn[m * ks + j] - 2.f * ip[m * ks + j]);
    }
  }
}

float IVFPQIndex::exact_score(const simd::Kernels& K, const float* qv, size_t l, size_t off,
                              float* tmp) const {
  const List& L = lists_[l];
  const float* v;
  if (rerank_ == RerankStorage::Float32) {
    v = L.xf.data() + off * dim_;
  } else {
    const uint16_t* h = L.xh.data() + off * dim_;
    if (K.from_half) {
      K.from_half(h, dim_, tmp);
    } else {
      for (size_t j = 0; j < dim_; ++j) tmp[j] = half_to_float(h[j]);
    }
    v = tmp;
  }
  return metric_ == Metric::L2 ? -K.l2sq(qv, v, dim_) : K.dot(qv, v, dim_);
}

void IVFPQIndex::search(const float* q, size_t nq, size_t k, size_t nprobe, size_t rerank,
                        const Filter& filter, float* distances, int64_t* out_ids) const {
  if (nprobe < 1) throw_value("nprobe must be at least 1, got 0");
  if (rerank > 0 && rerank_ == RerankStorage::None)
    throw_value("rerank=" + std::to_string(rerank) + " needs the full vectors, but this index "
                "stores none: create it with rerank_dtype='float32' or 'float16'");
  std::vector<float> unit;
  const float* queries = prepare_queries(q, nq, unit);
  std::shared_lock<std::shared_mutex> lk(mu_);
  require_trained("search()");
  const bool l2 = metric_ == Metric::L2;
  const float pad_out = l2 ? std::numeric_limits<float>::infinity()
                           : -std::numeric_limits<float>::infinity();
  nprobe = std::min(nprobe, nlist_);
  if (nq == 0 || k == 0) return;
  const size_t M = pq_.pq_m(), ks = pq_.ksub();
  const bool fast = pq_.nbits() == 4;
  const size_t k_out = k;
  // Candidates kept by ADC (r1), and by the quantised 4-bit scores before float re-scoring (kc).
  // With exact re-ranking the quantised shortlist goes to it directly (as FAISS's fast scan +
  // refine does): float re-scoring would cost about as much as the exact scores it feeds.
  const bool float_rescore = fast && rerank == 0;
  size_t r1 = std::max(k, rerank);
  size_t kc = float_rescore ? 2 * r1 : r1;
  r1 = std::max<size_t>(1, std::min(r1, ntotal_));
  kc = std::max<size_t>(1, std::min(kc, ntotal_));

  std::vector<float> cscore(nq * nprobe);
  std::vector<int64_t> probes(nq * nprobe);
  if (single_) {
    std::fill(probes.begin(), probes.end(), 0);
    std::fill(cscore.begin(), cscore.end(), 0.f);
  } else {
    ExactSearchInput cin;
    cin.x = centroids_.data();
    cin.n = nlist_;
    cin.d = dim_;
    cin.l2 = l2;
    exact_knn(cin, queries, nq, nprobe, cscore.data(), probes.data());
  }

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
  const ScoreScan scan{&K, dim_, 0.0};
  const size_t threads = static_cast<size_t>(num_threads());
  size_t max_list = 0;
  for (const List& l : lists_) max_list = std::max(max_list, l.ids.size());
  const size_t max_scan = (max_list + kBlock - 1) / kBlock * kBlock;

  // Work split: a few queries split their probes over the threads; batches are split by queries.
  const double to_scan = static_cast<double>(nq) * nprobe * ntotal_ / nlist_;
  const size_t parts = (nq < threads && nprobe > 1 && to_scan * M >= kMinSplitCodes * 8)
                           ? std::min(nprobe, (threads + nq - 1) / nq) : 1;
  const size_t qchunk = parts > 1 ? 1 : std::max<size_t>(1, std::min<size_t>(32, nq / (4 * threads)));
  const size_t nchunks = (nq + qchunk - 1) / qchunk;
  // Per (part, query): the best r1 by float ADC. 4-bit scans first keep the best kc by quantised
  // score (screened in uint16 against the heap's threshold); those kc are re-scored with the
  // float tables once the part's probes are done.
  std::vector<float> hs(parts * nq * r1);
  std::vector<int64_t> hr(parts * nq * r1);
  std::vector<size_t> hsize(parts * nq, 0);

  parallel_for(nchunks * parts, [&](size_t task) {
    const size_t chunk = task / parts, part = task % parts;
    const size_t q0 = chunk * qchunk, mq = std::min(qchunk, nq - q0);
    std::vector<float> ip(mq * M * ks), base(M * ks), lut(M * ks), s(fast ? 0 : max_scan);
    std::vector<uint32_t> idx(max_scan);
    std::vector<uint8_t> lut8(fast ? M * 16 : 0), code(M);
    std::vector<uint16_t> acc(fast ? max_scan : 0);
    std::vector<float> qs(fast ? kc : 0), lbias(fast ? nlist_ : 0);
    std::vector<int64_t> qr(fast ? kc : 0);
    pq_.inner_product_tables(K, queries + q0 * dim_, mq, ip.data());
    for (size_t i = 0; i < mq; ++i) {
      const size_t qi = q0 + i;
      const float* qv = queries + qi * dim_;
      base_table(ip.data() + i * M * ks, qv, base.data());
      const size_t slot = part * nq + qi;
      TopK h(hs.data() + slot * r1, hr.data() + slot * r1, r1);
      TopK hq(qs.data(), qr.data(), kc);
      QuantTable qt;
      if (fast && !l2_residual()) qt = quantise_table(base.data(), M, lut8.data());
      for (size_t p = nprobe * part / parts; p < nprobe * (part + 1) / parts; ++p) {
        const int64_t lp = probes[qi * nprobe + p];
        if (lp < 0) continue;
        const size_t l = static_cast<size_t>(lp);
        const List& L = lists_[l];
        const size_t n = L.ids.size();
        if (!n) continue;
        const float bias = by_residual_ ? cscore[qi * nprobe + p] : 0.f;
        const uint8_t* lmask = maskp ? maskp + prefix[l] : nullptr;
        const int64_t row0 = encode_loc(l, 0);
        if (!fast) {
          const float* table = base.data();
          if (l2_residual()) {
            const float* t2 = term2_.data() + l * M * ks;
            for (size_t j = 0; j < M * ks; ++j) lut[j] = base[j] - t2[j];
            table = lut.data();
          }
          K.pq8_scan(table, L.codes.data(), n, M, bias, s.data());
          scan.ip(h, s.data(), n, row0, lmask, idx.data());
          continue;
        }
        lbias[l] = bias;
        if (l2_residual()) {
          // The list's table base - T2[l], quantised per list.
          const float* t2 = term2_.data() + l * M * ks;
          for (size_t j = 0; j < M * ks; ++j) lut[j] = base[j] - t2[j];
          qt = quantise_table(lut.data(), M, lut8.data());
        }
        if (p + 1 < nprobe && probes[qi * nprobe + p + 1] >= 0) {
          // The next list's first block, while this one is scanned (lists start cold).
          const std::vector<uint8_t>& nc = lists_[static_cast<size_t>(probes[qi * nprobe + p + 1])].codes;
          for (size_t b = 0; b < std::min<size_t>(nc.size(), 1024); b += 64)
            __builtin_prefetch(nc.data() + b);
        }
        K.pq4_scan(L.codes.data(), (n + kBlock - 1) / kBlock, M, lut8.data(), acc.data());
        const float b0 = bias + qt.offset;
        size_t c;
        if (hq.size < hq.k) {
          std::iota(idx.begin(), idx.begin() + n, 0u);
          c = n;
        } else {
          // s = b0 + delta * acc >= thr needs acc >= (thr - b0) / delta; one step lower absorbs
          // rounding, the float test below is the exact one.
          const float tq = (hq.threshold() - b0) / qt.delta;
          if (!(tq <= 65536.f)) continue;
          const uint32_t t16 = tq <= 1.f ? 0u : static_cast<uint32_t>(tq) - 1u;
          c = K.select_ge_u16(acc.data(), n, t16, idx.data());
        }
        for (size_t t = 0; t < c; ++t) {
          const size_t j = idx[t];
          if (lmask && !lmask[j]) continue;
          const float sj = b0 + qt.delta * static_cast<float>(acc[j]);
          if (!(sj >= hq.threshold())) continue;
          hq.push(sj, row0 + static_cast<int64_t>(j));
        }
      }
      if (fast && !float_rescore) {
        for (size_t t = 0; t < hq.size; ++t) h.push(qs[t], qr[t]);
      } else if (fast) {
        // Float ADC of the quantised shortlist.
        for (size_t t = 0; t < hq.size; ++t) {
          const size_t l = list_of(qr[t]), j = offset_of(qr[t]);
          read_code(lists_[l], j, code.data());
          // Two sub-quantizers per step into two sums (M is even): independent additions.
          const float* t2 = l2_residual() ? term2_.data() + l * M * ks : nullptr;
          float f0 = 0.f, f1 = 0.f;
          for (size_t m = 0; m < M; m += 2) {
            const size_t a = m * ks + code[m], b = (m + 1) * ks + code[m + 1];
            f0 += t2 ? base[a] - t2[a] : base[a];
            f1 += t2 ? base[b] - t2[b] : base[b];
          }
          h.push(lbias[l] + (f0 + f1), qr[t]);
        }
      }
      hsize[slot] = h.size;
    }
  });

  // Per query: merge the parts, then re-rank exactly (or keep the ADC scores).
  parallel_for(nq, [&](size_t qi) {
    std::vector<float> s2(r1), tmp(dim_);
    std::vector<int64_t> r2(r1);
    TopK second(s2.data(), r2.data(), r1);
    for (size_t part = 0; part < parts; ++part) {
      const size_t slot = part * nq + qi;
      for (size_t j = 0; j < hsize[slot]; ++j) second.push(hs[slot * r1 + j], hr[slot * r1 + j]);
    }
    const float* qv = queries + qi * dim_;
    float* dq = distances + qi * k_out;
    int64_t* iq = out_ids + qi * k_out;
    TopK out(dq, iq, std::min(k_out, r1));
    if (rerank > 0) {
      // The shortlist's vectors are scattered over the whole store: fetch a few ahead.
      const size_t esize = rerank_ == RerankStorage::Float32 ? 4 : 2;
      auto prefetch = [&](int64_t loc) {
        const List& L = lists_[list_of(loc)];
        const char* p = rerank_ == RerankStorage::Float32
                            ? reinterpret_cast<const char*>(L.xf.data() + offset_of(loc) * dim_)
                            : reinterpret_cast<const char*>(L.xh.data() + offset_of(loc) * dim_);
        for (size_t b = 0; b < dim_ * esize; b += 64) __builtin_prefetch(p + b);
      };
      constexpr size_t kAhead = 4;
      for (size_t j = 0; j < std::min(kAhead, second.size); ++j) prefetch(r2[j]);
      for (size_t j = 0; j < second.size; ++j) {
        if (j + kAhead < second.size) prefetch(r2[j + kAhead]);
        const size_t l = list_of(r2[j]), off = offset_of(r2[j]);
        out.push(exact_score(K, qv, l, off, tmp.data()), r2[j]);
      }
    } else {
      for (size_t j = 0; j < second.size; ++j) out.push(s2[j], r2[j]);
    }
    out.sort_best_first();
    for (size_t j = 0; j < k_out; ++j) {
      if (j >= out.size) {
        dq[j] = pad_out;
        iq[j] = -1;
      } else {
        iq[j] = lists_[list_of(iq[j])].ids[offset_of(iq[j])];
        if (l2) dq[j] = -dq[j];
      }
    }
  });
}

void IVFPQIndex::decode_one(size_t l, size_t off, float* out) const {
  uint8_t code[4096];
  read_code(lists_[l], off, code);
  pq_.decode(code, 1, out);
  if (by_residual_) {
    const float* c = centroids_.data() + l * dim_;
    for (size_t j = 0; j < dim_; ++j) out[j] += c[j];
  }
}

void IVFPQIndex::get(const int64_t* ids, size_t n, float* out) const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  if (rerank_ == RerankStorage::None)
    throw_value("this index stores codes only (rerank_dtype=None): use reconstruct(ids) for the "
                "decoded approximations");
  std::vector<int64_t> loc = ids_.locations_of(ids, n, false);
  for (size_t i = 0; i < n; ++i) {
    const List& L = lists_[list_of(loc[i])];
    const size_t off = offset_of(loc[i]);
    if (rerank_ == RerankStorage::Float32)
      std::memcpy(out + i * dim_, L.xf.data() + off * dim_, dim_ * sizeof(float));
    else
      for (size_t j = 0; j < dim_; ++j) out[i * dim_ + j] = half_to_float(L.xh[off * dim_ + j]);
  }
}

void IVFPQIndex::reconstruct(const int64_t* ids, size_t n, float* out) const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  std::vector<int64_t> loc = ids_.locations_of(ids, n, false);
  for (size_t i = 0; i < n; ++i) decode_one(list_of(loc[i]), offset_of(loc[i]), out + i * dim_);
}

void IVFPQIndex::codes(const int64_t* ids, size_t n, uint8_t* out) const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  std::vector<int64_t> loc = ids_.locations_of(ids, n, false);
  uint8_t code[4096];
  for (size_t i = 0; i < n; ++i) {
    read_code(lists_[list_of(loc[i])], offset_of(loc[i]), code);
    pq_.pack_codes(code, 1, out + i * pq_.code_size());
  }
}

size_t IVFPQIndex::remove(const int64_t* ids, size_t n, bool missing_ok) {
  std::unique_lock<std::shared_mutex> lk(mu_);
  ids_.locations_of(ids, n, missing_ok);
  size_t removed = 0;
  uint8_t code[4096];
  const uint8_t zero[4096] = {};
  for (size_t i = 0; i < n; ++i) {
    const int64_t loc = ids_.find(ids[i]);
    if (loc < 0) continue;
    List& L = lists_[list_of(loc)];
    const size_t off = offset_of(loc), last = L.ids.size() - 1;
    if (off != last) {
      read_code(L, last, code);
      put_code(L, off, code);
      L.ids[off] = L.ids[last];
      if (!L.xf.empty())
        std::memcpy(L.xf.data() + off * dim_, L.xf.data() + last * dim_, dim_ * sizeof(float));
      if (!L.xh.empty())
        std::memcpy(L.xh.data() + off * dim_, L.xh.data() + last * dim_, dim_ * sizeof(uint16_t));
      ids_.relocate(L.ids[off], loc);
    }
    put_code(L, last, zero);  // 4-bit blocks: padding slots stay zero
    ids_.erase(ids[i]);
    L.ids.pop_back();
    L.codes.resize(code_bytes(L.ids.size()));
    if (!L.xf.empty()) L.xf.resize(L.xf.size() - dim_);
    if (!L.xh.empty()) L.xh.resize(L.xh.size() - dim_);
    --ntotal_;
    ++removed;
  }
  return removed;
}

bool IVFPQIndex::contains(int64_t id) const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  return ids_.find(id) >= 0;
}

std::vector<int64_t> IVFPQIndex::ids() const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  std::vector<int64_t> out;
  out.reserve(ntotal_);
  for (const List& l : lists_) out.insert(out.end(), l.ids.begin(), l.ids.end());
  return out;
}

std::vector<size_t> IVFPQIndex::list_sizes() const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  std::vector<size_t> out(nlist_, 0);
  for (size_t l = 0; l < lists_.size(); ++l) out[l] = lists_[l].ids.size();
  return out;
}

std::vector<float> IVFPQIndex::centroids() const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  return centroids_;
}

std::vector<float> IVFPQIndex::pq_centroids() const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  return pq_.centroids();
}

void IVFPQIndex::write_body(Writer& w) const {
  const uint64_t params[8] = {nlist_, centroids_.empty() ? 0u : 1u, nprobe_.load(), pq_.pq_m(),
                              pq_.nbits(), by_residual_ ? 1u : 0u,
                              static_cast<uint64_t>(rerank_), single_ ? 1u : 0u};
  w.section("PARM", params, sizeof params);
  w.section("CENT", centroids_.data(), centroids_.size() * sizeof(float));
  w.section("PQCT", pq_.centroids().data(), pq_.centroids().size() * sizeof(float));
  std::vector<uint64_t> sizes(nlist_, 0);
  for (size_t l = 0; l < lists_.size(); ++l) sizes[l] = lists_[l].ids.size();
  w.section("LSIZ", sizes.data(), sizes.size() * sizeof(uint64_t));
  uint64_t cbytes = 0;
  for (const List& l : lists_) cbytes += l.codes.size();
  w.section_begin("CODE", cbytes);
  for (const List& l : lists_) w.raw(l.codes.data(), l.codes.size());
  const size_t esize = rerank_ == RerankStorage::Float32 ? 4 : rerank_ == RerankStorage::Float16 ? 2 : 0;
  w.section_begin("RVEC", static_cast<uint64_t>(ntotal_) * dim_ * esize);
  for (const List& l : lists_) {
    w.raw(l.xf.data(), l.xf.size() * sizeof(float));
    w.raw(l.xh.data(), l.xh.size() * sizeof(uint16_t));
  }
  w.section_begin("IDS\0", static_cast<uint64_t>(ntotal_) * sizeof(int64_t));
  for (const List& l : lists_) w.raw(l.ids.data(), l.ids.size() * sizeof(int64_t));
  ids_.write(w);
}

std::unique_ptr<IVFPQIndex> IVFPQIndex::read_body(Reader& r, const FileHeader& h, bool single_list) {
  uint64_t p[8];
  r.section("PARM", p, sizeof p);
  const uint64_t nlist = p[0];
  if (nlist < 1 || nlist > (uint64_t(1) << 22) || p[1] > 1 || p[2] < 1 || p[3] < 1 ||
      p[3] > 4096 || (p[4] != 4 && p[4] != 8) || p[5] > 1 || p[6] > 2 || p[7] != (single_list ? 1u : 0u) ||
      h.dim % p[3] != 0)
    throw_format("corrupted index file: invalid IVF-PQ parameters (nlist " + std::to_string(nlist) +
                 ", pq_m " + std::to_string(p[3]) + ", nbits " + std::to_string(p[4]) + ")");
  std::unique_ptr<IVFPQIndex> idx;
  try {
    idx = std::make_unique<IVFPQIndex>(h.dim, static_cast<Metric>(h.metric), nlist, p[3], p[4],
                                       p[5] != 0, static_cast<RerankStorage>(p[6]), p[2], single_list);
  } catch (const Error& e) {
    throw_format(std::string("corrupted index file: ") + e.what());
  }
  const uint64_t cbytes = p[1] ? nlist * h.dim * sizeof(float) : 0;
  if (cbytes > r.remaining()) throw_format("truncated index file: centroids missing");
  idx->centroids_.resize(cbytes / sizeof(float));
  r.section("CENT", idx->centroids_.data(), cbytes);
  check_finite_loaded(idx->centroids_.data(), cbytes ? nlist : 0, h.dim, "coarse centroids");
  const uint64_t pqbytes = p[1] ? (uint64_t(1) << p[4]) * h.dim * sizeof(float) : 0;
  if (pqbytes > r.remaining()) throw_format("truncated index file: quantizer centroids missing");
  std::vector<float> pqc(pqbytes / sizeof(float));
  r.section("PQCT", pqc.data(), pqbytes);
  check_finite_loaded(pqc.data(), pqc.size() / h.dim, h.dim, "quantizer centroids");
  if (p[1]) idx->pq_.set_centroids(std::move(pqc));
  if (nlist * sizeof(uint64_t) > r.remaining()) throw_format("truncated index file: list sizes missing");
  std::vector<uint64_t> sizes(nlist);
  r.section("LSIZ", sizes.data(), nlist * sizeof(uint64_t));
  uint64_t total = 0, code_total = 0;
  for (uint64_t s : sizes) {
    if (s > h.count - total) throw_format("corrupted index file: list sizes exceed the vector count");
    total += s;
    code_total += idx->code_bytes(s);
  }
  if (total != h.count) throw_format("corrupted index file: list sizes do not add up to the count");
  if (!p[1] && total) throw_format("corrupted index file: vectors in an untrained index");
  if (code_total > r.remaining()) throw_format("truncated index file: codes missing");
  if (r.section_begin("CODE", code_total) != code_total)
    throw_format("corrupted index file: code section has the wrong size");
  idx->lists_.assign(p[1] ? nlist : 0, List());
  for (size_t l = 0; l < idx->lists_.size(); ++l) {
    idx->lists_[l].codes.resize(idx->code_bytes(sizes[l]));
    r.raw(idx->lists_[l].codes.data(), idx->lists_[l].codes.size());
  }
  const uint64_t esize = p[6] == 1 ? 4 : p[6] == 2 ? 2 : 0;
  const uint64_t vbytes = checked_mul(checked_mul(total, h.dim, "vectors"), esize, "vectors");
  if (vbytes > r.remaining()) throw_format("truncated index file: re-rank vectors missing");
  if (r.section_begin("RVEC", vbytes) != vbytes)
    throw_format("corrupted index file: re-rank section has the wrong size");
  for (size_t l = 0; l < idx->lists_.size(); ++l) {
    List& L = idx->lists_[l];
    if (p[6] == 1) {
      L.xf.resize(sizes[l] * h.dim);
      r.raw(L.xf.data(), L.xf.size() * sizeof(float));
    } else if (p[6] == 2) {
      L.xh.resize(sizes[l] * h.dim);
      r.raw(L.xh.data(), L.xh.size() * sizeof(uint16_t));
    }
  }
  if (total * sizeof(int64_t) > r.remaining()) throw_format("truncated index file: ids missing");
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
      locs.push_back(encode_loc(l, o));
    }
  }
  idx->ids_.read(r);
  idx->ids_.rebuild(all_ids.data(), locs.data(), total);
  idx->ntotal_ = total;
  idx->compute_term2();
  return idx;
}

}  // namespace pyknn
