// IVFPQIndex: an inverted file whose cells store product-quantizer codes instead of vectors
// (IVFADC, Jegou et al. 2011). A search probes the nprobe nearest cells and scores every code by
// asymmetric distance computation (ADC): the query stays exact, one lookup table per query (and
// per cell for L2 residuals) gives each sub-quantizer's contribution, and a code's score is the
// sum of pq_m table entries.
//
// nbits = 8: codes are stored one byte per sub-quantizer, n x pq_m per cell, scanned with float
// tables (kernel pq8_scan).
// nbits = 4 ("fast scan"): codes are stored interleaved in blocks of 32 vectors (see
// Kernels::pq4_scan); the tables are quantised to uint8 and looked up with byte shuffles, sums in
// uint16. Each list's sums are screened in uint16 against the threshold of a heap of the best
// candidates by quantised score (Kernels::select_ge_u16), so most codes cost no scalar work.
// Without re-ranking that heap holds 2k, re-scored with the float tables once the probes are
// done (the best k by float score are kept); with re-ranking it holds max(k, rerank), which go
// to the exact re-ranking directly.
//
// Scores (larger is better inside; L2 distances are negated):
//   ip / cosine, by_residual:  <q, c_l> + sum_m <q_m, r_m[code_m]>     (coarse score + table)
//   l2, by_residual:           ||q - c_l||^2 + sum_m (T2[l][m][code_m] - 2 <q_m, r_m[code_m]>)
//                              with T2[l][m][j] = ||r_mj||^2 + 2 <c_lm, r_mj> precomputed at
//                              training (FAISS's term1 + term2 + term3 decomposition)
//   without residuals:         sum_m <q_m, c_m[code]>  or  sum_m ||q_m - c_m[code]||^2
// The per-query tables <q_m, c_mj> are pq_m small matrix products (Kernels::gemm).
//
// Re-ranking: with rerank_storage float32 / float16 the full vectors are kept beside the codes;
// search(..., rerank = R) takes the best max(k, R) by ADC and re-scores them exactly.
//
// PQIndex is this class with one cell, a zero coarse centroid and no residuals (single_list):
// every search scans all codes.
#pragma once
#include <atomic>
#include <vector>

#include "index/exact_search.h"
#include "index/index.h"
#include "index/pq.h"

namespace pyknn {

enum class RerankStorage : uint32_t { None = 0, Float32 = 1, Float16 = 2 };

class IVFPQIndex : public Index {
 public:
  IVFPQIndex(size_t dim, Metric metric, size_t nlist, size_t pq_m, size_t nbits, bool by_residual,
             RerankStorage rerank, size_t nprobe, bool single_list);

  IndexKind kind() const override { return single_ ? IndexKind::PQ : IndexKind::IVFPQ; }
  size_t nlist() const { return nlist_; }
  size_t pq_m() const { return pq_.pq_m(); }
  size_t nbits() const { return pq_.nbits(); }
  bool by_residual() const { return by_residual_; }
  RerankStorage rerank_storage() const { return rerank_; }
  // Bytes of one vector's code: pq_m * nbits / 8.
  size_t code_size() const { return pq_.code_size(); }
  size_t nprobe() const { return nprobe_.load(); }
  void set_nprobe(size_t nprobe);
  bool is_trained() const;

  // Coarse k-means (n_iter) on x, then the product quantizer (pq_n_iter) on the residuals.
  void train(const float* x, size_t n, int n_iter, int pq_n_iter, uint64_t seed,
             bool kmeans_plus_plus);
  void add(const float* x, size_t n, const int64_t* ids);
  // rerank: 0 = return ADC scores; R > 0 = re-score the best max(k, R) exactly (needs stored
  // vectors).
  void search(const float* q, size_t nq, size_t k, size_t nprobe, size_t rerank,
              const Filter& filter, float* distances, int64_t* ids) const;
  // The stored full vectors (needs rerank storage; float16 ones converted back).
  void get(const int64_t* ids, size_t n, float* out) const;
  // Decoded codes (coarse centroid + decoded residual): what ADC scores against.
  void reconstruct(const int64_t* ids, size_t n, float* out) const;
  // Packed codes (code_size bytes per vector, ProductQuantizer::pack_codes layout).
  void codes(const int64_t* ids, size_t n, uint8_t* out) const;
  size_t remove(const int64_t* ids, size_t n, bool missing_ok);
  bool contains(int64_t id) const;
  std::vector<int64_t> ids() const;
  std::vector<size_t> list_sizes() const;
  std::vector<float> centroids() const;
  std::vector<float> pq_centroids() const;

  static std::unique_ptr<IVFPQIndex> read_body(Reader& r, const FileHeader& h, bool single_list);

 protected:
  size_t count() const override { return ntotal_; }
  size_t bytes_used() const override;
  void write_body(Writer& w) const override;

 private:
  struct List {
    std::vector<uint8_t> codes;   // 8-bit: n x pq_m; 4-bit: ceil(n / 32) blocks of pq_m x 16
    std::vector<int64_t> ids;
    std::vector<float> xf;        // rerank float32: n x dim
    std::vector<uint16_t> xh;     // rerank float16: n x dim
  };
  static int64_t encode_loc(size_t list, size_t offset) {
    return static_cast<int64_t>((static_cast<uint64_t>(list) << 40) | offset);
  }
  static size_t list_of(int64_t loc) { return static_cast<size_t>(static_cast<uint64_t>(loc) >> 40); }
  static size_t offset_of(int64_t loc) {
    return static_cast<size_t>(static_cast<uint64_t>(loc) & ((uint64_t(1) << 40) - 1));
  }
  bool coarse_ip() const { return metric_ != Metric::L2; }
  bool l2_residual() const { return metric_ == Metric::L2 && by_residual_; }
  size_t code_bytes(size_t n) const;
  void put_code(List& L, size_t off, const uint8_t* code) const;
  void read_code(const List& L, size_t off, uint8_t* code) const;
  void require_trained(const char* what) const;
  void compute_term2();
  // The per-query part of the tables from the inner products ip (pq_m x ksub): ip itself (ip),
  // 2 ip (l2 residual, T2 subtracted per list) or -||q_m - c_mj||^2 (l2).
  void base_table(const float* ip, const float* qv, float* out) const;
  float exact_score(const simd::Kernels& K, const float* qv, size_t l, size_t off,
                    float* tmp) const;
  void decode_one(size_t l, size_t off, float* out) const;

  size_t nlist_;
  ProductQuantizer pq_;
  bool by_residual_;
  RerankStorage rerank_;
  bool single_;
  std::atomic<size_t> nprobe_;
  std::vector<float> centroids_;  // nlist x dim once trained
  std::vector<float> term2_;      // l2 residual: nlist x pq_m x ksub
  std::vector<List> lists_;
  IdMap ids_;
  size_t ntotal_ = 0;
  uint64_t generation_ = 0;
};

}  // namespace pyknn
