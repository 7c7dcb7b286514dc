"""MatryoshkaIndex: search a short prefix of each vector, re-rank a shortlist with the full vector.

Matryoshka-trained models (OpenAI text-embedding-3, nomic-embed v1.5, ...) put most of the
meaning in the first components, so the first ``search_dim`` components, re-normalised, find a
shortlist almost as well as the full vector, at a fraction of the first stage's memory and
compute; the shortlist (``rerank`` candidates) is then scored exactly with the full vectors.
Models not trained that way still work, with lower recall at small ``search_dim``.
"""
from __future__ import annotations

import io
import json
import os
import struct
from typing import Optional

import numpy as np

from .. import _core
from .._guard import Guarded, inner, new_metadata
from .._validation import as_ids, as_matrix, check_dim, check_k, check_positive_int
from ..indexes import FlatIndex, HNSWIndex, IVFPQIndex, _from_bytes
from .tiered import _atomic_write

__all__ = ["MatryoshkaIndex", "FIRST_STAGES"]

_MAGIC = b"PYKNNMATRYOSHKA\x00"
_VERSION = 1
# Queries re-ranked per block: bounds the gathered (block, rerank, full_dim) float32 array
# (256 x 100 x 1536 x 4 bytes = 157 MB at the largest common size).
_RERANK_BLOCK = 256


#: First stages this pyknn provides.
FIRST_STAGES = ("flat", "hnsw", "ivfpq")


class MatryoshkaIndex(Guarded):
    """Two-stage search: a first-stage index over the re-normalised prefix, exact re-ranking.

    Parameters
    ----------
    full_dim : int
        Dimension of the vectors added and searched.
    search_dim : int, 1 ... full_dim
        Components of the prefix the first stage indexes (re-normalised to unit length).
    first_stage : "hnsw" | "flat" | "ivfpq"
        Index over the prefixes: HNSWIndex (graph), FlatIndex (exact over the prefixes), or
        IVFPQIndex (compressed codes; needs :meth:`train`).
    rerank : int >= 1
        Shortlist size re-scored with the full vectors (max(rerank, k) is used).
    store_dtype : "float32" | "float16"
        How the full vectors are kept for re-ranking (float16 halves their memory; scores are
        then computed from float16-rounded vectors, about 3 decimal digits).
    metric : "ip" | "cosine"
        Of the re-ranking on full vectors. Under "cosine" vectors and queries are normalised.
        The first stage always compares unit prefixes (cosine of the prefixes).
    **stage_params
        Passed to the first stage's constructor (M, ef_construction, ef_search for HNSW;
        nlist, pq_m, nbits ... for IVFPQ).

    ``search`` returns (similarities float32 (nq, k), ids int64 (nq, k)), best first; padding
    -inf / -1. Memory per vector: full_dim x (4 or 2) bytes for the store, plus the first
    stage's index of search_dim-dimensional vectors, plus 24 bytes of id maps.
    """

    def __init__(self, full_dim: int, search_dim: int = 256, first_stage: str = "hnsw",
                 rerank: int = 100, store_dtype: str = "float32", metric: str = "ip",
                 **stage_params):
        full_dim = check_dim(full_dim)
        search_dim = check_positive_int(search_dim, "search_dim", maximum=full_dim)
        self.rerank = check_positive_int(rerank, "rerank", maximum=1 << 20)
        if store_dtype not in ("float32", "float16"):
            raise ValueError(f"store_dtype must be 'float32' or 'float16', got {store_dtype!r}")
        if metric not in ("ip", "cosine"):
            raise ValueError(f"MatryoshkaIndex supports metric 'ip' or 'cosine', got {metric!r}")
        self._full_dim, self._search_dim, self._metric = full_dim, search_dim, metric
        self._store_dtype = np.dtype(store_dtype)
        self.first_stage_kind = first_stage
        self._stage = self._make_stage(first_stage, search_dim, stage_params)
        self._store = np.empty((0, full_dim), self._store_dtype)
        self._row_ids = np.empty(0, np.int64)      # row -> user id (-1: removed)
        self._n_rows = 0
        self._sorted_ids = np.empty(0, np.int64)   # id -> row, as two sorted arrays
        self._sorted_rows = np.empty(0, np.int64)
        self._next_id = 0
        self._metadata = new_metadata("MatryoshkaIndex", full_dim, metric)
        self._metadata.update(search_dim=search_dim, first_stage=first_stage, rerank=self.rerank,
                              store_dtype=store_dtype, stage_params=stage_params)

    @staticmethod
    def _make_stage(kind, search_dim, params):
        if kind == "flat":
            return FlatIndex(search_dim, "ip", **params)
        if kind == "hnsw":
            return HNSWIndex(search_dim, metric="ip", **params)
        if kind == "ivfpq":
            return IVFPQIndex(search_dim, metric="ip", **params)
        raise ValueError(f"unknown first_stage {kind!r}; available: {', '.join(FIRST_STAGES)}")

    # -- properties ----------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Full dimension of the vectors added and searched."""
        return self._full_dim

    @property
    def search_dim(self) -> int:
        """Prefix length indexed by the first stage."""
        return self._search_dim

    @property
    def metric(self) -> str:
        return self._metric

    @property
    def first_stage(self):
        """The first-stage index (ids are internal row numbers)."""
        return self._stage

    @property
    def is_trained(self) -> bool:
        """Whether the first stage is ready for adds (only IVF-PQ needs :meth:`train`)."""
        return getattr(self._stage, "is_trained", True)

    def __len__(self) -> int:
        return int(self._sorted_ids.size)

    def __repr__(self):
        return (f"MatryoshkaIndex(full_dim={self.dim}, search_dim={self.search_dim}, "
                f"first_stage={self.first_stage_kind!r}, rerank={self.rerank}, "
                f"store_dtype={self._store_dtype.name!r}, ntotal={len(self)})")

    def memory_usage(self) -> int:
        """Bytes of the full-vector store, the first stage and the id maps."""
        return int(self._store.nbytes + self._row_ids.nbytes + self._sorted_ids.nbytes
                   + self._sorted_rows.nbytes + self._stage.memory_usage())

    # -- helpers -------------------------------------------------------------------------
    def _prefix(self, x, what):
        p = np.ascontiguousarray(x[:, :self._search_dim], dtype=np.float32)
        norms = np.linalg.norm(p, axis=1, keepdims=True)
        zero = norms[:, 0] == 0
        if zero.any():
            raise ValueError(f"{what} row {int(np.argmax(zero))}: its first {self._search_dim} "
                             "components are all zero, so the prefix has no direction")
        return p / norms

    def _rows_of(self, ids, strict=True):
        pos = np.searchsorted(self._sorted_ids, ids)
        pos = np.minimum(pos, max(self._sorted_ids.size - 1, 0))
        found = self._sorted_ids.size > 0
        found = (self._sorted_ids[pos] == ids) if found else np.zeros(ids.shape, bool)
        if strict and not found.all():
            raise KeyError(f"id {int(ids[np.argmin(found)])} is not in the index")
        return np.where(found, self._sorted_rows[pos] if self._sorted_ids.size else -1, -1)

    # -- writes --------------------------------------------------------------------------
    def train(self, x, **kwargs):
        """Train the first stage (IVF-PQ) on the prefixes of ``x``; returns self."""
        x = as_matrix(x, self.dim, "training vectors")
        if not hasattr(self._stage, "train"):
            return self
        self._stage.train(self._prefix(x, "training vectors"), **kwargs)
        return self

    def add(self, x, ids=None) -> None:
        """Add full vectors (n, full_dim) with optional int64 ids (default: continuing).

        -1 and ids already present are rejected; NaN / Inf rows and zero prefixes raise
        ValueError naming the row; nothing changes on failure. Also accepts ``model_id=`` and
        ``strict=`` (see :meth:`pyknn.FlatIndex.add`).
        """
        x = as_matrix(x, self.dim, "vectors")
        n = x.shape[0]
        ids = (np.arange(self._next_id, self._next_id + n, dtype=np.int64) if ids is None
               else as_ids(ids, n))
        if n == 0:
            return
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            raise ValueError(f"vectors row {int(np.argmin(finite))} contains NaN or Inf")
        if (ids == -1).any():
            raise ValueError("id -1 is reserved for padding")
        uniq = np.unique(ids)
        if uniq.size != n:
            raise ValueError("ids repeat within one add; each id may appear once")
        known = self._rows_of(ids, strict=False) >= 0
        if known.any():
            raise ValueError(f"id {int(ids[np.argmax(known)])} is already in the index")
        if self._metric == "cosine":
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            if not norms.all():
                raise ValueError(f"cosine: vectors row {int(np.argmin(norms[:, 0] != 0))} is a zero vector")
            x = x / norms
        prefix = self._prefix(x, "vectors")
        rows = np.arange(self._n_rows, self._n_rows + n, dtype=np.int64)
        with inner():
            self._stage.add(prefix, rows)  # validates too; raises before any state here changes
        if self._n_rows + n > self._store.shape[0]:
            cap = max(self._n_rows + n, self._store.shape[0] * 3 // 2, 1024)
            grown = np.empty((cap, self.dim), self._store_dtype)
            grown[:self._n_rows] = self._store[:self._n_rows]
            self._store = grown
            row_ids = np.full(cap, -1, np.int64)
            row_ids[:self._n_rows] = self._row_ids[:self._n_rows]
            self._row_ids = row_ids
        self._store[self._n_rows:self._n_rows + n] = x
        self._row_ids[self._n_rows:self._n_rows + n] = ids
        self._n_rows += n
        all_ids = np.concatenate([self._sorted_ids, ids])
        all_rows = np.concatenate([self._sorted_rows, rows])
        order = np.argsort(all_ids, kind="stable")
        self._sorted_ids, self._sorted_rows = all_ids[order], all_rows[order]
        self._next_id = max(self._next_id, int(ids.max()) + 1)

    def remove(self, ids, missing_ok: bool = False) -> int:
        """Remove ``ids``; returns how many were removed (KeyError for unknown ids unless
        ``missing_ok``; nothing is removed then)."""
        ids = np.unique(as_ids(ids))
        rows = self._rows_of(ids, strict=not missing_ok)
        rows = rows[rows >= 0]
        if rows.size == 0:
            return 0
        with inner():
            self._stage.remove(rows)
        self._row_ids[rows] = -1
        keep = ~np.isin(self._sorted_rows, rows)
        self._sorted_ids, self._sorted_rows = self._sorted_ids[keep], self._sorted_rows[keep]
        return int(rows.size)

    def get(self, ids) -> np.ndarray:
        """Stored full vectors (float32) of ``ids``; KeyError naming an unknown id."""
        return self._store[self._rows_of(as_ids(ids))].astype(np.float32)

    def contains(self, id) -> bool:
        return bool(self._rows_of(as_ids(id), strict=False)[0] >= 0)

    __contains__ = contains

    @property
    def ids(self) -> np.ndarray:
        """Stored ids, ascending."""
        return self._sorted_ids.copy()

    # -- search --------------------------------------------------------------------------
    def search(self, q, k: int = 10, rerank: Optional[int] = None, filter=None, **params):
        """First stage on the query prefix, then exact scores of the shortlist on full vectors.

        Parameters
        ----------
        q : array-like (nq, full_dim) or (full_dim,)
        k : int >= 1
        rerank : int, optional
            Shortlist size (default :attr:`rerank`); max(rerank, k) is used.
        filter : allow-list of ids, optional
        **params
            First-stage search parameters (ef_search for HNSW, nprobe for IVF-PQ).

        Returns (scores float32 (nq, k), ids int64 (nq, k)): inner products of the full
        vectors (cosine under "cosine"), best first; padding -inf and -1.
        """
        q = as_matrix(q, self.dim, "queries")
        k = check_k(k, q.shape[0])
        R = max(k, self.rerank if rerank is None else check_positive_int(rerank, "rerank"))
        if self._metric == "cosine":
            norms = np.linalg.norm(q, axis=1, keepdims=True)
            if not norms.all():
                raise ValueError(f"cosine: queries row {int(np.argmin(norms[:, 0] != 0))} is a zero vector")
            q = q / norms
        if filter is not None:
            f = as_ids(np.fromiter(filter, np.int64) if isinstance(filter, (set, frozenset))
                       else filter, what="filter ids")
            rows = self._rows_of(f, strict=False)
            filter = rows[rows >= 0]
        with inner():
            _, cand = self._stage.search(self._prefix(q, "queries"), R, filter=filter, **params)
        nq = q.shape[0]
        D = np.full((nq, k), -np.inf, np.float32)
        I = np.full((nq, k), -1, np.int64)
        if self._n_rows == 0:
            return D, I
        kk = min(k, R)
        for s in range(0, nq, _RERANK_BLOCK):
            c = cand[s:s + _RERANK_BLOCK]
            valid = c >= 0
            # (b, R, full_dim) gathered rows, then one batched matrix-vector product.
            G = self._store[np.where(valid, c, 0)].astype(np.float32, copy=False)
            scores = np.matmul(G, q[s:s + _RERANK_BLOCK, :, None])[..., 0]
            scores[~valid] = -np.inf
            top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if R > kk else \
                np.broadcast_to(np.arange(R), (c.shape[0], R))
            ts = np.take_along_axis(scores, top, axis=1)
            order = np.argsort(-ts, axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            rows = np.take_along_axis(c, top, axis=1)
            D[s:s + c.shape[0], :kk] = np.take_along_axis(ts, order, axis=1)
            I[s:s + c.shape[0], :kk] = np.where(rows >= 0, self._row_ids[np.maximum(rows, 0)], -1)
        return D, I

    # -- persistence ---------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The index as bytes (what :meth:`save` writes and pickle stores)."""
        live = self._sorted_rows
        buf = io.BytesIO()
        np.save(buf, self._store[live], allow_pickle=False)
        np.save(buf, self._sorted_ids, allow_pickle=False)
        np.save(buf, live, allow_pickle=False)
        arrays = buf.getvalue()
        stage = self._stage.to_bytes()
        header = json.dumps({"metadata": self._metadata, "next_id": self._next_id,
                             "n_rows": self._n_rows}).encode()
        return b"".join([_MAGIC, struct.pack("<IQQQ", _VERSION, len(header), len(stage),
                                             len(arrays)), header, stage, arrays])

    def save(self, path) -> None:
        """Write the index to one file atomically (temporary file, fsync, rename)."""
        _atomic_write(os.fspath(path), self.to_bytes())

    @classmethod
    def from_bytes(cls, data) -> "MatryoshkaIndex":
        data = bytes(data)
        head = len(_MAGIC) + struct.calcsize("<IQQQ")
        if data[:len(_MAGIC)] != _MAGIC or len(data) < head:
            raise _core.FormatError("not a pyknn Matryoshka index file (bad magic bytes)")
        version, hl, sl, al = struct.unpack("<IQQQ", data[len(_MAGIC):head])
        if version != _VERSION:
            raise _core.FormatError(f"Matryoshka index format version {version} is not "
                                    f"supported (supported: {_VERSION})")
        if head + hl + sl + al != len(data):
            raise _core.FormatError(f"truncated or corrupted Matryoshka index file: sections "
                                    f"need {head + hl + sl + al} bytes, the file has {len(data)}")
        try:
            h = json.loads(data[head:head + hl])
            m = h["metadata"]
            obj = cls.__new__(cls)
            obj._full_dim, obj._search_dim, obj._metric = m["dim"], m["search_dim"], m["metric"]
            obj._store_dtype = np.dtype(m["store_dtype"])
            obj.rerank, obj.first_stage_kind = m["rerank"], m["first_stage"]
            obj._metadata = m
            obj._next_id = h["next_id"]
            buf = io.BytesIO(data[head + hl + sl:])
            store = np.load(buf, allow_pickle=False)
            obj._sorted_ids = np.load(buf, allow_pickle=False)
            rows = np.load(buf, allow_pickle=False)
        except (ValueError, KeyError, TypeError) as e:
            raise _core.FormatError(f"corrupted Matryoshka index file: {e}") from None
        obj._stage = _from_bytes(data[head + hl:head + hl + sl])
        n_rows = int(h["n_rows"])
        obj._store = np.zeros((n_rows, obj._full_dim), obj._store_dtype)
        obj._store[rows] = store
        obj._row_ids = np.full(n_rows, -1, np.int64)
        obj._row_ids[rows] = obj._sorted_ids
        obj._sorted_rows = rows
        obj._n_rows = n_rows
        return obj

    @classmethod
    def load(cls, path) -> "MatryoshkaIndex":
        """Load an index written by :meth:`save`."""
        with open(os.fspath(path), "rb") as f:
            return cls.from_bytes(f.read())

    def __reduce__(self):
        return (MatryoshkaIndex.from_bytes, (self.to_bytes(),))
