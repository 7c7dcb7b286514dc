"""pyknn.KMeans against faiss.Kmeans on the same data, k, iterations and threads, in one run.

Reports wall time and the final objective (sum of squared distances of the training points to
their nearest final centroid, computed the same way for both), best of --repeats runs each,
interleaved so machine noise hits both alike.

    python benchmarks/kmeans_compare.py --k 1024 --iterations 25 --threads 2
"""
import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

import pyknn
from pyknn import bench, datasets

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/wordnet-minilm"


def objective(x, centroids):
    """Sum over points of the squared distance to the nearest centroid (exact search, float32)."""
    index = pyknn.FlatIndex(x.shape[1], "l2")
    index.add(centroids)
    return float(index.search(x, 1)[0].astype(np.float64).sum())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--iterations", type=int, default=25)
    p.add_argument("--threads", type=int, default=bench.default_threads())
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    import faiss
    x = datasets.load(args.data).base_f32()
    pyknn.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    runs = {"pyknn KMeans (k-means++)": [], "pyknn KMeans (random)": [], "faiss Kmeans": []}
    cents = {}
    for _ in range(args.repeats):
        for name in runs:
            t0 = time.perf_counter()
            if name.startswith("faiss"):
                km = faiss.Kmeans(x.shape[1], args.k, niter=args.iterations, seed=args.seed,
                                  max_points_per_centroid=256)
                km.train(x)
                c = km.centroids
            else:
                init = "random" if "random" in name else "k-means++"
                c = pyknn.KMeans(args.k, n_iter=args.iterations, seed=args.seed, init=init).fit(x).centroids
            runs[name].append(time.perf_counter() - t0)
            cents[name] = c
    print(f"command: python {shlex.join(['benchmarks/kmeans_compare.py'] + (argv or sys.argv[1:]))}")
    print(f"data: {x.shape[0]} x {x.shape[1]}, k={args.k}, iterations={args.iterations}, "
          f"threads={args.threads}, CPU {bench.cpu_model()}, pyknn SIMD {pyknn.simd_level()}")
    ref = min(runs["faiss Kmeans"])
    ref_obj = objective(x, cents["faiss Kmeans"])
    print(f"{'':28} {'best s':>8} {'vs faiss':>9} {'objective':>12} {'vs faiss':>9}")
    for name, times in runs.items():
        obj = objective(x, cents[name])
        print(f"{name:28} {min(times):8.2f} {min(times) / ref:8.2f}x {obj:12.1f} "
              f"{(obj / ref_obj - 1) * 100:+8.2f}%")


if __name__ == "__main__":
    main()
