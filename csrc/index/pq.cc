#include "index/pq.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "common/aligned.h"
#include "common/errors.h"
#include "common/random.h"
#include "common/threadpool.h"
#include "index/index.h"
#include "index/kmeans.h"

namespace pyknn {

void check_pq_params(size_t dim, size_t pq_m, size_t nbits) {
  if (nbits != 4 && nbits != 8)
    throw_value("nbits " + std::to_string(nbits) + " is not supported (supported: 4, 8)");
  if (pq_m < 1 || dim % pq_m != 0) {
    std::string valid;
    for (size_t m = 1; m <= dim; ++m)
      if (dim % m == 0) valid += (valid.empty() ? "" : ", ") + std::to_string(m);
    throw_value("dim " + std::to_string(dim) + " is not divisible by pq_m " +
                std::to_string(pq_m) + " (valid pq_m for dim " + std::to_string(dim) + ": " +
                valid + ")");
  }
}

ProductQuantizer::ProductQuantizer(size_t dim, size_t pq_m, size_t nbits)
    : dim_(dim), M_(pq_m), nbits_(nbits) {
  if (dim == 0) throw_value("dim must be at least 1, got 0");
  check_pq_params(dim, pq_m, nbits);
  dsub_ = dim / pq_m;
  ksub_ = size_t(1) << nbits;
}

void ProductQuantizer::train(const float* x, size_t n, int n_iter, uint64_t seed) {
  if (n < ksub_)
    throw_value("training a product quantizer with nbits " + std::to_string(nbits_) + " needs at "
                "least 2**nbits = " + std::to_string(ksub_) + " points, got " + std::to_string(n));
  check_finite(x, n, dim_, "training vectors");
  // k-means would subsample each sub-space to 256 points per centroid anyway: do it once, so
  // that the sub-space copies stay small.
  Rng rng(seed);
  std::vector<int64_t> rows;
  const size_t cap = 256 * ksub_;
  if (n > cap) rows = sample_without_replacement(n, cap, rng);
  const size_t m = rows.empty() ? n : rows.size();
  std::vector<float> sub(m * dsub_), cent(M_ * ksub_ * dsub_);
  for (size_t s = 0; s < M_; ++s) {
    for (size_t i = 0; i < m; ++i) {
      const size_t r = rows.empty() ? i : static_cast<size_t>(rows[i]);
      std::memcpy(sub.data() + i * dsub_, x + r * dim_ + s * dsub_, dsub_ * sizeof(float));
    }
    KMeansParams p;
    p.n_clusters = ksub_;
    p.n_iter = n_iter;
    p.seed = seed + s;
    p.kmeans_plus_plus = false;
    p.spherical = false;
    KMeansResult res = kmeans_fit(sub.data(), m, dsub_, p);
    std::copy(res.centroids.begin(), res.centroids.end(), cent.begin() + s * ksub_ * dsub_);
  }
  set_centroids(std::move(cent));
}

void ProductQuantizer::set_centroids(std::vector<float> c) {
  if (c.size() != M_ * ksub_ * dsub_)
    throw_value("product quantizer centroids: expected " + std::to_string(M_ * ksub_ * dsub_) +
                " values, got " + std::to_string(c.size()));
  centroids_ = std::move(c);
  cnorms_.resize(M_ * ksub_);
  for (size_t i = 0; i < M_ * ksub_; ++i) {
    double s = 0;
    for (size_t j = 0; j < dsub_; ++j) s += double(centroids_[i * dsub_ + j]) * centroids_[i * dsub_ + j];
    cnorms_[i] = static_cast<float>(s);
  }
}

void ProductQuantizer::encode(const float* x, size_t n, uint8_t* codes) const {
  if (centroids_.empty())
    throw Error(ErrorKind::Runtime, "ProductQuantizer is not trained: call train() first");
  // Blocks of rows, each sub-space assigned with the blocked exact search (a matrix product
  // against the ksub centroids).
  const size_t bs = 8192;
  std::vector<float> sub, scores;
  std::vector<int64_t> labels;
  for (size_t i0 = 0; i0 < n; i0 += bs) {
    const size_t nb = std::min(bs, n - i0);
    sub.resize(nb * dsub_);
    scores.resize(nb);
    labels.resize(nb);
    for (size_t s = 0; s < M_; ++s) {
      for (size_t i = 0; i < nb; ++i)
        std::memcpy(sub.data() + i * dsub_, x + (i0 + i) * dim_ + s * dsub_, dsub_ * sizeof(float));
      kmeans_assign(sub.data(), nb, dsub_, centroids_.data() + s * ksub_ * dsub_, ksub_, false,
                    labels.data(), scores.data());
      for (size_t i = 0; i < nb; ++i)
        codes[(i0 + i) * M_ + s] = static_cast<uint8_t>(labels[i] < 0 ? 0 : labels[i]);
    }
  }
}

void ProductQuantizer::decode(const uint8_t* codes, size_t n, float* x) const {
  if (centroids_.empty())
    throw Error(ErrorKind::Runtime, "ProductQuantizer is not trained: call train() first");
  for (size_t i = 0; i < n; ++i)
    for (size_t s = 0; s < M_; ++s) {
      const size_t c = codes[i * M_ + s];
      if (c >= ksub_)
        throw_value("code " + std::to_string(c) + " of vector " + std::to_string(i) +
                    " is out of range for nbits " + std::to_string(nbits_));
      std::memcpy(x + i * dim_ + s * dsub_, centroids_.data() + (s * ksub_ + c) * dsub_,
                  dsub_ * sizeof(float));
    }
}

void ProductQuantizer::pack_codes(const uint8_t* u, size_t n, uint8_t* p) const {
  if (nbits_ == 8) {
    std::memcpy(p, u, n * M_);
    return;
  }
  const size_t cs = code_size();
  for (size_t i = 0; i < n; ++i) {
    uint8_t* out = p + i * cs;
    std::memset(out, 0, cs);
    for (size_t s = 0; s < M_; ++s) out[s / 2] |= static_cast<uint8_t>((u[i * M_ + s] & 15) << (4 * (s & 1)));
  }
}

void ProductQuantizer::unpack_codes(const uint8_t* p, size_t n, uint8_t* u) const {
  if (nbits_ == 8) {
    std::memcpy(u, p, n * M_);
    return;
  }
  const size_t cs = code_size();
  for (size_t i = 0; i < n; ++i)
    for (size_t s = 0; s < M_; ++s) u[i * M_ + s] = (p[i * cs + s / 2] >> (4 * (s & 1))) & 15;
}

void ProductQuantizer::inner_product_tables(const simd::Kernels& K, const float* q, size_t nq,
                                            float* ip) const {
  const size_t nr = static_cast<size_t>(K.nr);
  const size_t ldo = simd::round_up(ksub_, nr);
  AlignedFloats packed(simd::packed_size(K, ksub_, dsub_));
  const size_t qt = 64;
  std::vector<float> tile(qt * ldo);
  for (size_t s = 0; s < M_; ++s) {
    K.pack(centroids_.data() + s * ksub_ * dsub_, ksub_, dsub_, packed.data());
    for (size_t q0 = 0; q0 < nq; q0 += qt) {
      const size_t mq = std::min(qt, nq - q0);
      K.gemm(q + q0 * dim_ + s * dsub_, dim_, mq, packed.data(), ksub_, dsub_, tile.data(), ldo);
      for (size_t i = 0; i < mq; ++i)
        std::memcpy(ip + ((q0 + i) * M_ + s) * ksub_, tile.data() + i * ldo, ksub_ * sizeof(float));
    }
  }
}

}  // namespace pyknn
