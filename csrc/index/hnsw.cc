#include "index/hnsw.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <shared_mutex>
#include <thread>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/errors.h"
#include "common/hash.h"
#include "common/random.h"
#include "common/threadpool.h"
#include "index/exact_search.h"
#include "simd/dispatch.h"

namespace pyknn {

// Large arrays (vectors, level-0 links) are read at random by every search: on 2 MB pages
// (transparent huge pages, where the kernel offers them on request) they cost far fewer TLB
// misses than on 4 KB pages.
template <class T>
T* Aligned64Allocator<T>::allocate(size_t n) {
  constexpr size_t kHuge = size_t(2) << 20;
  if (n > (std::numeric_limits<size_t>::max() - kHuge) / sizeof(T)) throw std::bad_alloc();
  const size_t raw = n * sizeof(T);
  const bool huge = raw >= 2 * kHuge && !std::getenv("PYKNN_NO_HUGEPAGES");
  const size_t align = huge ? kHuge : 64;
  const size_t bytes = raw ? (raw + align - 1) / align * align : align;
  void* p = std::aligned_alloc(align, bytes);
  if (!p) throw std::bad_alloc();
#if defined(MADV_HUGEPAGE)
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return static_cast<T*>(p);
}
template struct Aligned64Allocator<float>;
template struct Aligned64Allocator<uint32_t>;
template struct Aligned64Allocator<uint16_t>;

namespace {

constexpr int kMaxLevel = 31;
constexpr size_t kMaxM = 4096;
constexpr size_t kMaxEf = size_t(1) << 30;

// Link words are read by searches while inserters rewrite them: every access is atomic (plain
// moves on x86). A reader may see a list half rewritten; each word is then an old or a new
// neighbour, both valid slots. Searches load a neighbour with acquire and inserters store it
// with release, so a node reached through a link is seen with its own lists written (this
// matters on weakly ordered CPUs; on x86 both are plain moves).
inline uint32_t ld(const uint32_t* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
inline uint32_t ld_acq(const uint32_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
inline void st(uint32_t* p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
inline void st_rel(uint32_t* p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

// (distance, slot) packed in one integer whose order is the distance's order, ties by slot.
inline uint64_t mkkey(float d, uint32_t s) {
  uint32_t u;
  std::memcpy(&u, &d, 4);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(u) << 32) | s;
}
inline float kdist(uint64_t k) {
  uint32_t o = static_cast<uint32_t>(k >> 32);
  uint32_t u = (o & 0x80000000u) ? (o & 0x7fffffffu) : ~o;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t kslot(uint64_t k) { return static_cast<uint32_t>(k); }

inline void prefetch_l1(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  const char* end = c + bytes;
  for (c = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(c) & ~uintptr_t(63)); c < end;
       c += 64)
    __builtin_prefetch(c, 0, 3);
}
inline void prefetch_l2(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  // Unrolled: a 384-d row is 24 lines, and the loop overhead was a third of the search's
  // instructions besides the distances.
  size_t o = 0;
  for (; o + 256 <= bytes; o += 256) {
    __builtin_prefetch(c + o, 0, 2);
    __builtin_prefetch(c + o + 64, 0, 2);
    __builtin_prefetch(c + o + 128, 0, 2);
    __builtin_prefetch(c + o + 192, 0, 2);
  }
  for (; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

using KernelFn = float (*)(const float*, const float*, size_t);
using ManyFn = void (*)(const float*, const float*, size_t, size_t, float*);
using GatherFn = void (*)(const float*, const float*, const uint32_t*, size_t, size_t, float*);
using GatherHFn = void (*)(const float*, const uint16_t*, const uint32_t*, size_t, size_t,
                          float*);

}  // namespace

// Per-thread buffers reused across queries and insertions: the visited set is an array of
// one-byte epoch stamps (a slot is visited when its stamp equals the current tag), so starting a
// new search costs one increment, and a clear every 255 searches. One byte per slot keeps the
// array in L2 next to the vectors being streamed (4-byte stamps measured 2-4% slower).
struct HNSWIndex::Scratch {
  std::vector<uint8_t> visited;
  uint8_t tag = 0;
  std::vector<uint64_t> cand, res;      // min-heap of candidates, max-heap of results
  std::vector<uint32_t> nbuf;           // unvisited neighbours of the node being expanded
  std::vector<float> dbuf;              // their distances
  std::vector<uint64_t> sorted, prune;  // construction: sorted candidates, back-link pruning
  std::vector<std::vector<uint32_t>> sel;
  std::vector<uint32_t> psel;
  std::vector<float> qbuf, selbuf;

  uint8_t* begin(size_t n) {
    if (visited.size() < n) {
      visited.assign(std::max(n, visited.size() + visited.size() / 2), 0);
      tag = 0;
    }
    if (++tag == 0) {
      std::fill(visited.begin(), visited.end(), 0);
      tag = 1;
    }
    return visited.data();
  }
};

// Distance from a fixed point q to stored slots, smaller is better.
// kKind 0: -<q,x> (cosine; ip searches). 1: ||q-x||^2. 2: ip construction:
// max(||q||^2, ||x||^2) - <q,x>, half the squared distance of the points augmented with one
// dimension to the same norm R = max(||q||, ||x||) (ext holds the squared norms).
template <int kKind>
struct HNSWIndex::DistTo {
  const float* q;
  float qe;
  const float* base;
  const float* ext;
  size_t d;
  KernelFn fn;
  ManyFn many;      // fn against n contiguous rows
  GatherFn gather;  // fn against the rows of n slots
  // Construction of a large batch: half-precision copies of the rows, read by every distance
  // to a slot and, widened, by neighbour selection (the query vector q stays float32). Null:
  // the float32 rows.
  const uint16_t* base_h = nullptr;
  GatherHFn gather_h = nullptr;
  void (*widen)(const uint16_t*, size_t, float*) = nullptr;

  const float* row(uint32_t s) const { return base + static_cast<size_t>(s) * d; }
  // The row that operator() reads for s, as float32 (tmp holds d floats when it is widened).
  const float* row_f(uint32_t s, float* tmp) const {
    if (!base_h) return row(s);
    widen(base_h + static_cast<size_t>(s) * d, d, tmp);
    return tmp;
  }
  // Requests the row that operator() reads for s into L2.
  void fetch(uint32_t s) const {
    if (base_h) prefetch_l2(base_h + static_cast<size_t>(s) * d, d * sizeof(uint16_t));
    else prefetch_l2(row(s), d * sizeof(float));
  }
  float operator()(uint32_t s) const {
    if (base_h) {
      float o;
      (*this)(&s, 1, &o);
      return o;
    }
    if constexpr (kKind == 1) return fn(q, row(s), d);
    else if constexpr (kKind == 0) return -fn(q, row(s), d);
    else return std::max(qe, ext[s]) - fn(q, row(s), d);
  }
  // out[i] = (*this)(slots[i]) for n slots in one kernel call.
  void operator()(const uint32_t* slots, size_t n, float* out) const {
    if (base_h) gather_h(q, base_h, slots, n, d, out);
    else gather(q, base, slots, n, d, out);
    if constexpr (kKind == 0) {
      for (size_t i = 0; i < n; ++i) out[i] = -out[i];
    } else if constexpr (kKind == 2) {
      for (size_t i = 0; i < n; ++i) out[i] = std::max(qe, ext[slots[i]]) - out[i];
    }
  }
  // Between two stored slots.
  float pair(uint32_t a, uint32_t b) const {
    if constexpr (kKind == 1) return fn(row(a), row(b), d);
    else if constexpr (kKind == 0) return -fn(row(a), row(b), d);
    else return std::max(ext[a], ext[b]) - fn(row(a), row(b), d);
  }
  DistTo at(uint32_t s) const {
    DistTo o = *this;
    o.q = row(s);
    o.qe = kKind == 2 ? ext[s] : 0.f;
    return o;
  }
};

struct HNSWIndex::AllowAll {
  static constexpr bool kAll = true;
  bool operator()(uint32_t) const { return true; }
};
struct HNSWIndex::AllowMask {
  static constexpr bool kAll = false;
  const uint8_t* m;
  bool operator()(uint32_t s) const { return m[s] != 0; }
};
struct HNSWIndex::AllowState {
  static constexpr bool kAll = false;
  const uint8_t* st;
  uint8_t bad;
  bool operator()(uint32_t s) const { return (st[s] & bad) == 0; }
};

HNSWIndex::Scratch& HNSWIndex::scratch() {
  thread_local Scratch s;
  return s;
}

// ---- construction, parameters ----------------------------------------------------------------

HNSWIndex::HNSWIndex(size_t dim, Metric metric, size_t M, size_t ef_construction, uint64_t seed)
    : Index(dim, metric), M_(M), M0_(2 * M), ef_c_(ef_construction), seed_(seed) {
  if (M < 2) throw_value("M must be at least 2, got " + std::to_string(M));
  if (M > kMaxM)
    throw_value("M must be at most " + std::to_string(kMaxM) + ", got " + std::to_string(M));
  if (ef_construction < 1)
    throw_value("ef_construction must be at least 1, got " + std::to_string(ef_construction));
  if (ef_construction > kMaxEf)
    throw_value("ef_construction must be at most " + std::to_string(kMaxEf) + ", got " +
                std::to_string(ef_construction));
  sel0_ = M0_;
  mult_ = 1.0 / std::log(static_cast<double>(M));
  stride0_ = 1 + M0_;
  strideU_ = 1 + M_;
  locks_.reset(new std::atomic<uint8_t>[kStripes]);
  for (size_t i = 0; i < kStripes; ++i) locks_[i].store(0, std::memory_order_relaxed);
}

HNSWIndex::~HNSWIndex() = default;

int HNSWIndex::max_level() const {
  const uint64_t e = entry_.load(std::memory_order_acquire);
  return e == kNoEntry ? -1 : static_cast<int>(e >> 32);
}

// Construction distance. For ip, when every squared norm stored so far agrees within 0.1%
// (normalised embeddings stored in float16, say), max(||x||^2, ||y||^2) - <x,y> differs from
// -<x,y> + const by less than 0.1% of ||x||^2: construction then uses -<x,y> and skips one
// random memory access (the norm) per distance.
int HNSWIndex::dist_kind() const {
  switch (metric_) {
    case Metric::L2: return 1;
    case Metric::Cosine: return 0;
    case Metric::IP:
      return norm_min_sq_ > 0.f && norm_max_sq_ <= norm_min_sq_ * 1.001f ? 0 : 2;
  }
  return 0;
}

void HNSWIndex::lock_node(uint32_t s) const {
  std::atomic<uint8_t>& l = locks_[(s * 0x9E3779B1u) >> 16];
  for (int spins = 0;;) {
    if (!l.exchange(1, std::memory_order_acquire)) return;
    while (l.load(std::memory_order_relaxed)) {
      if (++spins > 64) std::this_thread::yield();
#if defined(__x86_64__) || defined(__i386__)
      else __builtin_ia32_pause();
#endif
    }
  }
}

void HNSWIndex::unlock_node(uint32_t s) const {
  locks_[(s * 0x9E3779B1u) >> 16].store(0, std::memory_order_release);
}

// The i-th draw of the seeded stream: Rng(seed) advanced i times (splitmix64 is a counter).
int HNSWIndex::draw_level(uint64_t i) const {
  Rng r(seed_ + i * 0x9E3779B97F4A7C15ULL);
  const double u = r.uniform();  // [0, 1)
  const double lv = -std::log(1.0 - u) * mult_;
  return lv >= kMaxLevel ? kMaxLevel : static_cast<int>(lv);
}

size_t HNSWIndex::bytes_used() const {
  // Memory-mapped sections are not counted: they are the file's pages, shared and evictable.
  size_t b = vecs_.capacity() * sizeof(float) + link0_.capacity() * sizeof(uint32_t) +
             upper_.capacity() * sizeof(upper_[0]) + level_.capacity() + state_.capacity() +
             slot_ids_.capacity() * sizeof(int64_t) + next_dup_.capacity() * sizeof(uint32_t) +
             ext_.capacity() * sizeof(float) + free_.capacity() * sizeof(uint32_t) +
             ids_.memory_usage() + kStripes * sizeof(locks_[0]);
  for (size_t s = 0; s < n_slots_; ++s)
    if (upper_[s]) b += static_cast<size_t>(level_[s]) * strideU_ * sizeof(uint32_t);
  return b;
}

// ---- search within one level ----------------------------------------------------------------

template <int kKind>
void HNSWIndex::greedy(const DistTo<kKind>& dist, uint32_t& cur, float& cur_d, int from, int to,
                       uint32_t skip) const {
  const size_t n = n_slots_;
  for (int lc = from; lc > to; --lc) {
    for (bool changed = true; changed;) {
      changed = false;
      const uint32_t* blk = links(cur, lc);
      const uint32_t cnt = std::min<uint32_t>(ld_acq(blk), static_cast<uint32_t>(M_));
      for (uint32_t j = 1; j <= cnt; ++j) {
        const uint32_t v = ld(blk + j);
        if (v < n) dist.fetch(v);
      }
      for (uint32_t j = 1; j <= cnt; ++j) {
        const uint32_t v = ld_acq(blk + j);
        if (v >= n || v == skip || level_[v] < lc) continue;
        const float d = dist(v);
        if (d < cur_d) {
          cur_d = d;
          cur = v;
          changed = true;
        }
      }
    }
  }
}

// Best-first search of one level from ep (already marked visited): fills sc.res with the ef
// best allowed nodes (a max-heap of keys). Nodes that are not allowed are traversed but never
// enter the results. With next_dup, the exact copies chained to a node enter with it.
template <int kKind, class Allow>
void HNSWIndex::search_layer(const DistTo<kKind>& dist, uint32_t ep, float ep_d, int level,
                             size_t ef, const Allow& allow, const uint32_t* next_dup,
                             Scratch& sc) const {
  std::vector<uint64_t>& cand = sc.cand;
  std::vector<uint64_t>& res = sc.res;
  cand.clear();
  res.clear();
  if (sc.nbuf.size() < M0_) sc.nbuf.resize(M0_);
  if (sc.dbuf.size() < M0_) sc.dbuf.resize(M0_);
  uint32_t* nb = sc.nbuf.data();
  float* db = sc.dbuf.data();
  uint8_t* vis = sc.visited.data();
  const uint8_t tag = sc.tag;
  const uint32_t n = static_cast<uint32_t>(n_slots_);
  const uint32_t cap = static_cast<uint32_t>(cap_at(level));

  auto push_res = [&](uint64_t kk) {
    res.push_back(kk);
    std::push_heap(res.begin(), res.end());
    if (res.size() > ef) {
      std::pop_heap(res.begin(), res.end());
      res.pop_back();
    }
  };
  auto push_dups = [&](uint32_t s, float d) {
    size_t taken = 0;
    for (uint32_t c = ld_acq(next_dup + s); c < n; c = ld_acq(next_dup + c)) {
      if (!allow(c)) continue;
      const uint64_t kk = mkkey(d, c);
      if (res.size() < ef || kk < res.front()) push_res(kk);
      if (++taken >= ef) break;
    }
  };

  const uint64_t k0 = mkkey(ep_d, ep);
  cand.push_back(k0);
  if (allow(ep)) res.push_back(k0);
  if (next_dup) push_dups(ep, ep_d);

  while (!cand.empty()) {
    const uint64_t c = cand.front();
    if (res.size() >= ef && c > res.front()) break;
    std::pop_heap(cand.begin(), cand.end(), std::greater<uint64_t>());
    cand.pop_back();
    if (!cand.empty()) prefetch_l1(links(kslot(cand.front()), level), (1 + cap) * sizeof(uint32_t));

    const uint32_t* blk = links(kslot(c), level);
    uint32_t cnt = ld_acq(blk);
    if (cnt > cap) cnt = cap;
    for (uint32_t j = 1; j <= cnt; ++j) {
      const uint32_t v = ld(blk + j);
      if (v < n) __builtin_prefetch(vis + v);
    }
    // The unvisited neighbours' vectors are requested into L2 all at once (prefetches to L2
    // are not limited by L1's few fill buffers), then scored in order.
    uint32_t m = 0;
    for (uint32_t j = 1; j <= cnt; ++j) {
      const uint32_t v = ld_acq(blk + j);
      if (v >= n || vis[v] == tag) continue;
      if (level > 0 && level_[v] < level) continue;
      vis[v] = tag;
      nb[m++] = v;
      if constexpr (kKind == 2) __builtin_prefetch(dist.ext + v, 0, 3);
      dist.fetch(v);
    }
    dist(nb, m, db);
    for (uint32_t j = 0; j < m; ++j) {
      const uint32_t v = nb[j];
      const float d = db[j];
      const uint64_t kk = mkkey(d, v);
      if (res.size() < ef || kk < res.front()) {
        cand.push_back(kk);
        std::push_heap(cand.begin(), cand.end(), std::greater<uint64_t>());
        if (allow(v)) push_res(kk);
        if (next_dup) push_dups(v, d);
      }
    }
  }
}

// Algorithm 4 of the paper: keep a candidate (sorted nearest first) only if it is closer to the
// base point than to every neighbour already kept.
// The kept neighbours are copied into one contiguous buffer so that a candidate is compared
// with four of them per kernel call (dot_many / l2sq_many), stopping at the first block that
// holds a closer one.
template <int kKind>
void HNSWIndex::select_heuristic(const DistTo<kKind>& dist, const uint64_t* cand, size_t nc,
                                 size_t m, std::vector<uint32_t>& out, Scratch& sc) const {
  out.clear();
  const size_t d = dim_;
  if (sc.selbuf.size() < (m + 1) * d) sc.selbuf.resize((m + 1) * d);
  float* buf = sc.selbuf.data();
  float* tmp = buf + m * d;
  float s4[4];
  // Candidates found early in a long search may have left the caches: fetch a few ahead.
  for (size_t i = 0; i < nc && i < 4; ++i) dist.fetch(kslot(cand[i]));
  for (size_t i = 0; i < nc && out.size() < m; ++i) {
    if (i + 4 < nc) dist.fetch(kslot(cand[i + 4]));
    const uint32_t e = kslot(cand[i]);
    const float de = kdist(cand[i]);
    const float* ve = dist.row_f(e, tmp);
    bool good = true;
    for (size_t r0 = 0; r0 < out.size() && good; r0 += 4) {
      const size_t nb = std::min<size_t>(4, out.size() - r0);
      dist.many(ve, buf + r0 * d, nb, d, s4);
      for (size_t j = 0; j < nb; ++j) {
        float pd;
        if constexpr (kKind == 1) pd = s4[j];
        else if constexpr (kKind == 0) pd = -s4[j];
        else pd = std::max(dist.ext[e], dist.ext[out[r0 + j]]) - s4[j];
        if (pd < de) {
          good = false;
          break;
        }
      }
    }
    if (good) {
      std::memcpy(buf + out.size() * d, ve, d * sizeof(float));
      out.push_back(e);
    }
  }
}

// Writes s's list on `level` and adds s to each selected neighbour's list, pruning that list
// with the heuristic when it is full.
template <int kKind>
void HNSWIndex::link(const DistTo<kKind>& dist, uint32_t s, const std::vector<uint32_t>& sel,
                     int level, Scratch& sc) {
  const uint32_t cap = static_cast<uint32_t>(cap_at(level));
  {
    uint32_t* blk = links(s, level);
    lock_node(s);
    const uint32_t cnt = std::min<uint32_t>(static_cast<uint32_t>(sel.size()), cap);
    for (uint32_t j = 0; j < cnt; ++j) st(blk + 1 + j, sel[j]);
    st_rel(blk, cnt);
    unlock_node(s);
  }
  for (uint32_t v : sel) {
    uint32_t* b = links(v, level);
    lock_node(v);
    uint32_t c = std::min(ld(b), cap);
    bool present = false;
    for (uint32_t j = 1; j <= c && !present; ++j) present = ld(b + j) == s;
    if (!present) {
      if (c < cap) {
        st_rel(b + 1 + c, s);
        st_rel(b, c + 1);
      } else {
        const DistTo<kKind> dv = dist.at(v);
        sc.prune.clear();
        if (sc.nbuf.size() < c + 1) sc.nbuf.resize(c + 1);
        if (sc.dbuf.size() < c + 1) sc.dbuf.resize(c + 1);
        for (uint32_t j = 0; j < c; ++j) dv.fetch(sc.nbuf[j] = ld(b + 1 + j));
        sc.nbuf[c] = s;
        dv(sc.nbuf.data(), c + 1, sc.dbuf.data());
        for (uint32_t j = 0; j <= c; ++j) sc.prune.push_back(mkkey(sc.dbuf[j], sc.nbuf[j]));
        std::sort(sc.prune.begin(), sc.prune.end());
        select_heuristic(dv, sc.prune.data(), sc.prune.size(), cap, sc.psel, sc);
        for (size_t j = 0; j < sc.psel.size(); ++j) st_rel(b + 1 + j, sc.psel[j]);
        st_rel(b, static_cast<uint32_t>(sc.psel.size()));
      }
    }
    unlock_node(v);
  }
}

template <int kKind>
void HNSWIndex::insert(uint32_t s, const DistTo<kKind>& base, uint8_t* is_dup, Scratch& sc) {
  const int L = level_[s];
  const DistTo<kKind> dist = base.at(s);
  std::unique_lock<std::mutex> top_lock(entry_mu_, std::defer_lock);
  uint64_t e = entry_.load(std::memory_order_acquire);
  if (e == kNoEntry || L > static_cast<int>(e >> 32)) {
    top_lock.lock();
    e = entry_.load(std::memory_order_acquire);
  }
  if (e == kNoEntry) {
    entry_.store((static_cast<uint64_t>(L) << 32) | s, std::memory_order_release);
    return;
  }
  const int maxl = static_cast<int>(e >> 32);
  uint32_t cur = static_cast<uint32_t>(e);
  float cur_d = dist(cur);
  greedy(dist, cur, cur_d, maxl, L, s);
  const int top = std::min(L, maxl);
  if (static_cast<int>(sc.sel.size()) < top + 1) sc.sel.resize(top + 1);
  const bool deletions = !free_.empty();
  for (int lc = top; lc >= 0; --lc) {
    uint8_t* vis = sc.begin(n_slots_);
    vis[s] = sc.tag;
    vis[cur] = sc.tag;
    if (deletions) {
      // New links avoid deleted nodes (their slots will be reused), unless there is nothing
      // else nearby: then the nearest deleted nodes, still traversed, keep this node reachable.
      search_layer(dist, cur, cur_d, lc, ef_c_, AllowState{state_.data(), kDeleted}, nullptr, sc);
      if (sc.res.empty()) {
        uint8_t* v2 = sc.begin(n_slots_);
        v2[s] = sc.tag;
        v2[cur] = sc.tag;
        search_layer(dist, cur, cur_d, lc, ef_c_, AllowAll{}, nullptr, sc);
      }
    } else {
      search_layer(dist, cur, cur_d, lc, ef_c_, AllowAll{}, nullptr, sc);
    }
    sc.sorted.assign(sc.res.begin(), sc.res.end());
    std::sort(sc.sorted.begin(), sc.sorted.end());
    if (lc == 0) {
      // An exact copy of a node already in the graph joins that node's chain instead.
      const float self_d = dist(s);
      for (uint64_t w : sc.sorted) {
        if (kdist(w) > self_d) break;
        const uint32_t c = kslot(w);
        if (std::memcmp(vec(c), vec(s), dim_ * sizeof(float)) == 0) {
          lock_node(c);
          st(&next_dup_[s], ld(&next_dup_[c]));
          st_rel(&next_dup_[c], s);
          unlock_node(c);
          has_dups_.store(true, std::memory_order_release);
          *is_dup = 1;
          return;
        }
      }
    }
    select_heuristic(dist, sc.sorted.data(), sc.sorted.size(), lc == 0 ? sel0_ : M_, sc.sel[lc],
                     sc);
    if (!sc.sorted.empty()) {
      cur = kslot(sc.sorted[0]);
      cur_d = kdist(sc.sorted[0]);
    }
  }
  // Bottom level first: a search reaches s on a level only through a back-link written by
  // link() on that level, after s's own lists on every level below it are in place, so it never
  // descends into a node without links (searched at level 0 alone, such a node gives nothing).
  for (int lc = 0; lc <= top; ++lc) link(dist, s, sc.sel[lc], lc, sc);
  if (L > maxl) entry_.store((static_cast<uint64_t>(L) << 32) | s, std::memory_order_release);
}

// ---- add ------------------------------------------------------------------------------------

void HNSWIndex::check_writable() const {
  if (mapping_)
    throw_value("this HNSWIndex was loaded with mmap=True and is read-only; load it without "
                "mmap to add or remove vectors");
}

void HNSWIndex::add(const float* x, size_t n, const int64_t* ids) {
  check_writable();
  if (n == 0) return;
  std::vector<float> unit = prepare_vectors(x, n);
  if (!unit.empty()) x = unit.data();
  const simd::Kernels& K = simd::kernels();
  std::vector<float> nsq;
  if (metric_ == Metric::IP) {
    nsq.resize(n);
    K.norms_sq(x, n, dim_, nsq.data());
  }

  std::lock_guard<std::mutex> writer(write_mu_);
  std::vector<uint32_t> slots(n), order;
  std::vector<int64_t> new_ids;
  {
    // Phase 1 (exclusive, short): slots, storage, vectors, repair of reused slots.
    std::unique_lock<std::shared_mutex> lk(mu_);
    ids_.check_new(ids, n);
    new_ids = ids_.new_ids(ids, n);
    const size_t n_reuse = std::min(n, free_.size());
    const size_t n_new = n - n_reuse;
    if (n_slots_ + n_new >= kNone)
      throw_value("HNSWIndex holds at most " + std::to_string(kNone - 1) + " vectors");
    std::vector<uint8_t> lv(n);
    std::vector<std::unique_ptr<uint32_t[]>> blocks(n);
    for (size_t i = 0; i < n; ++i) {
      lv[i] = static_cast<uint8_t>(draw_level(n_drawn_ + i));
      if (lv[i]) blocks[i].reset(new uint32_t[lv[i] * strideU_]());
    }
    // Allocate first (reserve keeps the old contents on failure): nothing below throws.
    const size_t total = n_slots_ + n_new;
    auto grow = [&](auto& v, size_t per) {
      if (v.capacity() < total * per)
        v.reserve(std::max(total * per, v.capacity() + v.capacity() / 2));
    };
    grow(vecs_, dim_);
    grow(link0_, stride0_);
    grow(upper_, 1);
    grow(level_, 1);
    grow(state_, 1);
    grow(slot_ids_, 1);
    grow(next_dup_, 1);
    if (metric_ == Metric::IP) grow(ext_, 1);
    V_ = vecs_.data();  // reserve may have moved them
    L0_ = link0_.data();
    if (n_live_ == 0 && n_slots_ > 0) {
      // Nothing live: detach the old graph entirely (every slot becomes a free slot without
      // links) and build afresh, instead of linking the new nodes to deleted ones.
      for (size_t s = 0; s < n_slots_; ++s) {
        std::fill_n(L0_ + s * stride0_, stride0_, 0u);
        upper_[s].reset();
        level_[s] = 0;
        next_dup_[s] = kNone;
        state_[s] = kDeleted | kDup;
      }
      entry_.store(kNoEntry);
      has_dups_.store(false);
    }
    std::vector<uint32_t> reuse_graph;
    for (size_t i = 0; i < n_reuse; ++i) {
      const uint32_t s = free_[free_.size() - 1 - i];
      slots[i] = s;
      if (!(state_[s] & kDup)) reuse_graph.push_back(s);
    }
    for (size_t i = n_reuse; i < n; ++i) slots[i] = static_cast<uint32_t>(n_slots_ + i - n_reuse);
    if (!reuse_graph.empty()) unlink_reused(reuse_graph);
    free_.resize(free_.size() - n_reuse);

    vecs_.resize(total * dim_);
    link0_.resize(total * stride0_);
    V_ = vecs_.data();
    L0_ = link0_.data();
    upper_.resize(total);
    level_.resize(total);
    state_.resize(total);
    slot_ids_.resize(total);
    next_dup_.resize(total);
    if (metric_ == Metric::IP) ext_.resize(total);
    n_slots_ = total;
    for (size_t i = 0; i < n; ++i) {
      const uint32_t s = slots[i];
      std::memcpy(V_ + static_cast<size_t>(s) * dim_, x + i * dim_,
                  dim_ * sizeof(float));
      std::fill_n(L0_ + static_cast<size_t>(s) * stride0_, stride0_, 0u);
      upper_[s] = std::move(blocks[i]);
      level_[s] = lv[i];
      state_[s] = kPending;
      slot_ids_[s] = new_ids[i];
      next_dup_[s] = kNone;
    }
    if (metric_ == Metric::IP)
      for (size_t i = 0; i < n; ++i) {
        ext_[slots[i]] = nsq[i];
        norm_min_sq_ = std::min(norm_min_sq_, nsq[i]);
        norm_max_sq_ = std::max(norm_max_sq_, nsq[i]);
      }
    // Insertion order: highest level first (the upper levels are built before the nodes that
    // route through them), in a seeded random order within a level, so that the order of the
    // data (sorted by norm, by cluster ...) does not bias the graph (as FAISS does).
    Rng rng(seed_ ^ (n_drawn_ * 0xD1B54A32D192ED03ULL + 0x2545F4914F6CDD1DULL));
    order.resize(n);
    for (size_t i = 0; i < n; ++i) order[i] = static_cast<uint32_t>(i);
    for (size_t i = n; i > 1; --i) std::swap(order[i - 1], order[rng.below(i)]);
    std::stable_sort(order.begin(), order.end(),
                     [&](uint32_t a, uint32_t b) { return lv[a] > lv[b]; });
    n_drawn_ += n;
  }

  // Exact copies within the batch: only the first of each group is inserted (copies inserted
  // concurrently would not see each other and could both become nodes, and the neighbour
  // selection then drops every link to the second: measured, one copy in 100 unreachable in
  // about one 2-thread build in 20); the others join its chain after the insertion.
  std::vector<uint32_t> leader = batch_copies(x, n);
  if (!leader.empty()) {
    order.erase(std::remove_if(order.begin(), order.end(),
                               [&](uint32_t i) { return leader[i] != i; }),
                order.end());
  }

  // Phase 2 (shared): graph insertion on the pool; searches continue meanwhile.
  std::vector<uint8_t> is_dup(n, 0);
  std::exception_ptr err;
  {
    std::shared_lock<std::shared_mutex> lk(mu_);
    try {
      const HalfRows half = half_rows(n);
      auto run = [&](auto kind) {
        constexpr int kK = decltype(kind)::value;
        DistTo<kK> base{nullptr, 0.f, V_, ext_.data(), dim_,
                        kK == 1 ? K.l2sq : K.dot,
                        kK == 1 ? K.l2sq_many : K.dot_many,
                        kK == 1 ? K.l2sq_gather : K.dot_gather};
        if (!half.empty()) {
          base.base_h = half.data();
          base.gather_h = kK == 1 ? K.l2sq_gather_h : K.dot_gather_h;
          base.widen = K.from_half;
        }
        size_t first = 0;
        if (entry_.load(std::memory_order_acquire) == kNoEntry) {
          insert<kK>(slots[order[0]], base, &is_dup[order[0]], scratch());
          first = 1;
        }
        parallel_for(order.size() - first, [&](size_t i) {
          const uint32_t j = order[first + i];
          insert<kK>(slots[j], base, &is_dup[j], scratch());
        });
      };
      switch (dist_kind()) {
        case 0: run(std::integral_constant<int, 0>()); break;
        case 1: run(std::integral_constant<int, 1>()); break;
        default: run(std::integral_constant<int, 2>()); break;
      }
      // The other copies of a group join the chain of its first one (inserted after it: if the
      // first joined an older node's chain, they are in that chain too).
      for (size_t i = 0; i < leader.size(); ++i) {
        if (leader[i] == i) continue;
        const uint32_t s = slots[i], c = slots[leader[i]];
        lock_node(c);
        st(&next_dup_[s], ld(&next_dup_[c]));
        st_rel(&next_dup_[c], s);
        unlock_node(c);
        is_dup[i] = 1;
        has_dups_.store(true, std::memory_order_release);
      }
    } catch (...) {
      err = std::current_exception();
    }
  }

  // Phase 3 (exclusive, short): publish the batch.
  std::unique_lock<std::shared_mutex> lk(mu_);
  for (size_t i = 0; i < n; ++i) {
    if (!is_dup[i]) continue;
    const uint32_t s = slots[i];
    state_[s] |= kDup;
    level_[s] = 0;
    upper_[s].reset();
  }
  if (!err) {
    std::vector<int64_t> loc(slots.begin(), slots.end());
    try {
      ids_.insert(new_ids.data(), loc.data(), n);
    } catch (...) {
      err = std::current_exception();
    }
  }
  if (err) {
    drop_slots(slots, false);
    std::rethrow_exception(err);
  }
  for (size_t i = 0; i < n; ++i) state_[slots[i]] &= static_cast<uint8_t>(~kPending);
  n_live_ += n;
}

// For each row of the batch, the first row of the batch equal to it (bit for bit), or an empty
// vector when the batch holds no two equal rows.
std::vector<uint32_t> HNSWIndex::batch_copies(const float* x, size_t n) const {
  std::vector<std::pair<uint64_t, uint32_t>> h(n);
  parallel_for((n + 4095) / 4096, [&](size_t c) {
    for (size_t i = c * 4096; i < std::min(n, (c + 1) * 4096); ++i) {
      Hasher64 hs;
      hs.update(x + i * dim_, dim_ * sizeof(float));
      h[i] = {hs.digest(), static_cast<uint32_t>(i)};
    }
  });
  std::sort(h.begin(), h.end());
  std::vector<uint32_t> leader;
  for (size_t a = 0; a < n;) {
    size_t b = a + 1;
    while (b < n && h[b].first == h[a].first) ++b;
    // Rows of one hash, in batch order: each joins the first earlier row equal to it.
    for (size_t i = a + 1; i < b; ++i) {
      const uint32_t r = h[i].second;
      for (size_t j = a; j < i; ++j) {
        const uint32_t e = h[j].second;
        if ((leader.empty() || leader[e] == e) &&
            std::memcmp(x + static_cast<size_t>(r) * dim_, x + static_cast<size_t>(e) * dim_,
                        dim_ * sizeof(float)) == 0) {
          if (leader.empty()) {
            leader.resize(n);
            for (size_t k = 0; k < n; ++k) leader[k] = static_cast<uint32_t>(k);
          }
          leader[r] = e;
          break;
        }
      }
    }
    a = b;
  }
  return leader;
}

// Construction reads rows from memory far more than it computes on them (per insertion time
// grows ~3x from 10k to 80k rows of 384 floats, as the rows leave the caches), so a bulk batch
// (a quarter or more of the slots) is inserted against half-precision copies of all rows: half
// the bytes per distance; the copies live only during the add. Data whose magnitudes half
// precision cannot hold well keeps the float32 rows.
HNSWIndex::HalfRows HNSWIndex::half_rows(size_t n_batch) const {
  constexpr size_t kMinSlots = 4096;  // below this the rows stay in cache anyway
  constexpr float kMaxAbs = 32768.f, kMinAbs = 1.f / 64;
  const simd::Kernels& K = simd::kernels();
  HalfRows h;
  if (!K.to_half || n_slots_ < kMinSlots || n_batch * 4 < n_slots_) return h;
  try {
    h.resize(n_slots_ * dim_);  // huge pages, as the float32 rows: every read is a random row
  } catch (const std::bad_alloc&) {
    return HalfRows();
  }
  constexpr size_t kChunk = 4096;
  const size_t chunks = (n_slots_ + kChunk - 1) / kChunk;
  std::vector<float> mx(chunks);
  parallel_for(chunks, [&](size_t c) {
    const size_t r0 = c * kChunk, rows = std::min(kChunk, n_slots_ - r0);
    mx[c] = K.to_half(V_ + r0 * dim_, rows * dim_, h.data() + r0 * dim_);
  });
  const float m = *std::max_element(mx.begin(), mx.end());
  if (!(m <= kMaxAbs && m >= kMinAbs)) return HalfRows();
  // Half precision keeps 11 significant bits: data whose neighbours are close relative to
  // their magnitudes (coordinates far from the origin, vectors in a narrow cone, tight groups
  // of near-duplicates) would be built on a coarse grid. So the copies serve only if, for a
  // sample of rows, the 10 nearest of all rows by half-precision distances are those by
  // float32 distances (measured agreement: 1.00 on MiniLM vectors with float32 noise, 0.24 on
  // latitude/longitude in a 0.4-degree box, 0.06 on a 0.01-rad cone, 0.54-0.66 on cosine groups
  // of spread 0.001-0.01). Cost: 32 scans of the rows, a small part of a bulk build.
  constexpr size_t kQueries = 32, kTop = 10;
  constexpr double kMinAgreement = 0.95;
  Rng rng(seed_ ^ (n_slots_ * 0x9E3779B97F4A7C15ULL));
  std::vector<uint32_t> all(n_slots_), qs(kQueries);
  for (size_t i = 0; i < n_slots_; ++i) all[i] = static_cast<uint32_t>(i);
  for (uint32_t& q : qs) q = static_cast<uint32_t>(rng.below(n_slots_));
  const bool l2 = metric_ == Metric::L2;
  std::vector<size_t> agreed(kQueries, 0);
  parallel_for(kQueries, [&](size_t t) {
    std::vector<float> d32(n_slots_), d16(n_slots_);
    const float* qv = V_ + static_cast<size_t>(qs[t]) * dim_;
    (l2 ? K.l2sq_many : K.dot_many)(qv, V_, n_slots_, dim_, d32.data());
    (l2 ? K.l2sq_gather_h : K.dot_gather_h)(qv, h.data(), all.data(), n_slots_, dim_,
                                            d16.data());
    std::vector<std::pair<float, uint32_t>> a, b;
    a.reserve(n_slots_);
    b.reserve(n_slots_);
    for (size_t i = 0; i < n_slots_; ++i) {
      if (i == qs[t]) continue;
      a.emplace_back(l2 ? d32[i] : -d32[i], static_cast<uint32_t>(i));
      b.emplace_back(l2 ? d16[i] : -d16[i], static_cast<uint32_t>(i));
    }
    const size_t top = std::min(kTop, a.size());
    std::nth_element(a.begin(), a.begin() + static_cast<ptrdiff_t>(top), a.end());
    std::nth_element(b.begin(), b.begin() + static_cast<ptrdiff_t>(top), b.end());
    for (size_t i = 0; i < top; ++i)
      for (size_t j = 0; j < top; ++j) agreed[t] += a[i].second == b[j].second;
  });
  size_t agree = 0;
  for (size_t c : agreed) agree += c;
  const size_t total = kQueries * std::min(kTop, n_slots_ - 1);
  if (static_cast<double>(agree) < kMinAgreement * static_cast<double>(total)) return HalfRows();
  return h;
}

// Called under the exclusive lock, before reused graph slots get their new vectors: every list
// that links to one of them loses that link, and the hole is filled with the old node's
// neighbour (on the same level) nearest to the list's owner, keeping the old node's bridges.
void HNSWIndex::unlink_reused(const std::vector<uint32_t>& reuse) {
  std::vector<uint8_t> mark(n_slots_, 0);
  for (uint32_t r : reuse) mark[r] = 1;
  const simd::Kernels& K = simd::kernels();
  auto run = [&](auto kind) {
    constexpr int kK = decltype(kind)::value;
    const DistTo<kK> base{nullptr, 0.f, V_, ext_.data(), dim_, kK == 1 ? K.l2sq : K.dot,
                              kK == 1 ? K.l2sq_many : K.dot_many,
                              kK == 1 ? K.l2sq_gather : K.dot_gather};
    const size_t chunk = 4096;
    const size_t ntasks = (n_slots_ + chunk - 1) / chunk;
    parallel_for(ntasks, [&](size_t t) {
      std::vector<uint32_t> kept, removed;
      std::vector<uint64_t> cands;
      for (size_t a = t * chunk; a < std::min(n_slots_, (t + 1) * chunk); ++a) {
        if (mark[a] || (state_[a] & kDup)) continue;
        for (int lc = 0; lc <= level_[a]; ++lc) {
          uint32_t* b = links(static_cast<uint32_t>(a), lc);
          const uint32_t cap = static_cast<uint32_t>(cap_at(lc));
          const uint32_t c = std::min(b[0], cap);
          bool any = false;
          for (uint32_t j = 1; j <= c && !any; ++j) any = mark[b[j]] != 0;
          if (!any) continue;
          kept.clear();
          removed.clear();
          for (uint32_t j = 1; j <= c; ++j) (mark[b[j]] ? removed : kept).push_back(b[j]);
          const DistTo<kK> da = base.at(static_cast<uint32_t>(a));
          cands.clear();
          for (uint32_t r : removed) {
            const uint32_t* rb = links(r, lc);
            const uint32_t rc = std::min(rb[0], cap);
            for (uint32_t j = 1; j <= rc; ++j) {
              const uint32_t u = rb[j];
              if (u == a || mark[u] || (state_[u] & kDup) || level_[u] < lc) continue;
              if (std::find(kept.begin(), kept.end(), u) != kept.end()) continue;
              bool dup = false;
              for (uint64_t kk : cands) dup |= kslot(kk) == u;
              if (!dup) cands.push_back(mkkey(da(u), u));
            }
          }
          std::sort(cands.begin(), cands.end());
          for (size_t i = 0; i < cands.size() && i < removed.size() && kept.size() < cap; ++i)
            kept.push_back(kslot(cands[i]));
          for (size_t j = 0; j < kept.size(); ++j) b[1 + j] = kept[j];
          b[0] = static_cast<uint32_t>(kept.size());
        }
      }
    });
  };
  switch (dist_kind()) {
    case 0: run(std::integral_constant<int, 0>()); break;
    case 1: run(std::integral_constant<int, 1>()); break;
    default: run(std::integral_constant<int, 2>()); break;
  }
  const uint64_t e = entry_.load();
  if (e != kNoEntry && mark[static_cast<uint32_t>(e)]) pick_entry_excluding(mark);
}

void HNSWIndex::pick_entry_excluding(const std::vector<uint8_t>& excluded) {
  uint64_t best = kNoEntry;
  int best_level = -1;
  for (size_t s = 0; s < n_slots_; ++s) {
    if (excluded[s] || (state_[s] & kDup)) continue;
    if (level_[s] > best_level) {
      best_level = level_[s];
      best = (static_cast<uint64_t>(level_[s]) << 32) | s;
    }
  }
  entry_.store(best, std::memory_order_release);
}

// ---- remove ---------------------------------------------------------------------------------

size_t HNSWIndex::remove(const int64_t* ids, size_t n, bool missing_ok) {
  check_writable();
  std::lock_guard<std::mutex> writer(write_mu_);
  std::unique_lock<std::shared_mutex> lk(mu_);
  std::vector<int64_t> loc = ids_.locations_of(ids, n, missing_ok);  // KeyError first
  std::vector<uint32_t> slots;
  slots.reserve(n);
  for (int64_t l : loc)
    if (l >= 0) slots.push_back(static_cast<uint32_t>(l));
  std::sort(slots.begin(), slots.end());
  slots.erase(std::unique(slots.begin(), slots.end()), slots.end());
  drop_slots(slots, true);
  return slots.size();
}

void HNSWIndex::drop_slots(const std::vector<uint32_t>& slots, bool erase_ids) {
  if (slots.empty()) return;
  std::vector<uint8_t> kill(n_slots_, 0);
  std::vector<int64_t> gone;
  for (uint32_t s : slots) {
    kill[s] = 1;
    if (erase_ids) gone.push_back(slot_ids_[s]);
  }
  if (has_dups_.load()) {
    bool any_chain = false;
    std::vector<uint32_t> members, surv;
    for (size_t h = 0; h < n_slots_; ++h) {
      if ((state_[h] & kDup) || next_dup_[h] == kNone) continue;
      members.clear();
      surv.clear();
      for (uint32_t c = next_dup_[h]; c != kNone; c = next_dup_[c]) {
        members.push_back(c);
        if (!kill[c]) surv.push_back(c);
      }
      if (kill[h] && !surv.empty()) {
        // The copy d1 takes over the node's slot (same vector); d1's own slot is freed.
        const uint32_t d1 = surv.front();
        surv.erase(surv.begin());
        slot_ids_[h] = slot_ids_[d1];
        if (ids_.find(slot_ids_[h]) >= 0) ids_.relocate(slot_ids_[h], static_cast<int64_t>(h));
        state_[h] = static_cast<uint8_t>(state_[d1] & kPending);
        kill[h] = 0;
        kill[d1] = 1;
      }
      for (uint32_t c : members) next_dup_[c] = kNone;
      uint32_t prev = static_cast<uint32_t>(h);
      for (uint32_t c : surv) {
        next_dup_[prev] = c;
        prev = c;
      }
      next_dup_[prev] = kNone;
      any_chain |= !surv.empty();
    }
    has_dups_.store(any_chain);
  }
  for (size_t s = 0; s < n_slots_; ++s) {
    if (!kill[s]) continue;
    if (!(state_[s] & (kDeleted | kPending))) --n_live_;
    state_[s] = static_cast<uint8_t>((state_[s] & kDup) | kDeleted);
    slot_ids_[s] = -1;
    free_.push_back(static_cast<uint32_t>(s));
  }
  for (int64_t id : gone) ids_.erase(id);
}

// ---- search ---------------------------------------------------------------------------------

template <int kKind>
void HNSWIndex::search_impl(const float* queries, size_t nq, size_t k, size_t ef,
                            const uint8_t* mask, float* distances, int64_t* out_ids) const {
  const float pad = kKind == 1 ? std::numeric_limits<float>::infinity()
                               : -std::numeric_limits<float>::infinity();
  const uint64_t e = entry_.load(std::memory_order_acquire);
  if (e == kNoEntry || n_live_ == 0) {
    std::fill_n(distances, nq * k, pad);
    std::fill_n(out_ids, nq * k, int64_t(-1));
    return;
  }
  const simd::Kernels& K = simd::kernels();
  const size_t efs = std::max(ef, k);
  const uint32_t* nd = has_dups_.load(std::memory_order_acquire) ? next_dup_.data() : nullptr;
  const bool all_live = n_live_ == n_slots_;
  const int maxl = static_cast<int>(e >> 32);
  auto one = [&](size_t qi) {
    Scratch& sc = scratch();
    const DistTo<kKind> dist{queries + qi * dim_, 0.f, V_, nullptr, dim_,
                             kKind == 1 ? K.l2sq : K.dot, kKind == 1 ? K.l2sq_many : K.dot_many,
                             kKind == 1 ? K.l2sq_gather : K.dot_gather};
    uint32_t cur = static_cast<uint32_t>(e);
    float cur_d = dist(cur);
    greedy(dist, cur, cur_d, maxl, 0, kNone);
    uint8_t* vis = sc.begin(n_slots_);
    vis[cur] = sc.tag;
    if (mask)
      search_layer(dist, cur, cur_d, 0, efs, AllowMask{mask}, nd, sc);
    else if (all_live)
      search_layer(dist, cur, cur_d, 0, efs, AllowAll{}, nd, sc);
    else
      search_layer(dist, cur, cur_d, 0, efs, AllowState{state_.data(), kDeleted | kPending}, nd,
                   sc);
    std::vector<uint64_t>& res = sc.res;
    std::sort_heap(res.begin(), res.end());
    float* D = distances + qi * k;
    int64_t* I = out_ids + qi * k;
    const size_t got = std::min(k, res.size());
    for (size_t j = 0; j < got; ++j) {
      const float d = kdist(res[j]);
      D[j] = kKind == 1 ? d : -d;
      I[j] = slot_ids_[kslot(res[j])];
    }
    for (size_t j = got; j < k; ++j) {
      D[j] = pad;
      I[j] = -1;
    }
  };
  if (nq == 1) {
    one(0);
  } else {
    parallel_for(nq, one);
  }
}

std::vector<uint8_t> HNSWIndex::allowed_mask(const Filter& f, size_t* n_allowed) const {
  std::vector<uint8_t> mask(n_slots_, 0);
  if (f.mask) {
    if (f.mask_len != n_live_)
      throw_value("filter mask has " + std::to_string(f.mask_len) + " entries, expected one per "
                  "stored vector (" + std::to_string(n_live_) + ")");
    size_t j = 0;
    for (size_t s = 0; s < n_slots_; ++s)
      if (!(state_[s] & (kDeleted | kPending))) mask[s] = f.mask[j++] != 0;
  } else {
    for (size_t i = 0; i < f.n_ids; ++i) {
      const int64_t loc = ids_.find(f.ids[i]);
      if (loc >= 0) mask[static_cast<size_t>(loc)] = 1;
    }
  }
  size_t m = 0;
  for (uint8_t v : mask) m += v;
  *n_allowed = m;
  return mask;
}

void HNSWIndex::exact_filtered(const float* queries, size_t nq, size_t k, const uint8_t* allowed,
                               float* distances, int64_t* out_ids) const {
  std::vector<uint32_t> rows;
  for (size_t s = 0; s < n_slots_; ++s)
    if (allowed[s]) rows.push_back(static_cast<uint32_t>(s));
  std::vector<float> x(rows.size() * dim_);
  for (size_t i = 0; i < rows.size(); ++i)
    std::memcpy(x.data() + i * dim_, vec(rows[i]), dim_ * sizeof(float));
  ExactSearchInput in;
  in.x = x.data();
  in.n = rows.size();
  in.d = dim_;
  in.l2 = metric_ == Metric::L2;
  exact_knn(in, queries, nq, k, distances, out_ids);
  const float pad = in.l2 ? std::numeric_limits<float>::infinity()
                          : -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < nq * k; ++i) {
    if (out_ids[i] < 0) {
      distances[i] = pad;
      out_ids[i] = -1;
    } else {
      out_ids[i] = slot_ids_[rows[static_cast<size_t>(out_ids[i])]];
      if (in.l2) distances[i] = -distances[i];
    }
  }
}

void HNSWIndex::search(const float* q, size_t nq, size_t k, size_t ef, const Filter& filter,
                       float* distances, int64_t* out_ids) const {
  if (ef < 1) throw_value("ef_search must be at least 1, got 0");
  if (nq == 0 || k == 0) return;
  check_finite(q, nq, dim_, "queries");
  const float* queries = q;
  std::vector<float> normed;
  if (metric_ == Metric::Cosine) {
    float* buf;
    if (nq == 1) {
      std::vector<float>& b = scratch().qbuf;
      b.resize(dim_);
      buf = b.data();
    } else {
      normed.resize(nq * dim_);
      buf = normed.data();
    }
    normalize_rows(q, nq, dim_, buf, "queries");
    queries = buf;
  }
  std::shared_lock<std::shared_mutex> lk(mu_);
  std::vector<uint8_t> mask;
  if (filter.active()) {
    size_t m = 0;
    mask = allowed_mask(filter, &m);
    for (size_t s = 0; s < n_slots_; ++s)
      if (state_[s] & (kDeleted | kPending)) mask[s] = 0;
    m = 0;
    for (uint8_t v : mask) m += v;
    // Few allowed vectors: a graph search visits about ef / p nodes to fill its results (p the
    // allowed fraction), while an exact scan of the m = p n allowed vectors costs m. Measured
    // on wordnet-minilm (117,659 x 384, one thread, ef 64): graph 0.13 ms x (ef/64) / p, exact
    // 0.034 ms per 1,000 allowed; they cross at m^2 = kFilterCost ef n (p = 6% there; 30% for
    // 5,000 vectors, 0.7% for 10 million). Below that the search is exact (the true top k).
    const size_t efs = std::max(ef, k);
    if (m <= efs || static_cast<double>(m) * m < kFilterCost * efs * n_live_) {
      exact_filtered(queries, nq, k, mask.data(), distances, out_ids);
      return;
    }
  }
  const uint8_t* mp = filter.active() ? mask.data() : nullptr;
  if (metric_ == Metric::L2)
    search_impl<1>(queries, nq, k, ef, mp, distances, out_ids);
  else
    search_impl<0>(queries, nq, k, ef, mp, distances, out_ids);
}

// ---- storage by id --------------------------------------------------------------------------

void HNSWIndex::get(const int64_t* ids, size_t n, float* out) const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  std::vector<int64_t> loc = ids_.locations_of(ids, n, false);
  for (size_t i = 0; i < n; ++i)
    std::memcpy(out + i * dim_, vec(static_cast<uint32_t>(loc[i])), dim_ * sizeof(float));
}

bool HNSWIndex::contains(int64_t id) const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  return ids_.find(id) >= 0;
}

std::vector<int64_t> HNSWIndex::ids() const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  std::vector<int64_t> out;
  out.reserve(n_live_);
  for (size_t s = 0; s < n_slots_; ++s)
    if (!(state_[s] & (kDeleted | kPending))) out.push_back(slot_ids_[s]);
  return out;
}

// ---- persistence ----------------------------------------------------------------------------
//
// PARM  u64[9]: M, ef_construction, seed, slots, entry slot (or 2^64-1), top level, levels drawn,
//               smallest and largest squared norm added (ip; float bits)
// VECS  slots x dim float32      LEVL  slots x u8 level      STAT  slots x u8 (1 deleted, 4 copy)
// LNK0  slots x (1 + 2M) u32     LNKU  per slot with level L > 0: L x (1 + M) u32
// DUPS  slots x u32 (next copy in the chain, or 2^32-1)     IDS  slots x i64 (-1: deleted)
// DELS  the free slots, in reuse order (u32)                 NRMS  ip: slots x f32 squared norms
// NXID  the id map's default counter
//
// A batch still being inserted (a save concurrent with add) is written as deleted slots.

void HNSWIndex::write_body(Writer& w) const {
  // A save may run while a batch is being inserted (both hold the shared lock): its slots are
  // written as detached free slots (no level, no links) and every link to them is left out, so
  // the file holds the published graph alone, consistent whatever the inserters were doing
  // while each section was written.
  const uint32_t n = static_cast<uint32_t>(n_slots_);
  auto pending = [&](uint32_t s) { return (state_[s] & kPending) != 0; };
  std::vector<uint8_t> stat(n_slots_), lev(n_slots_);
  for (uint32_t s = 0; s < n; ++s) {
    stat[s] = pending(s) ? kDeleted | kDup : static_cast<uint8_t>(state_[s] & (kDeleted | kDup));
    lev[s] = pending(s) ? 0 : level_[s];
  }
  uint64_t e = entry_.load(std::memory_order_acquire);
  if (e != kNoEntry && pending(static_cast<uint32_t>(e))) {
    // The entry point belongs to the batch in flight: the highest published node replaces it.
    e = kNoEntry;
    for (uint32_t s = 0; s < n; ++s)
      if (!(stat[s] & kDup) && (e == kNoEntry || lev[s] > (e >> 32)))
        e = (static_cast<uint64_t>(lev[s]) << 32) | s;
  }
  uint32_t nmin, nmax;
  std::memcpy(&nmin, &norm_min_sq_, 4);
  std::memcpy(&nmax, &norm_max_sq_, 4);
  const uint64_t params[9] = {M_, ef_c_, seed_, n_slots_,
                              e == kNoEntry ? ~uint64_t(0) : (e & 0xffffffffu),
                              e == kNoEntry ? 0 : (e >> 32), n_drawn_, nmin, nmax};
  w.section("PARM", params, sizeof params);
  w.align(64);  // VECS and LNK0 can be mapped in place
  w.section("VECS", V_, n_slots_ * dim_ * sizeof(float));
  w.section("LEVL", lev.data(), n_slots_);
  w.section("STAT", stat.data(), stat.size());
  // One list as written: a snapshot of the words, without links to pending slots.
  auto copy_list = [&](const uint32_t* src, size_t stride, uint32_t* dst) {
    const uint32_t cnt = std::min<uint32_t>(ld_acq(src), static_cast<uint32_t>(stride - 1));
    uint32_t m = 0;
    for (uint32_t j = 1; j <= cnt; ++j) {
      const uint32_t v = ld(src + j);
      if (v < n && !pending(v)) dst[1 + m++] = v;
    }
    dst[0] = m;
    std::fill(dst + 1 + m, dst + stride, 0u);
  };
  {
    w.align(64);
    w.section_begin("LNK0", static_cast<uint64_t>(n_slots_) * stride0_ * sizeof(uint32_t));
    std::vector<uint32_t> buf;
    const size_t chunk = 4096;
    for (size_t s0 = 0; s0 < n_slots_; s0 += chunk) {
      const size_t m = std::min(chunk, n_slots_ - s0);
      buf.assign(m * stride0_, 0u);
      for (size_t i = 0; i < m; ++i) {
        const uint32_t s = static_cast<uint32_t>(s0 + i);
        if (!pending(s)) copy_list(L0_ + static_cast<size_t>(s) * stride0_, stride0_,
                                   buf.data() + i * stride0_);
      }
      w.raw(buf.data(), buf.size() * sizeof(uint32_t));
    }
  }
  {
    uint64_t words = 0;
    for (size_t s = 0; s < n_slots_; ++s) words += static_cast<uint64_t>(lev[s]) * strideU_;
    w.section_begin("LNKU", words * sizeof(uint32_t));
    std::vector<uint32_t> buf;
    for (uint32_t s = 0; s < n; ++s) {
      if (!lev[s]) continue;
      buf.resize(lev[s] * strideU_);
      for (int lc = 1; lc <= lev[s]; ++lc)
        copy_list(links(s, lc), strideU_, buf.data() + (lc - 1) * strideU_);
      w.raw(buf.data(), buf.size() * sizeof(uint32_t));
    }
  }
  std::vector<uint32_t> dups(n_slots_, kNone);
  for (size_t h = 0; h < n_slots_; ++h) {
    if ((stat[h] & (kDup | kDeleted)) || ld(&next_dup_[h]) == kNone) continue;
    uint32_t prev = static_cast<uint32_t>(h);
    for (uint32_t c = ld_acq(&next_dup_[h]); c < n_slots_; c = ld_acq(&next_dup_[c])) {
      if (stat[c] & kDeleted) continue;
      dups[prev] = c;
      prev = c;
    }
  }
  w.section("DUPS", dups.data(), dups.size() * sizeof(uint32_t));
  std::vector<int64_t> sid(n_slots_);
  std::vector<uint32_t> dels;
  for (size_t s = 0; s < n_slots_; ++s) {
    sid[s] = (stat[s] & kDeleted) ? -1 : slot_ids_[s];
    if (state_[s] & kPending) dels.push_back(static_cast<uint32_t>(s));
  }
  dels.insert(dels.end(), free_.begin(), free_.end());
  w.section("IDS\0", sid.data(), sid.size() * sizeof(int64_t));
  w.section("DELS", dels.data(), dels.size() * sizeof(uint32_t));
  w.section("NRMS", ext_.data(), (metric_ == Metric::IP ? n_slots_ : 0) * sizeof(float));
  ids_.write(w);
}

namespace {

template <class T>
void read_array(Reader& r, const char tag[4], T* dst, uint64_t count, const char* what) {
  const uint64_t bytes = checked_mul(count, sizeof(T), what);
  if (bytes > r.remaining())
    throw_format(std::string("truncated index file: ") + what + " needs " +
                 std::to_string(bytes) + " bytes, " + std::to_string(r.remaining()) + " remain");
  r.section(tag, dst, bytes);
}

void check_bytes(Reader& r, uint64_t count, uint64_t size, const char* what) {
  const uint64_t bytes = checked_mul(count, size, what);
  if (bytes > r.remaining())
    throw_format(std::string("truncated index file: ") + what + " needs " +
                 std::to_string(bytes) + " bytes, " + std::to_string(r.remaining()) + " remain");
}

}  // namespace

std::unique_ptr<HNSWIndex> HNSWIndex::read_body(Reader& r, const FileHeader& h) {
  uint64_t p[9];
  r.section("PARM", p, sizeof p);
  const uint64_t M = p[0], efc = p[1], seed = p[2], n = p[3], ep = p[4], top = p[5];
  if (M < 2 || M > kMaxM || efc < 1 || efc > kMaxEf || n >= kNone || n < h.count ||
      top > kMaxLevel || p[7] > 0xffffffffu || p[8] > 0xffffffffu)
    throw_format("corrupted index file: invalid HNSW parameters (M " + std::to_string(M) +
                 ", ef_construction " + std::to_string(efc) + ", slots " + std::to_string(n) + ")");
  auto idx = std::make_unique<HNSWIndex>(h.dim, static_cast<Metric>(h.metric), M, efc, seed);
  HNSWIndex& x = *idx;
  const size_t d = h.dim;
  // With a mapped file the two large sections are used in place (written 64-byte aligned).
  const bool mapped = r.mapping() != nullptr;
  auto big_section = [&](const char tag[4], auto*& ptr, auto& owned, uint64_t count,
                         const char* what) {
    using T = std::remove_reference_t<decltype(*ptr)>;
    check_bytes(r, count, sizeof(T), what);
    r.skip_padding();
    const uint64_t bytes = count * sizeof(T);
    if (r.section_begin(tag, bytes) != bytes)
      throw_format(std::string("corrupted index file: ") + what + " has the wrong size");
    if (mapped) {
      const void* p = r.borrow(bytes, 64);
      if (!p)
        throw_value("this index file was written by an older pyknn without aligned sections "
                    "and cannot be memory-mapped; load it without mmap and save it again");
      ptr = static_cast<T*>(const_cast<void*>(p));
    } else {
      owned.resize(count);
      r.raw(owned.data(), bytes);
      ptr = owned.data();
    }
  };
  big_section("VECS", x.V_, x.vecs_, checked_mul(n, d, "vectors"), "vector section");
  check_bytes(r, n, 2, "level and state sections");
  x.level_.resize(n);
  read_array(r, "LEVL", x.level_.data(), n, "level section");
  x.state_.resize(n);
  read_array(r, "STAT", x.state_.data(), n, "state section");
  uint64_t upper_words = 0;
  for (size_t s = 0; s < n; ++s) {
    const uint8_t st = x.state_[s];
    if (x.level_[s] > kMaxLevel || (st & ~(kDeleted | kDup)) || ((st & kDup) && x.level_[s]))
      throw_format("corrupted index file: invalid level or state of slot " + std::to_string(s));
    upper_words += static_cast<uint64_t>(x.level_[s]) * x.strideU_;
  }
  big_section("LNK0", x.L0_, x.link0_, checked_mul(n, x.stride0_, "level-0 links"),
              "level-0 links");
  auto check_list = [&](const uint32_t* b, size_t s, int lc) {
    const size_t cap = x.cap_at(lc);
    if (b[0] > cap || ((x.state_[s] & kDup) && b[0]))
      throw_format("corrupted index file: invalid link count of slot " + std::to_string(s));
    for (uint32_t j = 1; j <= b[0]; ++j)
      if (b[j] >= n || (x.state_[b[j]] & kDup) || x.level_[b[j]] < lc)
        throw_format("corrupted index file: invalid link of slot " + std::to_string(s));
  };
  for (size_t s = 0; s < n; ++s) check_list(x.L0_ + s * x.stride0_, s, 0);
  check_bytes(r, upper_words, sizeof(uint32_t), "upper-level links");
  if (r.section_begin("LNKU", upper_words * sizeof(uint32_t)) != upper_words * sizeof(uint32_t))
    throw_format("corrupted index file: upper-level link section has the wrong size");
  x.upper_.resize(n);
  for (size_t s = 0; s < n; ++s) {
    if (!x.level_[s]) continue;
    x.upper_[s].reset(new uint32_t[x.level_[s] * x.strideU_]);
    r.raw(x.upper_[s].get(), x.level_[s] * x.strideU_ * sizeof(uint32_t));
    for (int lc = 1; lc <= x.level_[s]; ++lc) check_list(x.links(static_cast<uint32_t>(s), lc), s, lc);
  }
  check_bytes(r, n, sizeof(uint32_t), "copy chains");
  x.next_dup_.resize(n);
  read_array(r, "DUPS", x.next_dup_.data(), n, "copy chains");
  std::vector<int64_t> sid = read_ids(r, n);
  const uint64_t del_bytes = r.section_begin("DELS", n * sizeof(uint32_t));
  if (del_bytes % sizeof(uint32_t)) throw_format("corrupted index file: invalid free-slot list");
  x.free_.resize(del_bytes / sizeof(uint32_t));
  r.raw(x.free_.data(), del_bytes);
  const uint64_t n_norms = x.metric_ == Metric::IP ? n : 0;
  check_bytes(r, n_norms, sizeof(float), "norm section");
  x.ext_.resize(n_norms);
  read_array(r, "NRMS", x.ext_.data(), n_norms, "norm section");
  x.ids_.read(r);

  // Consistency: ids, deleted slots, copy chains, entry point.
  size_t live = 0, n_deleted = 0, live_dups = 0;
  std::vector<int64_t> live_ids, live_slots;
  std::vector<uint8_t> seen(n, 0);
  for (size_t s = 0; s < n; ++s) {
    const bool del = x.state_[s] & kDeleted;
    if (del != (sid[s] == -1))
      throw_format("corrupted index file: id and state of slot " + std::to_string(s) + " disagree");
    if (del) {
      ++n_deleted;
      if (x.next_dup_[s] != kNone)
        throw_format("corrupted index file: deleted slot " + std::to_string(s) + " in a chain");
      continue;
    }
    ++live;
    live_ids.push_back(sid[s]);
    live_slots.push_back(static_cast<int64_t>(s));
    if (x.state_[s] & kDup) ++live_dups;
    const uint32_t nx = x.next_dup_[s];
    if (nx == kNone) continue;
    if (nx >= n || (x.state_[nx] & (kDeleted | kDup)) != kDup || seen[nx]++)
      throw_format("corrupted index file: invalid copy chain at slot " + std::to_string(s));
  }
  if (live != h.count)
    throw_format("corrupted index file: " + std::to_string(live) + " live slots, header says " +
                 std::to_string(h.count));
  size_t chained = 0;
  bool any_chain = false;
  for (size_t s = 0; s < n; ++s) {
    if ((x.state_[s] & (kDup | kDeleted)) || x.next_dup_[s] == kNone) continue;
    any_chain = true;
    for (uint32_t c = x.next_dup_[s]; c != kNone && chained <= n; c = x.next_dup_[c]) ++chained;
  }
  if (chained != live_dups) throw_format("corrupted index file: copy chains are inconsistent");
  if (x.free_.size() != n_deleted) throw_format("corrupted index file: invalid free-slot list");
  std::vector<uint8_t> freed(n, 0);
  for (uint32_t s : x.free_)
    if (s >= n || !(x.state_[s] & kDeleted) || freed[s]++)
      throw_format("corrupted index file: invalid free-slot list");
  x.ids_.rebuild(live_ids.data(), live_slots.data(), live_ids.size());
  x.slot_ids_ = std::move(sid);
  if (ep == ~uint64_t(0)) {
    for (size_t s = 0; s < n; ++s)
      if (!(x.state_[s] & (kDup | kDeleted)))
        throw_format("corrupted index file: live nodes but no entry point");
  } else {
    if (ep >= n || (x.state_[ep] & kDup) || x.level_[ep] != top)
      throw_format("corrupted index file: invalid entry point");
    x.entry_.store((top << 32) | ep);
  }
  x.n_slots_ = n;
  x.n_live_ = live;
  x.n_drawn_ = p[6];
  x.has_dups_.store(any_chain);
  x.mapping_ = r.mapping();
  const uint32_t nmin = static_cast<uint32_t>(p[7]), nmax = static_cast<uint32_t>(p[8]);
  std::memcpy(&x.norm_min_sq_, &nmin, 4);
  std::memcpy(&x.norm_max_sq_, &nmax, 4);
  if (std::isnan(x.norm_min_sq_) || std::isnan(x.norm_max_sq_))
    throw_format("corrupted index file: invalid norm bounds");
  return idx;
}

}  // namespace pyknn
