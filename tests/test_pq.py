"""ProductQuantizer and the PQ scan kernels: accuracy, code layout, parameters, SIMD levels."""
import pickle

import numpy as np
import pytest

import pyknn
from pyknn import _core

from conftest import LEVELS, clustered


@pytest.fixture(scope="module")
def data():
    return clustered(4000, 32, n_clusters=20, seed=3)


@pytest.mark.parametrize("nbits,pq_m,bound", [(8, 8, 0.1), (4, 8, 0.15), (4, 16, 0.1)])
def test_reconstruction_error_well_below_variance(data, nbits, pq_m, bound):
    pq = pyknn.ProductQuantizer(32, pq_m, nbits).train(data)
    codes = pq.encode(data)
    assert codes.dtype == np.uint8 and codes.shape == (4000, pq_m * nbits // 8)
    err = ((pq.decode(codes) - data) ** 2).sum(1).mean()
    variance = ((data - data.mean(0)) ** 2).sum(1).mean()
    assert err < bound * variance, (err, variance)


def test_codes_are_nearest_centroids_and_layout(data):
    for nbits in (8, 4):
        pq = pyknn.ProductQuantizer(32, 4, nbits).train(data[:1000], seed=1)
        c = pq.centroids
        assert c.shape == (4, 2 ** nbits, 8)
        codes = pq.encode(data[:50])
        sub = data[:50].reshape(50, 4, 1, 8)
        nearest = ((sub - c[None]) ** 2).sum(-1).argmin(-1)  # (50, 4)
        if nbits == 8:
            np.testing.assert_array_equal(codes, nearest)
        else:  # sub-quantizer 2j in the low nibble of byte j, 2j+1 in the high nibble
            np.testing.assert_array_equal(codes & 15, nearest[:, 0::2])
            np.testing.assert_array_equal(codes >> 4, nearest[:, 1::2])
        np.testing.assert_array_equal(pq.decode(codes), c[np.arange(4), nearest].reshape(50, 32))


def test_bad_parameters():
    with pytest.raises(ValueError, match=r"dim 30 is not divisible by pq_m 4 \(valid pq_m for "
                                         r"dim 30: 1, 2, 3, 5, 6, 10, 15, 30\)"):
        pyknn.ProductQuantizer(30, 4)
    with pytest.raises(ValueError, match=r"nbits 6 is not supported \(supported: 4, 8\)"):
        pyknn.ProductQuantizer(32, 4, nbits=6)
    with pytest.raises(ValueError, match="pq_m must be at least 1"):
        pyknn.ProductQuantizer(32, 0)
    with pytest.raises(TypeError, match="nbits must be an int"):
        pyknn.ProductQuantizer(32, 4, nbits=8.0)
    pq = pyknn.ProductQuantizer(8, 2, nbits=8)
    with pytest.raises(ValueError, match=r"2\*\*nbits = 256 points, got 100"):
        pq.train(np.random.default_rng(0).standard_normal((100, 8)))
    with pytest.raises(RuntimeError, match=r"call train\(\) first"):
        pq.encode(np.ones((1, 8)))
    with pytest.raises(RuntimeError, match=r"call train\(\) first"):
        pq.decode(np.zeros((1, 2), np.uint8))


def test_input_policy(data):
    pq = pyknn.ProductQuantizer(32, 8, 4).train(data)
    bad = data[:10].copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="row 7 contains NaN"):
        pq.encode(bad)
    with pytest.raises(ValueError, match="expected dim 32, got 31"):
        pq.encode(data[:3, :31])
    with pytest.raises(TypeError, match="real numbers"):
        pq.encode(np.array([["a"] * 32]))
    np.testing.assert_array_equal(pq.encode(data[:5].astype(np.float64)), pq.encode(data[:5]))
    np.testing.assert_array_equal(pq.encode(np.asfortranarray(data[:5])), pq.encode(data[:5]))
    np.testing.assert_array_equal(pq.encode(data[0]), pq.encode(data[:1]))
    with pytest.raises(ValueError, match=r"expected shape \(n, 4\)"):
        pq.decode(np.zeros((2, 5), np.uint8))
    with pytest.raises(ValueError, match="0 ... 255"):
        pq.decode(np.full((1, 4), 300))
    with pytest.raises(TypeError, match="integers"):
        pq.decode(np.zeros((1, 4), np.float32))
    bad_train = data.copy()
    bad_train[42] = np.inf
    fresh = pyknn.ProductQuantizer(32, 8, 4)
    with pytest.raises(ValueError, match="row 42 contains Inf"):
        fresh.train(bad_train)
    assert not fresh.is_trained


def test_deterministic_and_picklable(data):
    a = pyknn.ProductQuantizer(32, 8).train(data, seed=5)
    b = pyknn.ProductQuantizer(32, 8).train(data, seed=5)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    c = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(c.encode(data[:100]), a.encode(data[:100]))
    assert not pickle.loads(pickle.dumps(pyknn.ProductQuantizer(32, 8))).is_trained


# ---- kernels: every level against numpy (and the integer 4-bit scan bit-exactly) ----------

@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("M,n", [(1, 1), (3, 7), (8, 33), (48, 130)])
def test_pq8_scan_matches_numpy(level, M, n):
    rng = np.random.default_rng(M * 100 + n)
    lut = rng.standard_normal((M, 256)).astype(np.float32)
    codes = rng.integers(0, 256, (n, M), dtype=np.uint8)
    out = _core._kernel_pq8_scan(level, lut, codes, 0.5)
    ref = 0.5 + lut[np.arange(M), codes].astype(np.float64).sum(1)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


def _interleave(codes):
    """(32 * nb, M) 4-bit codes -> the fast-scan block layout (nb, M, 16) bytes."""
    n, M = codes.shape
    blocks = codes.reshape(n // 32, 32, M).transpose(0, 2, 1)  # (nb, M, 32)
    return (blocks[:, :, :16] | (blocks[:, :, 16:] << 4)).astype(np.uint8)


@pytest.mark.parametrize("M", [2, 4, 6, 16, 18, 96])
def test_pq4_scan_every_level_is_exact(M):
    rng = np.random.default_rng(M)
    nb = 3
    codes = rng.integers(0, 16, (32 * nb, M), dtype=np.uint8)
    lut = rng.integers(0, 256 if M <= 256 else 65535 // M, (M, 16), dtype=np.uint8)
    lut[0, :] = 255  # the largest entries, where uint16 sums must not wrap
    codes[5, 0] = 15
    ref = lut[np.arange(M), codes].astype(np.int64).sum(1)
    assert ref.max() < 65536
    for level in LEVELS:
        out = _core._kernel_pq4_scan(level, _interleave(codes), lut)
        np.testing.assert_array_equal(out, ref, err_msg=level)


@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 100, 1000])
def test_select_ge_u16_every_level(n):
    rng = np.random.default_rng(n)
    s = rng.integers(0, 65536, n, dtype=np.uint16)
    if n > 3:
        s[3] = 65535
    for thr in (0, 1, 30000, 65000, 65535, 65536, 70000):
        ref = np.flatnonzero(s.astype(np.int64) >= thr)
        for level in LEVELS:
            out = _core._kernel_select_ge_u16(level, s, thr)
            np.testing.assert_array_equal(out, ref, err_msg=f"{level} thr {thr}")
