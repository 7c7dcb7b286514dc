"""index_factory("IVF1024,Flat") style strings, and memory estimates for them.

Grammar (case-sensitive, comma-separated, as FAISS writes them):

=============================  ======================================================
``Flat``                       :class:`pyknn.FlatIndex`
``IVF<nlist>,Flat``            :class:`pyknn.IVFFlatIndex` (nlist cells; needs ``train``)
``HNSW<M>`` / ``HNSW<M>,Flat`` :class:`pyknn.HNSWIndex` with M links per node
``PQ<m>x<nbits>``              ``pyknn.PQIndex``: every code scanned (no coarse cells)
``IVF<nlist>,PQ<m>x<nbits>``   ``pyknn.IVFPQIndex`` (m sub-quantisers of nbits bits)
``...PQ<m>x4fs``               the same, 4-bit codes (always scanned with fast scan)
``<PQ spec>,Refine``            ``pyknn.RefineIndex``: re-rank with the full vectors
=============================  ======================================================

Each parsed spec is a small dataclass, so new index kinds plug in with one parser entry and
one builder.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from ._validation import check_dim, check_metric, check_positive_int

__all__ = ["index_factory", "estimate_memory", "parse_spec", "IndexSpecification"]


@dataclass(frozen=True)
class IndexSpecification:
    """A parsed factory string: the kind and its numeric parameters."""

    kind: str                  # "flat" | "ivf_flat" | "hnsw" | "pq" | "ivf_pq"
    params: dict = field(default_factory=dict)
    refine: bool = False
    text: str = ""


_PATTERNS = [
    (re.compile(r"^Flat$"), lambda m: ("flat", {})),
    (re.compile(r"^IVF(\d+),Flat$"), lambda m: ("ivf_flat", {"nlist": int(m[1])})),
    (re.compile(r"^HNSW(\d+)(?:,Flat)?$"), lambda m: ("hnsw", {"M": int(m[1])})),
    (re.compile(r"^PQ(\d+)(?:x(\d+))?(fs)?$"),
     lambda m: ("pq", {"pq_m": int(m[1]), "nbits": int(m[2]) if m[2] else (4 if m[3] else 8),
                       "fast_scan": bool(m[3])})),
    (re.compile(r"^IVF(\d+),PQ(\d+)(?:x(\d+))?(fs)?$"),
     lambda m: ("ivf_pq", {"nlist": int(m[1]), "pq_m": int(m[2]),
                           "nbits": int(m[3]) if m[3] else (4 if m[4] else 8),
                           "fast_scan": bool(m[4])})),
]

_EXAMPLES = "Flat, IVF1024,Flat, HNSW32, PQ48, IVF1024,PQ32x8, IVF1024,PQ48x4fs,Refine"


def parse_spec(spec: str) -> IndexSpecification:
    """Parse a factory string; ValueError naming the string and the accepted forms."""
    if not isinstance(spec, str):
        raise TypeError(f"index spec must be a string, got {type(spec).__name__}")
    text = spec.strip().replace(" ", "")
    refine = False
    if text.endswith(",Refine"):
        text, refine = text[:-len(",Refine")], True
    for pattern, make in _PATTERNS:
        m = pattern.match(text)
        if m:
            kind, params = make(m)
            for k, v in params.items():
                if isinstance(v, int) and not isinstance(v, bool) and v < 1:
                    raise ValueError(f"index spec {spec!r}: {k} must be at least 1, got {v}")
            return IndexSpecification(kind, params, refine, spec)
    raise ValueError(f"unknown index spec {spec!r}; accepted forms: {_EXAMPLES}")


# Upper bounds the index classes enforce (nlist: csrc IVF indexes; M: HNSWIndex).
_MAX_NLIST = 1 << 22
_MAX_M = 4096


def _checked_spec(dim: int, spec: str) -> IndexSpecification:
    """Parse ``spec`` and check its parameters against ``dim``: the one validation that
    index_factory and estimate_memory share, so that every spec one accepts the other builds."""
    s = parse_spec(spec)
    p = s.params
    if "nlist" in p:
        check_positive_int(p["nlist"], "nlist", maximum=_MAX_NLIST)
    if s.kind == "hnsw":
        check_positive_int(p["M"], "M", minimum=2, maximum=_MAX_M)
    if s.kind in ("pq", "ivf_pq"):
        if dim % p["pq_m"]:
            valid = [m for m in range(1, dim + 1) if dim % m == 0]
            raise ValueError(f"index spec {spec!r}: dim {dim} is not divisible by pq_m "
                             f"{p['pq_m']} (valid pq_m: {valid})")
        if p["nbits"] not in (4, 8):
            raise ValueError(f"index spec {spec!r}: nbits {p['nbits']} is not supported "
                             "(supported: 4 and 8)")
        if p["fast_scan"] and p["nbits"] != 4:
            raise ValueError(f"index spec {spec!r}: fast scan ('fs') is the 4-bit code layout; "
                             f"use PQ{p['pq_m']}x4fs, or drop 'fs' for {p['nbits']}-bit codes")
        if p["nbits"] == 4 and p["pq_m"] % 2:
            raise ValueError(f"index spec {spec!r}: 4-bit codes need an even pq_m, got "
                             f"{p['pq_m']}")
    elif s.refine:
        raise ValueError(f"index spec {spec!r}: Refine applies to compressed (PQ) indexes only; "
                         f"{spec.rsplit(',', 1)[0]!r} already stores full vectors")
    return s


def index_factory(dim: int, spec: str, metric: str = "ip"):
    """Build an (empty) index from a factory string.

    Parameters
    ----------
    dim : int
        Vector dimension.
    spec : str
        "Flat", "IVF1024,Flat", "HNSW32", "IVF1024,PQ32x8", "IVF1024,PQ48x4fs,Refine" ...
        (see the module documentation).
    metric : "ip" | "l2" | "cosine"

    IVF indexes come back untrained (call ``train``). Unknown strings raise ValueError listing
    the accepted forms; parameters the index cannot take (pq_m not dividing dim, nbits other
    than 4 or 8 ...) raise ValueError naming them.
    """
    import pyknn
    dim, metric = check_dim(dim), check_metric(metric)
    s = _checked_spec(dim, spec)
    p = s.params
    if s.kind == "flat":
        return pyknn.FlatIndex(dim, metric)
    if s.kind == "ivf_flat":
        return pyknn.IVFFlatIndex(dim, nlist=p["nlist"], metric=metric)
    if s.kind == "hnsw":
        return pyknn.HNSWIndex(dim, M=p["M"], metric=metric)
    # 4-bit codes are always scanned with fast scan, so 'fs' only documents it.
    if s.kind == "pq":
        base = pyknn.PQIndex(dim, pq_m=p["pq_m"], nbits=p["nbits"], metric=metric)
        return pyknn.RefineIndex(base) if s.refine else base
    base = pyknn.IVFPQIndex(dim, nlist=p["nlist"], pq_m=p["pq_m"], nbits=p["nbits"], metric=metric)
    return pyknn.RefineIndex(base) if s.refine else base


# The id map (csrc/index/index.h IdMap): open addressing, 16-byte slots, sized n + n/3 + 1 when
# n ids arrive in one call (later growth is by 1.5x, so incremental adds can hold up to 1.5x this).
def _idmap_bytes(n: int) -> int:
    return 16 * (n + n // 3 + 1)


# HNSW: striped spin locks, one byte each (csrc/index/hnsw.h kStripes).
_HNSW_STRIPES = 1 << 16


def estimate_memory(n: int, dim: int, spec: str, metric: str = "ip") -> int:
    """Bytes an index built from ``spec`` holds after one ``add`` of n vectors.

    The same accounting as ``index.memory_usage()`` (vectors, codes, graph links, ids, id map).
    Exact for Flat and IVF-Flat; for HNSW the upper levels use their expected size (levels drawn
    with P(level >= l) = M^-l, so n / (M - 1) upper-level link lists of M + 1 entries); for
    4-bit IVF-PQ the last, partly filled block of 32 codes of each list is taken as half full.
    """
    n = check_positive_int(n, "n", minimum=0)
    dim, metric = check_dim(dim), check_metric(metric)
    s = _checked_spec(dim, spec)
    p = s.params
    ids = n * 8 + _idmap_bytes(n)
    if s.kind == "flat":
        return int(n * dim * 4 + ids)
    if s.kind == "ivf_flat":
        # Centroids, the list headers (two std::vectors, 48 bytes), vectors and ids per list.
        return int(p["nlist"] * (dim * 4 + 48) + n * dim * 4 + ids)
    if s.kind == "hnsw":
        M = p["M"]
        per = (dim * 4              # vector
               + (1 + 2 * M) * 4    # level-0 links: count + 2M
               + 8 + 1 + 1          # upper-level pointer, level, state
               + 4                  # duplicate chain
               + (4 if metric == "ip" else 0))  # squared norm (ip graph)
        upper = n / (M - 1) * (M + 1) * 4
        return int(n * per + upper + ids + _HNSW_STRIPES)
    if s.kind == "pq":
        p = dict(p, nlist=1)
    return _ivfpq_memory(n, dim, p, s.refine, metric, single_list=s.kind == "pq") + \
        (_idmap_bytes(n) + n * 8 if s.refine else 0)


def _ivfpq_memory(n, dim, p, refine, metric, single_list=False):
    # csrc/index/ivf_pq.cc IVFPQIndex::bytes_used: coarse centroids, sub-quantizer centroids and
    # their norms, the L2 residual table (nlist x pq_m x 2^nbits floats), per list its codes and
    # ids, and the id map. ",Refine" wraps the index in a RefineIndex: a FlatIndex of float32
    # vectors with its own ids and id map.
    nlist, pq_m, nbits = p["nlist"], p["pq_m"], p["nbits"]
    ksub = 1 << nbits
    if nbits == 4:
        # Blocks of 32 codes of pq_m / 2 bytes each. With many vectors per list the last block
        # of each list is on average half full; with fewer than 32 per list, every non-empty
        # list (about min(nlist, n) of them) holds one block.
        blocks = max(n / 32 + min(nlist, n) / 2, min(nlist, n))
        codes = int(blocks * 32) * pq_m // 2
    else:
        codes = n * pq_m * nbits // 8
    floats = nlist * dim + dim * ksub + pq_m * ksub
    if metric == "l2" and not single_list:
        # PQIndex (one list, codes of the vectors themselves) has no residual table.
        floats += nlist * pq_m * ksub
    lists = nlist * 4 * 24                      # four std::vectors per list
    total = floats * 4 + lists + codes + n * 8 + _idmap_bytes(n)
    return int(total + (n * dim * 4 if refine else 0))
