"""The benchmark runner behind ``pyknn bench`` and ``benchmarks/compare.py``, as a library.

An :class:`IndexSpec` says how to build one kind of index and which search settings to sweep.
Specs live in a registry; adding an index type to every benchmark is one :func:`register` call::

    register(IndexSpec(
        name="IVFFlatIndex", family="IVF-Flat", params={"nlist": 1024},
        build=build_ivf_flat,                    # (data, threads, nlist) -> index
        settings=[{"nprobe": p} for p in (1, 2, 4, 8, 16, 32, 64)]))

:func:`run` builds every selected index once, then for each search setting measures batch QPS,
single-query latency and quality (recall@k against exact ground truth, NDCG@10 / MRR@10 against
judged relevance). Results are plain JSON-serialisable dicts, rendered by :func:`format_table`,
:func:`format_markdown` and :func:`plot`.

Peers (faiss, hnswlib, usearch) are registered with ``library`` set to their package; they
take part only when asked for (``compare=True``), are imported only when built, and are skipped
with a note when not installed.
"""
from __future__ import annotations

import datetime
import functools
import importlib
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import _simd
from ._version import __version__
from .evaluation import ground_truth, mrr_at_k, ndcg_at_k, recall_at_k
from .indexes import FlatIndex, HNSWIndex, IVFFlatIndex, IVFPQIndex

__all__ = [
    "BenchData", "IndexSpec", "register", "registered_specs", "get_spec", "select_specs",
    "prepare", "run", "format_table", "format_markdown", "qps_ratios", "plot", "cpu_model",
    "default_threads", "RANK_CUTOFF",
]

#: Cut-off of NDCG and MRR (judged relevance), whatever the k of the search.
RANK_CUTOFF = 10
#: Share of the CPUs used by other processes above which the report warns.
BACKGROUND_LOAD_WARNING = 0.05
#: Queries of the single-query warm-up (before the latency measurement).
_LATENCY_WARMUP = 10


# --------------------------------------------------------------------------- data
@dataclass
class BenchData:
    """A dataset ready to benchmark: float32 C-contiguous vectors and the judgements.

    Made by :func:`prepare`; every index is built and searched from these same arrays.
    """

    name: str
    metric: str
    base: np.ndarray
    queries: np.ndarray
    gt_ids: np.ndarray
    qrels: Optional[np.ndarray] = None

    @property
    def n(self) -> int:
        """Number of base vectors."""
        return int(self.base.shape[0])

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self.base.shape[1])

    @property
    def nq(self) -> int:
        """Number of queries."""
        return int(self.queries.shape[0])


def prepare(dataset, n_queries: Optional[int] = None, k: int = 10, progress=True) -> BenchData:
    """Turn a :class:`pyknn.datasets.Dataset` into :class:`BenchData`.

    Vectors are converted to float32 once, here. ``n_queries`` keeps the first queries (and
    their judgements). If the dataset has no ground truth, or fewer than ``k`` neighbours per
    query, the exact top-k is computed with :func:`pyknn.evaluation.ground_truth` (float64
    numpy, independent of the indexes).
    """
    nq = dataset.queries.shape[0] if n_queries is None else min(int(n_queries), dataset.queries.shape[0])
    if nq < 1:
        raise ValueError("the benchmark needs at least one query")
    base = np.ascontiguousarray(dataset.base, dtype=np.float32)
    queries = np.ascontiguousarray(dataset.queries[:nq], dtype=np.float32)
    gt = dataset.gt_ids
    if gt is None or gt.shape[1] < min(k, base.shape[0]):
        with _step(progress, f"computing exact ground truth (top {k})"):
            gt = ground_truth(base, queries, k, dataset.metric)[1]
    qrels = None if dataset.qrels is None else dataset.qrels[:nq]
    return BenchData(name=dataset.name, metric=dataset.metric, base=base, queries=queries,
                     gt_ids=gt[:nq], qrels=qrels)


# --------------------------------------------------------------------------- specs
def _pyknn_search(index, queries, k, threads, **setting):
    return index.search(queries, k, **setting)[1]


def _pyknn_memory(index, data):
    return index.memory_usage()


@dataclass(frozen=True, eq=False)
class IndexSpec:
    """How to build and search one kind of index in a benchmark.

    Parameters
    ----------
    name : str
        Unique row label, e.g. "FlatIndex" or "faiss IndexFlatIP" (peers carry their library).
    family : str
        What it is comparable with: rows of one family (e.g. "Flat", "HNSW") are compared,
        and pyknn's QPS is divided by each peer's of the same family.
    build : callable (data, threads, **params) -> index
        Builds the index from :class:`BenchData` using ``threads`` threads (it sets its
        library's thread count). Timed as the build.
    params : mapping
        Constructor parameters, passed to ``build`` and shown in the table.
    settings : sequence of mappings
        The search-parameter sweep (e.g. ``[{"nprobe": 1}, {"nprobe": 4}, ...]``); one row each.
    search : callable (index, queries, k, threads, **setting) -> ids
        Returns int64 ids (nq, k), best first. Default: ``index.search(queries, k, **setting)``.
    library : str
        "pyknn" or the peer's package name.
    metrics : tuple of str
        Metrics it supports; it is left out (with a note) for others.
    requires : str, optional
        Module that must import for the spec to run (peers); missing means skipped with a note.
    install : str, optional
        What to ``pip install`` for ``requires``.
    memory : callable (index, data) -> int or None
        Bytes held by the index (None: unknown).
    memory_note : str
        How ``memory`` counts, shown under the table for estimates.
    """

    name: str
    family: str
    build: Callable[..., Any]
    params: Mapping[str, Any] = field(default_factory=dict)
    settings: Sequence[Mapping[str, Any]] = field(default_factory=lambda: ({},))
    search: Callable[..., np.ndarray] = _pyknn_search
    library: str = "pyknn"
    metrics: Tuple[str, ...] = ("ip", "l2", "cosine")
    requires: Optional[str] = None
    install: Optional[str] = None
    memory: Callable[[Any, BenchData], Optional[int]] = _pyknn_memory
    memory_note: str = ""

    @property
    def peer(self) -> bool:
        """Whether this is another library's index (a comparison), not pyknn's."""
        return self.library != "pyknn"

    def build_index(self, data: BenchData, threads: int):
        """Build the index of this spec from ``data`` with ``threads`` threads."""
        return self.build(data, threads, **self.params)


_SPECS: Dict[str, IndexSpec] = {}


def register(spec: IndexSpec, replace: bool = False) -> IndexSpec:
    """Add ``spec`` to the registry (its name must be new unless ``replace``); returns it."""
    key = spec.name.lower()
    if key in _SPECS and not replace:
        raise ValueError(f"an index spec named {spec.name!r} is already registered")
    _SPECS[key] = spec
    return spec


def registered_specs() -> List[IndexSpec]:
    """All registered specs, pyknn's first, in registration order."""
    return sorted(_SPECS.values(), key=lambda s: s.peer)


def get_spec(name: str) -> IndexSpec:
    """The spec named ``name`` (case-insensitive); KeyError listing the names if unknown."""
    try:
        return _SPECS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown index {name!r}; available: "
                       f"{', '.join(s.name for s in registered_specs())}") from None


def select_specs(names: Optional[Sequence[str]] = None, compare: bool = False,
                 metric: Optional[str] = None) -> Tuple[List[IndexSpec], List[str]]:
    """Choose the specs of a run; returns (specs, notes about what was left out).

    ``names`` are spec names or family names (a family name selects pyknn's specs of that
    family); None selects all of pyknn's. ``compare`` adds the peers of the selected families.
    Specs that do not support ``metric`` are left out.
    """
    specs = registered_specs()
    if not names:
        chosen = [s for s in specs if not s.peer]
    else:
        chosen = []
        families = sorted({s.family for s in specs})
        for name in names:
            if name.lower() in (f.lower() for f in families):
                chosen += [s for s in specs if not s.peer and s.family.lower() == name.lower()]
            else:
                try:
                    chosen.append(get_spec(name))
                except KeyError as e:
                    raise ValueError(f"{e.args[0]} (or a family: {', '.join(families)})") from None
    if compare:
        families = {s.family for s in chosen}
        chosen += [s for s in specs if s.peer and s.family in families]
    chosen = list(dict.fromkeys(chosen))  # keep order, drop repeats
    notes = []
    if metric is not None:
        # Peers added by compare have a sibling for each metric (IndexFlatIP / IndexFlatL2):
        # only a spec the user named is worth a note.
        named = {n.lower() for n in names or ()}
        notes = [f"skipping {s.name}: it does not support metric {metric!r}"
                 for s in chosen if metric not in s.metrics and s.name.lower() in named]
        chosen = [s for s in chosen if metric in s.metrics]
    return chosen, notes


def _build_flat(data, threads):
    _simd.set_num_threads(threads)
    index = FlatIndex(data.dim, data.metric)
    index.add(data.base)
    return index


register(IndexSpec(name="FlatIndex", family="Flat", build=_build_flat))


# IVF: nlist "auto" is about 3 sqrt(n) rounded to a power of two (1024 for the full
# wordnet-minilm set, 256 for the bundled sample); both libraries train 10 k-means iterations on
# the whole base set.
IVF_NPROBE_SWEEP = (1, 4, 16, 64, 128, 256, 384)
IVF_TRAIN_ITERATIONS = 10


def auto_nlist(n: int) -> int:
    """The IVF cell count the benchmarks use for n vectors."""
    return int(2 ** max(4, round(math.log2(3 * math.sqrt(max(n, 1))))))


def _nlist(data, nlist):
    return auto_nlist(data.n) if nlist == "auto" else int(nlist)


def _build_ivf_flat(data, threads, nlist="auto"):
    _simd.set_num_threads(threads)
    index = IVFFlatIndex(data.dim, nlist=_nlist(data, nlist), metric=data.metric)
    index.train(data.base, n_iter=IVF_TRAIN_ITERATIONS)
    index.add(data.base)
    return index


register(IndexSpec(name="IVFFlatIndex", family="IVF-Flat", build=_build_ivf_flat,
                   params={"nlist": "auto"},
                   settings=[{"nprobe": p} for p in IVF_NPROBE_SWEEP]))


# IVF-PQ: the same nlist, pq_m, nbits, training data and k-means iterations for both
# libraries. pq_m "auto" gives 8 dimensions per sub-quantizer at nbits=8 and 4 at nbits=4 (48
# bytes of code per 384-d vector either way). "+refine" rows keep the float32 vectors and re-rank
# the best PQ_RERANK by ADC exactly (FAISS: IndexRefineFlat with k_factor = PQ_RERANK / k).
# Residual encoding follows FAISS's defaults for each pair: IndexIVFPQ encodes residuals,
# IndexIVFPQFastScan (nbits=4) encodes the vectors themselves (by_residual False), so the 4-bit
# rows use by_residual=False. On wordnet-minilm that is also the better shortlist (recall@10 at
# nprobe 384 without re-ranking: 0.709 against 0.641 with residuals).
PQ_NPROBE_SWEEP = (1, 4, 16, 64, 128, 192, 256, 384)
PQ_RERANK = 100


def auto_pq_m(dim: int, nbits: int) -> int:
    """pq_m for the benchmarks: the largest divisor of dim with at least 8 (nbits=8) or 4
    (nbits=4) dimensions per sub-quantizer (even for nbits=4)."""
    dsub = 8 if nbits == 8 else 4
    ok = [m for m in range(1, dim + 1) if dim % m == 0 and dim // m >= dsub
          and (nbits == 8 or m % 2 == 0)]
    return max(ok) if ok else (2 if nbits == 4 and dim % 2 == 0 else 1)


def _resolve_params(data, params):
    out = {}
    for key, value in params.items():
        if key == "nlist":
            value = _nlist(data, value)
        elif key == "pq_m" and value == "auto":
            value = auto_pq_m(data.dim, params.get("nbits", 8))
        out[key] = value
    return out


def _build_ivf_pq(data, threads, nlist="auto", pq_m="auto", nbits=8, refine=False):
    _simd.set_num_threads(threads)
    index = IVFPQIndex(data.dim, nlist=_nlist(data, nlist), pq_m=auto_pq_m(data.dim, nbits)
                       if pq_m == "auto" else pq_m, nbits=nbits, metric=data.metric,
                       by_residual=nbits != 4, rerank_dtype="float32" if refine else None)
    index.train(data.base, n_iter=IVF_TRAIN_ITERATIONS)
    index.add(data.base)
    return index


def _pq_settings(refine):
    return [{"nprobe": p, **({"rerank": PQ_RERANK} if refine else {})} for p in PQ_NPROBE_SWEEP]


for _nbits, _fam in ((8, "IVF-PQ8"), (4, "IVF-PQ4fs")):
    for _refine in (False, True):
        register(IndexSpec(
            name=f"IVFPQIndex nbits={_nbits}" + (" +rerank" if _refine else ""),
            family=_fam + ("+refine" if _refine else ""), build=_build_ivf_pq,
            params={"nlist": "auto", "pq_m": "auto", "nbits": _nbits, "refine": _refine},
            settings=_pq_settings(_refine)))


# HNSW: the same M and ef_construction for every library; the sweep is over ef_search.
HNSW_PARAMS = {"M": 16, "ef_construction": 200}
HNSW_EF_SWEEP = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def _build_hnsw(data, threads, M, ef_construction):
    _simd.set_num_threads(threads)
    index = HNSWIndex(data.dim, M=M, ef_construction=ef_construction, metric=data.metric)
    index.add(data.base)
    return index


register(IndexSpec(name="HNSWIndex", family="HNSW", build=_build_hnsw, params=HNSW_PARAMS,
                   settings=[{"ef_search": ef} for ef in HNSW_EF_SWEEP]))


# --------------------------------------------------------------------------- peers
def _faiss_base(data):
    """The base vectors as faiss needs them: cosine is inner product over normalised copies."""
    if data.metric != "cosine":
        return data.base
    import faiss
    base = data.base.copy()
    faiss.normalize_L2(base)
    return base


# faiss: IndexFlatIP / IndexFlatL2; cosine is IP over normalised copies (as faiss documents).
def _build_faiss_flat(data, threads):
    import faiss
    faiss.omp_set_num_threads(threads)
    index = (faiss.IndexFlatL2 if data.metric == "l2" else faiss.IndexFlatIP)(data.dim)
    index.add(_faiss_base(data))
    return index, data.metric == "cosine"


def _search_faiss(built, queries, k, threads, **setting):
    index, normalise = built
    if normalise:
        import faiss
        queries = queries.copy()
        faiss.normalize_L2(queries)
    return index.search(queries, k, **setting)[1]


def _faiss_memory(built, data):
    return int(built[0].ntotal) * int(built[0].code_size)


_FAISS = dict(family="Flat", library="faiss", requires="faiss", install="faiss-cpu",
              build=_build_faiss_flat, search=_search_faiss, memory=_faiss_memory,
              memory_note="ntotal * code_size (the stored float32 vectors; ids are implicit)")
register(IndexSpec(name="faiss IndexFlatIP", metrics=("ip", "cosine"), **_FAISS))
register(IndexSpec(name="faiss IndexFlatL2", metrics=("l2",), **_FAISS))


def _build_hnswlib_bf(data, threads):
    import hnswlib
    index = hnswlib.BFIndex(space=data.metric, dim=data.dim)
    index.init_index(max_elements=data.n)
    index.set_num_threads(threads)
    index.add_items(data.base)
    return index


def _search_hnswlib(index, queries, k, threads, **setting):
    return index.knn_query(queries, k=k, num_threads=threads, **setting)[0].astype(np.int64)


def _hnswlib_bf_memory(index, data):
    # BruteforceSearch stores per element the float32 vector and an 8-byte label.
    return index.get_max_elements() * (data.dim * 4 + 8)


register(IndexSpec(
    name="hnswlib BFIndex", family="Flat", library="hnswlib", requires="hnswlib",
    install="hnswlib", build=_build_hnswlib_bf, search=_search_hnswlib, memory=_hnswlib_bf_memory,
    memory_note="estimate: max_elements * (4 * dim + 8), vector + label; its label hash map is not counted"))


# usearch exact search has no index: it scans the caller's array, which is all it holds.
def _build_usearch_exact(data, threads):
    from usearch.index import MetricKind
    kind = {"ip": MetricKind.IP, "l2": MetricKind.L2sq, "cosine": MetricKind.Cos}[data.metric]
    return {"base": data.base, "metric": kind}


def _search_usearch_exact(index, queries, k, threads, **setting):
    from usearch.index import search
    m = search(index["base"], queries, k, index["metric"], exact=True, threads=threads, **setting)
    # keys are uint64; a one-row query comes back 1-D.
    return np.asarray(m.keys).astype(np.int64).reshape(queries.shape[0], -1)


register(IndexSpec(
    name="usearch exact", family="Flat", library="usearch", requires="usearch", install="usearch",
    build=_build_usearch_exact, search=_search_usearch_exact,
    memory=lambda index, data: index["base"].nbytes,
    memory_note="the float32 array it scans (usearch.index.search(..., exact=True) keeps no index)"))


# faiss IndexIVFPQ / IndexIVFPQFastScan (+ IndexRefineFlat) with the same parameters.
def _build_faiss_ivf_pq(data, threads, nlist="auto", pq_m="auto", nbits=8, refine=False):
    import faiss
    faiss.omp_set_num_threads(threads)
    nlist = _nlist(data, nlist)
    pq_m = auto_pq_m(data.dim, nbits) if pq_m == "auto" else pq_m
    ip = data.metric != "l2"
    metric = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
    base = _faiss_base(data)
    quantizer = faiss.IndexFlatIP(data.dim) if ip else faiss.IndexFlatL2(data.dim)
    if nbits == 4:
        ivf = faiss.IndexIVFPQFastScan(quantizer, data.dim, nlist, pq_m, 4, metric)
    else:
        ivf = faiss.IndexIVFPQ(quantizer, data.dim, nlist, pq_m, nbits, metric)
    ivf.cp.niter = IVF_TRAIN_ITERATIONS
    index = faiss.IndexRefineFlat(ivf) if refine else ivf
    index.train(base)
    index.add(base)
    return index, data.metric == "cosine", ivf, quantizer


def _search_faiss_ivf_pq(built, queries, k, threads, nprobe, rerank=None):
    index, _, ivf = built[:3]
    ivf.nprobe = nprobe
    if rerank:
        index.k_factor = rerank / k
    return _search_faiss(built[:2], queries, k, threads)


def _faiss_ivf_pq_memory(built, data):
    index, _, ivf = built[:3]
    # Codes and ids in the inverted lists, the centroids, plus the refine vectors.
    mem = int(ivf.ntotal) * (int(ivf.code_size) + 8) + ivf.nlist * data.dim * 4
    return mem + (int(index.ntotal) * data.dim * 4 if index is not ivf else 0)


for _nbits, _fam, _cls in ((8, "IVF-PQ8", "IndexIVFPQ"), (4, "IVF-PQ4fs", "IndexIVFPQFastScan")):
    for _refine in (False, True):
        register(IndexSpec(
            name=f"faiss {_cls}" + (" +IndexRefineFlat" if _refine else ""),
            family=_fam + ("+refine" if _refine else ""), library="faiss", requires="faiss",
            install="faiss-cpu", build=_build_faiss_ivf_pq, search=_search_faiss_ivf_pq,
            params={"nlist": "auto", "pq_m": "auto", "nbits": _nbits, "refine": _refine},
            settings=_pq_settings(_refine), memory=_faiss_ivf_pq_memory,
            memory_note="ntotal * (code_size + 8-byte id) + nlist * dim * 4 (+ ntotal * dim * 4 "
                        "refine vectors)"))


# faiss IndexIVFFlat with the same nlist, metric, training data and iteration count.
def _build_faiss_ivf(data, threads, nlist="auto"):
    import faiss
    faiss.omp_set_num_threads(threads)
    nlist = _nlist(data, nlist)
    ip = data.metric != "l2"
    base = _faiss_base(data)
    quantizer = faiss.IndexFlatIP(data.dim) if ip else faiss.IndexFlatL2(data.dim)
    index = faiss.IndexIVFFlat(quantizer, data.dim, nlist,
                               faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2)
    index.cp.niter = IVF_TRAIN_ITERATIONS
    index.train(base)
    index.add(base)
    return index, data.metric == "cosine", quantizer


def _search_faiss_ivf(built, queries, k, threads, nprobe):
    built[0].nprobe = nprobe
    return _search_faiss(built[:2], queries, k, threads)


def _faiss_ivf_memory(built, data):
    index = built[0]
    # Codes and ids in the inverted lists, plus the centroids.
    return int(index.ntotal) * (int(index.code_size) + 8) + index.nlist * data.dim * 4


register(IndexSpec(
    name="faiss IndexIVFFlat", family="IVF-Flat", library="faiss", requires="faiss",
    install="faiss-cpu", build=_build_faiss_ivf, search=_search_faiss_ivf,
    params={"nlist": "auto"}, settings=[{"nprobe": p} for p in IVF_NPROBE_SWEEP],
    memory=_faiss_ivf_memory,
    memory_note="ntotal * (code_size + 8-byte id) + nlist * dim * 4 (lists and centroids)"))


# HNSW peers, built with the same M / ef_construction and searched over the same ef sweep.
def _build_hnswlib(data, threads, M, ef_construction):
    import hnswlib
    index = hnswlib.Index(space=data.metric, dim=data.dim)
    index.init_index(max_elements=data.n, ef_construction=ef_construction, M=M)
    index.set_num_threads(threads)
    index.add_items(data.base)
    return index


def _search_hnswlib_ef(index, queries, k, threads, ef_search):
    index.set_ef(max(ef_search, k))
    return _search_hnswlib(index, queries, k, threads)


def _hnswlib_memory(index, data):
    # hnswlib's HierarchicalNSW allocates, per element of max_elements: the vector, the level-0
    # list (count + 2M links) and an 8-byte label in one block; a pointer to the upper-level
    # lists and an int level; a std::mutex (40 bytes on Linux x86-64) guarding the element's
    # links; and an entry in the label -> slot std::unordered_map (a 32-byte node and an 8-byte
    # bucket). Fixed: 65,536 label-operation mutexes. Upper levels: about one element in M - 1
    # levels holds a list of count + M links.
    M = index.M
    n = index.max_elements
    per_element = (4 * data.dim + 4 * (2 * M + 1) + 8) + 8 + 4 + 40 + 32 + 8
    upper = 4 * (M + 1) / max(M - 1, 1)
    return int(n * (per_element + upper) + 65536 * 40)


register(IndexSpec(
    name="hnswlib Index", family="HNSW", library="hnswlib", requires="hnswlib", install="hnswlib",
    build=_build_hnswlib, search=_search_hnswlib_ef, params=HNSW_PARAMS,
    settings=[{"ef_search": ef} for ef in HNSW_EF_SWEEP], memory=_hnswlib_memory,
    memory_note="counted from hnswlib's allocations: per element the vector, level-0 links, "
                "label, level, upper-list pointer, link mutex and label-map entry; plus "
                "upper-level links and 65,536 label mutexes"))


def _build_faiss_hnsw(data, threads, M, ef_construction):
    import faiss
    faiss.omp_set_num_threads(threads)
    ip = data.metric != "l2"
    index = faiss.IndexHNSWFlat(data.dim, M, faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2)
    index.hnsw.efConstruction = ef_construction
    index.add(_faiss_base(data))
    return index, data.metric == "cosine"


def _search_faiss_hnsw(built, queries, k, threads, ef_search):
    built[0].hnsw.efSearch = max(ef_search, k)
    return _search_faiss(built, queries, k, threads)


def _faiss_hnsw_memory(built, data):
    index = built[0]
    return int(index.ntotal) * data.dim * 4 + int(index.hnsw.neighbors.size()) * 4 + \
        int(index.hnsw.offsets.size()) * 8 + int(index.hnsw.levels.size()) * 4


register(IndexSpec(
    name="faiss IndexHNSWFlat", family="HNSW", library="faiss", requires="faiss",
    install="faiss-cpu", build=_build_faiss_hnsw, search=_search_faiss_hnsw, params=HNSW_PARAMS,
    settings=[{"ef_search": ef} for ef in HNSW_EF_SWEEP], memory=_faiss_hnsw_memory,
    memory_note="vectors + neighbour, offset and level arrays"))


def _build_usearch(data, threads, M, ef_construction):
    from usearch.index import Index
    metric = {"ip": "ip", "l2": "l2sq", "cosine": "cos"}[data.metric]
    index = Index(ndim=data.dim, metric=metric, connectivity=M, expansion_add=ef_construction,
                  dtype="f32")
    index.add(np.arange(data.n), data.base, threads=threads)
    return index


def _search_usearch(index, queries, k, threads, ef_search):
    index.expansion_search = max(ef_search, k)
    m = index.search(queries, k, threads=threads)
    return np.asarray(m.keys).astype(np.int64).reshape(queries.shape[0], -1)


register(IndexSpec(
    name="usearch Index", family="HNSW", library="usearch", requires="usearch", install="usearch",
    build=_build_usearch, search=_search_usearch, params=HNSW_PARAMS,
    settings=[{"ef_search": ef} for ef in HNSW_EF_SWEEP],
    memory=lambda index, data: int(index.memory_usage),
    memory_note="usearch's own memory_usage"))


# --------------------------------------------------------------------------- measurement
@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform module where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("model name", "hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def default_threads() -> int:
    """Cores this process may run on (the default thread count of a benchmark)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _step:
    """Context manager printing "what ... 1.2 s" to the progress stream (stderr by default)."""

    def __init__(self, progress, what):
        self.out = sys.stderr if progress is True else (progress or None)
        self.what = what

    def __enter__(self):
        if self.out:
            print(f"{self.what} ...", end="", file=self.out, flush=True)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.seconds = time.perf_counter() - self.t0
        if self.out:
            print(" failed" if exc_type else f" {self.seconds:.2f} s", file=self.out, flush=True)
        return False


def _note(progress, message):
    out = sys.stderr if progress is True else (progress or None)
    if out:
        print(message, file=out, flush=True)


class _BackgroundLoad:
    """Share of all CPUs that other processes used while the block ran (None off Linux).

    Busy time from /proc/stat minus this process's own CPU time: a benchmark that shares its
    cores with other work measures that work too, and the report should say so.
    """

    def __enter__(self):
        self.start = self._snapshot()
        return self

    def __exit__(self, exc_type, exc, tb):
        end = self._snapshot()
        self.share = None
        if self.start is not None and end is not None:
            wall, busy, own = (b - a for a, b in zip(self.start, end))
            cpus = os.cpu_count() or 1
            if wall > 0:
                self.share = min(1.0, max(0.0, (busy - own) / (wall * cpus)))
        return False

    @staticmethod
    def _snapshot():
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = f.readline().split()
        except OSError:
            return None
        # user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
        ticks = [int(x) for x in fields[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system


def _batch_seconds(search, queries, repeats) -> Tuple[np.ndarray, float]:
    """Ids of a warm-up call over all queries, and the best time of ``repeats`` more calls."""
    ids = search(queries)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        search(queries)
        best = min(best, time.perf_counter() - t0)
    return ids, best


def _latency_ms(search, queries, n) -> Optional[Tuple[float, float]]:
    """p50 and p99 in ms of one-query calls over the first ``n`` queries (after a warm-up)."""
    rows = [queries[i:i + 1] for i in range(min(n, queries.shape[0]))]
    if not rows:
        return None
    for row in rows[:_LATENCY_WARMUP]:
        search(row)
    seconds = np.empty(len(rows))
    for i, row in enumerate(rows):
        t0 = time.perf_counter()
        search(row)
        seconds[i] = time.perf_counter() - t0
    p50, p99 = np.percentile(seconds, [50, 99]) * 1e3
    return float(p50), float(p99)


def _finite(x):
    return None if x is None or not math.isfinite(x) else float(x)


def run(data, specs: Optional[Sequence[IndexSpec]] = None, *, k: int = 10,
        threads: Optional[int] = None, repeats: int = 3, single_queries: int = 200,
        compare: bool = False, progress=True) -> List[dict]:
    """Benchmark ``specs`` on ``data``; returns one dict per (spec, search setting).

    Parameters
    ----------
    data : BenchData or pyknn.datasets.Dataset
        A Dataset is passed through :func:`prepare` first (all its queries).
    specs : sequence of IndexSpec, optional
        Default: :func:`select_specs` (pyknn's specs, plus the peers if ``compare``).
    k : int
        Neighbours per query; recall@k is measured against the dataset's exact top-k.
    threads : int, optional
        Threads for every library (default: :func:`default_threads`).
    repeats : int
        Batch QPS is the best of this many calls with all queries, after one warm-up call.
    single_queries : int
        Latency is measured over one-query calls of the first this-many queries (0: skip).
    progress : True, False or a text stream
        Where progress messages go (True: stderr).

    Each result has: index, library, family, params (constructor + search setting),
    build_params, search_params, k, recall, ndcg and mrr (at :data:`RANK_CUTOFF`, None without
    judgements), qps, batch_seconds, p50_ms, p99_ms, latency_queries, build_s, bytes_per_vec,
    memory_note, background_load and build_background_load (share of the CPUs other processes
    used during the search measurements and during the build; the table warns above
    :data:`BACKGROUND_LOAD_WARNING`), and the run's context: dataset, n, dim, nq, metric,
    threads, batch_size, simd, pyknn_version, cpu. Missing values are None (JSON null).
    """
    if isinstance(k, bool) or int(k) < 1 or int(repeats) < 1 or int(single_queries) < 0:
        raise ValueError("k and repeats must be at least 1, single_queries at least 0")
    if not isinstance(data, BenchData):
        data = prepare(data, k=k, progress=progress)
    threads = default_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    if specs is None:
        specs, notes = select_specs(compare=compare, metric=data.metric)
        for message in notes:
            _note(progress, message)
    context = {
        "dataset": data.name, "n": data.n, "dim": data.dim, "nq": data.nq,
        "metric": data.metric, "threads": threads, "batch_size": data.nq,
        "simd": _simd.simd_level(), "pyknn_version": __version__, "cpu": cpu_model(),
    }
    runnable = []
    for spec in specs:
        if spec.requires:
            try:
                importlib.import_module(spec.requires)
            except ImportError:
                _note(progress, f"skipping {spec.name}: {spec.requires} is not installed "
                                f"(pip install {spec.install or spec.requires})")
                continue
        runnable.append(spec)
    families = list(dict.fromkeys(spec.family for spec in runnable))
    results = []
    previous_threads = _simd.num_threads()
    try:
        for family in families:
            results += _run_family([s for s in runnable if s.family == family], data, k, threads,
                                   repeats, single_queries, progress, context)
    finally:
        _simd.set_num_threads(previous_threads)
    return results


def _run_family(specs, data, k, threads, repeats, single_queries, progress, context):
    """Builds every index of one family, then measures their sweeps interleaved (setting i of
    each index, then setting i + 1 ...), so that a change in the machine's load during the run
    falls on all libraries alike rather than on whichever ran at the time."""
    built = []
    for spec in specs:
        with _step(progress, f"building {spec.name}") as b, _BackgroundLoad() as load:
            index = spec.build_index(data, threads)
        built.append((spec, index, (b.seconds, load.share), spec.memory(index, data), []))
    for i in range(max(len(spec.settings) for spec in specs)):
        for spec, index, build, memory, rows in built:
            if i < len(spec.settings):
                rows.append(_measure(spec, index, spec.settings[i], build, memory, data, k,
                                     threads, repeats, single_queries, progress, context))
    results = [row for *_, rows in built for row in rows]
    del built, index
    return results


def _measure(spec, index, setting, build, memory, data, k, threads, repeats, single_queries,
             progress, context):
    build_s, build_load = build
    # Show the values "auto" resolved to (e.g. nlist=1024), not "auto".
    build_params = _resolve_params(data, spec.params)
    params = {**build_params, **setting}
    label = " ".join([spec.name] + [f"{key}={value}" for key, value in params.items()])

    def search(q):
        return spec.search(index, q, k, threads, **setting)

    with _step(progress, f"searching {label} ({data.nq} queries, best of {repeats})"), \
            _BackgroundLoad() as load:
        ids, seconds = _batch_seconds(search, data.queries, repeats)
        latency = _latency_ms(search, data.queries, single_queries)
    ndcg = mrr = None
    if data.qrels is not None:
        ndcg = ndcg_at_k(ids, data.qrels, RANK_CUTOFF)
        mrr = mrr_at_k(ids, data.qrels, RANK_CUTOFF)
    return {
        "index": spec.name, "library": spec.library, "family": spec.family,
        "params": params, "build_params": build_params, "search_params": dict(setting),
        "k": k, "recall": _finite(recall_at_k(ids, data.gt_ids, k)),
        "ndcg": _finite(ndcg), "mrr": _finite(mrr),
        "qps": data.nq / seconds, "batch_seconds": seconds,
        "p50_ms": latency[0] if latency else None, "p99_ms": latency[1] if latency else None,
        "latency_queries": min(single_queries, data.nq),
        "build_s": build_s,
        "bytes_per_vec": None if memory is None else memory / data.n,
        "memory_note": spec.memory_note,
        "background_load": load.share,
        "build_background_load": build_load,
        **context,
    }


# --------------------------------------------------------------------------- reports
def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _params_text(params):
    return " ".join(f"{key}={value}" for key, value in params.items()) or "-"


def _table(results) -> Tuple[List[str], List[List[str]]]:
    """Header and cells shared by the text and markdown tables."""
    k = results[0]["k"] if results else 10
    header = ["index", "params", f"recall@{k}", f"NDCG@{RANK_CUTOFF}", f"MRR@{RANK_CUTOFF}",
              "QPS (batch)", "p50 ms", "p99 ms", "build s", "bytes/vec"]
    cells = [[r["index"], _params_text(r["params"]), _fmt(r["recall"], ".3f"), _fmt(r["ndcg"], ".3f"),
              _fmt(r["mrr"], ".3f"), _fmt(r["qps"], ".0f"), _fmt(r["p50_ms"], ".3f"),
              _fmt(r["p99_ms"], ".3f"), _fmt(r["build_s"], ".2f"),
              _fmt(r["bytes_per_vec"], ".0f") + ("*" if r["bytes_per_vec"] is not None
                                                 and r["memory_note"] else "")]
             for r in results]
    return header, cells


def _context_lines(results) -> List[str]:
    r = results[0]
    latency = (f"single-query latency over {r['latency_queries']} one-query calls"
               if r["latency_queries"] else "no latency measurement")
    return [
        f"dataset {r['dataset']}: n={r['n']:,} dim={r['dim']} nq={r['nq']:,} metric={r['metric']}",
        f"threads {r['threads']}, batch size {r['batch_size']} (all queries in one call), {latency}",
        f"pyknn {r['pyknn_version']} SIMD {r['simd']}, CPU {r['cpu']}",
    ]


def _memory_notes(results) -> List[str]:
    notes = {r["index"]: r["memory_note"] for r in results
             if r["memory_note"] and r["bytes_per_vec"] is not None}
    return [f"* {name}: {note}" for name, note in notes.items()]


def _load_warnings(results) -> List[str]:
    lines = []
    for key, what in (("background_load", "ran"), ("build_background_load", "were built")):
        busy = [r for r in results if (r.get(key) or 0) > BACKGROUND_LOAD_WARNING]
        if busy:
            worst = max(r[key] for r in busy)
            lines.append(f"warning: other processes used up to {worst:.0%} of the CPUs while "
                         f"{', '.join(dict.fromkeys(r['index'] for r in busy))} {what}; "
                         "their timings are not reliable")
    return lines


def format_table(results: Sequence[dict]) -> str:
    """The results as an aligned text table, with the run's context above and notes below.

    Returns the text (the CLI prints it to stdout). Bytes per vector marked * are counted
    from the peer's known layout, as the note under the table says.
    """
    if not results:
        return "(no results)"
    header, cells = _table(results)
    widths = [max(len(row[i]) for row in [header] + cells) for i in range(len(header))]
    numeric = range(2, len(header))

    def line(row):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = _context_lines(results) + ["", line(header), rule] + [line(c) for c in cells]
    notes = _memory_notes(results) + _load_warnings(results)
    return "\n".join(lines + ([""] + notes if notes else []))


def qps_ratios(results: Sequence[dict], recall_targets=(0.90, 0.95, 0.99),
               interpolate: bool = False) -> List[dict]:
    """pyknn's batch QPS divided by each peer's, per family.

    Where both sides have a single row (exact search) the QPS are compared directly
    (``recall_target`` None). For sweeps, the best QPS reaching each recall target is compared,
    for the targets both sides reach; with ``interpolate``, the QPS at exactly the target on each
    side's recall-QPS curve (:func:`qps_at_recall`), which does not depend on how close a sweep
    point happens to land to the target. Returns dicts: family, pyknn, peer, recall_target, ratio.
    """
    at = qps_at_recall if interpolate else _best_qps
    out = []
    by_index: Dict[str, List[dict]] = {}
    for r in results:
        by_index.setdefault(r["index"], []).append(r)
    ours = [rows for rows in by_index.values() if rows[0]["library"] == "pyknn"]
    peers = [rows for rows in by_index.values() if rows[0]["library"] != "pyknn"]
    for mine in ours:
        for theirs in (p for p in peers if p[0]["family"] == mine[0]["family"]):
            if len(mine) == 1 and len(theirs) == 1:
                pairs = [(None, mine[0]["qps"], theirs[0]["qps"])]
            else:
                pairs = [(t, at(mine, t), at(theirs, t)) for t in recall_targets]
            out += [{"family": mine[0]["family"], "pyknn": mine[0]["index"],
                     "peer": theirs[0]["index"], "recall_target": t, "ratio": a / b}
                    for t, a, b in pairs if a and b]
    return out


def _best_qps(rows, target):
    return max((r["qps"] for r in rows if r["recall"] is not None and r["recall"] >= target),
               default=None)


def qps_at_recall(rows, target):
    """Batch QPS at exactly ``target`` recall on a sweep's curve, or None if it never gets there.

    Linear in recall and in log(QPS) between the two sweep points around the target on the
    upper envelope; when the lowest setting already exceeds the target, its QPS (the best known).
    """
    pts = sorted((r["recall"], r["qps"]) for r in rows if r["recall"] is not None and r["qps"])
    if not pts or pts[-1][0] < target:
        return None
    best = None
    for (r0, q0), (r1, q1) in zip(pts, pts[1:]):
        if r0 <= target <= r1 and r1 > r0:
            w = (target - r0) / (r1 - r0)
            q = math.exp((1 - w) * math.log(q0) + w * math.log(q1))
            best = q if best is None else max(best, q)
    above = [q for r, q in pts if r >= target]
    return max([best] + above if best is not None else above)


def _ratio_lines(results) -> List[str]:
    lines = []
    for interpolate in (False, True):
        for r in qps_ratios(results, interpolate=interpolate):
            if r["recall_target"] is None:
                if interpolate:
                    continue
                at = ""
            elif interpolate:
                at = f" at recall@10 = {r['recall_target']:.2f} (interpolated)"
            else:
                at = f" at recall@10 >= {r['recall_target']:.2f} (best sweep point)"
            lines.append(f"pyknn {r['family']} / {r['peer']} = {r['ratio']:.2f}x{at}")
    return lines


def format_markdown(results: Sequence[dict], command: Optional[str] = None,
                    title: Optional[str] = None) -> str:
    """The results as a markdown section for BENCHMARKS.md.

    It records the command line (if given), the date, CPU, threads, batch size, the table, and
    the ratios of pyknn's batch QPS to each peer's of the same family (:func:`qps_ratios`).
    """
    if not results:
        return ""
    r = results[0]
    header, cells = _table(results)
    title = title or f"{r['dataset']}, {r['threads']} threads"
    lines = [f"## {title}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"- date: {datetime.date.today().isoformat()}",
              f"- CPU: {r['cpu']}",
              f"- threads: {r['threads']} (the same for every library)",
              f"- batch size: {r['batch_size']} queries per call; latency from "
              f"{r['latency_queries']} one-query calls",
              f"- dataset: {r['dataset']}, n={r['n']:,}, dim={r['dim']}, nq={r['nq']:,}, "
              f"metric={r['metric']}, k={r['k']}",
              f"- pyknn {r['pyknn_version']}, SIMD {r['simd']}", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    ratios = _ratio_lines(results)
    if ratios:
        lines += ["", "Batch QPS ratios:", ""] + [f"- {x}" for x in ratios]
    notes = _memory_notes(results)
    if notes:
        lines += ["", "Bytes per vector:", ""] + [f"- {x[2:]}" for x in notes]
    warnings = _load_warnings(results)
    if warnings:
        lines += [""] + [f"**{w}**" for w in warnings]
    return "\n".join(lines) + "\n"


def require_matplotlib():
    """Import matplotlib (for :func:`plot`), or raise ImportError saying how to install it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib "
                          "(or pip install 'pyknn[bench]')") from None


def plot(results: Sequence[dict], path) -> None:
    """Draw recall@k against batch QPS (log scale), one line per index, and save it to ``path``.

    The image format follows the file extension (PNG, SVG, PDF ...). Needs matplotlib.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results:
        raise ValueError("nothing to plot: no results")
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    by_index: Dict[str, List[dict]] = {}
    for r in results:
        if r["recall"] is not None:
            by_index.setdefault(r["index"], []).append(r)
    for name, rows in by_index.items():
        rows = sorted(rows, key=lambda r: r["recall"])
        ax.plot([r["recall"] for r in rows], [r["qps"] for r in rows], marker="o",
                linestyle="-" if rows[0]["library"] == "pyknn" else "--",
                label=f"{name} ({rows[0]['family']})")
    for target in (0.90, 0.95, 0.99):
        ax.axvline(target, color="0.85", linewidth=0.8, zorder=0)
    r = results[0]
    ax.set_xlim(right=1.005)  # exact indexes sit at recall 1.0: keep them off the frame
    ax.set_yscale("log")
    ax.set_xlabel(f"recall@{r['k']}")
    ax.set_ylabel("queries per second (batch, log scale)")
    ax.set_title(f"{r['dataset']} (n={r['n']:,}, dim={r['dim']}, {r['metric']}), "
                 f"{r['threads']} threads\n{r['cpu']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=120)
