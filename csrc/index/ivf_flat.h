// IVFFlatIndex: k-means partitions the space into nlist cells; a search scans the nprobe cells
// whose centroids are nearest to the query, with full-precision vectors stored per cell.
#pragma once
#include <atomic>
#include <vector>

#include "common/aligned.h"
#include "index/exact_search.h"
#include "index/index.h"

namespace pyknn {

class IVFFlatIndex : public Index {
 public:
  IVFFlatIndex(size_t dim, Metric metric, size_t nlist, size_t nprobe = 8);

  IndexKind kind() const override { return IndexKind::IVFFlat; }
  size_t nlist() const { return nlist_; }
  // Default number of cells a search scans (saved with the index).
  size_t nprobe() const { return nprobe_.load(); }
  void set_nprobe(size_t nprobe);
  bool is_trained() const;

  // k-means on x (n >= nlist), seeded with k-means++ or random points; only while the index
  // holds no vectors.
  void train(const float* x, size_t n, int n_iter, uint64_t seed, bool kmeans_plus_plus);
  void add(const float* x, size_t n, const int64_t* ids);
  void search(const float* q, size_t nq, size_t k, size_t nprobe, const Filter& filter,
              float* distances, int64_t* ids) const;
  void get(const int64_t* ids, size_t n, float* out) const;
  size_t remove(const int64_t* ids, size_t n, bool missing_ok);
  bool contains(int64_t id) const;
  // Stored ids, list by list (the order a boolean filter refers to).
  std::vector<int64_t> ids() const;
  std::vector<size_t> list_sizes() const;
  std::vector<float> centroids() const;

  static std::unique_ptr<IVFFlatIndex> read_body(Reader& r, const FileHeader& h);

 protected:
  size_t count() const override { return ntotal_; }
  size_t bytes_used() const override;
  void write_body(Writer& w) const override;

 private:
  struct List {
    std::vector<float> x;       // row-major vectors of this cell
    std::vector<int64_t> ids;   // their user ids
  };
  // A stored vector's location: its list in the high bits, its offset in the low 40.
  static int64_t encode(size_t list, size_t offset) {
    return static_cast<int64_t>((static_cast<uint64_t>(list) << 40) | offset);
  }
  static size_t list_of(int64_t loc) { return static_cast<size_t>(static_cast<uint64_t>(loc) >> 40); }
  static size_t offset_of(int64_t loc) {
    return static_cast<size_t>(static_cast<uint64_t>(loc) & ((uint64_t(1) << 40) - 1));
  }
  bool coarse_ip() const { return metric_ != Metric::L2; }
  // Per-thread buffers of the grouped batch scan.
  struct GroupScratch {
    std::vector<float> a, xn, t, tile, s;
    std::vector<uint32_t> idx;
    AlignedFloats packed;
  };
  // One query against list l (dot_many / l2sq_many).
  void scan_list_one(const simd::Kernels& K, const ScoreScan& scan, TopK& h, const float* qv,
                     size_t l, const uint8_t* lmask, float* s, uint32_t* idx) const;
  // All nqs queries qids that probe list l, as matrix products with the packed list.
  void scan_list_group(const simd::Kernels& K, const ScoreScan& scan, std::vector<TopK>& heaps,
                       const float* queries, const float* qn, const uint32_t* qids, size_t nqs,
                       size_t l, const uint8_t* lmask, GroupScratch& g) const;
  void require_trained(const char* what) const;

  size_t nlist_;
  std::atomic<size_t> nprobe_;
  std::vector<float> centroids_;  // nlist x dim once trained, else empty
  std::vector<List> lists_;
  IdMap ids_;                     // user id -> encoded location
  size_t ntotal_ = 0;
  uint64_t generation_ = 0;       // incremented by every train()
};

}  // namespace pyknn
