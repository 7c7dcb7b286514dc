"""FlatIndex against an independent float64 reference, and every rule of the input policy."""
import copy
import pickle
import threading

import numpy as np
import pytest

import pyknn
from pyknn import ground_truth

from conftest import clustered, thread_count

METRICS = ["ip", "l2", "cosine"]


def _check_against_reference(idx, x, q, k, metric, ids=None):
    D, I = idx.search(q, k)
    Dr, Ir = ground_truth(x, q, k, metric)
    if ids is not None:
        Ir = np.where(Ir >= 0, np.asarray(ids)[np.maximum(Ir, 0)], -1)
    assert D.dtype == np.float32 and I.dtype == np.int64
    assert D.shape == I.shape == (q.shape[0], k)
    # Ids must match except where the reference itself has a near-tie at float32 precision.
    scale = np.abs(Dr[np.isfinite(Dr)]).max() + 1.0
    tol = 2e-5 * scale
    np.testing.assert_allclose(D, Dr.astype(np.float32), rtol=0, atol=tol)
    mismatch = I != Ir
    if mismatch.any():
        rows, cols = np.nonzero(mismatch)
        for r, c in zip(rows, cols):
            assert abs(D[r, c] - Dr[r, c]) <= tol, (r, c)
    return D, I


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("nq", [1, 3, 4, 37, 300])
def test_matches_reference(simd_level, threads, metric, nq):
    x = clustered(2500, 48, seed=1)
    q = clustered(nq, 48, seed=2)
    idx = pyknn.FlatIndex(48, metric)
    idx.add(x)
    _check_against_reference(idx, x, q, 10, metric)


@pytest.mark.parametrize("d", [1, 3, 17, 100, 384])
def test_dims(simd_level, d):
    x = clustered(700, d, seed=d)
    q = clustered(20, d, seed=d + 1)
    for metric in METRICS:
        idx = pyknn.FlatIndex(d, metric)
        idx.add(x)
        _check_against_reference(idx, x, q, 7, metric)


def test_distances_and_order_conventions():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]], dtype=np.float32)
    q = np.array([[1.0, 1.0]], dtype=np.float32)
    D, I = pyknn.FlatIndex(2, "ip").search(q, 1)  # an empty index pads
    assert I.tolist() == [[-1]] and D[0, 0] == -np.inf
    ip = pyknn.FlatIndex(2, "ip")
    ip.add(x)
    D, I = ip.search(q, 3)
    assert I.tolist() == [[2, 1, 0]]
    np.testing.assert_allclose(D, [[6.0, 2.0, 1.0]])
    l2 = pyknn.FlatIndex(2, "l2")
    l2.add(x)
    D, I = l2.search(q, 3)
    assert I.tolist() == [[0, 1, 2]]
    np.testing.assert_allclose(D, [[1.0, 2.0, 8.0]])
    cos = pyknn.FlatIndex(2, "cosine")
    cos.add(x)
    D, I = cos.search(q, 3)
    assert I[0, 0] == 2
    np.testing.assert_allclose(D[0, 0], 1.0, rtol=1e-6)


def test_l2_accurate_at_large_magnitude(simd_level, threads):
    # Points close together far from the origin: the expanded form ||x||^2 + ||q||^2 - 2<x,q>
    # cancels catastrophically in float32 here.
    rng = np.random.default_rng(5)
    offset = 1e4
    x = (offset + rng.standard_normal((3000, 32))).astype(np.float32)
    q = (offset + rng.standard_normal((50, 32))).astype(np.float32)
    idx = pyknn.FlatIndex(32, "l2")
    idx.add(x)
    for nq in (1, 50):
        D, I = idx.search(q[:nq], 10)
        assert (D >= 0).all()
        Dr, Ir = ground_truth(x, q[:nq], 10, "l2")
        np.testing.assert_allclose(D, Dr, rtol=1e-4)
        assert (I == Ir).mean() > 0.99


def test_l2_never_negative_for_duplicates():
    x = np.full((100, 16), 1234.5, dtype=np.float32)
    idx = pyknn.FlatIndex(16, "l2")
    idx.add(x)
    D, I = idx.search(x[:10], 5)
    assert (D == 0).all()
    assert (I == np.arange(5)).all()  # ties go to the smaller id


def test_k_larger_than_n_and_empty_index():
    idx = pyknn.FlatIndex(4, "l2")
    D, I = idx.search(np.ones(4), 3)
    assert I.tolist() == [[-1, -1, -1]] and np.isinf(D).all() and (D > 0).all()
    idx.add(np.eye(4))
    D, I = idx.search(np.ones((2, 4)), 6)
    assert (I[:, :4] >= 0).all() and (I[:, 4:] == -1).all()
    assert np.isposinf(D[:, 4:]).all()
    ip = pyknn.FlatIndex(4, "ip")
    ip.add(np.eye(4))
    D, I = ip.search(np.ones(4), 5)
    assert I[0, 4] == -1 and D[0, 4] == -np.inf


def test_zero_queries():
    idx = pyknn.FlatIndex(3)
    idx.add(np.eye(3))
    D, I = idx.search(np.zeros((0, 3)), 2)
    assert D.shape == (0, 2) and I.shape == (0, 2)


# ---- input policy -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32, np.int64, np.uint8, np.int8])
def test_dtype_conversion_matches_astype(dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((50, 8)) * 10).astype(dtype)
    a = pyknn.FlatIndex(8, "l2")
    a.add(x)
    np.testing.assert_array_equal(a.get(np.arange(50)), x.astype(np.float32))
    D1, I1 = a.search(x[:5], 3)
    D2, I2 = a.search(x[:5].astype(np.float32), 3)
    np.testing.assert_array_equal(I1, I2)


def test_layouts_fortran_strided_and_lists():
    x = clustered(100, 16, seed=3)
    ref = pyknn.FlatIndex(16)
    ref.add(x)
    f = pyknn.FlatIndex(16)
    f.add(np.asfortranarray(x))
    s = pyknn.FlatIndex(16)
    wide = np.zeros((100, 32), np.float32)
    wide[:, ::2] = x
    s.add(wide[:, ::2])
    l = pyknn.FlatIndex(16)
    l.add(x.tolist())
    q = x[::7]
    expected = ref.search(q, 5)
    for other in (f, s, l):
        got = other.search(np.asfortranarray(q), 5)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])


def test_one_dimensional_query_and_vector():
    idx = pyknn.FlatIndex(3, "ip")
    idx.add([1.0, 2.0, 3.0])
    assert len(idx) == 1
    D, I = idx.search([1.0, 0.0, 0.0], 1)
    assert D.shape == (1, 1) and I[0, 0] == 0


@pytest.mark.parametrize("bad", [np.array(["a", "b"]), np.array([1 + 2j, 3j]),
                                 np.array([{}, {}], dtype=object)])
def test_non_numeric_dtypes_raise_type_error(bad):
    idx = pyknn.FlatIndex(2)
    with pytest.raises(TypeError, match="real numbers"):
        idx.add(bad)
    with pytest.raises(TypeError):
        idx.search(bad, 1)


def test_wrong_shapes():
    idx = pyknn.FlatIndex(384)
    with pytest.raises(ValueError, match="expected dim 384, got 256"):
        idx.add(np.zeros((3, 256), np.float32))
    with pytest.raises(ValueError, match="expected dim 384, got 256"):
        idx.search(np.zeros((3, 256), np.float32), 1)
    with pytest.raises(ValueError, match="2-D"):
        idx.add(np.zeros((2, 3, 384), np.float32))
    assert len(idx) == 0


@pytest.mark.parametrize("k", [0, -3])
def test_bad_k(k):
    idx = pyknn.FlatIndex(2)
    idx.add(np.eye(2))
    with pytest.raises(ValueError, match=f"k must be at least 1, got {k}"):
        idx.search(np.eye(2), k)
    with pytest.raises(TypeError):
        idx.search(np.eye(2), 2.5)


@pytest.mark.parametrize("value,name", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_nonfinite_rejected_naming_row(value, name):
    idx = pyknn.FlatIndex(4, "l2")
    idx.add(np.ones((3, 4)))
    x = np.zeros((10, 4), np.float32)
    x[7, 2] = value
    with pytest.raises(ValueError, match=f"vectors row 7 contains {name}"):
        idx.add(x)
    assert len(idx) == 3
    with pytest.raises(ValueError, match=f"queries row 7 contains {name}"):
        idx.search(x, 1)


def test_float64_overflow_becomes_inf_error():
    idx = pyknn.FlatIndex(2)
    with pytest.raises(ValueError, match="row 1 contains Inf"):
        idx.add(np.array([[1.0, 2.0], [1e300, 0.0]]))


def test_cosine_zero_vector_rejected():
    idx = pyknn.FlatIndex(3, "cosine")
    x = np.ones((5, 3))
    x[3] = 0
    with pytest.raises(ValueError, match="row 3 is a zero vector"):
        idx.add(x)
    assert len(idx) == 0
    idx.add(np.ones((2, 3)))
    with pytest.raises(ValueError, match="queries row 0 is a zero vector"):
        idx.search(np.zeros(3), 1)


def test_cosine_stores_unit_vectors():
    idx = pyknn.FlatIndex(2, "cosine")
    idx.add([[3.0, 4.0]], ids=[9])
    np.testing.assert_allclose(idx.get(9), [0.6, 0.8], rtol=1e-6)


# ---- ids ------------------------------------------------------------------------------------

def test_default_ids_continue():
    idx = pyknn.FlatIndex(2)
    idx.add(np.ones((3, 2)))
    idx.add(np.ones((2, 2)))
    assert idx.ids.tolist() == [0, 1, 2, 3, 4]
    idx.add(np.ones((1, 2)), ids=[100])
    idx.add(np.ones((1, 2)))
    assert idx.ids.tolist()[-1] == 101


def test_reserved_and_duplicate_ids():
    idx = pyknn.FlatIndex(2)
    idx.add(np.ones((2, 2)), ids=[5, 6])
    with pytest.raises(ValueError, match="id -1 .* reserved"):
        idx.add(np.ones((2, 2)), ids=[7, -1])
    with pytest.raises(ValueError, match="id 6 .* already in the index"):
        idx.add(np.ones((2, 2)), ids=[7, 6])
    with pytest.raises(ValueError, match="id 8 appears more than once"):
        idx.add(np.ones((2, 2)), ids=[8, 8])
    with pytest.raises(ValueError, match="got 3 ids for 2 vectors"):
        idx.add(np.ones((2, 2)), ids=[1, 2, 3])
    with pytest.raises(TypeError, match="integers"):
        idx.add(np.ones((2, 2)), ids=[1.5, 2.5])
    with pytest.raises(ValueError, match="fit in int64"):
        idx.add(np.ones((1, 2)), ids=np.array([2**63], dtype=np.uint64))
    assert idx.ids.tolist() == [5, 6]


def test_large_sparse_ids():
    idx = pyknn.FlatIndex(4, "l2")
    ids = np.array([2**62, -(2**62), 10**15, 3, -7], dtype=np.int64)
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    idx.add(x, ids=ids)
    assert idx.memory_usage() < 10_000  # grows with the number of ids, not their values
    D, I = idx.search(x, 1)
    assert I[:, 0].tolist() == ids.tolist()
    np.testing.assert_array_equal(idx.get(ids[::-1]), x[::-1])
    assert idx.contains(2**62) and (10**15 in idx) and not idx.contains(4)


def test_get_remove_contains():
    x = clustered(50, 8, seed=4)
    idx = pyknn.FlatIndex(8, "l2")
    idx.add(x, ids=np.arange(100, 150))
    with pytest.raises(KeyError, match="id 7 is not in the index"):
        idx.get([100, 7])
    with pytest.raises(KeyError, match="id 7"):
        idx.remove([101, 7])
    assert len(idx) == 50 and 101 in idx
    assert idx.remove([101, 102, 101]) == 2
    assert len(idx) == 48 and 101 not in idx
    assert idx.remove([101, 149], missing_ok=True) == 1
    D, I = idx.search(x, 1)
    for removed in (101, 102, 149):
        assert removed not in I
    np.testing.assert_array_equal(idx.get([100, 148]), x[[0, 48]])
    # Re-adding a removed id works and is found.
    idx.add(x[1], ids=[101])
    assert idx.search(x[1], 1)[1][0, 0] == 101


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_id_map_random_adds_and_removes_match_a_dict(kind):
    """Random ids (sequential runs, negatives, extremes) added and removed in random order: the
    id map must agree with a Python dict at every step, whatever collides in its hash table."""
    rng = np.random.default_rng(11)
    d = 4
    if kind == "flat":
        idx = pyknn.FlatIndex(d, "l2")
    elif kind == "hnsw":
        idx = pyknn.HNSWIndex(d, M=4, ef_construction=16, metric="l2")
    else:
        idx = pyknn.IVFFlatIndex(d, nlist=4, metric="l2")
        idx.train(rng.standard_normal((64, d)).astype(np.float32))
    model = {}
    pool = np.concatenate([np.arange(0, 300), np.arange(-300, -1), rng.integers(-2**62, 2**62, 300),
                           [2**63 - 1, -2**63]])
    for step in range(40):
        absent = np.array([i for i in rng.permutation(pool)[:40] if i not in model], dtype=np.int64)
        if len(absent):
            x = rng.standard_normal((len(absent), d)).astype(np.float32)
            idx.add(x, ids=absent)
            model.update({int(i): v for i, v in zip(absent, x)})
        present = list(model)
        if present:
            drop = rng.choice(present, size=min(len(present), int(rng.integers(0, 30))), replace=False)
            assert idx.remove(drop) == len(drop)
            for i in drop:
                del model[int(i)]
        assert len(idx) == len(model)
        probe = rng.permutation(pool)[:60]
        assert [idx.contains(int(i)) for i in probe] == [int(i) in model for i in probe]
        if model:
            keys = np.array(list(model), dtype=np.int64)
            np.testing.assert_array_equal(idx.get(keys), np.stack([model[int(i)] for i in keys]))
    assert sorted(idx.ids.tolist()) == sorted(model)


def test_memory_usage_counts_vectors():
    idx = pyknn.FlatIndex(64)
    idx.add(np.ones((1000, 64)))
    assert 1000 * 64 * 4 <= idx.memory_usage() < 1000 * 64 * 4 * 2 + 100_000


# ---- filters --------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 0.9])
def test_filter_allow_list_matches_reference(metric, fraction, threads):
    x = clustered(2000, 24, seed=6)
    q = clustered(30, 24, seed=7)
    ids = np.arange(2000) * 3 + 11
    idx = pyknn.FlatIndex(24, metric)
    idx.add(x, ids=ids)
    rng = np.random.default_rng(1)
    allowed_rows = np.sort(rng.choice(2000, int(2000 * fraction), replace=False))
    D, I = idx.search(q, 10, filter=ids[allowed_rows])
    Dr, Ir = ground_truth(x[allowed_rows], q, 10, metric)
    expect = np.where(Ir >= 0, ids[allowed_rows][np.maximum(Ir, 0)], -1)
    assert (I == expect).mean() > 0.99
    assert np.isin(I[I >= 0], ids[allowed_rows]).all()
    # The same filter as a boolean mask over stored rows.
    mask = np.zeros(2000, bool)
    mask[allowed_rows] = True
    D2, I2 = idx.search(q, 10, filter=mask)
    np.testing.assert_array_equal(I2, I)


def test_filter_fewer_than_k_and_empty():
    idx = pyknn.FlatIndex(4, "l2")
    idx.add(np.eye(4), ids=[10, 20, 30, 40])
    D, I = idx.search(np.ones(4), 3, filter=[20, 999])
    assert I.tolist() == [[20, -1, -1]] and np.isposinf(D[0, 1:]).all()
    D, I = idx.search(np.ones(4), 2, filter=[])
    assert I.tolist() == [[-1, -1]]
    D, I = idx.search(np.ones(4), 2, filter=np.zeros(4, bool))
    assert I.tolist() == [[-1, -1]]
    with pytest.raises(ValueError, match="one entry per stored vector \\(4\\)"):
        idx.search(np.ones(4), 2, filter=np.ones(3, bool))


# ---- copies and threads -----------------------------------------------------------------------

def test_pickle_and_deepcopy_identical_results():
    x = clustered(500, 16, seed=8)
    idx = pyknn.FlatIndex(16, "cosine")
    idx.add(x, ids=np.arange(500) * 2)
    idx.metadata["model_id"] = "all-MiniLM-L6-v2"
    expected = idx.search(x[:20], 5)
    for other in (pickle.loads(pickle.dumps(idx)), copy.deepcopy(idx)):
        assert type(other) is pyknn.FlatIndex and other.metric == "cosine" and len(other) == 500
        got = other.search(x[:20], 5)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
        assert other.metadata["model_id"] == "all-MiniLM-L6-v2"
    clone = copy.deepcopy(idx)
    clone.add(x[0], ids=[10_001])
    assert len(idx) == 500 and len(clone) == 501


def test_thread_count_does_not_change_results():
    x = clustered(5000, 32, seed=9)
    q = clustered(64, 32, seed=10)
    idx = pyknn.FlatIndex(32, "l2")
    idx.add(x)
    with thread_count(1):
        one = idx.search(q, 10)
    with thread_count(3):
        three = idx.search(q, 10)
    np.testing.assert_array_equal(one[1], three[1])
    np.testing.assert_array_equal(one[0], three[0])


def test_concurrent_searches_and_adds():
    x = clustered(4000, 32, seed=11)
    idx = pyknn.FlatIndex(32, "ip")
    idx.add(x[:2000])
    expected = idx.search(x[:50], 5)
    errors = []

    def searcher():
        try:
            for _ in range(20):
                D, I = idx.search(x[:50], 5)
                assert ((I >= 0) & (I < 4000)).all()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def writer():
        try:
            for i in range(2000, 4000, 100):
                idx.add(x[i:i + 100])
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(idx) == 4000
    got = pyknn.FlatIndex(32, "ip")
    got.add(x[:2000])
    np.testing.assert_array_equal(got.search(x[:50], 5)[1], expected[1])


def test_constructor_errors():
    with pytest.raises(ValueError, match="unknown metric 'manhattan'"):
        pyknn.FlatIndex(3, "manhattan")
    with pytest.raises(ValueError, match="dim must be at least 1, got 0"):
        pyknn.FlatIndex(0)
    with pytest.raises(TypeError):
        pyknn.FlatIndex(3.5)
    assert repr(pyknn.FlatIndex(3, "l2")) == "FlatIndex(dim=3, metric='l2', ntotal=0)"


# ---- magnitude, huge k, odd arguments, fork -------------------------------------------------

@pytest.mark.parametrize("metric", METRICS)
def test_vectors_whose_distances_overflow_are_rejected(metric):
    x = clustered(50, 8, seed=20)
    idx = pyknn.FlatIndex(8, metric)
    idx.add(x)
    big = x[:8] * 1e20
    with pytest.raises(ValueError, match="row 0 has squared norm .* beyond the supported"):
        idx.add(big)
    with pytest.raises(ValueError, match="queries row 0 has squared norm"):
        idx.search(big, 1)
    with pytest.raises(ValueError, match="squared norm"):
        idx.add(np.full((2, 8), 2**63, dtype=np.uint64))
    assert len(idx) == 50
    # Just inside the limit: results stay finite and exact.
    ok = x[:4] / np.linalg.norm(x[:4], axis=1, keepdims=True) * 9e18
    D, I = idx.search(ok, 3)
    assert np.isfinite(D).all() and (I >= 0).all()


def test_huge_k_costs_no_memory_and_is_checked():
    idx = pyknn.FlatIndex(4, "l2")
    idx.add(np.eye(4))
    D, I = idx.search(np.ones(4), 5_000_000)
    assert I.shape == (1, 5_000_000) and (I[0, 4:] == -1).all() and sorted(I[0, :4]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="results, more than"):
        idx.search(np.ones((4, 4)), 2**62)


def test_filter_conveniences_and_ambiguity():
    idx = pyknn.FlatIndex(4, "l2")
    idx.add(np.eye(4), ids=[10, 20, 30, 40])
    assert idx.search(np.ones(4), 4, filter={20, 40})[1][0, :2].tolist() in ([20, 40], [40, 20])
    with pytest.raises(TypeError, match="uint8 filter is ambiguous"):
        idx.search(np.ones(4), 2, filter=np.ones(4, np.uint8))


def test_out_of_range_integers_are_value_errors():
    idx = pyknn.FlatIndex(4)
    idx.add(np.eye(4))
    assert not idx.contains(2**70) and (-(2**70)) not in idx
    with pytest.raises(ValueError, match="dim must be at most"):
        pyknn.FlatIndex(2**64)


def test_results_do_not_depend_on_thread_count_for_small_batches():
    # A 7-query batch over 200 rows: the split over threads must not change which kernel runs.
    x = np.random.default_rng(3).standard_normal((200, 1024)).astype(np.float32)
    q = x[:7] + 0.5
    for metric in ("ip", "l2"):
        idx = pyknn.FlatIndex(1024, metric)
        idx.add(x)
        with thread_count(1):
            one = idx.search(q, 5)
        with thread_count(2):
            two = idx.search(q, 5)
        np.testing.assert_array_equal(one[0], two[0])
        np.testing.assert_array_equal(one[1], two[1])


def _fork_search(args):
    idx, q = args
    return idx.search(q, 3)[1]


def test_search_in_forked_children():
    import multiprocessing as mp
    x = clustered(20000, 32, seed=21)
    idx = pyknn.FlatIndex(32)
    idx.add(x)
    expected = idx.search(x[:100], 3)[1]  # the parent's pool has run: its threads exist
    with mp.get_context("fork").Pool(2) as pool:
        result = pool.map_async(_fork_search, [(idx, x[:100]), (idx, x[:100])])
        for got in result.get(timeout=60):
            np.testing.assert_array_equal(got, expected)


def test_cosine_normalises_subnormal_vectors():
    # 1 / norm of a row of magnitude 1e-40 overflows float32: the stored rows must still be unit.
    x = (np.random.default_rng(0).standard_normal((50, 16)) * 1e-40).astype(np.float32)
    idx = pyknn.FlatIndex(16, "cosine")
    idx.add(x)
    np.testing.assert_allclose(np.linalg.norm(idx.get(np.arange(50)), axis=1), 1.0, rtol=1e-3)
    D, I = idx.search(x[:3], 2)
    assert np.isfinite(D).all() and I[:, 0].tolist() == [0, 1, 2]
    # Spherical k-means (the coarse quantizer of "ip" IVF indexes) on the same rows.
    km = pyknn.KMeans(2, spherical=True).fit(np.tile(x, (4, 1)))
    np.testing.assert_allclose(np.linalg.norm(km.centroids, axis=1), 1.0, rtol=1e-3)
