"""Matryoshka two-stage search on real MiniLM vectors: recall@10, QPS and bytes per vector.

For each search_dim, a MatryoshkaIndex (first stage over the re-normalised prefix, shortlist of
``--rerank`` re-scored with the full 384-d vectors) is built on the full wordnet-minilm base set
and searched with the queries in one batch. Recall@10 is against exact full-dimension search
(the dataset's ground truth). The row "384 / exact" is FlatIndex on the full vectors.

    python benchmarks/matryoshka.py --data ../shared/data/wordnet-minilm --threads 2

Prints a markdown table (for BENCHMARKS.md) to stdout; progress goes to stderr.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

import pyknn
from pyknn.bench import cpu_model
from pyknn.rag import MatryoshkaIndex


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"
                                         / "wordnet-minilm"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--queries", type=int, default=10000)
    p.add_argument("--dims", default="64,128,192,256")
    p.add_argument("--stages", default="flat,hnsw")
    p.add_argument("--rerank", type=int, default=100)
    p.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--nprobe", type=int, default=64,
                   help="cells probed by the ivfpq first stage (nlist 1024, 4-bit codes, "
                        "search_dim / 2 sub-quantizers)")
    p.add_argument("--store-dtype", default="float32,float16")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)
    pyknn.set_num_threads(a.threads)
    d = Path(a.data)
    base = np.load(d / "base.f16.npy").astype(np.float32)
    q = np.load(d / "queries.f16.npy")[:a.queries].astype(np.float32)
    gt = np.load(d / "gt_ids.i32.npy")[:a.queries]
    n, dim = base.shape
    rows = []

    def timed_search(search):
        ids = search()
        best = np.inf
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            search()
            best = min(best, time.perf_counter() - t0)
        return ids, q.shape[0] / best

    flat = pyknn.FlatIndex(dim, "ip")
    flat.add(base)
    I, qps = timed_search(lambda: flat.search(q, 10)[1])
    rows.append(("384 (exact)", "FlatIndex", "float32", pyknn.recall_at_k(I, gt, 10), qps,
                 flat.memory_usage() / n, 0.0))
    print(f"exact: recall {rows[-1][3]:.4f} qps {qps:.0f}", file=sys.stderr)
    for stage in a.stages.split(","):
        for sd in [int(x) for x in a.dims.split(",")]:
            for dt in a.store_dtype.split(","):
                params = {"hnsw": {"M": 16, "ef_construction": 200},
                          "ivfpq": {"nlist": 1024, "pq_m": sd // 2, "nbits": 4,
                                    "by_residual": False}}.get(stage, {})
                m = MatryoshkaIndex(dim, search_dim=sd, first_stage=stage, rerank=a.rerank,
                                    store_dtype=dt, **params)
                t0 = time.perf_counter()
                if stage == "ivfpq":
                    m.train(base)
                m.add(base)
                build = time.perf_counter() - t0
                kw = ({"ef_search": a.ef_search} if stage == "hnsw" else
                      {"nprobe": a.nprobe} if stage == "ivfpq" else {})
                I, qps = timed_search(lambda: m.search(q, 10, **kw)[1])
                # The first stage alone (no re-ranking): what the prefix gives by itself.
                _, rowsI = m.first_stage.search(m._prefix(q, "queries"), 10, **kw)
                rows_now = m._rows
                pos = m._positions(rows_now, rowsI)
                r_prefix = pyknn.recall_at_k(
                    np.where(pos >= 0, rows_now[2][np.maximum(pos, 0)], -1), gt, 10)
                setting = "".join(f" {key} {value}" for key, value in kw.items())
                rows.append((str(sd), stage + setting.replace("ef_search", "ef"), dt,
                             pyknn.recall_at_k(I, gt, 10), qps, m.memory_usage() / n, build,
                             r_prefix))
                print(f"{stage} {sd} {dt}: recall {rows[-1][3]:.4f} (prefix only {r_prefix:.4f}) "
                      f"qps {qps:.0f} B/vec {rows[-1][5]:.0f} build {build:.1f}s", file=sys.stderr)
    print(f"- data: {d.name}, n={n:,}, dim={dim}, nq={q.shape[0]:,}, metric ip, k=10, "
          f"rerank={a.rerank}")
    print(f"- CPU: {cpu_model()}; threads: {a.threads}; batch: all {q.shape[0]:,} queries in one "
          f"call, QPS = best of {a.repeats} after a warm-up; pyknn {pyknn.__version__}, "
          f"SIMD {pyknn.simd_level()}")
    print()
    print("| search_dim | first stage | store | recall@10 | prefix-only recall@10 | QPS | "
          "bytes/vector | build s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        pre = f"{r[7]:.3f}" if len(r) > 7 else "-"
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3f} | {pre} | {r[4]:,.0f} | {r[5]:,.0f} | "
              f"{r[6]:.1f} |")


if __name__ == "__main__":
    main()
