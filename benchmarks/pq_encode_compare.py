"""Encoding throughput of pyknn's IVFPQIndex against faiss IndexIVFPQ / IndexIVFPQFastScan.

Both are trained with the same parameters on the same data; what is timed is ``add`` of the whole
base set (coarse assignment, residuals, product-quantizer encoding, storage), best of --repeats
calls on a fresh copy of the trained index each time.

    OPENBLAS_NUM_THREADS=1 python benchmarks/pq_encode_compare.py --threads 2
"""
import argparse
import copy
import time
from pathlib import Path

import numpy as np

import pyknn
from pyknn import bench

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/wordnet-minilm"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import faiss
    base = np.ascontiguousarray(np.load(Path(args.data) / "base.f16.npy").astype(np.float32))
    n, dim = base.shape
    nlist = bench.auto_nlist(n)
    pyknn.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    print(f"n={n} dim={dim} nlist={nlist} threads={args.threads} metric=ip")
    for nbits in (8, 4):
        pq_m = bench.auto_pq_m(dim, nbits)
        ours = pyknn.IVFPQIndex(dim, nlist=nlist, pq_m=pq_m, nbits=nbits, metric="ip")
        ours.train(base, n_iter=bench.IVF_TRAIN_ITERATIONS)
        quantizer = faiss.IndexFlatIP(dim)
        if nbits == 4:
            theirs = faiss.IndexIVFPQFastScan(quantizer, dim, nlist, pq_m, 4,
                                              faiss.METRIC_INNER_PRODUCT)
        else:
            theirs = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, nbits, faiss.METRIC_INNER_PRODUCT)
        theirs.cp.niter = bench.IVF_TRAIN_ITERATIONS
        theirs.train(base)
        t_ours, t_theirs = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            fresh = copy.deepcopy(ours)
            t0 = time.perf_counter()
            fresh.add(base)
            t_ours.append(time.perf_counter() - t0)
            theirs.reset()
            t0 = time.perf_counter()
            theirs.add(base)
            t_theirs.append(time.perf_counter() - t0)
        a, b = n / min(t_ours), n / min(t_theirs)
        print(f"nbits={nbits} pq_m={pq_m}: pyknn {a:,.0f} vectors/s, faiss "
              f"{type(theirs).__name__} {b:,.0f} vectors/s, ratio {a / b:.2f}x")


if __name__ == "__main__":
    main()
