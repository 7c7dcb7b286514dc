"""The index classes: argument checks, metadata and persistence around the C++ core."""
import datetime
import json
import os

import numpy as np

from . import _core
from ._validation import (as_filter, as_ids, as_matrix, check_dim, check_k, check_metric,
                          is_scalar_id)
from ._version import __version__

__all__ = ["FlatIndex", "load"]


class _Index:
    """What every index shares: dim, metric, ids, metadata, save/load and pickling."""

    _core_type = None
    _kind_name = "index"

    def __init__(self):
        raise TypeError(f"{type(self).__name__} cannot be created directly")

    def _init_core(self, core):
        self._core = core
        meta = json.loads(core.metadata or "{}")
        if not meta:
            meta = {
                "pyknn_version": __version__,
                "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "index": type(self).__name__,
                "dim": core.dim,
                "metric": core.metric,
                "normalized": core.metric == "cosine",
            }
        self._metadata = meta

    @classmethod
    def _from_core(cls, core):
        obj = cls.__new__(cls)
        obj._init_core(core)
        return obj

    # -- basic properties ------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Number of dimensions of every vector."""
        return self._core.dim

    @property
    def metric(self) -> str:
        """"ip" (inner product), "l2" (squared Euclidean) or "cosine"."""
        return self._core.metric

    @property
    def metadata(self) -> dict:
        """A JSON-serialisable dict saved with the index (pyknn version, creation time, metric ...).

        Add your own keys (for instance the embedding model id); they survive save/load and pickle.
        """
        return self._metadata

    def __len__(self) -> int:
        return len(self._core)

    def memory_usage(self) -> int:
        """Bytes held by the index's vectors, codes and id map."""
        return self._core.memory_usage()

    def __repr__(self):
        return f"{type(self).__name__}(dim={self.dim}, metric={self.metric!r}, ntotal={len(self)})"

    # -- persistence -----------------------------------------------------------------------
    def _sync_metadata(self):
        try:
            text = json.dumps(self._metadata)
        except TypeError as e:
            raise TypeError(f"index metadata must be JSON-serialisable: {e}") from None
        self._core.metadata = text

    def save(self, path) -> None:
        """Write the index to ``path`` atomically (temporary file, fsync, rename).

        Read it back with :func:`pyknn.load`.
        """
        self._sync_metadata()
        self._core.save(os.fspath(path))

    def to_bytes(self) -> bytes:
        """The index in the file format, as bytes (what pickle stores)."""
        self._sync_metadata()
        return self._core.to_bytes()

    def __reduce__(self):
        return (_from_bytes, (self.to_bytes(),))


class FlatIndex(_Index):
    """Exact k-nearest-neighbour search over every stored vector.

    Parameters
    ----------
    dim : int
        Number of dimensions of the vectors.
    metric : "ip" | "l2" | "cosine"
        "ip": inner product <q, x>, larger is better. "l2": squared Euclidean distance
        ||q - x||^2, smaller is better. "cosine": <q, x> / (||q|| ||x||); vectors are normalised
        once when added (so :meth:`get` returns the stored unit vectors) and queries when searched.

    Inputs may be any real dtype (converted as ``astype(float32)``), any memory layout, or 1-D for
    a single vector. NaN or Inf (and zero vectors under cosine) raise ValueError naming the row,
    and a failed call leaves the index unchanged.
    """

    _core_type = _core.FlatIndex

    def __init__(self, dim: int, metric: str = "ip"):
        self._init_core(_core.FlatIndex(check_dim(dim), check_metric(metric)))

    def add(self, x, ids=None) -> None:
        """Add vectors.

        Parameters
        ----------
        x : array-like, shape (n, dim) or (dim,)
        ids : array-like of n int64, optional
            User ids. Default: consecutive integers continuing after the largest id seen so far
            (0, 1, 2 ... for a new index). -1 is reserved; ids already present are rejected.
        """
        x = as_matrix(x, self.dim, "vectors")
        if ids is not None:
            ids = as_ids(ids, x.shape[0])
        self._core.add(x, ids)

    def search(self, q, k: int = 10, filter=None):
        """Find the k nearest stored vectors of each query.

        Parameters
        ----------
        q : array-like, shape (nq, dim) or (dim,)
        k : int >= 1
            Results per query. Beyond the number of candidates, results are padded.
        filter : array-like, optional
            Either an allow-list of ids, or a boolean mask with one entry per stored vector (in
            the order of :attr:`ids`). Only allowed vectors are returned.

        Returns
        -------
        distances : float32 array (nq, k)
            For "ip" and "cosine" the similarity, best (largest) first; for "l2" the squared
            distance, best (smallest) first. Padding: -inf for ip/cosine, +inf for l2.
        ids : int64 array (nq, k)
            The ids of the results; -1 for padding.
        """
        q = as_matrix(q, self.dim, "queries")
        k = check_k(k)
        fids, fmask = as_filter(filter, len(self))
        return self._core.search(q, k, fids, fmask)

    def get(self, ids):
        """Return the stored vectors of ``ids``: (n, dim) for a sequence, (dim,) for one id.

        Raises KeyError naming the first unknown id. Under cosine these are unit vectors.
        """
        if is_scalar_id(ids):
            return self._core.get(as_ids(ids))[0]
        return self._core.get(as_ids(ids))

    def remove(self, ids, missing_ok: bool = False) -> int:
        """Remove the vectors of ``ids``; returns how many were removed.

        Unknown ids raise KeyError (and nothing is removed) unless ``missing_ok`` is True.
        Removal moves the last stored vector into the freed row, so :attr:`ids` order changes.
        """
        return self._core.remove(as_ids(ids), bool(missing_ok))

    def contains(self, id) -> bool:
        """Whether ``id`` is stored."""
        if not is_scalar_id(id):
            raise TypeError(f"id must be an integer, got {type(id).__name__}")
        return self._core.contains(int(id))

    __contains__ = contains

    @property
    def ids(self):
        """The stored ids, in row order (the order a boolean ``filter`` refers to)."""
        return self._core.ids()


_KINDS = {1: FlatIndex}


def _wrap(core):
    cls = _KINDS.get(core.kind)
    if cls is None:
        raise _core.FormatError(f"index kind {core.kind} is not supported by this pyknn")
    return cls._from_core(core)


def _from_bytes(data):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    return _wrap(_core.from_bytes(bytes(data)))


def load(path):
    """Load an index written by ``index.save(path)``; returns an object of the saved class.

    Raises FileNotFoundError / OSError for unreadable paths and :class:`pyknn.FormatError` for
    truncated, corrupted, foreign or unsupported-version files.
    """
    return _wrap(_core.load(os.fspath(path)))
