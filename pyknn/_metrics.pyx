# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Retrieval metrics over large id arrays (private; use :mod:`pyknn.evaluation`).

Every function takes C-contiguous int64 2-D arrays of ids, where -1 (any
only -1) is padding and never counts; other negative ids are ordinary ids, and returns ``(mean, per_query)``:

* ``per_query`` is a float64 array of shape (nq,) holding each query's value,
  NaN for a query that is excluded (no valid truth / relevant id);
* ``mean`` is a Python float, the mean over the queries that are not excluded,
  NaN if every query is excluded (or nq == 0).

Ids are compared as sets: an id repeated in ``found`` counts once. Membership
uses a small open-addressing hash set per query, so each query costs O(k) and
k in the thousands stays fast. The inner loops run without the GIL.
"""

from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from libc.math cimport log2, NAN

import numpy as np

# Empty slots hold -1, the padding id, which is never inserted; `taken` marks ids already matched,
# so an id repeated in `found` counts once.
cdef enum:
    EMPTY = -1


cdef struct IdSet:
    int64_t* slots
    unsigned char* taken
    uint64_t mask
    Py_ssize_t capacity


cdef inline uint64_t _hash(int64_t key) noexcept nogil:
    # Fibonacci hashing; fold the well-mixed high bits into the low ones used.
    cdef uint64_t h = (<uint64_t>key) * <uint64_t>0x9E3779B97F4A7C15ULL
    return h ^ (h >> 32)


cdef inline void _set_free(IdSet* s) noexcept nogil:
    free(s.slots)
    free(s.taken)
    s.slots = NULL
    s.taken = NULL


cdef int _set_init(IdSet* s, Py_ssize_t max_items) noexcept nogil:
    """Allocate a table with load factor <= 1/2 for max_items ids; 0 on success."""
    cdef Py_ssize_t cap = 8
    while cap < 2 * max_items:
        cap *= 2
    s.capacity = cap
    s.mask = <uint64_t>(cap - 1)
    s.slots = <int64_t*>malloc(cap * sizeof(int64_t))
    s.taken = <unsigned char*>malloc(cap)
    if s.slots == NULL or s.taken == NULL:
        _set_free(s)
        return -1
    return 0


cdef inline void _set_clear(IdSet* s) noexcept nogil:
    # All bytes 0xFF == int64 -1 == EMPTY.
    memset(s.slots, 0xFF, s.capacity * sizeof(int64_t))
    memset(s.taken, 0, s.capacity)


cdef inline bint _set_insert(IdSet* s, int64_t key) noexcept nogil:
    """Insert an id other than -1; return True if it was not present."""
    cdef uint64_t i = _hash(key) & s.mask
    while s.slots[i] != EMPTY:
        if s.slots[i] == key:
            return False
        i = (i + 1) & s.mask
    s.slots[i] = key
    return True


cdef inline bint _set_take(IdSet* s, int64_t key) noexcept nogil:
    """Return True the first time a present id is looked up, False otherwise."""
    cdef uint64_t i = _hash(key) & s.mask
    while s.slots[i] != EMPTY:
        if s.slots[i] == key:
            if s.taken[i]:
                return False
            s.taken[i] = 1
            return True
        i = (i + 1) & s.mask
    return False


cdef inline Py_ssize_t _fill_set(IdSet* s, const int64_t[:, ::1] ids, Py_ssize_t i,
                                 Py_ssize_t n) noexcept nogil:
    """Empty the set, then insert the valid ids of ids[i, :n]; return how many distinct ones."""
    cdef Py_ssize_t j, count = 0
    cdef int64_t v
    _set_clear(s)
    for j in range(n):
        v = ids[i, j]
        if v != EMPTY and _set_insert(s, v):
            count += 1
    return count


cdef tuple _finish(Py_ssize_t n_valid, double total, object out):
    return (total / n_valid if n_valid > 0 else float("nan")), out


def recall_at_k(const int64_t[:, ::1] found, const int64_t[:, ::1] truth, Py_ssize_t k):
    """recall@k of ``found`` against ``truth``; returns ``(mean, per_query)``.

    Per query: |set(found[i, :k]) & set(truth[i, :k])| / (number of distinct
    valid ids in truth[i, :k]), ids == -1 ignored. Only the first min(k, columns)
    columns of each array are read. Queries without valid truth are NaN and
    excluded from the mean.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    cdef Py_ssize_t nq = found.shape[0]
    if truth.shape[0] != nq:
        raise ValueError(f"found has {nq} rows but truth has {truth.shape[0]}")
    cdef Py_ssize_t kf = min(k, found.shape[1]), kt = min(k, truth.shape[1])
    out = np.empty(nq, dtype=np.float64)
    cdef double[::1] res = out
    cdef IdSet s
    cdef Py_ssize_t i, j, n_truth, hits, n_valid = 0
    cdef double total = 0.0
    cdef int64_t v
    if _set_init(&s, kt) != 0:
        raise MemoryError()
    with nogil:
        for i in range(nq):
            n_truth = _fill_set(&s, truth, i, kt)
            if n_truth == 0:
                res[i] = NAN
                continue
            hits = 0
            for j in range(kf):
                v = found[i, j]
                if v != EMPTY and _set_take(&s, v):
                    hits += 1
            res[i] = <double>hits / <double>n_truth
            total += res[i]
            n_valid += 1
    _set_free(&s)
    return _finish(n_valid, total, out)


def ndcg_at_k(const int64_t[:, ::1] found, const int64_t[:, ::1] relevant, Py_ssize_t k):
    """Binary-relevance NDCG@k; returns ``(mean, per_query)``.

    DCG = sum over ranks r < k (0-based) with found[i, r] relevant of
    1 / log2(r + 2), each relevant id counted at most once; IDCG = sum over
    r < min(k, n_rel) of 1 / log2(r + 2), where n_rel is the number of distinct
    valid ids in the whole row relevant[i]. Queries with n_rel == 0 are NaN
    and excluded from the mean.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    cdef Py_ssize_t nq = found.shape[0]
    if relevant.shape[0] != nq:
        raise ValueError(f"found has {nq} rows but relevant has {relevant.shape[0]}")
    cdef Py_ssize_t kf = min(k, found.shape[1]), r = relevant.shape[1]
    cdef Py_ssize_t n_disc = max(kf, min(k, r))
    out = np.empty(nq, dtype=np.float64)
    cdef double[::1] res = out
    cdef IdSet s
    cdef Py_ssize_t i, j, n_rel, n_valid = 0
    cdef double total = 0.0, dcg, idcg
    cdef int64_t v
    cdef double* disc = <double*>malloc((n_disc + 1) * sizeof(double))
    if disc == NULL:
        raise MemoryError()
    if _set_init(&s, r) != 0:
        free(disc)
        raise MemoryError()
    with nogil:
        for j in range(n_disc):
            disc[j] = 1.0 / log2(<double>(j + 2))
        for i in range(nq):
            n_rel = _fill_set(&s, relevant, i, r)
            if n_rel == 0:
                res[i] = NAN
                continue
            dcg = 0.0
            for j in range(kf):
                v = found[i, j]
                if v != EMPTY and _set_take(&s, v):
                    dcg += disc[j]
            idcg = 0.0
            for j in range(min(k, n_rel)):
                idcg += disc[j]
            res[i] = dcg / idcg
            total += res[i]
            n_valid += 1
    free(disc)
    _set_free(&s)
    return _finish(n_valid, total, out)


def mrr_at_k(const int64_t[:, ::1] found, const int64_t[:, ::1] relevant, Py_ssize_t k):
    """Mean reciprocal rank at k; returns ``(mean, per_query)``.

    Per query: 1 / (r + 1) for the smallest 0-based rank r < k with found[i, r]
    in the valid ids of relevant[i], else 0. Queries without valid relevant
    ids are NaN and excluded from the mean.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    cdef Py_ssize_t nq = found.shape[0]
    if relevant.shape[0] != nq:
        raise ValueError(f"found has {nq} rows but relevant has {relevant.shape[0]}")
    cdef Py_ssize_t kf = min(k, found.shape[1]), r = relevant.shape[1]
    out = np.empty(nq, dtype=np.float64)
    cdef double[::1] res = out
    cdef IdSet s
    cdef Py_ssize_t i, j, n_rel, n_valid = 0
    cdef double total = 0.0
    cdef int64_t v
    if _set_init(&s, r) != 0:
        raise MemoryError()
    with nogil:
        for i in range(nq):
            n_rel = _fill_set(&s, relevant, i, r)
            if n_rel == 0:
                res[i] = NAN
                continue
            res[i] = 0.0
            for j in range(kf):
                v = found[i, j]
                if v != EMPTY and _set_take(&s, v):
                    res[i] = 1.0 / <double>(j + 1)
                    break
            total += res[i]
            n_valid += 1
    _set_free(&s)
    return _finish(n_valid, total, out)
