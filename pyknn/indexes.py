"""The index classes: argument checks, metadata and persistence around the C++ core."""
import json
import os
import threading

import numpy as np

from . import _core
from ._validation import (as_filter, as_ids, as_matrix, check_dim, check_k, check_metric,
                          check_positive_int, is_scalar_id)
from ._guard import Guarded, new_metadata
from ._guard import inner as _inner

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

__all__ = ["FlatIndex", "IVFFlatIndex", "PQIndex", "IVFPQIndex", "HNSWIndex", "RefineIndex", "load"]


class _Index(Guarded):
    """What every index shares: dim, metric, ids, metadata, model guard, save/load, pickling.

    ``add`` and ``search`` of every subclass also accept ``model_id="name@revision"``: a model
    other than the one the index was built with raises :class:`pyknn.ModelMismatchError`
    (see :mod:`pyknn._guard`).
    """

    def __init__(self):
        raise TypeError(f"{type(self).__name__} cannot be created directly")

    def _init_core(self, core):
        self._core = core
        meta = json.loads(core.metadata or "{}")
        if not meta:
            meta = new_metadata(type(self).__name__, core.dim, core.metric)
        # Files written before the model guard existed carry no model id.
        meta.setdefault("model_id", None)
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

    def __len__(self) -> int:
        return len(self._core)

    def memory_usage(self) -> int:
        """Bytes held by the index's vectors, codes and id map."""
        return self._core.memory_usage()

    def __repr__(self):
        return f"{type(self).__name__}(dim={self.dim}, metric={self.metric!r}, ntotal={len(self)})"

    # -- storage by id ---------------------------------------------------------------------
    def add(self, x, ids=None) -> None:
        """Add vectors.

        Parameters
        ----------
        x : array-like, shape (n, dim) or (dim,)
        ids : array-like of n int64, optional
            User ids. Default: consecutive integers continuing after the largest id seen so far
            (0, 1, 2 ... for a new index). -1 is reserved; ids already present are rejected.
        model_id : str, optional (keyword)
            The embedding model of ``x`` ("name@revision"). The first add with a model id binds
            the index to it; a different one later raises :class:`pyknn.ModelMismatchError`.
        strict : bool, optional (keyword)
            Under metric "ip", vectors whose norm is off 1 by more than 1e-3 give one
            :class:`pyknn.NormWarning`, or with ``strict=True`` a ValueError (nothing added).
            Default: :attr:`strict_norms`.
        """
        x = as_matrix(x, self.dim, "vectors")
        if ids is not None:
            ids = as_ids(ids, x.shape[0])
        self._core.add(x, ids)

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
        id = int(id)
        return _INT64_MIN <= id <= _INT64_MAX and self._core.contains(id)

    __contains__ = contains

    @property
    def ids(self):
        """The stored ids, in row order (the order a boolean ``filter`` refers to)."""
        return self._core.ids()

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

    def __init__(self, dim: int, metric: str = "ip"):
        self._init_core(_core.FlatIndex(check_dim(dim), check_metric(metric)))

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
        k = check_k(k, q.shape[0])
        fids, fmask = as_filter(filter, len(self))
        return self._core.search(q, k, fids, fmask)

class _Cells:
    """What the IVF indexes share: the cells (nlist, centroids, list sizes) and nprobe."""

    @property
    def nlist(self) -> int:
        """Number of cells."""
        return self._core.nlist

    @property
    def nprobe(self) -> int:
        """Default number of cells scanned by :meth:`search` (saved with the index); a value
        set above nlist reads back as nlist, the number a search actually scans."""
        return min(self._core.nprobe, self._core.nlist)

    @nprobe.setter
    def nprobe(self, value):
        self._core.nprobe = check_positive_int(value, "nprobe")

    @property
    def centroids(self):
        """The cells' centroids, float32 (nlist, dim); empty before training."""
        return self._core.centroids()

    def list_sizes(self):
        """Number of vectors in each cell (int64 array of nlist)."""
        return self._core.list_sizes()

    @staticmethod
    def _coarse_args(n_iter, init):
        n_iter = check_positive_int(n_iter, "n_iter", maximum=(1 << 31) - 1)
        if init not in ("random", "k-means++"):
            raise ValueError(f"init must be 'random' or 'k-means++', got {init!r}")
        return n_iter, init == "k-means++"


class IVFFlatIndex(_Cells, _Index):
    """Inverted-file index: k-means cells, full-precision vectors, search over the nearest cells.

    Parameters
    ----------
    dim : int
        Number of dimensions of the vectors.
    nlist : int
        Number of k-means cells (centroids). About sqrt(n) to 4 sqrt(n) for n vectors.
    metric : "ip" | "l2" | "cosine"
        As for :class:`FlatIndex`. For "ip" and "cosine" the cells come from spherical k-means and
        queries probe the cells with the largest inner product.
    nprobe : int
        Default number of cells a search scans (more: higher recall, slower). Clamped to nlist.

    Call :meth:`train` (k-means on a representative sample, at least nlist vectors) before
    :meth:`add` and :meth:`search`.
    """

    def __init__(self, dim: int, nlist: int = 1024, metric: str = "ip", nprobe: int = 8):
        nlist = check_positive_int(nlist, "nlist", maximum=1 << 22)
        nprobe = check_positive_int(nprobe, "nprobe")
        self._init_core(_core.IVFFlatIndex(check_dim(dim), check_metric(metric), nlist, nprobe))

    @property
    def is_trained(self) -> bool:
        """Whether :meth:`train` has run."""
        return self._core.is_trained

    def train(self, x, n_iter: int = 10, seed: int = 0, init: str = "random"):
        """Learn the nlist cells with k-means on x (n >= nlist rows); returns self.

        Parameters
        ----------
        x : array-like (n, dim), n >= nlist
        n_iter : int
            k-means iterations (10, as FAISS uses for its IVF quantisers).
        seed : int
            Seed of the subsampling and seeding; the same seed gives the same cells.
        init : "random" | "k-means++"
            Seeding of k-means: nlist random training points (as FAISS does), or k-means++
            (slightly better cells, about 10% longer training for nlist 1024).

        Only allowed while the index holds no vectors. Training sets larger than 256 * nlist are
        subsampled (seeded), as FAISS does.
        """
        x = as_matrix(x, self.dim, "training vectors")
        n_iter, plus_plus = self._coarse_args(n_iter, init)
        seed = check_positive_int(seed, "seed", minimum=0, maximum=(1 << 64) - 1)
        self._core.train(x, n_iter, seed, plus_plus)
        return self

    def search(self, q, k: int = 10, nprobe=None, filter=None):
        """Find the k nearest vectors of each query among the nprobe nearest cells.

        Parameters
        ----------
        q : array-like, shape (nq, dim) or (dim,)
        k : int >= 1
        nprobe : int, optional
            Cells to scan (default: :attr:`nprobe`); clamped to nlist. nprobe = nlist is exact.
        filter : array-like, optional
            Allow-list of ids, or a boolean mask over stored vectors in the order of :attr:`ids`.

        Returns (distances, ids) as :meth:`FlatIndex.search` does.
        """
        q = as_matrix(q, self.dim, "queries")
        k = check_k(k, q.shape[0])
        nprobe = self.nprobe if nprobe is None else check_positive_int(nprobe, "nprobe")
        fids, fmask = as_filter(filter, len(self))
        return self._core.search(q, k, nprobe, fids, fmask)

    def __repr__(self):
        return (f"IVFFlatIndex(dim={self.dim}, nlist={self.nlist}, metric={self.metric!r}, "
                f"nprobe={self.nprobe}, ntotal={len(self)}, trained={self.is_trained})")


class HNSWIndex(_Index):
    """Hierarchical navigable small-world graph (HNSW, Malkov & Yashunin): approximate search.

    Parameters
    ----------
    dim : int
        Number of dimensions of the vectors.
    M : int, 2 ... 4096
        Links per node on the upper levels (M in the paper); level 0 keeps up to 2*M (M_max0).
        Larger: higher recall at a given ef_search, more memory, slower build. 16 is typical.
    ef_construction : int >= 1
        Size of the candidate list while inserting (efConstruction). Larger: better graph, slower
        build.
    metric : "ip" | "l2" | "cosine"
        As for :class:`FlatIndex`. Under "ip", vectors of any norm are handled: queries are ranked
        by the exact inner product, and the graph is built on the order-preserving transform to
        L2 with one extra dimension, x' = [x, sqrt(R^2 - ||x||^2)], with R = max(||x||, ||y||)
        for each pair (so adding larger vectors later changes nothing already built).
    seed : int >= 0
        Seed of the level draws (level = floor(-ln(U) * mL), mL = 1/ln(M)) and of the insertion
        order within a batch. With one thread (:func:`pyknn.set_num_threads`) a build is
        deterministic for a given seed.
    ef_search : int >= 1
        Default size of the candidate list of a search (ef); max(ef_search, k) is used.

    Capacity grows automatically. ``add`` inserts a batch on the thread pool; searches may run
    concurrently with an ``add`` (from other Python threads) and only return vectors whose
    ``add`` had completed when the search began. Exact duplicates are chained to one graph node
    and returned together with it.
    """

    def __init__(self, dim: int, M: int = 16, ef_construction: int = 200, metric: str = "ip",
                 seed: int = 100, ef_search: int = 64):
        M = check_positive_int(M, "M", minimum=2, maximum=4096)
        ef_construction = check_positive_int(ef_construction, "ef_construction", maximum=1 << 30)
        seed = check_positive_int(seed, "seed", minimum=0, maximum=(1 << 64) - 1)
        ef_search = check_positive_int(ef_search, "ef_search")
        self._init_core(_core.HNSWIndex(check_dim(dim), check_metric(metric), M, ef_construction,
                                        seed))
        self.ef_search = ef_search

    @property
    def M(self) -> int:
        """Links per node on the upper levels (2*M on level 0)."""
        return self._core.M

    @property
    def ef_construction(self) -> int:
        """Candidate list size used while inserting."""
        return self._core.ef_construction

    @property
    def seed(self) -> int:
        """Seed of the level draws."""
        return self._core.seed

    @property
    def max_level(self) -> int:
        """Top level of the graph (-1 when empty)."""
        return self._core.max_level

    @property
    def read_only(self) -> bool:
        """True when loaded with ``pyknn.load(path, mmap=True)``: add and remove raise."""
        return self._core.read_only

    @property
    def ef_search(self) -> int:
        """Default candidate list size of :meth:`search` (saved with the index's metadata)."""
        return self._metadata.get("ef_search", 64)

    @ef_search.setter
    def ef_search(self, value):
        self._metadata["ef_search"] = check_positive_int(value, "ef_search")

    def search(self, q, k: int = 10, ef_search=None, filter=None):
        """Find (approximately) the k nearest stored vectors of each query.

        Parameters
        ----------
        q : array-like, shape (nq, dim) or (dim,)
        k : int >= 1
        ef_search : int, optional
            Candidate list size (default: :attr:`ef_search`); max(ef_search, k) is used. Larger:
            higher recall, slower.
        filter : array-like, optional
            Allow-list of ids, or a boolean mask over stored vectors in the order of :attr:`ids`.
            Other vectors are traversed but never returned. When few are allowed (m allowed out of
            n with m^2 < 7 ef n: about 6% of 100,000 vectors at ef 64, 30% of 5,000), the graph
            would be searched almost exhaustively, so the search is exact over them instead.

        Returns (distances, ids) as :meth:`FlatIndex.search` does: ip/cosine similarity
        descending, or l2 squared distance ascending; padding -1 and -inf / +inf.
        """
        # Fast path for the common call (a float32 C-contiguous query array, an int k and ef,
        # no filter): a single query costs about 100 us, so a few us of checks matter.
        if (filter is None and type(q) is np.ndarray and q.dtype == np.float32
                and type(k) is int and 1 <= k <= 1 << 20
                and (ef_search is None or (type(ef_search) is int and ef_search >= 1))):
            core = self._core
            if q.ndim == 1:
                q = q.reshape(1, -1)
            if q.ndim == 2 and q.shape[1] == core.dim and q.flags.c_contiguous:
                k = check_k(k, q.shape[0])  # the (queries x k) result limit
                ef = self._metadata.get("ef_search", 64) if ef_search is None else ef_search
                return core.search(q, k, ef, None, None)
        q = as_matrix(q, self.dim, "queries")
        k = check_k(k, q.shape[0])
        ef = self.ef_search if ef_search is None else check_positive_int(ef_search, "ef_search")
        fids, fmask = as_filter(filter, len(self))
        return self._core.search(q, k, ef, fids, fmask)

    def remove(self, ids, missing_ok: bool = False) -> int:
        """Remove the vectors of ``ids``; returns how many were removed.

        Unknown ids raise KeyError (and nothing is removed) unless ``missing_ok`` is True.
        Removed vectors are never returned again; their graph nodes keep routing searches until
        a later :meth:`add` reuses their slots. The order of :attr:`ids` may change.
        """
        return self._core.remove(as_ids(ids), bool(missing_ok))

    def __repr__(self):
        return (f"HNSWIndex(dim={self.dim}, M={self.M}, ef_construction={self.ef_construction}, "
                f"metric={self.metric!r}, ef_search={self.ef_search}, ntotal={len(self)})")


_RERANK_DTYPES = {None: 0, "float32": 1, "float16": 2}
_RERANK_NAMES = {v: k for k, v in _RERANK_DTYPES.items()}


def _check_rerank_dtype(rerank_dtype):
    if isinstance(rerank_dtype, type) or isinstance(rerank_dtype, np.dtype):
        rerank_dtype = np.dtype(rerank_dtype).name
    if rerank_dtype not in _RERANK_DTYPES:
        raise ValueError(f"rerank_dtype must be 'float32', 'float16' or None, got {rerank_dtype!r}")
    return _RERANK_DTYPES[rerank_dtype]


class _PQIndexBase(_Index):
    """What PQIndex and IVFPQIndex share: codes, re-ranking, reconstruction."""

    @property
    def pq_m(self) -> int:
        """Number of sub-quantizers (bytes per code for nbits=8)."""
        return self._core.pq_m

    @property
    def nbits(self) -> int:
        """Bits per sub-quantizer code: 8, or 4 (fast scan)."""
        return self._core.nbits

    @property
    def code_size(self) -> int:
        """Bytes of one vector's code: pq_m * nbits / 8."""
        return self._core.code_size

    @property
    def rerank_dtype(self):
        """Precision of the stored full vectors used by re-ranking: "float32", "float16" or None."""
        return _RERANK_NAMES[self._core.rerank_storage]

    @property
    def is_trained(self) -> bool:
        """Whether :meth:`train` has run."""
        return self._core.is_trained

    @property
    def rerank(self) -> int:
        """Default re-rank depth of :meth:`search` (0: none; saved with the metadata)."""
        return self._metadata.get("rerank", 0)

    @rerank.setter
    def rerank(self, value):
        value = check_positive_int(value, "rerank", minimum=0, maximum=1 << 30)
        if value and self.rerank_dtype is None:
            raise ValueError(f"rerank={value} needs the full vectors, but this index stores "
                             "none: create it with rerank_dtype='float32' or 'float16'")
        self._metadata["rerank"] = value

    @property
    def pq_centroids(self):
        """The product quantizer's centroids, float32 (pq_m, 2**nbits, dim / pq_m)."""
        return self._core.pq_centroids()

    def _search(self, q, k, nprobe, rerank, filter):
        q = as_matrix(q, self.dim, "queries")
        k = check_k(k, q.shape[0])
        rerank = check_k(self.rerank if rerank is None else rerank, q.shape[0], "rerank", 0)
        fids, fmask = as_filter(filter, len(self))
        return self._core.search(q, k, nprobe, rerank, fids, fmask)

    def get(self, ids):
        """The stored full vectors of ``ids`` (needs ``rerank_dtype``; float16 ones converted).

        Without stored vectors this raises ValueError: use :meth:`reconstruct`.
        """
        return super().get(ids)

    def reconstruct(self, ids):
        """The decoded approximations of ``ids`` (what the ADC scores are exact distances to):
        (n, dim) float32 for a sequence, (dim,) for one id. KeyError for unknown ids."""
        if is_scalar_id(ids):
            return self._core.reconstruct(as_ids(ids))[0]
        return self._core.reconstruct(as_ids(ids))

    def codes(self, ids):
        """The codes of ``ids``: uint8 (n, code_size) in :class:`pyknn.ProductQuantizer` layout."""
        return self._core.codes(as_ids(ids))

    def _train_args(self, x, pq_n_iter, seed):
        x = as_matrix(x, self.dim, "training vectors")
        pq_n_iter = check_positive_int(pq_n_iter, "pq_n_iter", maximum=(1 << 31) - 1)
        seed = check_positive_int(seed, "seed", minimum=0, maximum=(1 << 64) - 1)
        return x, pq_n_iter, seed


_PQ_SEARCH_DOC = """
        Parameters
        ----------
        q : array-like, shape (nq, dim) or (dim,)
        k : int >= 1
        rerank : int >= 0, optional
            Re-ranking depth R (default: :attr:`rerank`). 0: the distances are the ADC
            approximations. R > 0: the best max(k, R) codes by ADC are re-scored exactly against
            the stored full vectors (needs ``rerank_dtype``; ValueError otherwise).
        filter : array-like, optional
            Allow-list of ids, or a boolean mask over stored vectors in the order of :attr:`ids`.

        Returns (distances, ids): float32 and int64 (nq, k), best first: ip/cosine similarity
        descending, or l2 squared distance ascending; missing results padded with id -1 and
        -inf (ip, cosine) or +inf (l2).
"""


class IVFPQIndex(_Cells, _PQIndexBase):
    """Inverted file with product-quantized codes (IVFADC): compact approximate search.

    Parameters
    ----------
    dim : int
        Number of dimensions of the vectors.
    nlist : int
        Number of k-means cells of the coarse quantizer. About sqrt(n) to 4 sqrt(n).
    pq_m : int
        Number of sub-quantizers (M); must divide dim. A code takes pq_m * nbits / 8 bytes.
    nbits : 8 | 4
        Bits per sub-quantizer. 8: 256 centroids per sub-space, float lookup tables. 4: 16
        centroids, "fast scan": codes interleaved in blocks of 32 vectors, tables quantised to
        8 bits and looked up with byte shuffles (pq_m must be even). Without re-ranking the best
        2k by quantised score are re-scored with the float tables; with ``rerank=R`` the best
        max(k, R) by quantised score go straight to the exact re-ranking.
    metric : "ip" | "l2" | "cosine"
        As for :class:`FlatIndex` (cosine normalises vectors and queries).
    by_residual : bool
        Encode x - c(x), the residual to the vector's cell centroid (more accurate, as FAISS
        does by default), or x itself.
    rerank_dtype : "float32" | "float16" | None
        Also keep the full vectors (4 or 2 bytes per dimension) so that searches can re-rank
        exactly (``rerank=R``); None keeps codes only.
    nprobe : int
        Default number of cells a search scans; clamped to nlist.
    rerank : int
        Default re-ranking depth of :meth:`search` (0: none).

    Memory: pq_m * nbits / 8 bytes of code plus an 8-byte id per vector, and its slot in the
    id map (16-byte slots at most 3/4 full: 21 to 32 bytes per vector); plus dim * 4 or 2
    bytes with re-rank vectors, the centroids, and for l2 with residuals a table of
    nlist * pq_m * 2**nbits floats. :func:`pyknn.estimate_memory` gives the total. Call :meth:`train` before :meth:`add` and :meth:`search`.
    """

    def __init__(self, dim: int, nlist: int = 1024, pq_m: int = None, nbits: int = 8,
                 metric: str = "ip", by_residual: bool = True, rerank_dtype=None,
                 nprobe: int = 8, rerank: int = 0):
        if pq_m is None:
            raise TypeError("IVFPQIndex needs pq_m, the number of sub-quantizers (a divisor of dim)")
        dim = check_dim(dim)
        nlist = check_positive_int(nlist, "nlist", maximum=1 << 22)
        pq_m = check_positive_int(pq_m, "pq_m", maximum=4096)
        nbits = check_positive_int(nbits, "nbits", maximum=64)
        nprobe = check_positive_int(nprobe, "nprobe")
        self._init_core(_core.IVFPQIndex(dim, check_metric(metric), nlist, pq_m, nbits,
                                         bool(by_residual), _check_rerank_dtype(rerank_dtype),
                                         nprobe, False))
        self.rerank = rerank

    @property
    def by_residual(self) -> bool:
        """Whether codes encode the residual to the cell centroid."""
        return self._core.by_residual

    def train(self, x, n_iter: int = 10, pq_n_iter: int = 25, seed: int = 0,
              init: str = "random"):
        """Learn the cells (k-means, n_iter iterations), then the product quantizer on the
        residuals (one k-means per sub-space, pq_n_iter iterations); returns self.

        x needs at least max(nlist, 2**nbits) rows. Training sets beyond 256 points per centroid
        are subsampled (seeded). Only allowed while the index holds no vectors.
        """
        x, pq_n_iter, seed = self._train_args(x, pq_n_iter, seed)
        n_iter, plus_plus = self._coarse_args(n_iter, init)
        self._core.train(x, n_iter, pq_n_iter, seed, plus_plus)
        return self

    def search(self, q, k: int = 10, nprobe=None, rerank=None, filter=None):
        nprobe = self.nprobe if nprobe is None else check_positive_int(nprobe, "nprobe")
        return self._search(q, k, nprobe, rerank, filter)

    search.__doc__ = ("Find the k nearest vectors of each query among the nprobe nearest cells."
                      "\n" + _PQ_SEARCH_DOC.replace(
                          "        k : int >= 1\n",
                          "        k : int >= 1\n        nprobe : int, optional\n"
                          "            Cells to scan (default: :attr:`nprobe`); clamped to nlist.\n"))

    def __repr__(self):
        return (f"IVFPQIndex(dim={self.dim}, nlist={self.nlist}, pq_m={self.pq_m}, "
                f"nbits={self.nbits}, metric={self.metric!r}, nprobe={self.nprobe}, "
                f"rerank_dtype={self.rerank_dtype!r}, ntotal={len(self)}, "
                f"trained={self.is_trained})")


class PQIndex(_PQIndexBase):
    """Product-quantized codes without a coarse quantizer: every search scans all codes by ADC.

    The same engine as :class:`IVFPQIndex` with a single cell whose centroid is zero (so codes
    encode the vectors themselves). Parameters as there: dim, pq_m, nbits (8, or 4 for fast
    scan), metric, rerank_dtype, rerank.
    """

    def __init__(self, dim: int, pq_m: int, nbits: int = 8, metric: str = "ip",
                 rerank_dtype=None, rerank: int = 0):
        dim = check_dim(dim)
        pq_m = check_positive_int(pq_m, "pq_m", maximum=4096)
        nbits = check_positive_int(nbits, "nbits", maximum=64)
        self._init_core(_core.IVFPQIndex(dim, check_metric(metric), 1, pq_m, nbits, False,
                                         _check_rerank_dtype(rerank_dtype), 1, True))
        self.rerank = rerank

    def train(self, x, pq_n_iter: int = 25, seed: int = 0):
        """Learn the product quantizer (one k-means per sub-space) on x (>= 2**nbits rows)."""
        x, pq_n_iter, seed = self._train_args(x, pq_n_iter, seed)
        self._core.train(x, 1, pq_n_iter, seed, False)
        return self

    def search(self, q, k: int = 10, rerank=None, filter=None):
        return self._search(q, k, 1, rerank, filter)

    search.__doc__ = "Find the k nearest vectors of each query by scanning every code.\n" + \
        _PQ_SEARCH_DOC

    def __repr__(self):
        return (f"PQIndex(dim={self.dim}, pq_m={self.pq_m}, nbits={self.nbits}, "
                f"metric={self.metric!r}, rerank_dtype={self.rerank_dtype!r}, "
                f"ntotal={len(self)}, trained={self.is_trained})")


class RefineIndex(Guarded):
    """Exact re-ranking over any index: ``base`` proposes a shortlist, full vectors decide.

    Parameters
    ----------
    base : index
        An empty pyknn index (trained if it needs training). The wrapper adds every vector to it
        and to its own float32 store (a :class:`FlatIndex`), with the same ids.
    k_factor : int >= 1
        Default shortlist size per query: k_factor * k candidates are asked of ``base``.

    ``search(q, k, rerank=None, **base_search_args)`` asks ``base`` for max(k, rerank) (default
    k_factor * k) candidates, then re-scores them against the stored vectors in C++ (the gather
    and the exact distances, no Python loop). Like FAISS's IndexRefineFlat. The metadata (and
    so the model guard) is the base index's. ``add`` and ``remove`` are serialised with each
    other and with pickling, so the two parts always hold the same ids; searches run
    concurrently with them. It pickles (both parts); :meth:`save` is not available.

    Memory: the base index plus dim * 4 bytes per vector, its id and id-map slot.
    """

    def __init__(self, base, k_factor: int = 4):
        if not isinstance(base, _Index):
            raise TypeError(f"base must be a pyknn index, got {type(base).__name__}")
        self.k_factor = check_positive_int(k_factor, "k_factor", maximum=1 << 20)
        if len(base):
            raise ValueError(f"the base index already holds {len(base)} vectors; wrap an empty "
                             "index so that every vector is also stored for re-ranking")
        self.base = base
        self._store = FlatIndex(base.dim, base.metric)
        self._lock = threading.RLock()

    dim = property(lambda self: self.base.dim, doc="Number of dimensions.")
    metric = property(lambda self: self.base.metric, doc="The base index's metric.")
    _metadata = property(lambda self: self.base._metadata)

    @property
    def is_trained(self) -> bool:
        """Whether the base index is ready for ``add`` (indexes without training always are)."""
        return getattr(self.base, "is_trained", True)

    def __len__(self):
        return len(self._store)

    def train(self, x, **kwargs):
        """Train the base index (arguments as its ``train``); a no-op for bases that need no
        training (FlatIndex, HNSWIndex), as in FAISS. Returns self."""
        if hasattr(self.base, "train"):
            self.base.train(x, **kwargs)
        return self

    def _check_can_add(self) -> None:
        super()._check_can_add()
        if getattr(self.base, "read_only", False):
            raise ValueError(f"the base {type(self.base).__name__} is read-only (memory-mapped); "
                             "load it without mmap to add vectors")

    def add(self, x, ids=None) -> None:
        """Add vectors to the store and to the base index with the same ids.

        Parameters as :meth:`FlatIndex.add`. The store assigns the default ids; a failed add
        changes neither part.
        """
        self._check_can_add()
        x = as_matrix(x, self.dim, "vectors")
        if ids is not None:
            ids = as_ids(ids, x.shape[0])
        with self._lock:
            if ids is None:
                # The ids the store's next add assigns, computed before anything changes so
                # that a failure does not use them up.
                n_before = len(self._store)
                self._store.add(x)
                ids = self._store.ids[n_before:]
            else:
                self._store.add(x, ids)
            try:
                with _inner():
                    self.base.add(x, ids)
            except BaseException:
                self._store.remove(ids)
                raise

    def search(self, q, k: int = 10, rerank=None, filter=None, **base_args):
        """The k best of the base index's shortlist, by exact distance.

        rerank : shortlist size (default k_factor * k; at least k). Other keyword arguments
        (nprobe, ef_search ...) go to the base index's search. Returns (distances, ids) as
        :meth:`FlatIndex.search`.
        """
        q = as_matrix(q, self.dim, "queries")
        k = check_k(k, q.shape[0])
        r = check_k(self.k_factor * k if rerank is None else rerank, q.shape[0], "rerank")
        r = max(r, k)
        if filter is not None:
            # The base index orders its rows differently: pass the filter as ids.
            fids, fmask = as_filter(filter, len(self))
            filter = fids if fids is not None else self._store.ids[fmask.view(bool)]
        _, cand = self.base.search(q, r, filter=filter, **base_args)
        return self._store._core.rerank(q, cand, k)

    def remove(self, ids, missing_ok: bool = False) -> int:
        """Remove ids from both parts; returns how many were removed."""
        ids = as_ids(ids)
        if getattr(self.base, "read_only", False):
            raise ValueError(f"the base {type(self.base).__name__} is read-only (memory-mapped)")
        with self._lock:
            # The store first: unknown ids raise KeyError there before either part changes.
            removed = self._store.remove(ids, missing_ok)
            self.base.remove(ids, missing_ok=True)
            return removed

    def get(self, ids):
        """The stored full vectors (float32)."""
        return self._store.get(ids)

    def contains(self, id) -> bool:
        return self._store.contains(id)

    __contains__ = contains

    @property
    def ids(self):
        """Stored ids in the order a boolean ``filter`` refers to."""
        return self._store.ids

    def memory_usage(self) -> int:
        """Bytes of the base index plus the float32 store."""
        return self.base.memory_usage() + self._store.memory_usage()

    def __getstate__(self):
        with self._lock:
            # Serialised here, under the lock, so the two parts are captured between writes.
            return {"base": self.base.to_bytes(), "store": self._store.to_bytes(),
                    "k_factor": self.k_factor}

    def __setstate__(self, state):
        self.base = _from_bytes(state["base"])
        self._store = _from_bytes(state["store"])
        self.k_factor = state["k_factor"]
        self._lock = threading.RLock()

    def __repr__(self):
        return f"RefineIndex({self.base!r}, k_factor={self.k_factor})"


_KINDS = {1: FlatIndex, 2: IVFFlatIndex, 3: HNSWIndex, 4: IVFPQIndex, 5: PQIndex}


def _wrap(core):
    cls = _KINDS.get(core.kind)
    if cls is None:
        raise _core.FormatError(f"index kind {core.kind} is not supported by this pyknn")
    return cls._from_core(core)


def _from_bytes(data):
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    return _wrap(_core.from_bytes(bytes(data)))


def load(path, mmap: bool = False):
    """Load an index written by ``index.save(path)``; returns an object of the saved class.

    Parameters
    ----------
    path : str or os.PathLike
        The file to read.
    mmap : bool
        HNSWIndex files only: map the file read-only and use its vector and level-0 link
        sections in place instead of copying them into memory. Loading then costs little more
        than one read of the file (checked against its checksum), the pages are shared between
        processes that map the same file and can be evicted under memory pressure, and
        :meth:`memory_usage` no longer counts them. The index is read-only: ``add`` and
        ``remove`` raise ValueError. The file must not be modified or truncated while the index
        is in use (:meth:`_Index.save` replaces a file atomically, which is safe). ValueError
        for other index kinds and for files written before aligned sections existed.

    Raises FileNotFoundError / OSError for unreadable paths and :class:`pyknn.FormatError` for
    truncated, corrupted, foreign or unsupported-version files.
    """
    if not isinstance(mmap, (bool, np.bool_)):
        raise TypeError(f"mmap must be True or False, got {mmap!r}")
    return _wrap(_core.load(os.fspath(path), bool(mmap)))
