#include "index/exact_search.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "common/aligned.h"
#include "common/threadpool.h"
#include "common/topk.h"
#include "simd/dispatch.h"

namespace pyknn {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Below this many queries in a batch, packing a block costs more than it saves.
constexpr size_t kGemmMinQueries = 4;
// Scores screened per select_ge call: the threshold is refreshed between chunks.
constexpr size_t kScanChunk = 128;
// ScoreScan::ip selects the k-th best by nth_element from this k on (see there).
constexpr size_t kSelectMinK = 32;
// Work (multiply-adds) below which waking the pool costs more than it saves.
constexpr double kMinParallelWork = 1 << 20;

// Vectors per packed block: about 1 MB of panels (half an L2), a multiple of the panel width.
size_t block_rows(const simd::Kernels& K, size_t d) {
  size_t nr = static_cast<size_t>(K.nr);
  size_t nb = (size_t(1) << 18) / std::max<size_t>(d, 1) / nr * nr;
  return std::min<size_t>(std::max(nb, nr), 2048);
}

struct Plan {
  size_t splits_rows;     // S: contiguous row ranges
  size_t splits_queries;  // C: query chunks per batch
};

Plan make_plan(size_t n, size_t nqb, size_t d, size_t nb) {
  const double work = static_cast<double>(n) * d * nqb;
  size_t threads = static_cast<size_t>(num_threads());
  if (work < kMinParallelWork) threads = 1;
  const size_t nblocks = (n + nb - 1) / nb;
  Plan p;
  p.splits_rows = std::max<size_t>(1, std::min(threads, nblocks));
  // A few blocks of rows (coarse quantizers, k-means centroids) against many queries: split the
  // queries only. Packing the rows once per thread costs little there, and each query then has
  // one heap (no merge of per-split heaps, which with a large k costs as much as the scan).
  if (nblocks <= 4 && nqb >= 16 * threads) p.splits_rows = 1;
  p.splits_queries = std::min(nqb, (threads + p.splits_rows - 1) / p.splits_rows);
  p.splits_queries = std::max<size_t>(1, p.splits_queries);
  return p;
}

struct Batch {
  const ExactSearchInput* in;
  const simd::Kernels* K;
  const float* q;       // queries of this batch
  const float* qn;      // their squared norms (L2 only)
  size_t nqb, k, nb;
  double gamma;
  Plan plan;
  std::vector<float> heap_scores;
  std::vector<int64_t> heap_rows;
  std::vector<size_t> heap_sizes;

  TopK heap(size_t split, size_t qi) {
    size_t slot = split * nqb + qi;
    TopK h(heap_scores.data() + slot * k, heap_rows.data() + slot * k, k);
    h.size = heap_sizes[slot];
    return h;
  }
  void save(size_t split, size_t qi, const TopK& h) { heap_sizes[split * nqb + qi] = h.size; }

  void run_task(size_t task);
};

void Batch::run_task(size_t task) {
  const size_t S = plan.splits_rows, C = plan.splits_queries;
  const size_t split = task % S, chunk = task / S;
  const size_t n = in->n, d = in->d;
  // Rows of this split: an equal share in whole panels (whole blocks would leave one thread
  // idle for much of the time when there are only a few blocks, e.g. 1,024 k-means centroids).
  const size_t nr = static_cast<size_t>(K->nr);
  const size_t npanels = (n + nr - 1) / nr;
  const size_t r_begin = std::min(n, npanels * split / S * nr);
  const size_t r_end = std::min(n, npanels * (split + 1) / S * nr);
  const size_t q_begin = nqb * chunk / C, q_end = nqb * (chunk + 1) / C;
  if (r_begin >= r_end || q_begin >= q_end) return;
  const size_t nbr = (nb + K->nr - 1) / K->nr * K->nr;
  const ScoreScan scan{K, d, gamma};

  // Per-thread scratch kept across calls: fresh large buffers for every batch would cost a page
  // fault per 4 KB (measured: a fifth of the time of k-means assignment).
  struct Scratch {
    AlignedFloats packed;
    std::vector<float> tile, xn, t, s;
    std::vector<uint32_t> idx;
  };
  static thread_local Scratch sc;
  if (sc.idx.size() < nbr) sc.idx.resize(nbr);
  if (sc.xn.size() < nbr) sc.xn.resize(nbr);
  if (sc.t.size() < nbr) sc.t.resize(nbr);
  std::vector<uint32_t>& idx = sc.idx;
  std::vector<float>& xn = sc.xn;
  std::vector<float>& t = sc.t;
  std::vector<TopK> heaps;
  heaps.reserve(q_end - q_begin);
  for (size_t qi = q_begin; qi < q_end; ++qi) heaps.push_back(heap(split, qi));

  // The path depends on the batch size only (not on how the batch was split over threads), so
  // results are identical at any thread count.
  if (nqb >= kGemmMinQueries) {
    AlignedFloats& packed = sc.packed;
    packed.resize(nbr * d);
    const size_t qtile = query_tile(*K);
    std::vector<float>& tile = sc.tile;
    if (tile.size() < qtile * nbr) tile.resize(qtile * nbr);
    for (size_t r0 = r_begin; r0 < r_end; r0 += nb) {
      const size_t m = std::min(nb, r_end - r0);
      const float* xb = in->x + r0 * d;
      const int64_t row0 = static_cast<int64_t>(r0);
      const uint8_t* mask = in->mask ? in->mask + r0 : nullptr;
      K->pack(xb, m, d, packed.data());
      if (in->l2) K->norms_sq(xb, m, d, xn.data());
      for (size_t qt = q_begin; qt < q_end; qt += qtile) {
        const size_t mq = std::min(qtile, q_end - qt);
        K->gemm(q + qt * d, d, mq, packed.data(), m, d, tile.data(), nbr);
        for (size_t i = 0; i < mq; ++i) {
          TopK& h = heaps[qt + i - q_begin];
          if (in->l2)
            scan.l2(h, tile.data() + i * nbr, xn.data(), xb, m, row0, mask, q + (qt + i) * d,
                    qn[qt + i], t.data(), idx.data());
          else
            scan.ip(h, tile.data() + i * nbr, m, row0, mask, idx.data());
        }
      }
    }
  } else {
    std::vector<float>& s = sc.s;
    if (s.size() < nb) s.resize(nb);
    for (size_t r0 = r_begin; r0 < r_end; r0 += nb) {
      const size_t m = std::min(nb, r_end - r0);
      const float* xb = in->x + r0 * d;
      const int64_t row0 = static_cast<int64_t>(r0);
      const uint8_t* mask = in->mask ? in->mask + r0 : nullptr;
      for (size_t qi = q_begin; qi < q_end; ++qi) {
        TopK& h = heaps[qi - q_begin];
        if (in->l2) {
          K->l2sq_many(q + qi * d, xb, m, d, s.data());
          for (size_t j = 0; j < m; ++j) s[j] = -s[j];
        } else {
          K->dot_many(q + qi * d, xb, m, d, s.data());
        }
        scan.ip(h, s.data(), m, row0, mask, idx.data());
      }
    }
  }
  for (size_t qi = q_begin; qi < q_end; ++qi) save(split, qi, heaps[qi - q_begin]);
}

void pad(float* scores, int64_t* rows, size_t from, size_t to) {
  std::fill(scores + from, scores + to, kNegInf);
  std::fill(rows + from, rows + to, int64_t(-1));
}

// Few allowed rows: search a compact copy of them instead of scanning everything.
bool search_compacted(const ExactSearchInput& in, const float* q, size_t nq, size_t k,
                      float* scores, int64_t* rows) {
  size_t allowed = 0;
  for (size_t i = 0; i < in.n; ++i) allowed += in.mask[i] != 0;
  if (allowed * 4 >= in.n) return false;
  std::vector<int64_t> keep;
  keep.reserve(allowed);
  for (size_t i = 0; i < in.n; ++i)
    if (in.mask[i]) keep.push_back(static_cast<int64_t>(i));
  std::vector<float> sub(allowed * in.d);
  for (size_t i = 0; i < allowed; ++i)
    std::copy(in.x + keep[i] * in.d, in.x + (keep[i] + 1) * in.d, sub.begin() + i * in.d);
  ExactSearchInput compact = in;
  compact.x = sub.data();
  compact.n = allowed;
  compact.mask = nullptr;
  exact_knn(compact, q, nq, k, scores, rows);
  for (size_t i = 0; i < nq * k; ++i)
    if (rows[i] >= 0) rows[i] = keep[static_cast<size_t>(rows[i])];
  return true;
}

}  // namespace

// The expanded form ||q||^2 + ||x||^2 - 2<q,x> can be off by about gamma * (||q||^2 + ||x||^2)
// in float32 (Higham's bound for length-d sums, for each of the three terms, plus the final
// additions). It is only used to discard rows that certainly cannot enter the top k; every
// survivor is re-scored as a sum of squared differences.
double l2_error_factor(size_t d) {
  const double u = std::ldexp(1.0, -24);
  const double du = std::min(0.5, static_cast<double>(d + 2) * u);
  const double gamma_d = du / (1.0 - du);
  return 2.0 * gamma_d + 16.0 * u;
}

size_t query_tile(const simd::Kernels& K) {
  const size_t mr = static_cast<size_t>(K.mr);
  return std::max(mr, 64 / mr * mr);
}

void ScoreScan::ip(TopK& h, const float* s, size_t m, int64_t row0, const uint8_t* mask,
                   uint32_t* idx) const {
  if (h.k == 1 && !mask) {
    // Nearest neighbour only (k-means assignment): the row's maximum, at its first position.
    const float mx = K->max(s, m);
    if (!(mx >= h.threshold())) return;
    if (K->select_ge(s, m, mx, idx)) h.push(mx, row0 + idx[0]);
    return;
  }
  if (h.size == 0 && !mask && h.k >= kSelectMinK && m >= 2 * h.k) {
    // A large k from an empty heap (the cells an IVF search probes): find the k-th best score
    // by selection and push only the rows at or above it, instead of pushing rows that a
    // loose early threshold lets in only to evict them.
    thread_local std::vector<float> tmp;
    tmp.assign(s, s + m);
    std::nth_element(tmp.begin(), tmp.begin() + static_cast<ptrdiff_t>(m - h.k), tmp.end());
    const size_t c = K->select_ge(s, m, tmp[m - h.k], idx);
    for (size_t i = 0; i < c; ++i) h.push(s[idx[i]], row0 + static_cast<int64_t>(idx[i]));
    return;
  }
  size_t j = 0;
  for (; j < m && h.size < h.k; ++j)  // until the heap is full every row is a candidate
    if (!mask || mask[j]) h.push(s[j], row0 + static_cast<int64_t>(j));
  // In chunks, so that the threshold tightens as better rows come in.
  for (; j < m; j += kScanChunk) {
    const size_t len = std::min(kScanChunk, m - j);
    const size_t c = K->select_ge(s + j, len, h.threshold(), idx);
    for (size_t i = 0; i < c; ++i) {
      const size_t o = j + idx[i];
      if (mask && !mask[o]) continue;
      h.push(s[o], row0 + static_cast<int64_t>(o));
    }
  }
}

void ScoreScan::l2(TopK& h, const float* ip, const float* xn, const float* x, size_t m,
                   int64_t row0, const uint8_t* mask, const float* qv, float qn, float* t,
                   uint32_t* idx) const {
  const float keep = static_cast<float>(1.0 - gamma);
  const float slack = static_cast<float>(1.0 + gamma);
  // Row j can enter only if qn + xn - 2ip - gamma (qn + xn) <= D_k (+ slack), i.e.
  // 2ip - (1 - gamma) xn >= (1 - gamma) qn - D_k.
  for (size_t j = 0; j < m; ++j) t[j] = 2.0f * ip[j] - keep * xn[j];
  auto push_exact = [&](size_t o) {
    h.push(-K->l2sq(qv, x + o * d, d), row0 + static_cast<int64_t>(o));
  };
  auto bound = [&] { return keep * qn + h.threshold() * slack; };
  if (h.k == 1 && !mask) {
    // The row that looks nearest first, so the bound is tight before the rest are screened.
    const float mx = K->max(t, m);
    if (!(mx >= bound())) return;
    if (K->select_ge(t, m, mx, idx)) push_exact(idx[0]);
  }
  size_t j = 0;
  for (; j < m && h.size < h.k; ++j)
    if (!mask || mask[j]) push_exact(j);
  for (; j < m; j += kScanChunk) {
    const size_t len = std::min(kScanChunk, m - j);
    float b = bound();
    const size_t c = K->select_ge(t + j, len, b, idx);
    for (size_t i = 0; i < c; ++i) {
      const size_t o = j + idx[i];
      if (!(t[o] >= b)) continue;  // the bound tightened since the selection
      if (mask && !mask[o]) continue;
      push_exact(o);
      b = bound();
    }
  }
}

void exact_knn(const ExactSearchInput& in, const float* q, size_t nq, size_t k, float* scores,
               int64_t* rows) {
  if (nq == 0 || k == 0) return;
  if (k > in.n && in.n > 0) {
    // At most n results exist: search for n and pad the rest, so huge k costs no heap memory.
    std::vector<float> s(nq * in.n);
    std::vector<int64_t> r(nq * in.n);
    exact_knn(in, q, nq, in.n, s.data(), r.data());
    for (size_t i = 0; i < nq; ++i) {
      std::copy(s.begin() + i * in.n, s.begin() + (i + 1) * in.n, scores + i * k);
      std::copy(r.begin() + i * in.n, r.begin() + (i + 1) * in.n, rows + i * k);
      pad(scores + i * k, rows + i * k, in.n, k);
    }
    return;
  }
  pad(scores, rows, 0, nq * k);
  if (in.n == 0) return;
  if (in.mask && search_compacted(in, q, nq, k, scores, rows)) return;

  const simd::Kernels& K = simd::kernels();
  const size_t d = in.d;
  const size_t nb = block_rows(K, d);
  // Queries per batch bound the heap memory (splits x batch x k entries).
  const size_t qbatch = std::max<size_t>(64, std::min<size_t>(4096, (size_t(1) << 20) / k));
  std::vector<float> qn;

  for (size_t qb0 = 0; qb0 < nq; qb0 += qbatch) {
    const size_t nqb = std::min(qbatch, nq - qb0);
    Batch b;
    b.in = &in;
    b.K = &K;
    b.q = q + qb0 * d;
    b.nqb = nqb;
    b.k = k;
    b.nb = nb;
    b.gamma = l2_error_factor(d);
    b.plan = make_plan(in.n, nqb, d, nb);
    if (in.l2 && in.query_norms) {
      b.qn = in.query_norms + qb0;
    } else if (in.l2) {
      qn.resize(nqb);
      K.norms_sq(b.q, nqb, d, qn.data());
      b.qn = qn.data();
    }
    const size_t S = b.plan.splits_rows;
    b.heap_scores.resize(S * nqb * k);
    b.heap_rows.resize(S * nqb * k);
    b.heap_sizes.assign(S * nqb, 0);
    parallel_for(S * b.plan.splits_queries, [&](size_t task) { b.run_task(task); });

    // Merge the splits' heaps into the output, best first, by a selection and a sort of
    // (score, row) pairs in TopK's order (larger score, then smaller row), over the threads:
    // with a large k (the cells an IVF batch probes) the merge costs as much as the scan.
    constexpr size_t kMergeChunk = 32;
    parallel_for((nqb + kMergeChunk - 1) / kMergeChunk, [&](size_t c) {
      std::vector<std::pair<float, int64_t>> all;
      const auto better = [](const std::pair<float, int64_t>& a,
                             const std::pair<float, int64_t>& b) {
        return TopK::worse(b.first, b.second, a.first, a.second);
      };
      for (size_t qi = c * kMergeChunk; qi < std::min(nqb, (c + 1) * kMergeChunk); ++qi) {
        all.clear();
        for (size_t s = 0; s < S; ++s) {
          TopK h = b.heap(s, qi);
          for (size_t j = 0; j < h.size; ++j) all.emplace_back(h.s[j], h.r[j]);
        }
        const size_t m = std::min(k, all.size());
        if (all.size() > m) std::nth_element(all.begin(), all.begin() + m, all.end(), better);
        std::sort(all.begin(), all.begin() + m, better);
        float* os = scores + (qb0 + qi) * k;
        int64_t* orow = rows + (qb0 + qi) * k;
        for (size_t j = 0; j < m; ++j) {
          os[j] = all[j].first;
          orow[j] = all[j].second;
        }
        pad(os, orow, m, k);
      }
    });
  }
}

}  // namespace pyknn
