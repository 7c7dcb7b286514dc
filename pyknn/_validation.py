"""Argument checks and conversions shared by every index (the input policy)."""
import numbers
import operator

import numpy as np

_METRICS = ("ip", "l2", "cosine")


def check_metric(metric):
    if not isinstance(metric, str) or metric.lower() not in _METRICS:
        raise ValueError(f"unknown metric {metric!r} (expected 'ip', 'l2' or 'cosine')")
    return metric.lower()


# Largest dimension an index accepts (the C++ core checks the same).
MAX_DIM = 1 << 20
# Most results (queries x k, or queries x shortlist) one search may hold: 2^28 results already
# take 3 GB (float32 distance + int64 id each); beyond that a typo in k is far likelier than a
# real need, and the allocation would take the process down rather than raise.
MAX_RESULTS = 1 << 28


def check_positive_int(value, name, minimum=1, maximum=(1 << 63) - 1):
    """Return value as an int in [minimum, maximum]; TypeError for non-integers (bool included)."""
    if type(value) is int and minimum <= value <= maximum:  # the common case, without ABC checks
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")
    return int(value)


def check_dim(dim):
    return check_positive_int(dim, "dim", maximum=MAX_DIM)


def check_k(k, nq=1, name="k", minimum=1):
    """k >= minimum, and small enough that the (nq, k) results can be allocated.

    Also serves shortlist sizes (name="rerank"), which cost the same per query.
    """
    k = check_positive_int(k, name, minimum=minimum)
    if nq * k > MAX_RESULTS:
        raise ValueError(f"{name}={k} for {nq} queries asks for {nq * k} results, more than the "
                         f"{MAX_RESULTS} one search can hold; lower {name} or split the queries")
    return k


def as_matrix(x, dim, what="vectors"):
    """Return x as a C-contiguous float32 (n, dim) array, copying only when needed.

    Real dtypes are converted as ``astype(np.float32)`` would; a 1-D array is one vector.
    """
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{what} must be an array of real numbers, got dtype {a.dtype}")
    if a.ndim == 1:
        a = a.reshape(1, -1)
    elif a.ndim != 2:
        raise ValueError(f"{what} must be a 1-D vector or a 2-D (n, dim) array, got shape {a.shape}")
    if a.shape[1] != dim:
        raise ValueError(f"{what}: expected dim {dim}, got {a.shape[1]}")
    if type(a) is np.ndarray and a.dtype == np.float32 and a.flags.c_contiguous:
        return a  # nothing to convert (subclasses such as np.matrix still become ndarrays)
    # Values beyond float32's range become Inf, which the core then rejects naming the row.
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(a, dtype=np.float32)


def as_ids(ids, n=None, what="ids"):
    """Return ids as a C-contiguous 1-D int64 array (a scalar becomes one id)."""
    a = ids if isinstance(ids, np.ndarray) else np.asarray(ids)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.size == 0:
        a = a.reshape(0).astype(np.int64)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integers, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"got {a.shape[0]} {what} for {n} vectors")
    if a.dtype == np.uint64 and a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{what} must fit in int64, got {int(a.max())}")
    return np.ascontiguousarray(a, dtype=np.int64)


def as_filter(filter, ntotal):
    """Split a search filter into (allowed ids, row mask): exactly one of them is not None.

    ``filter`` is an allow-list of ids (integers) or a boolean mask with one entry per stored
    vector, in the order of ``index.ids``.
    """
    if filter is None:
        return None, None
    if isinstance(filter, (set, frozenset)):
        filter = np.fromiter(filter, dtype=np.int64, count=len(filter))
    a = filter if isinstance(filter, np.ndarray) else np.asarray(filter)
    if a.dtype == np.uint8:
        # Most likely a 0/1 mask that lost its bool dtype; as ids it would silently mean 0 and 1.
        raise TypeError("a uint8 filter is ambiguous: pass a boolean mask (mask.astype(bool)) "
                        "or ids as int64")
    if a.dtype == np.bool_:
        if a.ndim != 1 or a.shape[0] != ntotal:
            raise ValueError(
                f"a boolean filter needs one entry per stored vector ({ntotal}), got shape {a.shape}")
        return None, np.ascontiguousarray(a).view(np.uint8)
    return as_ids(a, what="filter ids"), None


def is_scalar_id(x):
    try:
        operator.index(x)
        return not isinstance(x, bool)
    except TypeError:
        return False
