"""Collection: an embedded vector store (texts + JSON metadata in SQLite, vectors in pyknn).

A collection is a folder::

    docs.sqlite      documents: id (text), text, JSON metadata, and the index row of each
    vectors.pyknn    the TieredIndex of their embeddings (written atomically by persist())

SQLite is the source of truth. The index file is written atomically (temporary file, fsync,
rename) and records the *generation* it contains; every document row records the generation
that last wrote it. Opening a collection repairs the index from SQLite: documents written after
the saved generation are embedded again, index entries without a document are removed. So a
crash at any point (during an add, between the SQLite commit and ``persist()``, or while the
index file is written) leaves a store that reopens consistent, losing nothing committed.

One Collection object at a time may have a folder open: it holds an exclusive lock on
``lock`` in the folder (``fcntl.flock``) until :meth:`Collection.close`, and the operating
system drops it when the process dies. A second open, in this process or another, raises
:class:`CollectionLockedError` instead of letting two instances overwrite each other's index.
(Where ``fcntl`` is missing, e.g. on Windows, no lock is taken.)
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from .._guard import ModelMismatchError, as_bool
from ..factory import index_factory
from .tiered import TieredIndex

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["Collection", "CollectionLockedError", "Hit"]

_SCHEMA_VERSION = 1
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_OPS = {"$eq": "=", "$ne": "!=", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
# SQLite's default limit of bound parameters per statement is 32766; stay well below it.
_CHUNK = 10_000


@dataclass(frozen=True)
class Hit:
    """One search result: the document id, its score (similarity, larger is better), its text
    and metadata."""

    id: str
    score: float
    text: str
    metadata: Dict[str, Any]


class Collection:
    """A persistent collection of texts searchable by meaning.

    Parameters
    ----------
    path : str or Path
        Folder of the collection (created if missing).
    embedder : pyknn.embed.Embedder
        Embeds documents and queries. A collection is bound to the model that built it:
        opening it with an embedder of another ``model_id`` raises
        :class:`pyknn.ModelMismatchError`.
    index_spec : str
        Main index of the TieredIndex (:func:`pyknn.index_factory` string: "HNSW32", "Flat",
        "IVF1024,Flat" ...). Used when the collection is created; stored with it.
    metric : "ip" | "cosine"
        Similarity (embedders return unit vectors, so both rank alike).
    merge_threshold : int
        Fresh-tier size at which new vectors are merged into the main index (in a background
        thread).

    Use as a context manager (``with Collection(...) as c:``) or call :meth:`close`, which
    persists the index. Methods are thread-safe.
    """

    def __init__(self, path, embedder, index_spec: str = "HNSW32", metric: str = "ip",
                 merge_threshold: int = 10_000):
        for attr in ("model_id", "dim", "encode_queries", "encode_documents"):
            if not hasattr(embedder, attr):
                raise TypeError(f"embedder must provide {attr} (see pyknn.embed.Embedder)")
        if metric not in ("ip", "cosine"):
            raise ValueError(f"metric must be 'ip' or 'cosine' (embedders return unit vectors), "
                             f"got {metric!r}")
        index_factory(embedder.dim, index_spec, metric)  # validate before creating anything
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.embedder = embedder
        self._lock = threading.RLock()
        self._db = None
        self._lock_file = _lock_folder(self.path)  # raises if another instance has it open
        try:
            self._open(embedder, index_spec, metric, merge_threshold)
        except BaseException:
            self._release()
            raise

    def _open(self, embedder, index_spec, metric, merge_threshold):
        self._db = sqlite3.connect(self.path / "docs.sqlite", check_same_thread=False,
                                   isolation_level=None)  # transactions are explicit
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS docs (
                row INTEGER PRIMARY KEY,
                id TEXT UNIQUE NOT NULL,
                text TEXT NOT NULL,
                metadata TEXT NOT NULL,
                gen INTEGER NOT NULL);
        """)
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if meta:
            if meta["model_id"] != embedder.model_id:
                raise ModelMismatchError(
                    f"collection {str(self.path)!r} holds vectors of embedding model "
                    f"{meta['model_id']!r}; it was opened with {embedder.model_id!r}")
            if int(meta["dim"]) != embedder.dim:
                raise ValueError(f"collection {str(self.path)!r} has dim {meta['dim']}, the "
                                 f"embedder gives {embedder.dim}")
            self.index_spec, self.metric = meta["index_spec"], meta["metric"]
        else:
            self.index_spec, self.metric = index_spec, metric
            with self._transaction():
                self._db.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("schema", str(_SCHEMA_VERSION)), ("model_id", embedder.model_id),
                    ("dim", str(embedder.dim)), ("index_spec", index_spec), ("metric", metric)])
        self._merge_threshold = merge_threshold
        self._open_index()

    # -- setup and repair ----------------------------------------------------------------
    def _new_index(self) -> TieredIndex:
        main = index_factory(self.embedder.dim, self.index_spec, self.metric)
        t = TieredIndex(main, merge_threshold=self._merge_threshold)
        t.bind_model(self.embedder.model_id)
        return t

    def _open_index(self):
        file = self.path / "vectors.pyknn"
        saved_gen = 0
        if file.exists():
            self._index = TieredIndex.load(file)
            self._index.merge_threshold = self._merge_threshold
            self._index.bind_model(self.embedder.model_id)  # raises on a foreign file
            saved_gen = int(self._index.metadata.get("collection_generation", 0))
        else:
            self._index = self._new_index()
        self._gen = saved_gen + 1
        # Documents written after the saved index: embed them again.
        stale = self._db.execute("SELECT row, text FROM docs WHERE gen > ?", (saved_gen,)).fetchall()
        if stale:
            rows = np.array([r for r, _ in stale], np.int64)
            vecs = self.embedder.encode_documents([t for _, t in stale])
            self._index.add(vecs, rows, model_id=self.embedder.model_id)
        # Index entries whose document is gone (deleted, or an add that never committed).
        in_db = np.array([r for (r,) in self._db.execute("SELECT row FROM docs")], np.int64)
        orphans = np.setdiff1d(self._index.ids, in_db)
        if orphans.size:
            self._index.remove(orphans)
        #: Documents re-embedded / index entries dropped when the collection was opened.
        self.repaired = (len(stale), int(orphans.size))

    @property
    def index(self) -> TieredIndex:
        """The TieredIndex of the vectors (ids are SQLite row numbers)."""
        return self._index

    class _Txn:
        def __init__(self, db):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb):
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
            return False

    def _transaction(self):
        return Collection._Txn(self._db)

    # -- writes --------------------------------------------------------------------------
    def add_texts(self, texts: Sequence[str], ids: Optional[Sequence[str]] = None,
                  metadata: Optional[Sequence[Optional[dict]]] = None) -> List[str]:
        """Embed and store documents; returns their ids.

        Parameters
        ----------
        texts : sequence of str
        ids : sequence of str, optional
            Document ids (unique). An id already stored is replaced (text, metadata, vector).
            Default: new ids "doc-<row>".
        metadata : sequence of dict (JSON-serialisable) or None, optional
            One per text; filterable with ``search(where=...)``.

        Texts are embedded before anything is written; the SQLite rows and the in-memory index
        change together or not at all. Call :meth:`persist` (or :meth:`close`) to write the
        index file; without it, the next open re-embeds these documents.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings; wrap one text in a list")
        texts = list(texts)
        n = len(texts)
        if ids is not None:
            ids = _doc_ids(ids, "ids")
            if len(ids) != n:
                raise ValueError(f"got {len(ids)} ids for {n} texts")
            if len(set(ids)) != n:
                raise ValueError("ids repeat within one add_texts call")
        metadata = [None] * n if metadata is None else list(metadata)
        if len(metadata) != n:
            raise ValueError(f"got {len(metadata)} metadata entries for {n} texts")
        meta_json = []
        for i, m in enumerate(metadata):
            if m is not None and not isinstance(m, dict):
                raise TypeError(f"metadata[{i}] must be a dict, got {type(m).__name__}")
            try:
                # allow_nan=False: NaN / Infinity are not JSON; SQLite's json functions would
                # reject the stored text and every later filtered search would fail.
                meta_json.append(json.dumps(m if m is not None else {}, allow_nan=False))
            except TypeError as e:
                raise TypeError(f"metadata[{i}] must be JSON-serialisable: {e}") from None
            except ValueError:
                raise ValueError(f"metadata[{i}] holds NaN or Infinity, which JSON cannot "
                                 "store; use None or a finite number") from None
        self._check_open()
        if n == 0:
            return []
        vecs = self.embedder.encode_documents(texts)  # before any write: may be slow or fail
        with self._lock, self._transaction() as db:
            self._check_open()
            # Row numbers (and default ids "doc-<row>") come from a counter that only grows,
            # kept in the meta table: a deleted document's row and id are never handed out
            # again. It changes in this transaction, so a failed add does not advance it.
            next_row = _next_row(db)
            if ids is None:
                ids = [f"doc-{r}" for r in range(next_row, next_row + n)]
                clash = _select_in(db, "SELECT id FROM docs WHERE id IN ({})", ids)
                if clash:
                    raise ValueError(f"default id {clash[0][0]!r} is taken; pass ids explicitly")
            existing = dict(_select_in(db, "SELECT id, row FROM docs WHERE id IN ({})", ids))
            new = [i for i in ids if i not in existing]
            db.execute("INSERT OR REPLACE INTO meta VALUES ('next_row', ?)",
                       (str(next_row + len(new)),))
            row_of = dict(existing)
            row_of.update({i: next_row + j for j, i in enumerate(new)})
            rows = np.array([row_of[i] for i in ids], np.int64)
            db.executemany(
                "INSERT INTO docs (row, id, text, metadata, gen) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET text=excluded.text, metadata=excluded.metadata, "
                "gen=excluded.gen",
                [(int(r), i, t, m, self._gen) for r, i, t, m in zip(rows, ids, texts, meta_json)])
            # Inside the transaction: if the index refuses, the rows roll back.
            self._index.add(vecs, rows, model_id=self.embedder.model_id)
        return ids

    def delete(self, ids: Sequence[str], missing_ok: bool = False) -> int:
        """Delete documents by id; returns how many were deleted (KeyError naming an unknown
        id unless ``missing_ok``; nothing is deleted then)."""
        missing_ok = as_bool(missing_ok, "missing_ok")
        ids = _doc_ids([ids] if isinstance(ids, str) else ids, "ids")
        self._check_open()
        with self._lock, self._transaction() as db:
            found = dict(_select_in(db, "SELECT id, row FROM docs WHERE id IN ({})", ids))
            missing = [i for i in ids if i not in found]
            if missing and not missing_ok:
                raise KeyError(f"document {missing[0]!r} is not in the collection")
            rows = list(found.values())
            _exec_in(db, "DELETE FROM docs WHERE row IN ({})", rows)
            self._index.remove(np.array(rows, np.int64), missing_ok=True)
            return len(rows)

    def persist(self) -> None:
        """Write the vector index atomically (temporary file, fsync, rename)."""
        with self._lock:
            self._check_open()
            self._index.metadata["collection_generation"] = self._gen
            self._index.save(self.path / "vectors.pyknn")
            self._gen += 1

    def close(self) -> None:
        """Persist the index and close the database."""
        with self._lock:
            if self._db is None:
                return
            try:
                self._index.wait_merge()
                self.persist()
            finally:
                self._release()

    def _release(self):
        """Close the database and give up the folder's lock (no persist)."""
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor drops the flock
            self._lock_file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- reads ---------------------------------------------------------------------------
    def _check_open(self):
        if self._db is None:
            raise ValueError(f"collection {str(self.path)!r} is closed")

    def __len__(self) -> int:
        self._check_open()
        return self._db.execute("SELECT COUNT(*) FROM docs").fetchone()[0]

    def __contains__(self, id) -> bool:
        self._check_open()
        return self._db.execute("SELECT 1 FROM docs WHERE id = ?", (str(id),)).fetchone() is not None

    def get(self, id: str) -> Hit:
        """The stored document ``id`` (score NaN); KeyError if unknown."""
        self._check_open()
        r = self._db.execute("SELECT text, metadata FROM docs WHERE id = ?", (str(id),)).fetchone()
        if r is None:
            raise KeyError(f"document {id!r} is not in the collection")
        return Hit(str(id), float("nan"), r[0], json.loads(r[1]))

    def search(self, query: Union[str, Sequence[str]], k: int = 10,
               where: Optional[dict] = None, **params):
        """Find the k documents most similar to ``query``.

        Parameters
        ----------
        query : str or sequence of str
            One query (returns a list of :class:`Hit`) or several (a list of such lists).
        k : int
        where : dict, optional
            Metadata filter: ``{"lang": "en"}`` (equality), ``{"year": {"$gte": 2020}}``,
            ``{"tag": {"$in": ["a", "b"]}}``; operators $eq $ne $gt $gte $lt $lte $in $nin;
            several keys must all hold. Keys may be dotted paths into nested metadata.
            Matching documents become an id allow-list for the index search.
        **params
            Search parameters of the main index (ef_search, nprobe).
        """
        single = isinstance(query, str)
        queries = [query] if single else list(query)
        with self._lock:
            self._check_open()
            allow = sql = None
            if where is not None:
                sql, args = _where_sql(where)
            if sql:
                allow = np.array([r for (r,) in self._db.execute(
                    f"SELECT row FROM docs WHERE {sql}", args)], np.int64)
            if allow is not None and allow.size == 0:
                hits = [[] for _ in queries]
                return hits[0] if single else hits
            qv = self.embedder.encode_queries(queries)
            D, I = self._index.search(qv, k, filter=allow, model_id=self.embedder.model_id,
                                      **params)
            rows = np.unique(I[I >= 0]).tolist()
            docs = {r: (i, t, m) for r, i, t, m in _select_in(
                self._db, "SELECT row, id, text, metadata FROM docs WHERE row IN ({})", rows)}
        out = []
        for drow, irow in zip(D, I):
            hits = []
            for score, r in zip(drow.tolist(), irow.tolist()):
                if r >= 0 and r in docs:
                    i, t, m = docs[r]
                    hits.append(Hit(i, score, t, json.loads(m)))
            out.append(hits)
        return out[0] if single else out


class CollectionLockedError(RuntimeError):
    """The collection folder is open in another Collection object (this process or another)."""


def _lock_folder(path: Path):
    """Open ``path/lock`` and take an exclusive, non-blocking flock on it; returns the file."""
    f = open(path / "lock", "a+b")
    if fcntl is None:  # pragma: no cover - no advisory locks on this platform
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise CollectionLockedError(
            f"collection {str(path)!r} is already open (in this process or another); close "
            "it first: two open instances would overwrite each other's index") from None
    return f


def _next_row(db) -> int:
    """The next unused row number: the stored counter (collections made before it existed
    start from the largest row)."""
    r = db.execute("SELECT value FROM meta WHERE key = 'next_row'").fetchone()
    largest = db.execute("SELECT COALESCE(MAX(row), 0) + 1 FROM docs").fetchone()[0]
    return max(int(r[0]), largest) if r else largest


def _select_in(db, sql, values):
    out = []
    for s in range(0, len(values), _CHUNK):
        part = values[s:s + _CHUNK]
        out += db.execute(sql.format(",".join("?" * len(part))), part).fetchall()
    return out


def _exec_in(db, sql, values):
    for s in range(0, len(values), _CHUNK):
        part = values[s:s + _CHUNK]
        db.execute(sql.format(",".join("?" * len(part))), part)


def _doc_ids(ids, what):
    """Document ids as strings: each must be a str or an integer (numpy ones included)."""
    if isinstance(ids, (bytes, dict)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"{what} must be a list of document ids (str), got {type(ids).__name__}")
    out = []
    for i in ids:
        if isinstance(i, str):
            out.append(i)
        elif isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)):
            out.append(str(int(i)))
        else:
            raise TypeError(f"{what}: a document id must be a str (or an int), got "
                            f"{type(i).__name__} {i!r}")
    return out


def _json_value(v, key):
    if isinstance(v, np.generic):  # numpy scalars: their Python value
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        raise ValueError(f"where[{key!r}]: NaN and Infinity never match stored metadata")
    if isinstance(v, bool) or v is None or isinstance(v, (int, float, str)):
        return v
    raise TypeError(f"where[{key!r}]: filter values must be str, int, float, bool or None, "
                    f"got {type(v).__name__}")


def _where_sql(where: dict):
    """Turn a metadata filter into a SQL condition over json_extract (values bound, keys checked)."""
    if not isinstance(where, dict):
        raise TypeError(f"where must be a dict, got {type(where).__name__}")
    parts, args = [], []
    for key, cond in where.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValueError(f"where: metadata key {key!r} must be letters, digits and _ "
                             "(dotted for nested keys)")
        col = f"json_extract(metadata, '$.{key}')"
        ops = cond if isinstance(cond, dict) else {"$eq": cond}
        if not ops:
            raise ValueError(f"where[{key!r}]: empty condition")
        for op, v in ops.items():
            if op in ("$in", "$nin"):
                if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
                    raise TypeError(f"where[{key!r}][{op!r}] must be a list of values")
                v = [_json_value(x, key) for x in v]
                if not v:
                    parts.append("0" if op == "$in" else "1")
                    continue
                neg = "NOT " if op == "$nin" else ""
                parts.append(f"{col} {neg}IN ({','.join('?' * len(v))})")
                args += v
            elif op in _OPS:
                v = _json_value(v, key)
                if v is None:
                    parts.append(f"{col} IS {'NOT ' if op == '$ne' else ''}NULL")
                    if op not in ("$eq", "$ne"):
                        raise ValueError(f"where[{key!r}]: {op} needs a value, not None")
                else:
                    parts.append(f"{col} {_OPS[op]} ?")
                    args.append(v)
            else:
                raise ValueError(f"where[{key!r}]: unknown operator {op!r}; known: "
                                 f"{', '.join(list(_OPS) + ['$in', '$nin'])}")
    return " AND ".join(parts), args
