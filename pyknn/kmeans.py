"""k-means clustering on the C++ kernels."""
import warnings

import numpy as np

from . import _core
from ._validation import as_matrix, check_positive_int

__all__ = ["KMeans"]

# Below this many training points per centroid, centroids are poorly estimated (FAISS warns at
# the same ratio).
_MIN_POINTS_PER_CENTROID = 39


class KMeans:
    """Lloyd's k-means with k-means++ or random seeding.

    Parameters
    ----------
    n_clusters : int
        Number of centroids (k).
    n_iter : int
        Maximum number of Lloyd iterations (assign, then update); stops early once no point
        changes cluster.
    seed : int
        Seed for subsampling and seeding. The same seed gives bitwise-identical centroids at any
        thread count.
    init : "k-means++" | "random"
        "k-means++": D^2 seeding (Arthur & Vassilvitskii), run on a seeded pool of at most
        8 * n_clusters training points. "random": n_clusters distinct training points.
    max_points_per_centroid : int
        Training sets larger than n_clusters * max_points_per_centroid are subsampled (seeded)
        to that size, as FAISS does; 0 disables subsampling.
    spherical : bool
        Keep centroids at unit norm and assign by largest inner product (for "ip"/"cosine" data).

    Attributes (after :meth:`fit`)
    ----------
    centroids : float32 array (n_clusters, dim)
    inertia_ : float
        Sum of squared L2 distances of the training points to their assigned centroid.
    n_iter_ : int
        Lloyd iterations run.
    """

    def __init__(self, n_clusters, n_iter=25, seed=0, init="k-means++",
                 max_points_per_centroid=256, spherical=False):
        self.n_clusters = check_positive_int(n_clusters, "n_clusters", maximum=(1 << 31) - 1)
        self.n_iter = check_positive_int(n_iter, "n_iter", minimum=0, maximum=(1 << 31) - 1)
        self.seed = check_positive_int(seed, "seed", minimum=0, maximum=(1 << 64) - 1)
        if init not in ("k-means++", "random"):
            raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
        self.init = init
        self.max_points_per_centroid = check_positive_int(
            max_points_per_centroid, "max_points_per_centroid", minimum=0, maximum=(1 << 62))
        self.spherical = bool(spherical)
        self.centroids = None
        self.inertia_ = None
        self.n_iter_ = None

    def __repr__(self):
        return (f"KMeans(n_clusters={self.n_clusters}, n_iter={self.n_iter}, seed={self.seed}, "
                f"init={self.init!r}, spherical={self.spherical})")

    def fit(self, x):
        """Train on x (n, dim); returns self.

        Raises ValueError when n < n_clusters (naming both) or a row holds NaN/Inf; warns when there
        are fewer than 39 points per cluster.
        """
        x = np.asarray(x) if not isinstance(x, np.ndarray) else x
        if x.ndim != 2 or x.shape[1] < 1:
            raise ValueError(f"training vectors must be a 2-D (n, dim) array with dim >= 1, got "
                             f"shape {x.shape}")
        x = as_matrix(x, x.shape[1], "training vectors")
        n = x.shape[0]
        if n < self.n_clusters:
            raise ValueError(f"k-means needs at least as many points as clusters: got {n} points "
                             f"for {self.n_clusters} clusters")
        if n < _MIN_POINTS_PER_CENTROID * self.n_clusters:
            warnings.warn(f"{n} training points for {self.n_clusters} clusters "
                          f"({n / self.n_clusters:.1f} per cluster): consider at least "
                          f"{_MIN_POINTS_PER_CENTROID * self.n_clusters} points", stacklevel=2)
        centroids, inertia, n_iter = _core.kmeans_fit(
            x, self.n_clusters, self.n_iter, self.seed, self.init == "k-means++",
            self.max_points_per_centroid, self.spherical)
        self.centroids, self.inertia_, self.n_iter_ = centroids, float(inertia), int(n_iter)
        return self

    def predict(self, x):
        """Index of the nearest centroid of each row of x (int64 array of n)."""
        if self.centroids is None:
            raise RuntimeError("KMeans is not fitted: call fit(x) first")
        x = as_matrix(x, self.centroids.shape[1], "vectors")
        labels, _ = _core.kmeans_assign(x, self.centroids, self.spherical)
        return labels
