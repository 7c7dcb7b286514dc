"""TieredIndex: a small exact "fresh" tier in front of a large trained "main" index.

New vectors go to the fresh tier (a FlatIndex) and are searchable at once; ``merge()`` moves
them into the main index (an IVF or HNSW index that would be slow to rebuild) and may run in a
background thread while searches go on.

How readers stay consistent while a merge runs
----------------------------------------------
Tiers, newest first: ``fresh``, ``frozen`` (the fresh tier being merged; read-only) and
``main``. Outside a merge every id lives in exactly one tier (adding an id that exists already
replaces it: the old copy is removed in the same locked step). A merge

1. swaps, under the write lock, the fresh tier for a new empty one (it becomes ``frozen``);
2. copies ``frozen`` into ``main`` without the lock: readers meanwhile can find a document in
   both ``frozen`` and ``main``, with the same vector, and keep one copy (the newer tier's). Each
   tier's own top k is enough for the top k of the union, so nothing is lost either;
3. drops ``frozen``, under the write lock: readers see either the three tiers or two, never a
   half-merged state.

Writes never modify ``frozen`` or ``main`` themselves: replacing or removing an id stored
there *hides* it (a tombstone): searches skip hidden ids of ``frozen`` and ``main`` (fetching
k + number hidden from those tiers). The tombstones of ``main`` are applied (``main.remove``)
by whoever holds main's writer role: the merge thread (before its swap and in step 3), or an
add / remove after it released the tier lock when no merge runs. So an add or remove never
waits for main's own write lock (held for a long time while a merge inserts a chunk into an
HNSW graph) while holding the tier lock, and searches never queue behind it.
Searches share a reader/writer lock, so many run in parallel; add / remove hold it briefly.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from contextlib import contextmanager
from typing import Optional

import numpy as np

from .. import _core
from .._guard import Guarded, as_bool, inner
from .._validation import as_ids, as_matrix, check_k, check_positive_int, is_scalar_id
from ..indexes import FlatIndex, _from_bytes

__all__ = ["TieredIndex"]

_MAGIC = b"PYKNNTIERED\x00"
# Version 2 ends with a SHA-256 digest of everything before it; version 1 files still load.
_VERSION = 2
_DIGEST = 32
# Vectors copied into main per call during a merge: small enough that an IVF / flat main,
# which locks out its searches while adding, is never locked for long.
_MERGE_CHUNK = 4096


class _RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _needs_training(index) -> bool:
    return not getattr(index, "is_trained", True)


def _min_train(index) -> int:
    return int(getattr(index, "nlist", 1))


class TieredIndex(Guarded):
    """A fresh exact tier in front of a main index; searches see both as one index.

    Parameters
    ----------
    main : index
        The large index (FlatIndex, IVFFlatIndex, HNSWIndex ...), empty or not, trained or not.
        An untrained IVF index is trained on the first merge (which then needs at least nlist
        vectors). Its dim, metric and metadata (model id) are the tiered index's.
    fresh : FlatIndex instance or class, optional
        The fresh tier: an empty FlatIndex of the same dim and metric (default: a new one).
    merge_threshold : int
        Size of the fresh tier at which an ``add`` starts a merge (when ``auto_merge``).
    auto_merge : "background" | "sync" | None
        "background": the merge runs in a thread and the add returns at once; "sync": the add
        merges before returning; None: only explicit :meth:`merge` calls.

    ``add`` with an id that is already stored replaces that vector (the newest version wins);
    searches return each id once. ``search`` keyword parameters other than ``filter`` (nprobe,
    ef_search ...) go to the main index. Thread-safe: searches, adds, removes and one merge may
    run concurrently from several threads.
    """

    def __init__(self, main, fresh=FlatIndex, *, merge_threshold: int = 10_000,
                 auto_merge: Optional[str] = "background"):
        if not all(hasattr(main, a) for a in ("add", "search", "remove", "dim", "metric")):
            raise TypeError(f"main must be a pyknn index, got {type(main).__name__}")
        if getattr(main, "read_only", False):
            raise ValueError("main is read-only (loaded with mmap=True): a TieredIndex must add "
                             "to and remove from its main index; load it with mmap=False")
        if fresh is None or fresh is FlatIndex:
            fresh = FlatIndex(main.dim, main.metric)
        if not isinstance(fresh, FlatIndex):
            raise TypeError(f"fresh must be a FlatIndex (or the class), got {type(fresh).__name__}")
        if (fresh.dim, fresh.metric) != (main.dim, main.metric):
            raise ValueError(f"fresh tier (dim {fresh.dim}, {fresh.metric!r}) and main index "
                             f"(dim {main.dim}, {main.metric!r}) must have the same dim and metric")
        if len(fresh):
            raise ValueError(f"the fresh tier must start empty, it holds {len(fresh)} vectors")
        if auto_merge not in ("background", "sync", None):
            raise ValueError(f"auto_merge must be 'background', 'sync' or None, got {auto_merge!r}")
        self.merge_threshold = check_positive_int(merge_threshold, "merge_threshold")
        self.auto_merge = auto_merge
        self._main, self._fresh, self._frozen = main, fresh, None
        self._metadata = main.metadata  # one dict: binding a model binds the main index
        self._frozen_hidden: set = set()
        self._main_hidden: set = set()
        self._lock = _RWLock()
        self._merge_lock = threading.Lock()
        # Held by whoever writes to main (the merge thread, or a flush of main's tombstones):
        # main.add / main.remove are only called with it held.
        self._main_writer = threading.Lock()
        self._merge_thread: Optional[threading.Thread] = None
        self._merge_error: Optional[BaseException] = None
        ids = np.asarray(main.ids)
        self._count = int(ids.size)
        self._next_id = int(ids.max()) + 1 if ids.size else 0

    # -- properties ----------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Number of dimensions of every vector."""
        return self._main.dim

    @property
    def metric(self) -> str:
        """"ip", "l2" or "cosine" (the main index's)."""
        return self._main.metric

    @property
    def main(self):
        """The main index (do not modify it directly while the tiered index is in use)."""
        return self._main

    @property
    def fresh_size(self) -> int:
        """Vectors in the fresh tier, waiting for a merge."""
        return len(self._fresh)

    @property
    def merging(self) -> bool:
        """Whether a merge is running."""
        return self._merge_lock.locked()

    def __len__(self) -> int:
        return self._count

    def __repr__(self):
        return (f"TieredIndex(main={self._main!r}, fresh={len(self._fresh)}, "
                f"ntotal={self._count}, merge_threshold={self.merge_threshold})")

    def memory_usage(self) -> int:
        """Bytes held by both tiers (and the tier being merged)."""
        with self._lock.read():
            tiers = [t for t in (self._fresh, self._frozen, self._main) if t is not None]
            return sum(t.memory_usage() for t in tiers)

    # -- writes --------------------------------------------------------------------------
    def add(self, x, ids=None) -> None:
        """Add (or replace) vectors; they are searchable when this returns.

        Parameters
        ----------
        x : array-like (n, dim) or (dim,)
        ids : array-like of n int64, optional
            Default: consecutive ids after the largest id ever added. An id already stored is
            replaced by the new vector (in whichever tier it lives). -1 is reserved and
            repeated ids within one call are rejected.

        Also accepts ``model_id=`` and ``strict=`` (see :meth:`pyknn.FlatIndex.add`).
        """
        x = as_matrix(x, self.dim, "vectors")
        n = x.shape[0]
        with self._lock.write():
            if ids is None:
                ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
            else:
                ids = as_ids(ids, n)
                if n and np.unique(ids).size != n:
                    raise ValueError("ids repeat within one add; each id may appear once")
            if n == 0:
                return
            # Validate (finite, cosine zero vectors, magnitude) and normalise exactly as the
            # core does, before any tier changes: a failed add leaves everything as it was.
            staged = FlatIndex(self.dim, self.metric)
            with inner():
                staged.add(x, ids)
                x = staged.get(ids)
                in_fresh = np.isin(ids, self._fresh.ids)
                live_frozen = np.zeros(n, bool)
                if self._frozen is not None:
                    live_frozen = (~in_fresh & np.isin(ids, self._frozen.ids)
                                   & ~np.isin(ids, _arr(self._frozen_hidden)))
                rest = ids[~in_fresh & ~live_frozen]
                # Older copies in main are hidden, not removed here (see the module docstring).
                in_main = self._in_main(rest) & ~np.isin(rest, _arr(self._main_hidden))
                # Nothing has changed so far; the steps below do not fail.
                if in_fresh.any():
                    self._fresh.remove(ids[in_fresh])
                self._fresh.add(x, ids)
            hide_frozen = ids[live_frozen].tolist()
            self._frozen_hidden.update(hide_frozen)
            self._main_hidden.update(hide_frozen)
            self._main_hidden.update(rest[in_main].tolist())
            replaced = (int(np.count_nonzero(in_fresh)) + len(hide_frozen)
                        + int(np.count_nonzero(in_main)))
            self._count += n - replaced
            self._next_id = max(self._next_id, int(ids.max()) + 1)
            if self._metadata.get("model_id") is not None:
                self._fresh.metadata["model_id"] = self._metadata["model_id"]
        self._flush_main()
        self._maybe_merge()

    def remove(self, ids, missing_ok: bool = False) -> int:
        """Remove ``ids`` from whichever tier holds them; returns how many were removed.

        Unknown ids raise KeyError (nothing removed) unless ``missing_ok``.
        """
        missing_ok = as_bool(missing_ok, "missing_ok")
        ids = as_ids(ids)
        if ids.size and np.unique(ids).size != ids.size:
            ids = np.unique(ids)
        with self._lock.write(), inner():
            in_fresh = np.isin(ids, self._fresh.ids)
            in_frozen = np.zeros(ids.shape, bool)
            if self._frozen is not None:
                in_frozen = (np.isin(ids, self._frozen.ids) & ~in_fresh
                             & ~np.isin(ids, _arr(self._frozen_hidden)))
            rest = ids[~in_fresh & ~in_frozen]
            in_main = self._in_main(rest) & ~np.isin(rest, _arr(self._main_hidden))
            if not missing_ok and not in_main.all():
                raise KeyError(f"id {int(rest[np.argmin(in_main)])} is not in the index")
            # Nothing has changed so far. Copies in frozen and main are hidden (tombstones).
            removed = self._fresh.remove(ids[in_fresh]) if in_fresh.any() else 0
            hide = ids[in_frozen].tolist()
            self._frozen_hidden.update(hide)
            self._main_hidden.update(hide)
            self._main_hidden.update(rest[in_main].tolist())
            removed += len(hide) + int(np.count_nonzero(in_main))
            self._count -= removed
        self._flush_main()
        return removed

    def _in_main(self, ids) -> np.ndarray:
        """Whether each id is stored in main (hidden or not); reads only, never waits for
        main's writer."""
        if ids.size <= 32:
            return np.fromiter((self._main.contains(int(i)) for i in ids), bool, ids.size)
        return np.isin(ids, np.asarray(self._main.ids))

    def _apply_main_tombstones(self, keep=()):
        """Remove main's hidden ids from main. Call with the tier write lock and main's writer
        held. Ids in ``keep`` stay hidden (their copy in main may still be written later). On
        error the tombstones stay (the state remains consistent) and the error propagates."""
        todo = self._main_hidden - set(keep) if keep else self._main_hidden
        if todo:
            with inner():
                self._main.remove(_arr(todo), missing_ok=True)
            self._main_hidden = self._main_hidden & set(keep) if keep else set()

    def _flush_main(self):
        """Apply main's tombstones now if no one else writes main (a merge does it itself)."""
        if not self._main_hidden or not self._main_writer.acquire(blocking=False):
            return
        try:
            with self._lock.write():
                if self._frozen is None:
                    self._apply_main_tombstones()
        except Exception:  # noqa: BLE001 - tombstones stay; retried by the next flush / merge
            pass
        finally:
            self._main_writer.release()

    # -- reads ---------------------------------------------------------------------------
    def search(self, q, k: int = 10, filter=None, **params):
        """Search both tiers as one index.

        Parameters
        ----------
        q : array-like (nq, dim) or (dim,)
        k : int >= 1
        filter : allow-list of ids, optional
            Only these ids are returned (a boolean row mask has no meaning across tiers).
        **params
            Search parameters of the main index (nprobe, ef_search ...).

        Returns (distances float32 (nq, k), ids int64 (nq, k)) as :meth:`FlatIndex.search`:
        each id at most once, with its newest vector; padding -1 and -inf (ip, cosine) or
        +inf (l2).
        """
        q = as_matrix(q, self.dim, "queries")
        k = check_k(k, q.shape[0])
        if filter is not None:
            f = np.asarray(list(filter) if isinstance(filter, (set, frozenset)) else filter)
            if f.dtype == np.bool_:
                raise TypeError("TieredIndex.search takes an allow-list of ids as filter, not a "
                                "boolean mask (row order differs between tiers)")
            filter = as_ids(f, what="filter ids")
        pad = np.inf if self.metric == "l2" else -np.inf
        parts_D, parts_I = [], []
        with self._lock.read(), inner():
            tiers = [(self._fresh, None, {}), (self._frozen, self._frozen_hidden, {}),
                     (self._main, self._main_hidden, params)]
            for tier, hidden, kw in tiers:
                if tier is None or len(tier) == 0 or _needs_training(tier):
                    continue
                extra = len(hidden) if hidden else 0
                D, I = tier.search(q, min(k + extra, max(len(tier), 1)), filter=filter, **kw)
                if extra:
                    drop = np.isin(I, _arr(hidden))
                    I[drop] = -1
                    D[drop] = pad
                parts_D.append(D)
                parts_I.append(I)
        return _merge_results(parts_D, parts_I, q.shape[0], k, pad)

    def contains(self, id) -> bool:
        """Whether ``id`` is stored (in any tier)."""
        if not is_scalar_id(id):
            raise TypeError(f"id must be an integer, got {type(id).__name__}")
        id = int(id)
        if not -(1 << 63) <= id < (1 << 63):
            return False
        with self._lock.read():
            if self._fresh.contains(id):
                return True
            if self._frozen is not None and id not in self._frozen_hidden and self._frozen.contains(id):
                return True
            return id not in self._main_hidden and self._main.contains(id)

    __contains__ = contains

    @property
    def ids(self) -> np.ndarray:
        """All stored ids (fresh tier first; order otherwise unspecified)."""
        with self._lock.read():
            parts = [self._fresh.ids]
            if self._frozen is not None:
                f = self._frozen.ids
                parts.append(f[~np.isin(f, _arr(self._frozen_hidden))])
            m = self._main.ids
            parts.append(m[~np.isin(m, _arr(self._main_hidden))])
            out = np.concatenate(parts)
            _, first = np.unique(out, return_index=True)
            return out[np.sort(first)]

    def get(self, ids) -> np.ndarray:
        """The newest stored vectors of ``ids`` (n, dim), or (dim,) for one scalar id;
        KeyError naming an unknown id."""
        if is_scalar_id(ids):
            return self.get(as_ids(ids))[0]
        ids = as_ids(ids)
        out = np.empty((ids.size, self.dim), np.float32)
        with self._lock.read():
            todo = np.ones(ids.size, bool)
            tiers = [(self._fresh, set()), (self._frozen, self._frozen_hidden),
                     (self._main, self._main_hidden)]
            for tier, hidden in tiers:
                if tier is None or not todo.any():
                    continue
                m = todo & np.isin(ids, tier.ids) & ~np.isin(ids, _arr(hidden))
                if m.any():
                    out[m] = tier.get(ids[m])
                    todo &= ~m
            if todo.any():
                raise KeyError(f"id {int(ids[np.argmax(todo)])} is not in the index")
        return out

    # -- merging -------------------------------------------------------------------------
    def merge(self, background: bool = False):
        """Move the fresh tier into the main index (training it first if it needs it).

        With ``background=True`` the merge runs in a new thread, which is returned (searches,
        adds and removes go on meanwhile); otherwise it runs here and returns None. One merge
        runs at a time: a second call waits for the first. An error in a background merge is
        raised by the next :meth:`wait_merge` (the fresh tier is then restored, nothing lost).
        """
        if background:
            t = threading.Thread(target=self._merge_in_thread, name="pyknn-tiered-merge",
                                 daemon=True)
            self._merge_thread = t
            t.start()
            return t
        self._merge()
        return None

    def wait_merge(self, timeout: Optional[float] = None) -> bool:
        """Wait for a background merge to finish; re-raise its error if it failed.

        Returns True when no merge is running any more, False when ``timeout`` (seconds)
        passed first.
        """
        t = self._merge_thread
        if t is not None:
            t.join(timeout)
            if t.is_alive():
                return False
        err, self._merge_error = self._merge_error, None
        if err is not None:
            raise err
        return True

    def _merge_in_thread(self):
        try:
            self._merge()
        except BaseException as e:  # noqa: BLE001 - handed to wait_merge
            self._merge_error = e

    def _maybe_merge(self):
        if (self.auto_merge is None or len(self._fresh) < self.merge_threshold
                or self._merge_lock.locked()):
            return
        if _needs_training(self._main) and len(self._fresh) < _min_train(self._main):
            return  # not enough vectors to train the main index yet
        if self.auto_merge == "sync":
            self._merge()
        else:
            self.merge(background=True)

    def _merge(self):
        with self._merge_lock, self._main_writer:
            with self._lock.write():
                if len(self._fresh) == 0:
                    return
                if _needs_training(self._main) and len(self._fresh) < _min_train(self._main):
                    raise ValueError(
                        f"the main index needs at least {_min_train(self._main)} vectors to "
                        f"train; the fresh tier holds {len(self._fresh)}")
                # Main's stale copies go first, so that main holds none of the ids about to be
                # copied into it (main's writer is ours: this does not wait). On error nothing
                # has changed.
                self._apply_main_tombstones()
                frozen = self._frozen = self._fresh
                self._fresh = FlatIndex(self.dim, self.metric)
                self._fresh.metadata["model_id"] = self._metadata.get("model_id")
            try:
                with inner():
                    ids = frozen.ids
                    if _needs_training(self._main):
                        self._main.train(frozen.get(ids))
                    for s in range(0, ids.size, _MERGE_CHUNK):
                        with self._lock.read():
                            chunk = ids[s:s + _MERGE_CHUNK]
                            # Ids hidden since the swap are stale: no need to copy them.
                            chunk = chunk[~np.isin(chunk, _arr(self._frozen_hidden))]
                        if chunk.size:
                            self._main.add(frozen.get(chunk), chunk)
            except BaseException:
                self._rollback(frozen)
                raise
            with self._lock.write():
                self._frozen = None
                self._frozen_hidden = set()
                try:
                    self._apply_main_tombstones()
                except Exception:  # noqa: BLE001 - they stay hidden; the next flush retries
                    pass

    def _rollback(self, frozen):
        """Undo a failed merge: the frozen vectors go back to the fresh tier. Whatever the merge
        copied into main is hidden (not removed: main may be what failed)."""
        with self._lock.write(), inner():
            ids = frozen.ids
            live = ids[~np.isin(ids, _arr(self._frozen_hidden))]
            # Newer versions already in the fresh tier win over the frozen ones.
            live = live[~np.isin(live, self._fresh.ids)]
            if live.size:
                self._fresh.add(frozen.get(live), live)
            self._main_hidden.update(ids.tolist())
            self._frozen = None
            self._frozen_hidden = set()
            try:
                self._apply_main_tombstones()
            except Exception:  # noqa: BLE001 - they stay hidden; the next flush retries
                pass

    # -- persistence ---------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Both tiers in one blob (what :meth:`save` writes and pickle stores).

        Waits for a running merge, so the two tiers saved are a consistent state.
        """
        with self._merge_lock, self._main_writer, self._lock.write():
            self._apply_main_tombstones()
            if self._metadata.get("model_id") is not None:
                self._fresh.metadata["model_id"] = self._metadata["model_id"]
            header = json.dumps({"merge_threshold": self.merge_threshold,
                                 "auto_merge": self.auto_merge, "next_id": self._next_id,
                                 "count": self._count}).encode()
            main = self._main.to_bytes()
            fresh = self._fresh.to_bytes()
        body = b"".join([_MAGIC, struct.pack("<IQ", _VERSION, len(header)), header,
                         struct.pack("<Q", len(main)), main, struct.pack("<Q", len(fresh)), fresh])
        return body + hashlib.sha256(body).digest()

    def save(self, path) -> None:
        """Write both tiers to one file, atomically (temporary file, fsync, rename).

        Read it back with :meth:`TieredIndex.load`.
        """
        _atomic_write(os.fspath(path), self.to_bytes())

    @classmethod
    def from_bytes(cls, data) -> "TieredIndex":
        """Rebuild a tiered index from :meth:`to_bytes` output."""
        data = memoryview(bytes(data))
        if bytes(data[:len(_MAGIC)]) != _MAGIC:
            raise _core.FormatError("not a pyknn tiered index file (bad magic bytes)")
        pos = len(_MAGIC)

        def take(n):
            nonlocal pos
            if n > len(data) - pos:
                raise _core.FormatError(f"truncated tiered index file: a section needs {n} "
                                        f"bytes, {len(data) - pos} remain")
            out = data[pos:pos + n]
            pos += n
            return out

        version, hlen = struct.unpack("<IQ", take(12))
        if version not in (1, _VERSION):
            raise _core.FormatError(f"tiered index format version {version} is not supported "
                                    f"(supported: 1, {_VERSION})")
        if version >= 2:
            if len(data) - pos < _DIGEST:
                raise _core.FormatError("truncated tiered index file: no checksum")
            if hashlib.sha256(data[:-_DIGEST]).digest() != bytes(data[-_DIGEST:]):
                raise _core.FormatError("corrupted tiered index file: checksum mismatch")
            data = data[:-_DIGEST]
        try:
            header = json.loads(bytes(take(hlen)))
            merge_threshold, auto_merge = header["merge_threshold"], header["auto_merge"]
            count, next_id = int(header["count"]), int(header["next_id"])
        except (ValueError, KeyError, TypeError):
            raise _core.FormatError("corrupted tiered index file: bad header") from None
        main = _from_bytes(take(struct.unpack("<Q", take(8))[0]))
        fresh = _from_bytes(take(struct.unpack("<Q", take(8))[0]))
        if pos != len(data):
            raise _core.FormatError(f"corrupted tiered index file: {len(data) - pos} trailing bytes")
        try:
            if count != len(main) + len(fresh) or np.isin(fresh.ids, main.ids).any():
                raise ValueError(f"the header counts {count} vectors, the tiers hold "
                                 f"{len(main)} + {len(fresh)}")
            obj = cls(main, merge_threshold=merge_threshold, auto_merge=auto_merge)
        except (ValueError, TypeError) as e:
            raise _core.FormatError(f"corrupted tiered index file: {e}") from None
        with inner():
            if len(fresh):
                fids = fresh.ids
                obj._fresh.add(fresh.get(fids), fids)
        obj._fresh.metadata["model_id"] = main.metadata.get("model_id")
        obj._count = count
        obj._next_id = max(next_id, obj._next_id, int(fresh.ids.max()) + 1 if len(fresh) else 0)
        return obj

    @classmethod
    def load(cls, path) -> "TieredIndex":
        """Load a tiered index written by :meth:`save`."""
        with open(os.fspath(path), "rb") as f:
            return cls.from_bytes(f.read())

    def __reduce__(self):
        return (TieredIndex.from_bytes, (self.to_bytes(),))


def _arr(ids) -> np.ndarray:
    """A set of ids as an int64 array (for np.isin)."""
    return np.fromiter(ids, dtype=np.int64, count=len(ids)) if ids else np.empty(0, np.int64)


def _merge_results(parts_D, parts_I, nq, k, pad):
    """Combine per-tier results (newest tier first): one copy per id, the newest; best k."""
    D_out = np.full((nq, k), pad, np.float32)
    I_out = np.full((nq, k), -1, np.int64)
    if not parts_I:
        return D_out, I_out
    D = np.concatenate(parts_D, axis=1)
    I = np.concatenate(parts_I, axis=1)
    if len(parts_I) > 1:
        # Duplicates: a stable sort by id keeps each id's columns in tier order, so the first
        # of every run is the newest tier's copy; the others are dropped.
        order = np.argsort(I, axis=1, kind="stable")
        Is = np.take_along_axis(I, order, axis=1)
        dup_sorted = np.zeros(I.shape, bool)
        dup_sorted[:, 1:] = (Is[:, 1:] == Is[:, :-1]) & (Is[:, 1:] != -1)
        dup = np.empty_like(dup_sorted)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        I[dup] = -1
    D[I == -1] = pad
    key = D if pad == np.inf else -D
    best = np.argsort(key, axis=1, kind="stable")[:, :k]
    m = best.shape[1]
    D_out[:, :m] = np.take_along_axis(D, best, axis=1)
    I_out[:, :m] = np.take_along_axis(I, best, axis=1)
    return D_out, I_out


def _atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, rename."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
