// ProductQuantizer: the vector is cut into pq_m sub-vectors of dsub = dim / pq_m dimensions, and
// each sub-vector is replaced by the index of its nearest of ksub = 2^nbits centroids, learnt by
// one k-means per sub-space (Jegou, Douze, Schmid, "Product quantization for nearest neighbor
// search", 2011).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "simd/dispatch.h"

namespace pyknn {

// Throws ValueError unless (dim, pq_m, nbits) is usable: pq_m divides dim (the message lists
// the valid pq_m values), nbits is 4 or 8.
void check_pq_params(size_t dim, size_t pq_m, size_t nbits);

class ProductQuantizer {
 public:
  ProductQuantizer(size_t dim, size_t pq_m, size_t nbits);

  size_t dim() const { return dim_; }
  size_t pq_m() const { return M_; }
  size_t nbits() const { return nbits_; }
  size_t dsub() const { return dsub_; }
  size_t ksub() const { return ksub_; }
  // Bytes of one packed code: ceil(pq_m * nbits / 8).
  size_t code_size() const { return (M_ * nbits_ + 7) / 8; }
  bool is_trained() const { return !centroids_.empty(); }

  // One k-means (L2) per sub-space on x (n x dim, n >= ksub).
  void train(const float* x, size_t n, int n_iter, uint64_t seed);
  // Replaces the centroids (pq_m x ksub x dsub), e.g. after loading.
  void set_centroids(std::vector<float> c);
  const std::vector<float>& centroids() const { return centroids_; }

  // codes: n x pq_m, one sub-quantizer index per byte (the unpacked form used inside indexes).
  void encode(const float* x, size_t n, uint8_t* codes) const;
  // x: n x dim from n x pq_m unpacked codes.
  void decode(const uint8_t* codes, size_t n, float* x) const;
  // Packed form (code_size bytes per vector): nbits = 8 one byte per sub-quantizer; nbits = 4
  // two per byte, sub-quantizer 2j in the low nibble and 2j + 1 in the high one (as FAISS).
  void pack_codes(const uint8_t* unpacked, size_t n, uint8_t* packed) const;
  void unpack_codes(const uint8_t* packed, size_t n, uint8_t* unpacked) const;

  // ip[q][m][j] = <q_m, c_mj> for nq queries (nq x dim): pq_m small matrix products.
  void inner_product_tables(const simd::Kernels& K, const float* q, size_t nq, float* ip) const;
  // Squared norms of the centroids, pq_m x ksub.
  const std::vector<float>& centroid_norms() const { return cnorms_; }

 private:
  size_t dim_, M_, nbits_, dsub_, ksub_;
  std::vector<float> centroids_;  // pq_m x ksub x dsub
  std::vector<float> cnorms_;     // pq_m x ksub
};

}  // namespace pyknn
