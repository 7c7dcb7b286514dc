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
import hashlib
import struct
import threading
from typing import Optional

import numpy as np

from .. import _core
from .._guard import Guarded, as_bool, inner, new_metadata
from .._validation import (as_ids, as_matrix, check_dim, check_k, check_positive_int,
                           is_scalar_id)
from ..indexes import FlatIndex, HNSWIndex, IVFPQIndex, _from_bytes
from .tiered import _atomic_write

__all__ = ["MatryoshkaIndex", "FIRST_STAGES"]

_MAGIC = b"PYKNNMATRYOSHKA\x00"
# Version 2 adds the first-stage keys and a trailing checksum; version 1 files still load.
_VERSION = 2
_DIGEST = 32  # SHA-256 of everything before it
# Removed rows are dropped from the store once they are more than half of it (and this many).
_COMPACT_MIN = 64
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
    stage's index of search_dim-dimensional vectors, plus 32 bytes of id maps.
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
        self._init_state()
        self._metadata = new_metadata("MatryoshkaIndex", full_dim, metric)
        self._metadata.update(search_dim=search_dim, first_stage=first_stage, rerank=self.rerank,
                              store_dtype=store_dtype, stage_params=stage_params)

    def _init_state(self):
        # Rows of the full-vector store. The first stage indexes *keys* (int64, increasing,
        # never reused); store row i holds the vector whose key is keys[i] (ascending over the
        # used rows), row_ids[i] is its user id (-1 once removed). Compaction drops removed
        # rows without touching the first stage. Published as one tuple, replaced atomically:
        # (store, keys, row_ids, n_rows); writers only write rows >= n_rows in place (invisible
        # to readers of the published tuple) or set row_ids to -1.
        self._rows = (np.empty((0, self._full_dim), self._store_dtype),
                      np.empty(0, np.int64), np.empty(0, np.int64), 0)
        # id -> key, as two arrays sorted by id (one tuple, replaced atomically).
        self._map = (np.empty(0, np.int64), np.empty(0, np.int64))
        self._dead = 0
        self._next_key = 0
        self._next_id = 0
        # Serialises writers (add, remove, train); readers take no lock.
        self._write_lock = threading.Lock()

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
        return int(self._map[0].size)

    def __repr__(self):
        return (f"MatryoshkaIndex(full_dim={self.dim}, search_dim={self.search_dim}, "
                f"first_stage={self.first_stage_kind!r}, rerank={self.rerank}, "
                f"store_dtype={self._store_dtype.name!r}, ntotal={len(self)})")

    def memory_usage(self) -> int:
        """Bytes of the full-vector store, the first stage and the id maps."""
        store, keys, row_ids, _ = self._rows
        sids, skeys = self._map
        return int(store.nbytes + keys.nbytes + row_ids.nbytes + sids.nbytes + skeys.nbytes
                   + self._stage.memory_usage())

    # -- helpers -------------------------------------------------------------------------
    def _prefix(self, x, what):
        p = np.ascontiguousarray(x[:, :self._search_dim], dtype=np.float32)
        norms = np.linalg.norm(p, axis=1, keepdims=True)
        zero = norms[:, 0] == 0
        if zero.any():
            raise ValueError(f"{what} row {int(np.argmax(zero))}: its first {self._search_dim} "
                             "components are all zero, so the prefix has no direction")
        return p / norms

    @staticmethod
    def _keys_of(idmap, ids, strict=True):
        """First-stage keys of ``ids`` (-1 where unknown; KeyError if ``strict``)."""
        sids, skeys = idmap
        if sids.size == 0:
            found = np.zeros(ids.shape, bool)
            if strict and ids.size:
                raise KeyError(f"id {int(ids[0])} is not in the index")
            return np.full(ids.shape, -1, np.int64)
        pos = np.minimum(np.searchsorted(sids, ids), sids.size - 1)
        found = sids[pos] == ids
        if strict and not found.all():
            raise KeyError(f"id {int(ids[np.argmin(found)])} is not in the index")
        return np.where(found, skeys[pos], -1)

    @staticmethod
    def _positions(rows, keys):
        """Store rows of first-stage ``keys`` in the published ``rows`` (-1: not there)."""
        _, rkeys, row_ids, n = rows
        if n == 0:
            return np.full(keys.shape, -1, np.int64)
        pos = np.minimum(np.searchsorted(rkeys[:n], keys), n - 1)
        ok = (keys >= 0) & (rkeys[pos] == keys) & (row_ids[pos] >= 0)
        return np.where(ok, pos, -1)

    # -- writes --------------------------------------------------------------------------
    def train(self, x, **kwargs):
        """Train the first stage (IVF-PQ) on the prefixes of ``x``; returns self."""
        x = as_matrix(x, self.dim, "training vectors")
        if not hasattr(self._stage, "train"):
            return self
        with self._write_lock:
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
        if ids is not None:
            ids = as_ids(ids, n)
        if n == 0:
            return
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            raise ValueError(f"vectors row {int(np.argmin(finite))} contains NaN or Inf")
        if self._metric == "cosine":
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            if not norms.all():
                raise ValueError(f"cosine: vectors row {int(np.argmin(norms[:, 0] != 0))} is a zero vector")
            x = x / norms
        prefix = self._prefix(x, "vectors")
        with self._write_lock:
            if ids is None:
                ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
            if (ids == -1).any():
                raise ValueError("id -1 is reserved for padding")
            if np.unique(ids).size != n:
                raise ValueError("ids repeat within one add; each id may appear once")
            known = self._keys_of(self._map, ids, strict=False) >= 0
            if known.any():
                raise ValueError(f"id {int(ids[np.argmax(known)])} is already in the index")
            # The store grows first (rows beyond the published count: invisible to readers),
            # then the first stage gets the keys, then the rows and the id map are published.
            # A search that finds a new key in the first stage therefore finds its row.
            old = self._rows
            store, rkeys, row_ids, nr = old
            keys = np.arange(self._next_key, self._next_key + n, dtype=np.int64)
            if nr + n > store.shape[0]:
                cap = max(nr + n, store.shape[0] * 3 // 2, 1024)
                grown = np.empty((cap, self.dim), self._store_dtype)
                grown[:nr] = store[:nr]
                gk = np.full(cap, -1, np.int64)
                gk[:nr] = rkeys[:nr]
                gi = np.full(cap, -1, np.int64)
                gi[:nr] = row_ids[:nr]
                store, rkeys, row_ids = grown, gk, gi
            store[nr:nr + n] = x
            rkeys[nr:nr + n] = keys
            row_ids[nr:nr + n] = ids
            self._rows = (store, rkeys, row_ids, nr + n)
            try:
                with inner():
                    self._stage.add(prefix, keys)  # validates too
            except BaseException:
                self._rows = old  # the new rows were never reachable
                raise
            self._next_key += n
            sids, skeys = self._map
            all_ids = np.concatenate([sids, ids])
            all_keys = np.concatenate([skeys, keys])
            order = np.argsort(all_ids, kind="stable")
            self._map = (all_ids[order], all_keys[order])
            self._next_id = max(self._next_id, int(ids.max()) + 1)

    def remove(self, ids, missing_ok: bool = False) -> int:
        """Remove ``ids``; returns how many were removed (KeyError for unknown ids unless
        ``missing_ok``; nothing is removed then)."""
        missing_ok = as_bool(missing_ok, "missing_ok")
        ids = np.unique(as_ids(ids))
        with self._write_lock:
            keys = self._keys_of(self._map, ids, strict=not missing_ok)
            keys = keys[keys >= 0]
            if keys.size == 0:
                return 0
            with inner():
                self._stage.remove(keys)
            rows = self._rows
            pos = self._positions(rows, keys)
            rows[2][pos[pos >= 0]] = -1  # row ids: readers drop these rows from now on
            sids, skeys = self._map
            keep = ~np.isin(skeys, keys)
            self._map = (sids[keep], skeys[keep])
            self._dead += int(keys.size)
            if self._dead > max(_COMPACT_MIN, rows[3] // 2):
                self._compact()
            return int(keys.size)

    def _compact(self):
        """Drop removed rows from the store (call with the write lock held)."""
        store, rkeys, row_ids, n = self._rows
        live = np.flatnonzero(row_ids[:n] >= 0)
        cap = max(live.size, 1024) if live.size else 0
        s = np.empty((cap, self.dim), self._store_dtype)
        k = np.full(cap, -1, np.int64)
        i = np.full(cap, -1, np.int64)
        s[:live.size], k[:live.size], i[:live.size] = store[live], rkeys[live], row_ids[live]
        self._rows = (s, k, i, int(live.size))
        self._dead = 0

    def get(self, ids) -> np.ndarray:
        """Stored full vectors (float32) of ``ids`` (n, full_dim), or (full_dim,) for one
        scalar id; KeyError naming an unknown id."""
        if is_scalar_id(ids):
            return self.get(as_ids(ids))[0]
        ids = as_ids(ids)
        keys = self._keys_of(self._map, ids)
        rows = self._rows
        pos = self._positions(rows, keys)
        if (pos < 0).any():  # removed meanwhile
            raise KeyError(f"id {int(ids[np.argmin(pos >= 0)])} is not in the index")
        return rows[0][pos].astype(np.float32)

    def contains(self, id) -> bool:
        """Whether ``id`` is stored."""
        if not is_scalar_id(id):
            raise TypeError(f"id must be an integer, got {type(id).__name__}")
        id = int(id)
        if not -(1 << 63) <= id < (1 << 63):
            return False
        return bool(self._keys_of(self._map, np.array([id], np.int64), strict=False)[0] >= 0)

    __contains__ = contains

    @property
    def ids(self) -> np.ndarray:
        """Stored ids, ascending."""
        return self._map[0].copy()

    # -- search --------------------------------------------------------------------------
    def search(self, q, k: int = 10, rerank: Optional[int] = None, filter=None, **params):
        """First stage on the query prefix, then exact scores of the shortlist on full vectors.

        Parameters
        ----------
        q : array-like (nq, full_dim) or (full_dim,)
        k : int >= 1
        rerank : int, optional
            Shortlist size (default :attr:`rerank`); max(rerank, k), at most the number of
            stored vectors, is used.
        filter : allow-list of ids, optional
        **params
            First-stage search parameters (ef_search for HNSW, nprobe for IVF-PQ).

        Returns (scores float32 (nq, k), ids int64 (nq, k)): inner products of the full
        vectors (cosine under "cosine"), best first; padding -inf and -1.
        """
        q = as_matrix(q, self.dim, "queries")
        k = check_k(k, q.shape[0])
        if rerank is not None:
            rerank = check_positive_int(rerank, "rerank", maximum=1 << 20)
        nq = q.shape[0]
        D = np.full((nq, k), -np.inf, np.float32)
        I = np.full((nq, k), -1, np.int64)
        if self._metric == "cosine":
            norms = np.linalg.norm(q, axis=1, keepdims=True)
            if not norms.all():
                raise ValueError(f"cosine: queries row {int(np.argmin(norms[:, 0] != 0))} is a zero vector")
            q = q / norms
        prefix = self._prefix(q, "queries")
        idmap = self._map
        if filter is not None:
            f = as_ids(np.fromiter(filter, np.int64) if isinstance(filter, (set, frozenset))
                       else filter, what="filter ids")
            keys = self._keys_of(idmap, f, strict=False)
            filter = keys[keys >= 0]
        # The shortlist never needs more candidates than there are vectors: R bounds memory.
        R = min(max(k, self.rerank if rerank is None else rerank), len(self._stage))
        if R == 0:
            return D, I
        with inner():
            _, cand = self._stage.search(prefix, R, filter=filter, **params)
        # Published after the first stage answered: holds every key it returned.
        rows = self._rows
        store, _, row_ids, _ = rows
        kk = min(k, R)
        for s in range(0, nq, _RERANK_BLOCK):
            pos = self._positions(rows, cand[s:s + _RERANK_BLOCK])
            valid = pos >= 0
            # (b, R, full_dim) gathered rows, then one batched matrix-vector product.
            G = store[np.where(valid, pos, 0)].astype(np.float32, copy=False)
            scores = np.matmul(G, q[s:s + _RERANK_BLOCK, :, None])[..., 0]
            scores[~valid] = -np.inf
            top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if R > kk else \
                np.broadcast_to(np.arange(R), (pos.shape[0], R))
            ts = np.take_along_axis(scores, top, axis=1)
            order = np.argsort(-ts, axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            p = np.take_along_axis(pos, top, axis=1)
            D[s:s + pos.shape[0], :kk] = np.take_along_axis(ts, order, axis=1)
            I[s:s + pos.shape[0], :kk] = np.where(p >= 0, row_ids[np.maximum(p, 0)], -1)
        D[I < 0] = -np.inf
        return D, I

    # -- persistence ---------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The index as bytes (what :meth:`save` writes and pickle stores): removed rows are
        left out; a SHA-256 digest of the rest ends the blob."""
        with self._write_lock:
            store, rkeys, row_ids, n = self._rows
            live = np.flatnonzero(row_ids[:n] >= 0)
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(store[live]), allow_pickle=False)
            np.save(buf, rkeys[live], allow_pickle=False)
            np.save(buf, row_ids[live], allow_pickle=False)
            arrays = buf.getvalue()
            stage = self._stage.to_bytes()
            header = json.dumps({"metadata": self._metadata, "next_id": self._next_id,
                                 "next_key": self._next_key}).encode()
        body = b"".join([_MAGIC, struct.pack("<IQQQ", _VERSION, len(header), len(stage),
                                             len(arrays)), header, stage, arrays])
        return body + hashlib.sha256(body).digest()

    def save(self, path) -> None:
        """Write the index to one file atomically (temporary file, fsync, rename)."""
        _atomic_write(os.fspath(path), self.to_bytes())

    @classmethod
    def from_bytes(cls, data) -> "MatryoshkaIndex":
        """Rebuild an index from :meth:`to_bytes` output; :class:`pyknn.FormatError` for any
        damaged or truncated data."""
        data = bytes(data)
        head = len(_MAGIC) + struct.calcsize("<IQQQ")
        if len(data) < head or data[:len(_MAGIC)] != _MAGIC:
            raise _core.FormatError("not a pyknn Matryoshka index file (bad magic bytes)")
        version, hl, sl, al = struct.unpack("<IQQQ", data[len(_MAGIC):head])
        if version not in (1, _VERSION):
            raise _core.FormatError(f"Matryoshka index format version {version} is not "
                                    f"supported (supported: 1, {_VERSION})")
        tail = _DIGEST if version >= 2 else 0
        if head + hl + sl + al + tail != len(data):
            raise _core.FormatError(f"truncated or corrupted Matryoshka index file: sections "
                                    f"need {head + hl + sl + al + tail} bytes, the file has "
                                    f"{len(data)}")
        if tail and hashlib.sha256(data[:-tail]).digest() != data[-tail:]:
            raise _core.FormatError("corrupted Matryoshka index file: checksum mismatch")
        try:
            h = json.loads(data[head:head + hl])
            m = h["metadata"]
            obj = cls.__new__(cls)
            obj._full_dim = check_dim(m["dim"])
            obj._search_dim = check_positive_int(m["search_dim"], "search_dim",
                                                 maximum=obj._full_dim)
            obj._metric = m["metric"]
            if obj._metric not in ("ip", "cosine"):
                raise ValueError(f"metric {obj._metric!r}")
            obj._store_dtype = np.dtype(m["store_dtype"])
            if obj._store_dtype not in (np.float32, np.float16):
                raise ValueError(f"store dtype {obj._store_dtype}")
            obj.rerank = check_positive_int(m["rerank"], "rerank", maximum=1 << 20)
            obj.first_stage_kind = m["first_stage"]
            obj._metadata = m
            obj._init_state()
            obj._next_id = int(h["next_id"])
            buf = io.BytesIO(data[head + hl + sl:head + hl + sl + al])
            store = np.load(buf, allow_pickle=False)
            a = np.load(buf, allow_pickle=False)
            b = np.load(buf, allow_pickle=False)
            if buf.tell() != al:
                raise ValueError("bytes after the arrays")
            if version == 1:  # sorted ids, then their rows (= first-stage keys)
                order = np.argsort(b, kind="stable")
                keys, row_ids, store = b[order], a[order], store[order]
                next_key = int(h["n_rows"])
            else:
                keys, row_ids, next_key = a, b, int(h["next_key"])
            n = keys.shape[0] if keys.ndim == 1 else -1
            if (store.shape != (n, obj._full_dim) or store.dtype != obj._store_dtype
                    or row_ids.shape != (n,) or keys.dtype != np.int64
                    or row_ids.dtype != np.int64):
                raise ValueError("array shapes or types do not match the header")
            if n and (keys[0] < 0 or (np.diff(keys) <= 0).any() or keys[-1] >= next_key
                      or (row_ids == -1).any()):
                raise ValueError("bad first-stage keys or ids")
            order = np.argsort(row_ids, kind="stable")
            sids = row_ids[order]
            if n and (np.diff(sids) == 0).any():
                raise ValueError("repeated ids")
            stage = _from_bytes(data[head + hl:head + hl + sl])
            if len(stage) != n:
                raise ValueError(f"the first stage holds {len(stage)} vectors, the store {n}")
        except _core.FormatError:
            raise
        except (ValueError, KeyError, TypeError, IndexError, OverflowError, EOFError) as e:
            raise _core.FormatError(f"corrupted Matryoshka index file: {e}") from None
        obj._stage = stage
        obj._rows = (store, keys, row_ids, n)
        obj._map = (sids, keys[order])
        obj._next_key = next_key
        obj._next_id = max(obj._next_id, int(sids[-1]) + 1 if n else 0)
        return obj

    @classmethod
    def load(cls, path) -> "MatryoshkaIndex":
        """Load an index written by :meth:`save`."""
        with open(os.fspath(path), "rb") as f:
            return cls.from_bytes(f.read())

    def __reduce__(self):
        return (MatryoshkaIndex.from_bytes, (self.to_bytes(),))
