// Bindings of k-means: fit and assignment.
#include "index/index.h"
#include "index/kmeans.h"
#include "python/common.h"

namespace pyknn {

void bind_kmeans(py::module_& m) {
  m.def("kmeans_fit",
        [](FloatArray x, size_t n_clusters, int n_iter, uint64_t seed, bool plus_plus,
           size_t max_points_per_centroid, bool spherical) {
          if (x.ndim() != 2) throw_value("training vectors must be a 2-D array");
          size_t n = static_cast<size_t>(x.shape(0)), d = static_cast<size_t>(x.shape(1));
          KMeansParams p;
          p.n_clusters = n_clusters;
          p.n_iter = n_iter;
          p.seed = seed;
          p.kmeans_plus_plus = plus_plus;
          p.max_points_per_centroid = max_points_per_centroid;
          p.spherical = spherical;
          KMeansResult r;
          {
            py::gil_scoped_release nogil;
            r = kmeans_fit(x.data(), n, d, p);
          }
          py::array_t<float> c({n_clusters, d});
          std::copy(r.centroids.begin(), r.centroids.end(), c.mutable_data());
          return py::make_tuple(c, r.inertia, r.n_iter);
        });
  m.def("kmeans_assign", [](FloatArray x, FloatArray centroids, bool inner_product) {
    size_t d = static_cast<size_t>(centroids.shape(1)), k = static_cast<size_t>(centroids.shape(0));
    size_t n = rows_checked(x, d, "vectors");
    py::array_t<int64_t> labels(n);
    py::array_t<float> scores(n);
    int64_t* lp = labels.mutable_data();
    float* sp = scores.mutable_data();
    {
      py::gil_scoped_release nogil;
      check_finite(x.data(), n, d, "vectors");
      kmeans_assign(x.data(), n, d, centroids.data(), k, inner_product, lp, sp);
    }
    return py::make_tuple(labels, scores);
  });
}

}  // namespace pyknn
