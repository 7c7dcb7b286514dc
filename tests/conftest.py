import contextlib

import numpy as np
import pytest

import pyknn

LEVELS = pyknn.available_simd_levels()


@pytest.fixture(params=LEVELS)
def simd_level(request):
    """Runs a test once per compiled SIMD level this CPU supports, restoring the level after."""
    previous = pyknn.simd_level()
    pyknn.set_simd_level(request.param)
    try:
        yield request.param
    finally:
        pyknn.set_simd_level(previous)


@contextlib.contextmanager
def thread_count(n):
    """Run the block with pyknn using n threads, restoring the previous count after."""
    previous = pyknn.num_threads()
    pyknn.set_num_threads(n)
    try:
        yield n
    finally:
        pyknn.set_num_threads(previous)


@pytest.fixture(params=[1, 2])
def threads(request):
    with thread_count(request.param) as n:
        yield n


def clustered(n, dim, n_clusters=16, seed=0, spread=0.3, dtype=np.float32):
    """Seeded clustered Gaussians: low intrinsic dimension, like real embeddings."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim))
    labels = rng.integers(0, n_clusters, n)
    x = centers[labels] + spread * rng.standard_normal((n, dim))
    return x.astype(dtype)
