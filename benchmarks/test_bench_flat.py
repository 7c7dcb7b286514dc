"""Exact search on the full data set: pyknn FlatIndex beside faiss IndexFlatIP.

    pytest benchmarks/test_bench_flat.py                 # both libraries, grouped side by side
    PYKNN_BENCH_THREADS=2 pytest benchmarks -k batch

Indexes are built once per session (conftest.py); only the searches are timed.
"""
import itertools

import pytest

from pyknn import recall_at_k

K = 10
LIBRARIES = ["pyknn", "faiss"]


@pytest.mark.benchmark(group="flat: batch of 1000 queries, k=10")
@pytest.mark.parametrize("library", LIBRARIES)
def test_flat_batch(benchmark, built, bench_data, threads, library):
    spec, index = built(library, "Flat")
    ids = benchmark(spec.search, index, bench_data.queries, K, threads)
    assert recall_at_k(ids, bench_data.gt_ids, K) > 0.999


@pytest.mark.benchmark(group="flat: single query, k=10")
@pytest.mark.parametrize("library", LIBRARIES)
def test_flat_single_query(benchmark, built, bench_data, threads, library):
    spec, index = built(library, "Flat")
    rows = itertools.cycle(bench_data.queries[i:i + 1] for i in range(bench_data.nq))
    ids = benchmark(lambda: spec.search(index, next(rows), K, threads))
    assert ids.shape == (1, K)
