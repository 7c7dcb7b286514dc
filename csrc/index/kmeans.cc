#include "index/kmeans.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "common/errors.h"
#include "common/random.h"
#include "common/threadpool.h"
#include "index/exact_search.h"
#include "index/index.h"
#include "simd/dispatch.h"

namespace pyknn {
namespace {

// k-means++ seeding looks at this many candidate points per centroid at most: seeding is
// inherently sequential (one pass per centroid), and beyond this the seeds barely improve.
constexpr size_t kSeedPointsPerCentroid = 8;
// Relative perturbation when an empty cluster takes half of the largest one.
constexpr float kSplitEps = 1.0f / 1024.0f;

void normalize_centroid(float* c, size_t d) {
  double ss = 0.0;
  for (size_t j = 0; j < d; ++j) ss += static_cast<double>(c[j]) * c[j];
  if (ss > 0.0) scale_row(c, d, 1.0 / std::sqrt(ss), c);
}

void copy_rows(const float* x, size_t d, const std::vector<int64_t>& rows, float* out) {
  for (size_t i = 0; i < rows.size(); ++i)
    std::memcpy(out + i * d, x + static_cast<size_t>(rows[i]) * d, d * sizeof(float));
}

std::vector<float> seed_random(const float* x, size_t n, size_t d, size_t k, Rng& rng) {
  std::vector<int64_t> rows = sample_without_replacement(n, k, rng);
  std::vector<float> c(k * d);
  copy_rows(x, d, rows, c.data());
  return c;
}

// D^2 seeding (Arthur & Vassilvitskii 2007) over a seeded pool of candidate points.
std::vector<float> seed_plus_plus(const float* x, size_t n, size_t d, size_t k, Rng& rng) {
  const simd::Kernels& K = simd::kernels();
  const size_t pool_n = std::min(n, std::max(k * kSeedPointsPerCentroid, k));
  std::vector<float> pool_store;
  const float* pool = x;
  if (pool_n < n) {
    std::vector<int64_t> rows = sample_without_replacement(n, pool_n, rng);
    pool_store.resize(pool_n * d);
    copy_rows(x, d, rows, pool_store.data());
    pool = pool_store.data();
  }
  std::vector<float> c(k * d);
  std::vector<float> best(pool_n, std::numeric_limits<float>::infinity());
  std::vector<float> tmp(pool_n);
  size_t pick = rng.below(pool_n);
  const size_t chunk = 4096;
  const size_t nchunks = (pool_n + chunk - 1) / chunk;
  for (size_t ci = 0; ci < k; ++ci) {
    std::memcpy(c.data() + ci * d, pool + pick * d, d * sizeof(float));
    if (ci + 1 == k) break;
    const float* cv = c.data() + ci * d;
    parallel_for(nchunks, [&](size_t t) {
      const size_t a = t * chunk, b = std::min(pool_n, a + chunk);
      K.l2sq_many(cv, pool + a * d, b - a, d, tmp.data() + a);
      for (size_t i = a; i < b; ++i) best[i] = std::min(best[i], tmp[i]);
    });
    double total = 0.0;
    for (size_t i = 0; i < pool_n; ++i) total += best[i];
    if (!(total > 0.0)) {  // every point coincides with a centroid: any point will do
      pick = rng.below(pool_n);
      continue;
    }
    const double r = rng.uniform() * total;
    double acc = 0.0;
    pick = pool_n - 1;
    for (size_t i = 0; i < pool_n; ++i) {
      acc += best[i];
      if (acc > r && best[i] > 0.0f) {
        pick = i;
        break;
      }
    }
  }
  return c;
}

// Recomputes centroids as the mean of their points, summed in double in point order (so the
// result does not depend on the thread count); returns the cluster sizes.
std::vector<size_t> update_centroids(const float* x, size_t n, size_t d, size_t k,
                                     const std::vector<int64_t>& labels, bool spherical,
                                     float* centroids) {
  std::vector<size_t> count(k, 0), start(k + 1, 0);
  for (size_t i = 0; i < n; ++i) {
    if (labels[i] < 0 || static_cast<size_t>(labels[i]) >= k)
      throw Error(ErrorKind::Runtime, "k-means: point " + std::to_string(i) + " was not assigned");
    ++count[static_cast<size_t>(labels[i])];
  }
  for (size_t c = 0; c < k; ++c) start[c + 1] = start[c] + count[c];
  std::vector<size_t> order(n), fill(start.begin(), start.end() - 1);
  for (size_t i = 0; i < n; ++i) order[fill[static_cast<size_t>(labels[i])]++] = i;
  const size_t per_task = 16;
  parallel_for((k + per_task - 1) / per_task, [&](size_t t) {
    std::vector<double> sum(d);
    for (size_t c = t * per_task; c < std::min(k, (t + 1) * per_task); ++c) {
      if (count[c] == 0) continue;
      std::fill(sum.begin(), sum.end(), 0.0);
      for (size_t p = start[c]; p < start[c + 1]; ++p) {
        const float* row = x + order[p] * d;
        for (size_t j = 0; j < d; ++j) sum[j] += row[j];
      }
      float* out = centroids + c * d;
      const double inv = 1.0 / static_cast<double>(count[c]);
      for (size_t j = 0; j < d; ++j) out[j] = static_cast<float>(sum[j] * inv);
      if (spherical) normalize_centroid(out, d);
    }
  });
  return count;
}

// An empty cluster takes over half of the largest one: both get the largest's centroid, nudged
// in opposite directions, so the next assignment splits its points.
void split_empty(std::vector<size_t>& count, size_t d, bool spherical, float* centroids) {
  const size_t k = count.size();
  for (size_t c = 0; c < k; ++c) {
    if (count[c] != 0) continue;
    size_t big = 0;
    for (size_t j = 1; j < k; ++j)
      if (count[j] > count[big]) big = j;
    if (count[big] < 2) return;  // nothing left to split
    float* dst = centroids + c * d;
    float* src = centroids + big * d;
    for (size_t j = 0; j < d; ++j) {
      const float v = src[j];
      const float up = v * (1.0f + kSplitEps), down = v * (1.0f - kSplitEps);
      dst[j] = (j % 2 == 0) ? up : down;
      src[j] = (j % 2 == 0) ? down : up;
    }
    if (spherical) {
      normalize_centroid(dst, d);
      normalize_centroid(src, d);
    }
    count[c] = count[big] / 2;
    count[big] -= count[c];
  }
}

// kmeans_assign computes scores directly up to this dimension (see nearest_small).
constexpr size_t kSmallDim = 16;
constexpr size_t kSmallMaxK = size_t(1) << 16;

}  // namespace

void kmeans_assign(const float* x, size_t n, size_t d, const float* centroids, size_t k,
                   bool inner_product, int64_t* labels, float* scores, const float* x_norms) {
  if (d <= kSmallDim && k >= 1 && k <= kSmallMaxK) {
    // Small dimension (product-quantizer sub-spaces): scores computed directly, exactly, in
    // chunks of points over the threads.
    const simd::Kernels& K = simd::kernels();
    const size_t w = static_cast<size_t>(K.nr) / 2, kp = (k + w - 1) / w * w;
    std::vector<float> ct(d * kp, 0.f), init(kp, 0.f);
    for (size_t c = 0; c < k; ++c)
      for (size_t j = 0; j < d; ++j) ct[j * kp + c] = centroids[c * d + j];
    const float pad = inner_product ? -std::numeric_limits<float>::infinity()
                                    : std::numeric_limits<float>::infinity();
    for (size_t c = k; c < kp; ++c) init[c] = pad;
    constexpr size_t kChunk = 1024;
    parallel_for((n + kChunk - 1) / kChunk, [&](size_t t) {
      const size_t i0 = t * kChunk, m = std::min(kChunk, n - i0);
      K.nearest_small(x + i0 * d, m, d, ct.data(), init.data(), kp, inner_product, labels + i0,
                      scores + i0);
    });
    return;
  }
  ExactSearchInput in;
  in.x = centroids;
  in.n = k;
  in.d = d;
  in.l2 = !inner_product;
  in.query_norms = x_norms;
  exact_knn(in, x, n, 1, scores, labels);
  if (!inner_product)
    for (size_t i = 0; i < n; ++i) scores[i] = -scores[i];
}

KMeansResult kmeans_fit(const float* x, size_t n, size_t d, const KMeansParams& p) {
  const size_t k = p.n_clusters;
  if (k < 1) throw_value("n_clusters must be at least 1, got 0");
  if (d < 1) throw_value("k-means needs vectors of at least 1 dimension, got 0");
  if (n < k)
    throw_value("k-means needs at least as many points as clusters: got " + std::to_string(n) +
                " points for " + std::to_string(k) + " clusters");
  check_finite(x, n, d, "training vectors");
  Rng rng(p.seed);

  KMeansResult res;
  std::vector<float> sample_store;
  const float* xs = x;
  size_t m = n;
  if (p.max_points_per_centroid > 0 && n / k > p.max_points_per_centroid) {
    m = k * p.max_points_per_centroid;
    std::vector<int64_t> rows = sample_without_replacement(n, m, rng);
    sample_store.resize(m * d);
    copy_rows(x, d, rows, sample_store.data());
    xs = sample_store.data();
  }
  res.n_train = m;

  res.centroids = p.kmeans_plus_plus ? seed_plus_plus(xs, m, d, k, rng) : seed_random(xs, m, d, k, rng);
  if (p.spherical)
    for (size_t c = 0; c < k; ++c) normalize_centroid(res.centroids.data() + c * d, d);

  std::vector<int64_t> labels(m), previous;
  std::vector<float> scores(m), norms;
  if (!p.spherical) {  // the points do not change between iterations: their norms neither
    norms.resize(m);
    simd::kernels().norms_sq(xs, m, d, norms.data());
  }
  auto assign = [&] {
    kmeans_assign(xs, m, d, res.centroids.data(), k, p.spherical, labels.data(), scores.data(),
                  p.spherical ? nullptr : norms.data());
  };
  assign();
  int it = 0;
  for (; it < p.n_iter; ++it) {
    std::vector<size_t> count =
        update_centroids(xs, m, d, k, labels, p.spherical, res.centroids.data());
    split_empty(count, d, p.spherical, res.centroids.data());
    previous.swap(labels);
    labels.resize(m);
    assign();
    if (labels == previous) {
      ++it;
      break;
    }
  }
  res.n_iter = it;

  // Inertia against the final centroids (for spherical, from the inner products).
  double inertia = 0.0;
  if (p.spherical) {
    const simd::Kernels& K = simd::kernels();
    for (size_t i = 0; i < m; ++i) {
      const float xn = K.dot(xs + i * d, xs + i * d, d);
      const float* c = res.centroids.data() + static_cast<size_t>(labels[i]) * d;
      inertia += std::max(0.0f, xn + K.dot(c, c, d) - 2.0f * scores[i]);
    }
  } else {
    for (size_t i = 0; i < m; ++i) inertia += scores[i];
  }
  res.inertia = inertia;
  return res;
}

}  // namespace pyknn
