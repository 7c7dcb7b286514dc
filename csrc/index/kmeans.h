// Lloyd's k-means with k-means++ or random seeding; the coarse quantiser of the IVF indexes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace pyknn {

struct KMeansParams {
  size_t n_clusters = 0;
  int n_iter = 25;
  uint64_t seed = 0;
  bool kmeans_plus_plus = true;
  size_t max_points_per_centroid = 256;
  bool spherical = false;  // unit-norm centroids, assignment by inner product
};

struct KMeansResult {
  std::vector<float> centroids;  // n_clusters x d
  double inertia = 0.0;          // sum of squared distances of the training points to their centroid
  int n_iter = 0;                // Lloyd iterations run (fewer than asked when assignments settle)
  size_t n_train = 0;            // points used (after subsampling)
};

// Deterministic for a given seed at any thread count: assignment ties go to the smaller centroid
// and each centroid is summed in a fixed order.
KMeansResult kmeans_fit(const float* x, size_t n, size_t d, const KMeansParams& p);

// Nearest centroid of each point: labels[i] and its squared distance (or, with `inner_product`,
// the largest inner product).
// x_norms: optional squared norms of the points (saves a pass over x per call when assigning
// the same points repeatedly).
void kmeans_assign(const float* x, size_t n, size_t d, const float* centroids, size_t k,
                   bool inner_product, int64_t* labels, float* scores,
                   const float* x_norms = nullptr);

}  // namespace pyknn
