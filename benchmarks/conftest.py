"""Session fixtures of the pytest-benchmark suites: the full data set and indexes built once.

Data: env ``PYKNN_BENCH_DATA`` or ../shared/data/wordnet-minilm beside the repository; the
suites skip when it is absent. Threads: env ``PYKNN_BENCH_THREADS`` or all cores, the same
for every library. Run with ``pytest benchmarks`` (tests/ is the default test path).
"""
import os
from pathlib import Path

import pytest

from compare import DEFAULT_DATA
from pyknn import bench, datasets

#: Queries of the batch benchmarks.
N_QUERIES = 1000


@pytest.fixture(scope="session")
def threads():
    """Threads for every library in the suites."""
    return int(os.environ.get("PYKNN_BENCH_THREADS") or 0) or bench.default_threads()


@pytest.fixture(scope="session")
def bench_data():
    """The benchmark data set as float32 (first N_QUERIES queries), loaded once."""
    path = Path(os.environ.get("PYKNN_BENCH_DATA") or DEFAULT_DATA)
    if not path.exists():
        pytest.skip(f"benchmark data not found at {path} (set PYKNN_BENCH_DATA to a data folder)")
    return bench.prepare(datasets.load(path), n_queries=N_QUERIES, progress=False)


@pytest.fixture(scope="session")
def built(bench_data, threads):
    """``built(library, family)`` -> (spec, index): that library's spec for the data's metric,
    built on first use and kept for the session. Skips if the library is not installed."""
    cache = {}

    def get(library, family):
        key = (library, family)
        if key not in cache:
            spec = next((s for s in bench.registered_specs() if s.library == library
                         and s.family == family and bench_data.metric in s.metrics), None)
            if spec is None:
                pytest.skip(f"no {library} {family} spec for metric {bench_data.metric!r}")
            if spec.requires:
                pytest.importorskip(spec.requires, reason=f"{spec.requires} is not installed "
                                                          f"(pip install {spec.install})")
            cache[key] = spec, spec.build_index(bench_data, threads)
        return cache[key]

    return get
