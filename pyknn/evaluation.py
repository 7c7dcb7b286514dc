"""Evaluation: exact ground truth, recall against it, NDCG / MRR against judged relevance.

* :func:`ground_truth` is exact search in float64 numpy. It shares no code with
  the C++ indexes, so tests and benchmarks use it as the independent reference.
* :func:`recall_at_k`, :func:`ndcg_at_k` and :func:`mrr_at_k` validate their
  inputs and run the compiled loops of :mod:`pyknn._metrics` (GIL released).

Id conventions: ids are integers; -1 (what the indexes pad with) is padding and
never counts as a hit; every other value, negative ones included, is an id.
Ids are compared as sets, so an id repeated
in a result row counts once.
"""

from __future__ import annotations

import operator
from typing import Tuple

import numpy as np

from . import _metrics

__all__ = ["recall_at_k", "ndcg_at_k", "mrr_at_k", "ground_truth", "evaluate", "METRICS"]

#: Metrics understood by :func:`ground_truth` (the same names as the indexes).
METRICS = ("ip", "l2", "cosine")

_INT64_MAX = np.iinfo(np.int64).max
_EPS64 = np.finfo(np.float64).eps


# --------------------------------------------------------------------------- validation
def _check_k(k) -> int:
    if isinstance(k, (bool, np.bool_)):
        raise TypeError("k must be an integer, got bool")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an integer, got {type(k).__name__}") from None
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return k


def _as_ids(x, name: str, allow_1d: bool = False) -> np.ndarray:
    """Return x as a C-contiguous (n, m) int64 array, copying only when needed."""
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        # np.asarray([]) and [[]] are float64: accept empty input of any numeric kind.
        if not (a.size == 0 and a.dtype.kind in "fiub"):
            raise ValueError(f"{name} must hold integer ids, got dtype {a.dtype}")
    elif a.dtype == np.uint64 and a.size and int(a.max()) > _INT64_MAX:
        raise ValueError(f"{name} holds ids larger than the int64 maximum")
    if a.ndim == 1 and allow_1d:
        a = a.reshape(-1, 1)
    if a.ndim != 2:
        expected = "1-D (n_queries,) or 2-D (n_queries, r)" if allow_1d else "2-D (n_queries, k)"
        raise ValueError(f"{name} must be {expected}, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.int64)


def _pair(found_ids, other, other_name: str, allow_1d: bool):
    found = _as_ids(found_ids, "found_ids")
    other = _as_ids(other, other_name, allow_1d=allow_1d)
    if found.shape[0] != other.shape[0]:
        raise ValueError(
            f"found_ids and {other_name} need the same number of rows (queries), "
            f"got shapes {found.shape} and {other.shape}")
    return found, other


def _result(mean_and_rows, per_query: bool):
    mean, rows = mean_and_rows
    return (float(mean), rows) if per_query else float(mean)


# --------------------------------------------------------------------------- metrics
def recall_at_k(found_ids, true_ids, k: int, *, per_query: bool = False):
    """Recall@k of search results against exact neighbours.

    For each query i: ``|set(found_ids[i, :k]) & set(true_ids[i, :k])|`` divided by
    the number of distinct valid ids in ``true_ids[i, :k]``. Ids of -1 are
    padding and are ignored on both sides; a repeated id counts once. When an
    array has fewer than k columns all its columns are used. Queries whose
    ``true_ids[i, :k]`` holds no valid id are left out of the mean.

    Parameters
    ----------
    found_ids : array-like of int, shape (n_queries, k_found)
        Ids returned by an index, best first (e.g. the ``I`` of ``D, I = index.search(q, k)``).
    true_ids : array-like of int, shape (n_queries, k_true)
        Exact nearest-neighbour ids, best first (e.g. from :func:`ground_truth`).
    k : int
        Cut-off, >= 1.
    per_query : bool, keyword-only
        Also return the per-query recalls (float64 array, NaN for left-out queries).

    Returns
    -------
    float, or (float, ndarray) when ``per_query`` is true
        Mean recall over the queries that count; NaN if none does.

    Raises
    ------
    ValueError
        Non-integer ids, arrays that are not 2-D, different numbers of rows, k < 1.
    """
    k = _check_k(k)
    found, truth = _pair(found_ids, true_ids, "true_ids", allow_1d=False)
    return _result(_metrics.recall_at_k(found, truth, k), per_query)


def ndcg_at_k(found_ids, qrels, k: int = 10, *, per_query: bool = False):
    """NDCG@k with binary relevance.

    ``DCG = sum(1 / log2(r + 2))`` over the 0-based ranks r < k whose id is
    relevant (each relevant id counted once); ``IDCG`` is the same sum over
    ``r < min(k, n_relevant)``; the query's value is DCG / IDCG. Queries without
    any relevant id are left out of the mean.

    Parameters
    ----------
    found_ids : array-like of int, shape (n_queries, k_found)
        Ranked ids per query, best first. -1 is padding.
    qrels : array-like of int, shape (n_queries,) or (n_queries, r)
        Judged-relevant ids per query: one per query (1-D) or a row padded with -1.
    k : int
        Cut-off, >= 1 (default 10).
    per_query : bool, keyword-only
        Also return the per-query values (float64 array, NaN for left-out queries).

    Returns
    -------
    float, or (float, ndarray) when ``per_query`` is true
        Mean NDCG@k over the queries that count; NaN if none does.

    Raises
    ------
    ValueError
        Non-integer ids, wrong number of dimensions, different numbers of rows, k < 1.
    """
    k = _check_k(k)
    found, rel = _pair(found_ids, qrels, "qrels", allow_1d=True)
    return _result(_metrics.ndcg_at_k(found, rel, k), per_query)


def mrr_at_k(found_ids, qrels, k: int = 10, *, per_query: bool = False):
    """Mean reciprocal rank at k.

    For each query: ``1 / (r + 1)`` for the first 0-based rank r < k whose id is
    relevant, 0 if none is. Queries without any relevant id are left out of the mean.

    Parameters
    ----------
    found_ids : array-like of int, shape (n_queries, k_found)
        Ranked ids per query, best first. -1 is padding.
    qrels : array-like of int, shape (n_queries,) or (n_queries, r)
        Judged-relevant ids per query: one per query (1-D) or a row padded with -1.
    k : int
        Cut-off, >= 1 (default 10).
    per_query : bool, keyword-only
        Also return the per-query values (float64 array, NaN for left-out queries).

    Returns
    -------
    float, or (float, ndarray) when ``per_query`` is true
        MRR@k over the queries that count; NaN if none does.

    Raises
    ------
    ValueError
        Non-integer ids, wrong number of dimensions, different numbers of rows, k < 1.
    """
    k = _check_k(k)
    found, rel = _pair(found_ids, qrels, "qrels", allow_1d=True)
    return _result(_metrics.mrr_at_k(found, rel, k), per_query)


# --------------------------------------------------------------------------- ground truth
def _as_vectors(x, name: str, allow_1d: bool) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    if a.ndim == 1 and allow_1d:
        a = a.reshape(1, -1)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, dim), got shape {a.shape}")
    return a


def _check_finite(a: np.ndarray, name: str, rows_per_chunk: int) -> None:
    if a.dtype.kind != "f":
        return
    for s in range(0, a.shape[0], rows_per_chunk):
        ok = np.isfinite(a[s:s + rows_per_chunk]).all(axis=1)
        if not ok.all():
            raise ValueError(f"{name} row {s + int(np.argmin(ok))} contains NaN or Inf")


def _row_norms(a: np.ndarray, rows_per_chunk: int) -> np.ndarray:
    """Euclidean norms of the rows of a, in float64, converting a chunk at a time."""
    out = np.empty(a.shape[0], np.float64)
    for s in range(0, a.shape[0], rows_per_chunk):
        c = a[s:s + rows_per_chunk].astype(np.float64, copy=False)
        out[s:s + c.shape[0]] = np.sqrt(np.einsum("ij,ij->i", c, c))
    return out


def ground_truth(base, queries, k: int, metric: str = "ip", *,
                 memory_budget: int = 256 << 20) -> Tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by brute force in float64 numpy.

    The independent reference for the indexes: it shares no code with them.

    Method, per block of queries: float64 scores against all of ``base``
    (a matrix product); every vector scoring within a rounding-error bound of
    the k-th best is a candidate, so near-ties at the cut-off are never lost;
    candidates are re-scored one by one in float64 (for "l2" as the sum of
    squared differences, which has no cancellation error) and ordered by
    (score, id): ties go to the smaller id. For float16 or small-integer data
    the float64 inner products are exact, so the order is exact too.

    Parameters
    ----------
    base : array-like, shape (n, dim)
        Database vectors (any real dtype; float16 is converted block by block).
        Row i has id i.
    queries : array-like, shape (n_queries, dim) or (dim,)
        Query vectors; a 1-D array is one query.
    k : int
        Neighbours per query, >= 1. If k > n the rows are padded (see Returns).
    metric : {"ip", "l2", "cosine"}
        "ip": inner product, largest first. "l2": squared Euclidean distance,
        smallest first. "cosine": inner product of the float64-normalised
        vectors, largest first.
    memory_budget : int, keyword-only
        Approximate bound, in bytes, on the temporary memory (default 256 MiB);
        the query block size follows from it.

    Returns
    -------
    distances : ndarray of float32, shape (n_queries, k)
        Similarity (ip, cosine; descending) or squared distance (l2; ascending).
        Padding: -inf for ip / cosine, +inf for l2.
    ids : ndarray of int64, shape (n_queries, k)
        Row numbers in ``base``; padding is -1.

    Raises
    ------
    ValueError
        Unknown metric, k < 1, dimensions that differ, NaN / Inf in the data,
        a zero vector with "cosine".
    TypeError
        Non-numeric arrays or a non-integer k.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    k = _check_k(k)
    base = _as_vectors(base, "base", allow_1d=False)
    queries = _as_vectors(queries, "queries", allow_1d=True)
    n, d = base.shape
    nq = queries.shape[0]
    if queries.shape[1] != d:
        raise ValueError(f"expected dim {d}, got {queries.shape[1]} (base {base.shape}, "
                         f"queries {queries.shape})")
    budget = max(int(memory_budget), 1 << 20)
    row_bytes = 8 * max(d, 1)
    chunk_rows = max(1, budget // (4 * row_bytes))  # float64 rows per converted chunk
    _check_finite(base, "base", chunk_rows)
    _check_finite(queries, "queries", chunk_rows)

    pad = np.inf if metric == "l2" else -np.inf
    dist = np.full((nq, k), pad, dtype=np.float32)
    ids = np.full((nq, k), -1, dtype=np.int64)
    if n == 0 or nq == 0:
        return dist, ids

    bnorm = _row_norms(base, chunk_rows)
    qnorm = _row_norms(queries, chunk_rows)
    if metric == "cosine":
        for name, norms in (("base", bnorm), ("queries", qnorm)):
            if not norms.all():
                raise ValueError(f"cosine: {name} row {int(np.argmin(norms != 0))} is a zero vector")

    def convert(a, rows, norms):
        # float64 copy of some rows; normalised for cosine. The same elementwise
        # operations in selection and re-scoring give bit-identical vectors.
        x = a[rows].astype(np.float64, copy=False)
        return x / norms[rows][..., None] if metric == "cosine" else x

    # Base chunks in float64: converted once if they fit in a quarter of the budget,
    # otherwise again for every query block (a cost of 1 / block size of the product).
    chunks = [slice(s, min(s + chunk_rows, n)) for s in range(0, n, chunk_rows)]
    cached = [convert(base, c, bnorm) for c in chunks] if n * row_bytes <= budget // 4 else None
    bmax = 1.0 if metric == "cosine" else float(bnorm.max())
    bsq = (bnorm * bnorm) if metric == "l2" else None

    kk = min(k, n)
    # S, its partitioned copy and the mask: about 17 bytes per (query, base) pair.
    qblock = int(max(1, min(nq, (budget // 2) // (17 * n))))
    for q0 in range(0, nq, qblock):
        qs = slice(q0, min(q0 + qblock, nq))
        Q = convert(queries, qs, qnorm)
        nb = Q.shape[0]

        # Approximate scores, larger is better (l2: 2 q.b - |b|^2, a shift of -|q-b|^2).
        S = np.empty((nb, n), np.float64)
        for i, c in enumerate(chunks):
            B = cached[i] if cached is not None else convert(base, c, bnorm)
            S[:, c] = Q @ B.T  # a contiguous product keeps BLAS on the fast path
        if metric == "l2":
            S *= 2.0
            S -= bsq

        # Bound on |approximate - re-scored| (both carry ~d*eps relative rounding).
        qn = 1.0 if metric == "cosine" else qnorm[qs]
        scale = (qn + bmax) ** 2 if metric == "l2" else qn * bmax
        margin = 4.0 * (d + 2) * _EPS64 * scale + np.finfo(np.float64).tiny
        kth = np.partition(S, n - kk, axis=1)[:, n - kk]
        mask = S >= (kth - margin)[:, None]
        del S

        # Candidates as a padded (nb, cmax) matrix; pad slots are id -1.
        counts = mask.sum(axis=1)
        rows, cols = np.nonzero(mask)
        del mask
        cmax = int(counts.max())
        pos = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
        cand = np.full((nb, cmax), -1, dtype=np.int64)
        cand[rows, pos] = cols

        score = _rescore(base, Q, cand, metric, bnorm, convert, budget // 4)
        # Order by (-score, id); -inf pads sort last.
        order = np.lexsort((cand, -score), axis=-1)[:, :kk]
        top_ids = np.take_along_axis(cand, order, axis=1)
        top = np.take_along_axis(score, order, axis=1)
        ids[qs, :kk] = top_ids
        dist[qs, :kk] = -top if metric == "l2" else top
    return dist, ids


def _rescore(base, Q, cand, metric, bnorm, convert, budget):
    """Scores (larger is better) of the candidate ids per query row; -inf at pads."""
    nb, cmax = cand.shape
    d = Q.shape[1]
    safe = np.where(cand >= 0, cand, 0)
    out = np.empty((nb, cmax), np.float64)
    # Gathered rows take nb_sub * c_sub * d * 8 bytes (twice, with the products).
    cells = max(1, budget // (16 * max(d, 1)))
    c_sub = max(1, min(cmax, cells))
    r_sub = max(1, cells // c_sub)
    for r0 in range(0, nb, r_sub):
        rs = slice(r0, min(r0 + r_sub, nb))
        q = Q[rs, None, :]
        for c0 in range(0, cmax, c_sub):
            cs = slice(c0, min(c0 + c_sub, cmax))
            B = convert(base, safe[rs, cs], bnorm)
            if metric == "l2":
                diff = B - q
                # Pairwise summation along the contiguous last axis.
                out[rs, cs] = -np.sum(diff * diff, axis=-1)
            else:
                out[rs, cs] = np.sum(B * q, axis=-1)
    out[cand < 0] = -np.inf
    return out


# --------------------------------------------------------------------------- one call
def evaluate(index, queries, gt_ids=None, qrels=None, k: int = 10, *, base=None,
             repeats: int = 1, **search_params) -> dict:
    """Search ``queries`` with ``index`` and report quality and speed in one dict.

    Parameters
    ----------
    index : a pyknn index (anything with ``search(q, k, **params) -> (D, I)``)
    queries : array-like (nq, dim)
    gt_ids : array-like of int (nq, >= k), optional
        Exact nearest ids, best first (e.g. from :func:`ground_truth`). When omitted and
        ``base`` is given, computed here with :func:`ground_truth` (base row i = id i).
    qrels : array-like of int (nq,) or (nq, r), optional
        Judged-relevant ids per query (-1 pads rows), for NDCG@k and MRR@k.
    k : int
        Results per query, and the cut-off of every metric (recall, NDCG, MRR): the keys name
        it (``recall@k``, ``ndcg@k``, ``mrr@k``), so k=3 reports ``ndcg@3``.
    base : array-like (n, dim), optional
        The indexed vectors, only to compute ``gt_ids`` when not given.
    repeats : int >= 1
        Timed searches after a first, untimed one; QPS is from the fastest.
    **search_params
        Passed to ``index.search`` (nprobe, ef_search, rerank ...).

    Returns
    -------
    dict with ``recall@k`` (None without ground truth), ``ndcg@k`` and ``mrr@k`` (None
    without qrels), ``qps`` (queries per second of one batch call), ``seconds``, ``nq``, ``k``,
    ``params`` and ``ids`` (the result ids, int64 (nq, k)).
    """
    import time

    k = _check_k(k)
    if isinstance(repeats, (bool, np.bool_)) or not isinstance(repeats, (int, np.integer)):
        raise TypeError(f"repeats must be an integer, got {type(repeats).__name__}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    repeats = int(repeats)
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q.reshape(1, -1)
    if gt_ids is None and base is not None:
        gt_ids = ground_truth(base, q, k, getattr(index, "metric", "ip"))[1]
    if gt_ids is not None and np.asarray(gt_ids).shape[0] != q.shape[0]:
        raise ValueError(f"gt_ids has {np.asarray(gt_ids).shape[0]} rows for {q.shape[0]} queries")
    if qrels is not None and np.asarray(qrels).shape[0] != q.shape[0]:
        raise ValueError(f"qrels has {np.asarray(qrels).shape[0]} rows for {q.shape[0]} queries")
    best = np.inf
    for i in range(1 + repeats):
        t0 = time.perf_counter()
        _, ids = index.search(q, k, **search_params)
        dt = time.perf_counter() - t0
        if i:
            best = min(best, dt)
    return {
        f"recall@{k}": None if gt_ids is None else recall_at_k(ids, gt_ids, k),
        f"ndcg@{k}": None if qrels is None else ndcg_at_k(ids, qrels, k),
        f"mrr@{k}": None if qrels is None else mrr_at_k(ids, qrels, k),
        "qps": q.shape[0] / best if best > 0 else float("inf"),
        "seconds": best,
        "nq": int(q.shape[0]),
        "k": k,
        "params": dict(search_params),
        "ids": ids,
    }
