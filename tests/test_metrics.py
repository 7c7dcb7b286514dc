"""recall@k, NDCG@k and MRR@k against straightforward Python references."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from pyknn import evaluation
from pyknn.evaluation import mrr_at_k, ndcg_at_k, recall_at_k


# --------------------------------------------------------------------------- references
def _valid(row):
    return [int(v) for v in row if v >= 0]


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


def ref_recall(found, truth, k):
    out = []
    for f, t in zip(found, truth):
        t = set(_valid(t[:k]))
        out.append(len(set(_valid(f[:k])) & t) / len(t) if t else None)
    return _mean(out), out


def _relevant_rows(qrels):
    qrels = np.asarray(qrels)
    return qrels.reshape(-1, 1) if qrels.ndim == 1 else qrels


def ref_ndcg(found, qrels, k):
    out = []
    for f, rel in zip(found, _relevant_rows(qrels)):
        rel = set(_valid(rel))
        if not rel:
            out.append(None)
            continue
        seen, dcg = set(), 0.0
        for rank, v in enumerate(f[:k]):
            if v in rel and v not in seen:
                seen.add(v)
                dcg += 1.0 / math.log2(rank + 2)
        idcg = sum(1.0 / math.log2(r + 2) for r in range(min(k, len(rel))))
        out.append(dcg / idcg)
    return _mean(out), out


def ref_mrr(found, qrels, k):
    out = []
    for f, rel in zip(found, _relevant_rows(qrels)):
        rel = set(_valid(rel))
        if not rel:
            out.append(None)
            continue
        out.append(next((1.0 / (r + 1) for r, v in enumerate(f[:k]) if v in rel), 0.0))
    return _mean(out), out


def _same(got, want):
    if math.isnan(want):
        return math.isnan(got)
    return got == pytest.approx(want, rel=1e-12, abs=1e-12)


def _check_per_query(rows, want_rows):
    assert rows.dtype == np.float64 and rows.shape == (len(want_rows),)
    for got, want in zip(rows, want_rows):
        assert _same(got, math.nan if want is None else want)


def random_ids(rng, shape, high, p_pad=0.15):
    """Ids in [0, high) with duplicates (small range) and -1 padding."""
    a = rng.integers(0, high, size=shape)
    a[rng.random(shape) < p_pad] = -1
    return a


# --------------------------------------------------------------------------- random data
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 3, 10, 25])
def test_recall_random(seed, k):
    rng = np.random.default_rng(seed)
    found = random_ids(rng, (60, 12), 30)
    truth = random_ids(rng, (60, 15), 30)
    truth[:5] = -1  # queries without truth are left out
    mean, rows = recall_at_k(found, truth, k, per_query=True)
    want_mean, want_rows = ref_recall(found.tolist(), truth.tolist(), k)
    assert _same(mean, want_mean)
    _check_per_query(rows, want_rows)
    assert _same(recall_at_k(found, truth, k), want_mean)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 5, 10, 40])
@pytest.mark.parametrize("one_d", [True, False])
def test_ndcg_and_mrr_random(seed, k, one_d):
    rng = np.random.default_rng(100 + seed)
    found = random_ids(rng, (50, 20), 25)
    qrels = rng.integers(0, 25, size=50) if one_d else random_ids(rng, (50, 6), 25, p_pad=0.4)
    if not one_d:
        qrels[:3] = -1  # empty relevance rows
    for fn, ref in ((ndcg_at_k, ref_ndcg), (mrr_at_k, ref_mrr)):
        mean, rows = fn(found, qrels, k, per_query=True)
        want_mean, want_rows = ref(found.tolist(), qrels.tolist(), k)
        assert _same(mean, want_mean)
        _check_per_query(rows, want_rows)


def test_large_k_matches_reference():
    rng = np.random.default_rng(7)
    found = random_ids(rng, (40, 1200), 3000, p_pad=0.05)
    truth = random_ids(rng, (40, 1000), 3000, p_pad=0.05)
    for k in (500, 1000, 1500):
        assert _same(recall_at_k(found, truth, k), ref_recall(found.tolist(), truth.tolist(), k)[0])
        assert _same(ndcg_at_k(found, truth, k), ref_ndcg(found.tolist(), truth.tolist(), k)[0])
        assert _same(mrr_at_k(found, truth, k), ref_mrr(found.tolist(), truth.tolist(), k)[0])


def test_large_ids_and_hash_collisions():
    # Ids far apart and ids that differ only in high bits must not be confused.
    big = np.iinfo(np.int64).max
    found = np.array([[big, big - 1, 1 << 40, 0, 1 << 62]], dtype=np.int64)
    truth = np.array([[0, big, (1 << 40) + 1, 1 << 61, 7]], dtype=np.int64)
    assert recall_at_k(found, truth, 5) == pytest.approx(2 / 5)


# --------------------------------------------------------------------------- hand-made cases
def test_recall_hand_examples():
    found = [[1, 2, 3, -1], [5, 5, 6, 7], [9, 9, 9, 9]]
    truth = [[3, 1, 9, 10], [-1, -1, -1, -1], [9, 8, 7, 6]]
    mean, rows = recall_at_k(found, truth, 4, per_query=True)
    assert rows[0] == 0.5 and math.isnan(rows[1]) and rows[2] == 0.25  # duplicates count once
    assert mean == pytest.approx(0.375)
    # k beyond the columns uses all columns; the denominator counts valid truth ids only.
    assert recall_at_k([[1, 2]], [[1, -1, -1]], 10) == 1.0
    assert recall_at_k([[1, 2]], [[2, 3, 4]], 1) == 0.0  # only found[:1] and truth[:1]
    assert recall_at_k([[-1, -1]], [[-1, 3]], 2) == 0.0  # padding never matches


def test_all_excluded_or_empty_is_nan():
    assert math.isnan(recall_at_k([[1, 2]], [[-1, -1]], 2))
    assert math.isnan(ndcg_at_k([[1, 2]], [[-1]], 2))
    assert math.isnan(mrr_at_k([[1, 2]], [-1], 2))
    empty = np.empty((0, 5), np.int64)
    mean, rows = recall_at_k(empty, empty, 3, per_query=True)
    assert math.isnan(mean) and rows.shape == (0,)
    assert math.isnan(ndcg_at_k(np.empty((0, 3)), [], 3))  # empty float arrays are accepted
    zero_cols = np.empty((4, 0), np.int64)
    assert math.isnan(recall_at_k(zero_cols, zero_cols, 3))
    assert mrr_at_k(zero_cols, [1, 2, 3, 4], 3) == 0.0


def test_ndcg_mrr_hand_examples():
    found = [[4, 2, 2, 7], [0, 1, 2, 3]]
    qrels = [[2, 7, -1], [9, -1, -1]]
    mean, rows = ndcg_at_k(found, qrels, 4, per_query=True)
    want0 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert rows[0] == pytest.approx(want0) and rows[1] == 0.0
    assert mean == pytest.approx(want0 / 2)
    assert mrr_at_k(found, qrels, 4, per_query=True)[1].tolist() == [0.5, 0.0]
    assert mrr_at_k(found, qrels, 1) == 0.0
    assert ndcg_at_k([[3, 1]], [3], 10) == 1.0
    assert mrr_at_k([[-1, 3]], [3], 10) == 0.5


# --------------------------------------------------------------------------- input handling
def test_accepts_any_integer_layout_without_needless_copies():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 50, size=(30, 10))
    found = truth[:, ::-1]  # a strided view
    want = ref_recall(found.tolist(), truth.tolist(), 10)[0]
    for f in (found, np.asfortranarray(found), found.astype(np.int32), found.astype(np.uint16),
              found.tolist()):
        assert recall_at_k(f, truth, 10) == pytest.approx(want)
    ro = np.ascontiguousarray(truth)
    ro.setflags(write=False)
    assert recall_at_k(ro, ro, 10) == 1.0  # read-only arrays work
    c = np.ascontiguousarray(truth, dtype=np.int64)
    assert evaluation._as_ids(c, "x") is c


@pytest.mark.parametrize("fn", [recall_at_k, ndcg_at_k, mrr_at_k])
def test_bad_inputs(fn):
    good = np.zeros((3, 4), np.int64)
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(2, 4\)"):
        fn(good, np.zeros((2, 4), np.int64), 2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        fn(good, good, 0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        fn(good, good, -3)
    with pytest.raises(ValueError, match="integer ids"):
        fn(good.astype(np.float32), good, 2)
    with pytest.raises(ValueError, match="integer ids"):
        fn(good, good.astype(bool), 2)
    with pytest.raises(ValueError, match="integer ids"):
        fn([["a", "b"]] * 3, good, 2)
    with pytest.raises(ValueError, match="2-D"):
        fn(good[0], good, 2)
    with pytest.raises(ValueError, match="2-D|1-D"):
        fn(good, np.zeros((3, 4, 1), np.int64), 2)
    with pytest.raises(ValueError, match="int64"):
        fn(good, np.full((3, 1), 2 ** 63, np.uint64), 2)
    with pytest.raises(TypeError):
        fn(good, good, 2.5)


def test_recall_truth_must_be_2d():
    with pytest.raises(ValueError, match="2-D"):
        recall_at_k(np.zeros((3, 4), np.int64), np.zeros(3, np.int64), 2)


# --------------------------------------------------------------------------- properties
id_arrays = st.tuples(st.integers(0, 12), st.integers(0, 9), st.integers(0, 9)).flatmap(
    lambda s: st.tuples(
        hnp.arrays(np.int64, (s[0], s[1]), elements=st.integers(-1, 15)),
        hnp.arrays(np.int64, (s[0], s[2]), elements=st.integers(-1, 15))))


@settings(max_examples=150, deadline=None)
@given(arrays=id_arrays, k=st.integers(1, 12))
def test_property_all_metrics_match_reference(arrays, k):
    found, truth = arrays
    f, t = found.tolist(), truth.tolist()
    for fn, ref in ((recall_at_k, ref_recall), (ndcg_at_k, ref_ndcg), (mrr_at_k, ref_mrr)):
        mean, rows = fn(found, truth, k, per_query=True)
        want_mean, want_rows = ref(f, t, k)
        assert _same(mean, want_mean)
        _check_per_query(rows, want_rows)
        valid = rows[~np.isnan(rows)]
        assert ((valid >= 0) & (valid <= 1 + 1e-12)).all()


@settings(max_examples=50, deadline=None)
@given(truth=hnp.arrays(np.int64, st.tuples(st.integers(1, 8), st.integers(1, 8)),
                        elements=st.integers(0, 1000), unique=True),
       k=st.integers(1, 10))
def test_property_perfect_results_score_one(truth, k):
    assert recall_at_k(truth, truth, k) == 1.0
    assert ndcg_at_k(truth, truth, k) == pytest.approx(1.0)
    assert mrr_at_k(truth, truth, k) == 1.0


def test_negative_ids_other_than_minus_one_are_ids():
    from pyknn import recall_at_k, mrr_at_k, ndcg_at_k
    assert recall_at_k([[-5, 9]], [[-5, 3]], 2) == 0.5
    assert recall_at_k([[-5, -7]], [[-5, -7]], 2) == 1.0
    assert recall_at_k([[-1, -7]], [[-1, -7]], 2) == 1.0  # -1 is padding on both sides
    assert mrr_at_k([[-5, 3]], [-5], 2) == 1.0
    assert ndcg_at_k([[3, -5]], [-5], 2) == pytest.approx(1 / np.log2(3))
