// HNSWIndex: a hierarchical navigable small-world graph (Malkov & Yashunin, 2016/2018).
//
// Layout (for speed): the vectors of all slots in one contiguous 64-byte aligned float32 array
// (row-major, dim floats per slot); the level-0 links in one contiguous array of fixed-size blocks
// (count + 2*M neighbour slots, uint32); the links of levels 1..L of a node in one small block of
// its own (L blocks of count + M slots). A slot is a position in these arrays; user ids map to
// slots through the IdMap, and every search returns user ids. The two large arrays ask for
// transparent huge pages (madvise; PYKNN_NO_HUGEPAGES=1 turns it off): every search touches
// random rows, and 2 MB pages measured ~12% faster than 4 KB pages on 117k x 384.
//
// Construction: the heuristic neighbour selection of the paper (algorithm 4); a new node
// selects up to 2*M neighbours on level 0 (the level's capacity, as FAISS does; hnswlib selects
// M) and M above; a full neighbour list is re-pruned with the same heuristic. Levels are drawn
// with mL = 1/ln(M) from the seeded stream. A batch is inserted highest level first, in a
// seeded random order within a level (data sorted by norm or by cluster otherwise biases the
// graph badly: measured recall@10 0.22 instead of 0.90 on norm-sorted data), in parallel on the
// thread pool; with one thread the build is deterministic. Construction is bound by fetching
// rows from memory, so a bulk add (a quarter or more of the slots, 4,096 slots or more, at
// levels with F16C) reads half-precision copies of all rows, made for the add and freed after
// it: 15% faster on 117k x 384 at the same recall. The new node's vector stays float32. The
// float32 rows serve instead when magnitudes go beyond [1/64, 32768] or when, for 32 sampled
// rows, the 10 nearest of all rows differ between half and float32 distances (neighbours close
// relative to their magnitudes: coordinates far from the origin, tight near-duplicate groups).
//
// Metrics: l2 and cosine (unit vectors, distance -<q,x>) as usual. Inner product on vectors of
// varying norm: the order-preserving transform to L2 with one extra dimension,
// x' = [x, sqrt(R^2 - ||x||^2)], q' = [q, 0], gives ||q' - x'||^2 = ||q||^2 + R^2 - 2<q,x>, so
// queries are searched with -<q,x> whatever R is (no extra work: the same path as cosine).
// For construction (candidate search and neighbour selection between stored points) the
// transform is applied per pair with the smallest valid R, R = max(||x||, ||y||):
// ||x' - y'||^2 / 2 = max(||x||^2, ||y||^2) - <x,y>. A global R (the largest norm stored)
// squeezes typical vectors near the pole of the augmented sphere when norms are heavy-tailed,
// and changes whenever a later add raises it; the pairwise R depends on nothing but the pair,
// so the graph never needs rebuilding or re-weighting as norms grow, and on unit vectors it is
// exactly the cosine graph (1 - <x,y>). One float per slot (the squared norm) is stored.
// Measured (recall@10 at ef 64, 5,000 x 32): global R 0.85, plain -<x,y> (FAISS, hnswlib)
// 0.93, pairwise R 0.95 on norms uniform in [0.5, 5]; 0.67 / 0.93 / 0.95 when the small norms
// are added first; 0.89 / 0.66 / 0.91 on raw clustered data; 0.54 / 0.98 / 0.89 on log-normal
// norms (the one case where -<x,y> is better).
//
// Exact duplicates: a new vector equal to a node it finds at level 0 is not linked into the graph
// (a clique of copies would trap searches); it is chained to that node (its representative)
// and returned with it, at the same distance. Copies within one batch are grouped by hash
// before the insertion (threads inserting two copies at once would not see each other): only
// the first is inserted, the others join its chain. Removing a representative hands its slot to one
// of its copies, so the graph node stays.
//
// Deletion: remove() marks slots deleted. Deleted graph nodes stay in the graph (traversed, never
// returned) until their slot is reused by a later add; then every link that pointed to the old
// node is removed (a full scan of the link lists, once per add call) and the hole is filled with
// the old node's neighbour nearest to the list's owner, so no link silently points to the new
// vector and the old node's bridges survive.
//
// Filters: nodes outside the allow-list are traversed but never returned. With few allowed
// vectors (m^2 < kFilterCost ef n) the search is exact over them instead (see search()).
//
// Concurrency: writers (add, remove) are serialised by their own mutex. An add takes the
// exclusive lock only briefly (to assign slots, grow storage, copy vectors, repair reused slots)
// and at the end (to publish the batch); the graph insertion itself runs under the shared lock,
// in parallel on the thread pool, with striped spinlocks around every link-list write. Searches
// hold the shared lock and read links with atomic loads: they may traverse nodes of a batch in
// flight but never return them (their slots are "pending" until published), and storage never
// moves under them. So searches run concurrently with adds, and every returned id was added
// before the search began.
#pragma once
#include <atomic>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "index/index.h"

namespace pyknn {

template <class T>
struct Aligned64Allocator {
  using value_type = T;
  Aligned64Allocator() = default;
  template <class U>
  Aligned64Allocator(const Aligned64Allocator<U>&) {}
  T* allocate(size_t n);
  void deallocate(T* p, size_t) { std::free(p); }
  template <class U>
  bool operator==(const Aligned64Allocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const Aligned64Allocator<U>&) const { return false; }
};

class HNSWIndex : public Index {
 public:
  // M: links per node on levels >= 1 (2*M on level 0). ef_construction: candidate list size
  // while inserting. seed: level draws.
  HNSWIndex(size_t dim, Metric metric, size_t M, size_t ef_construction, uint64_t seed);
  ~HNSWIndex() override;

  IndexKind kind() const override { return IndexKind::HNSW; }
  size_t M() const { return M_; }
  size_t ef_construction() const { return ef_c_; }
  uint64_t seed() const { return seed_; }
  // Highest level of the graph (-1 when empty).
  int max_level() const;

  void add(const float* x, size_t n, const int64_t* ids);
  // distances/ids: nq x k, best first (ip/cosine: similarity descending; l2: squared distance
  // ascending), padded with -1 and -inf / +inf. ef: size of the candidate list, max(ef, k) used.
  void search(const float* q, size_t nq, size_t k, size_t ef, const Filter& filter,
              float* distances, int64_t* ids) const;
  void get(const int64_t* ids, size_t n, float* out) const;
  size_t remove(const int64_t* ids, size_t n, bool missing_ok);
  bool contains(int64_t id) const;
  // True when loaded with mmap (vectors and level-0 links used in place; add/remove raise).
  bool read_only() const { return mapping_ != nullptr; }
  // Live ids in slot order (the order a boolean filter refers to).
  std::vector<int64_t> ids() const;

  static std::unique_ptr<HNSWIndex> read_body(Reader& r, const FileHeader& h);

  // A filtered search is exact when the m allowed vectors satisfy m^2 < kFilterCost ef n
  // (or m <= max(ef, k)); see search() for the measurement behind it.
  static constexpr double kFilterCost = 7.0;

 protected:
  size_t count() const override { return n_live_; }
  size_t bytes_used() const override;
  void write_body(Writer& w) const override;

 private:
  struct Scratch;
  template <int kKind>
  struct DistTo;
  struct AllowAll;
  struct AllowMask;
  struct AllowState;

  static constexpr uint32_t kNone = 0xffffffffu;
  // state_ bits
  static constexpr uint8_t kDeleted = 1;  // removed (slot on the free list); never returned
  static constexpr uint8_t kPending = 2;  // in a batch being inserted; never returned
  // Not a graph node (no links in or out): an exact copy chained to a graph node, or a free
  // slot detached from the graph.
  static constexpr uint8_t kDup = 4;

  const float* vec(uint32_t s) const { return V_ + static_cast<size_t>(s) * dim_; }
  uint32_t* links(uint32_t s, int level) {
    return level == 0 ? L0_ + static_cast<size_t>(s) * stride0_
                      : upper_[s].get() + static_cast<size_t>(level - 1) * strideU_;
  }
  const uint32_t* links(uint32_t s, int level) const {
    return const_cast<HNSWIndex*>(this)->links(s, level);
  }
  size_t cap_at(int level) const { return level == 0 ? M0_ : M_; }
  int dist_kind() const;
  void lock_node(uint32_t s) const;
  void unlock_node(uint32_t s) const;

  int draw_level(uint64_t i) const;

  static Scratch& scratch();
  // Graph insertion of one pending slot (called in parallel). base: the distance functor
  // without a query point.
  template <int kKind>
  void insert(uint32_t s, const DistTo<kKind>& base, uint8_t* is_dup, Scratch& sc);
  template <int kKind, class Allow>
  void search_layer(const DistTo<kKind>& dist, uint32_t ep, float ep_d, int level, size_t ef,
                    const Allow& allow, const uint32_t* next_dup, Scratch& sc) const;
  template <int kKind>
  void greedy(const DistTo<kKind>& dist, uint32_t& cur, float& cur_d, int from, int to,
              uint32_t skip) const;
  template <int kKind>
  void select_heuristic(const DistTo<kKind>& dist, const uint64_t* cand, size_t nc, size_t m,
                        std::vector<uint32_t>& out, Scratch& sc) const;
  template <int kKind>
  void link(const DistTo<kKind>& dist, uint32_t s, const std::vector<uint32_t>& sel, int level,
            Scratch& sc);
  template <int kKind>
  void search_impl(const float* queries, size_t nq, size_t k, size_t ef, const uint8_t* mask,
                   float* distances, int64_t* ids) const;

  // Removes links to the slots in `reuse` (graph slots about to be reused), filling holes.
  void unlink_reused(const std::vector<uint32_t>& reuse);
  // For each row of a batch, the first row equal to it; empty when all rows differ.
  std::vector<uint32_t> batch_copies(const float* x, size_t n) const;
  // Half-precision copies of all rows for inserting a batch of n_batch vectors, or empty when
  // the float32 rows serve (see the construction notes above).
  using HalfRows = std::vector<uint16_t, Aligned64Allocator<uint16_t>>;
  HalfRows half_rows(size_t n_batch) const;
  // Marks slots deleted (erasing their ids from the map when erase_ids), keeping dup chains
  // valid: a removed representative is replaced by one of its copies. Returns slots freed.
  void drop_slots(const std::vector<uint32_t>& slots, bool erase_ids);
  void pick_entry_excluding(const std::vector<uint8_t>& excluded);
  void exact_filtered(const float* queries, size_t nq, size_t k, const uint8_t* allowed,
                      float* distances, int64_t* ids) const;
  std::vector<uint8_t> allowed_mask(const Filter& f, size_t* n_allowed) const;

  size_t M_, M0_, ef_c_;
  size_t sel0_;  // neighbours a new node selects on level 0
  uint64_t seed_;
  double mult_;
  size_t stride0_, strideU_;

  // Storage, indexed by slot; grows (moves) only under the exclusive lock.
  size_t n_slots_ = 0;
  std::vector<float, Aligned64Allocator<float>> vecs_;
  std::vector<uint32_t, Aligned64Allocator<uint32_t>> link0_;
  // The vectors and level-0 links: vecs_ and link0_, or the sections of a memory-mapped file
  // (then the index is read-only and mapping_ keeps the map alive).
  float* V_ = nullptr;
  uint32_t* L0_ = nullptr;
  std::shared_ptr<const void> mapping_;
  void check_writable() const;
  std::vector<std::unique_ptr<uint32_t[]>> upper_;  // levels 1..L, null on level 0
  std::vector<uint8_t> level_;
  std::vector<uint8_t> state_;
  std::vector<int64_t> slot_ids_;   // user id, -1 when deleted
  std::vector<uint32_t> next_dup_;  // chain of exact copies (kNone ends it)
  std::vector<float> ext_;          // ip only: squared norms (construction distance)
  float norm_min_sq_ = std::numeric_limits<float>::infinity();  // ip: bounds of the squared
  float norm_max_sq_ = 0.f;                                      // norms added so far
  IdMap ids_;
  std::vector<uint32_t> free_;      // deleted slots, reused from the back
  size_t n_live_ = 0;
  uint64_t n_drawn_ = 0;            // levels drawn so far (the seeded stream's position)
  std::atomic<bool> has_dups_{false};

  // Entry point: (level << 32) | slot, or kNoEntry.
  static constexpr uint64_t kNoEntry = ~uint64_t(0);
  std::atomic<uint64_t> entry_{kNoEntry};
  std::mutex entry_mu_;  // held while inserting a node above the current top level
  std::mutex write_mu_;  // serialises add / remove

  static constexpr size_t kStripes = 1 << 16;
  std::unique_ptr<std::atomic<uint8_t>[]> locks_;
};

}  // namespace pyknn
