"""Every compiled kernel level against float64 numpy, over awkward dimensions."""
import os
import subprocess
import sys

import numpy as np
import pytest

import pyknn
from pyknn import _core

from conftest import LEVELS

DIMS = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 384, 768, 1536, 4096]


def _data(n, d, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32)


def _tol(ref, d, scale):
    # float32 accumulation error grows with d; compare relative to the magnitudes summed.
    return 1e-5 * np.sqrt(d) * scale + 1e-6


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("d", DIMS)
def test_dot_and_l2_many(level, d):
    x = _data(13, d, d)
    q = _data(1, d, d + 1)[0]
    ref_dot = x.astype(np.float64) @ q.astype(np.float64)
    ref_l2 = ((x.astype(np.float64) - q) ** 2).sum(1)
    scale = np.abs(x).astype(np.float64) @ np.abs(q).astype(np.float64)
    np.testing.assert_allclose(_core._kernel_dot_many(level, q, x), ref_dot, rtol=0,
                               atol=_tol(ref_dot, d, scale.max()))
    np.testing.assert_allclose(_core._kernel_l2sq_many(level, q, x), ref_l2, rtol=1e-5 * np.sqrt(d))
    for i in (0, 5, 12):
        assert abs(_core._kernel_dot(level, q, x[i]) - ref_dot[i]) <= _tol(ref_dot, d, scale[i])
        assert _core._kernel_l2sq(level, q, x[i]) == pytest.approx(ref_l2[i], rel=1e-5 * np.sqrt(d))
    norms = _core._kernel_norms_sq(level, x)
    np.testing.assert_allclose(norms, (x.astype(np.float64) ** 2).sum(1), rtol=1e-5 * np.sqrt(d))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("d", DIMS)
def test_many_scores_independent_of_call_size(level, d):
    # Small calls take four rows at a time, large ones stream row by row: a row's score must be
    # bitwise the same either way, and the same as the one-pair kernel's.
    x = _data(8, d, d + 2)
    q = _data(1, d, d + 3)[0]
    big = np.tile(x, (4096 // d + 2, 1))  # at least 4096 floats: the streaming path
    for many, one in ((_core._kernel_dot_many, _core._kernel_dot),
                      (_core._kernel_l2sq_many, _core._kernel_l2sq)):
        small = np.concatenate([many(level, q, x[:4]), many(level, q, x[4:])])
        np.testing.assert_array_equal(many(level, q, big)[:8], small)
        np.testing.assert_array_equal(small, [one(level, q, row) for row in x])


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("d", [1, 3, 16, 17, 65, 384])
@pytest.mark.parametrize("m,n", [(1, 1), (5, 33), (13, 70), (25, 129)])
def test_packed_gemm(level, d, m, n):
    q = _data(m, d, 1)
    x = _data(n, d, 2)
    ref = q.astype(np.float64) @ x.astype(np.float64).T
    scale = np.abs(q).astype(np.float64) @ np.abs(x).astype(np.float64).T
    got = _core._kernel_gemm(level, q, x)
    assert got.shape == (m, n)
    assert np.all(np.abs(got - ref) <= 1e-5 * np.sqrt(d) * scale + 1e-6)


def _check_gather(gather, q, xs, idx, d):
    """gather(l2, idx) against float64 products with the rows xs[idx] (float64), for prefixes of
    idx of 0, 1, 4, 5 and all rows."""
    rows = xs[idx]
    ref_dot = rows @ q.astype(np.float64)
    ref_l2 = ((rows - q) ** 2).sum(1)
    scale = (np.abs(rows) @ np.abs(q).astype(np.float64)).max()
    for m in (0, 1, 4, 5, len(idx)):
        np.testing.assert_allclose(gather(False, idx[:m]), ref_dot[:m], rtol=0,
                                   atol=_tol(ref_dot, d, scale))
        np.testing.assert_allclose(gather(True, idx[:m]), ref_l2[:m], rtol=1e-5 * np.sqrt(d))


# Rows by index, in a shuffled order with repeats and a count that is not a multiple of 4.
GATHER_IDX = np.array([3, 0, 10, 3, 7, 1, 9, 9, 2, 5, 4, 8, 6], dtype=np.uint32)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("d", DIMS)
def test_gather(level, d):
    x = _data(11, d, d + 7)
    q = _data(1, d, d + 8)[0]
    _check_gather(lambda l2, idx: _core._kernel_gather(level, l2, q, x, idx), q,
                  x.astype(np.float64), GATHER_IDX, d)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("d", DIMS)
def test_gather_half(level, d):
    # Graph construction reads half-precision rows: the products must be those of the rounded rows.
    x = _data(11, d, d + 17)
    q = _data(1, d, d + 18)[0]
    xh = x.astype(np.float16)
    if _core._kernel_gather_half(level, False, q, xh.view(np.uint16), GATHER_IDX) is None:
        assert level == "scalar"  # the portable level has no F16C: construction reads float32
        return
    _check_gather(lambda l2, idx: _core._kernel_gather_half(level, l2, q, xh.view(np.uint16), idx),
                  q, xh.astype(np.float64), GATHER_IDX, d)


@pytest.mark.parametrize("level", LEVELS)
def test_half_round_trip(level):
    rng = np.random.default_rng(5)
    for n in (0, 1, 15, 16, 17, 100, 1000):
        x = (rng.standard_normal(n) * 100).astype(np.float32)
        if n > 3:
            x[:3] = [65504.0, -70000.0, 1e-8]  # largest half, overflow, underflow to subnormal
        r = _core._kernel_half_round_trip(level, x)
        if r is None:
            assert level == "scalar"
            return
        h, mx, back = r
        with np.errstate(over="ignore"):  # -70000 becomes -inf, as in the kernel
            ref = x.astype(np.float16)
        np.testing.assert_array_equal(h, ref.view(np.uint16))
        np.testing.assert_array_equal(back, ref.astype(np.float32))
        assert mx == (np.abs(x).max() if n else 0.0)


@pytest.mark.parametrize("level", LEVELS)
def test_select_ge(level):
    rng = np.random.default_rng(3)
    for n in (0, 1, 63, 64, 65, 200, 1000):
        s = rng.standard_normal(n).astype(np.float32)
        for thr in (-np.inf, 0.5, 2.0, np.inf):
            got = _core._kernel_select_ge(level, s, thr)
            assert list(got) == list(np.nonzero(s >= thr)[0])


@pytest.mark.parametrize("level", LEVELS)
def test_max(level):
    rng = np.random.default_rng(4)
    assert _core._kernel_max(level, np.zeros(0, np.float32)) == -np.inf
    for n in (1, 7, 16, 17, 100, 1000):
        s = rng.standard_normal(n).astype(np.float32)
        assert _core._kernel_max(level, s) == s.max()


def test_levels_reported():
    assert LEVELS[0] == "scalar"
    assert set(LEVELS) <= {"scalar", "avx2", "avx512"}
    expected = os.environ.get("PYKNN_SIMD", "").strip().lower() or LEVELS[-1]
    assert pyknn.simd_level() == (LEVELS[-1] if expected == "auto" else expected)


def test_set_level_lower_and_restore(simd_level):
    assert pyknn.simd_level() == simd_level


def test_set_level_errors():
    with pytest.raises(ValueError, match="unknown SIMD level 'sse9'"):
        pyknn.set_simd_level("sse9")
    missing = [lv for lv in ("avx2", "avx512") if lv not in LEVELS]
    for lv in missing:
        with pytest.raises(ValueError, match="not supported by this CPU"):
            pyknn.set_simd_level(lv)
    with pytest.raises(TypeError):
        pyknn.set_simd_level(2)
    before = pyknn.simd_level()
    try:
        pyknn.set_simd_level("scalar")
        pyknn.set_simd_level("auto")
        assert pyknn.simd_level() == LEVELS[-1]
    finally:
        pyknn.set_simd_level(before)


def _run(env_extra, cwd):
    # cwd outside the checkout: from its root, `import pyknn` would find the source folder.
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", "import pyknn; print(pyknn.simd_level())"],
                          env=env, capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("level", LEVELS)
def test_env_variable_lowers_level(level, tmp_path):
    r = _run({"PYKNN_SIMD": level}, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == level


def test_env_variable_rejects_unknown_level(tmp_path):
    r = _run({"PYKNN_SIMD": "neon9000"}, tmp_path)
    assert r.returncode != 0
    assert "PYKNN_SIMD" in r.stderr and "unknown SIMD level" in r.stderr


def test_thread_env_variable(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import pyknn; print(pyknn.num_threads())"],
                       env=dict(os.environ, PYKNN_NUM_THREADS="3"), capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "3", r.stderr
    r = subprocess.run([sys.executable, "-c", "import pyknn"], cwd=tmp_path, text=True,
                       env=dict(os.environ, PYKNN_NUM_THREADS="abc"), capture_output=True)
    assert r.returncode != 0 and "PYKNN_NUM_THREADS='abc'" in r.stderr


def test_search_identical_results_across_levels():
    x = _data(3000, 100, 7)
    q = _data(40, 100, 8)
    results = {}
    previous = pyknn.simd_level()
    try:
        for lv in LEVELS:
            pyknn.set_simd_level(lv)
            idx = pyknn.FlatIndex(100, "l2")
            idx.add(x)
            results[lv] = idx.search(q, 10)
    finally:
        pyknn.set_simd_level(previous)
    base_d, base_i = results["scalar"]
    for lv, (d, i) in results.items():
        np.testing.assert_array_equal(i, base_i, err_msg=lv)
        np.testing.assert_allclose(d, base_d, rtol=1e-5, err_msg=lv)
