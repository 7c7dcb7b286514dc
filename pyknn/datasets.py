"""Dataset loaders: .npy folders, ann-benchmarks HDF5, TEXMEX fvecs/ivecs/bvecs, the bundled sample.

A :class:`Dataset` keeps vectors in the dtype they were stored in: float16 stays
float16 (half the memory; the indexes convert to float32 as numpy
``astype(float32)`` would, see the input policy). :meth:`Dataset.base_f32` and
:meth:`Dataset.queries_f32` give float32 copies when a caller needs them.

>>> ds = load()            # the bundled wordnet-minilm sample
>>> ds.base.shape, ds.queries.shape, ds.metric
((10000, 384), (1000, 384), 'ip')
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

import numpy as np

__all__ = [
    "Dataset", "load", "load_sample", "sample_path", "load_npy_folder", "load_ann_benchmarks_hdf5",
    "read_fvecs", "read_ivecs", "read_bvecs", "write_fvecs", "write_ivecs", "write_bvecs",
]

PathLike = Union[str, os.PathLike]

METRICS = ("ip", "l2", "cosine")
SAMPLE_NAME = "wordnet-minilm-sample"
# ann-benchmarks "distance" attribute -> our metric name.
_HDF5_METRICS = {"angular": "cosine", "cosine": "cosine", "euclidean": "l2", "l2": "l2",
                 "dot": "ip", "ip": "ip", "inner_product": "ip"}


# --------------------------------------------------------------------------- Dataset
@dataclass(repr=False)
class Dataset:
    """Vectors, queries and judgements of one benchmark dataset.

    Attributes
    ----------
    name : str
        Short name (folder or file stem).
    base : ndarray, shape (n, dim), float32 or float16
        Database vectors; row i has id i. Other real dtypes are converted to float32.
    queries : ndarray, shape (n_queries, dim), float32 or float16
        Query vectors.
    gt_ids : ndarray of int64, shape (n_queries, k_gt), or None
        Exact nearest-neighbour ids per query, best first (-1 = padding).
    qrels : ndarray of int64, shape (n_queries,) or (n_queries, r), or None
        Judged-relevant document ids per query (for :func:`pyknn.evaluation.ndcg_at_k`
        / ``mrr_at_k``); rows padded with -1 when 2-D.
    metric : str
        "ip", "l2" or "cosine": the metric ``gt_ids`` was computed with.
    path : Path or None
        Where the dataset was loaded from (used to find optional text files).
    """

    name: str
    base: np.ndarray
    queries: np.ndarray
    gt_ids: Optional[np.ndarray] = None
    qrels: Optional[np.ndarray] = None
    metric: str = "ip"
    path: Optional[Path] = None

    def __post_init__(self):
        self.base = _as_vectors(self.base, "base")
        self.queries = _as_vectors(self.queries, "queries")
        if self.queries.shape[1] != self.base.shape[1]:
            raise ValueError(f"queries have dim {self.queries.shape[1]} but base has dim "
                             f"{self.base.shape[1]}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        nq = self.queries.shape[0]
        if self.gt_ids is not None:
            self.gt_ids = _as_id_array(self.gt_ids, "gt_ids", (2,))
            if self.gt_ids.shape[0] != nq:
                raise ValueError(f"gt_ids has {self.gt_ids.shape[0]} rows but there are {nq} queries")
        if self.qrels is not None:
            self.qrels = _as_id_array(self.qrels, "qrels", (1, 2))
            if self.qrels.shape[0] != nq:
                raise ValueError(f"qrels has {self.qrels.shape[0]} rows but there are {nq} queries")
        if self.path is not None:
            self.path = Path(self.path)

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self.base.shape[1])

    def base_f32(self) -> np.ndarray:
        """The base vectors as float32 (a copy unless already float32)."""
        return self.base.astype(np.float32, copy=False)

    def queries_f32(self) -> np.ndarray:
        """The query vectors as float32 (a copy unless already float32)."""
        return self.queries.astype(np.float32, copy=False)

    def doc_texts(self) -> List[str]:
        """Texts of the base documents, in id order, from ``docs.jsonl.gz`` beside the data.

        Raises FileNotFoundError if the dataset has no such file.
        """
        return _read_texts(self.path, "docs.jsonl.gz", self.base.shape[0])

    def query_texts(self) -> List[str]:
        """Texts of the queries, in order, from ``queries.jsonl.gz`` beside the data.

        Raises FileNotFoundError if the dataset has no such file.
        """
        return _read_texts(self.path, "queries.jsonl.gz", self.queries.shape[0])

    def __repr__(self) -> str:
        gt = "None" if self.gt_ids is None else f"{self.gt_ids.shape}"
        qr = "None" if self.qrels is None else f"{self.qrels.shape}"
        return (f"Dataset(name={self.name!r}, metric={self.metric!r}, dim={self.dim}, "
                f"base={self.base.shape} {self.base.dtype}, queries={self.queries.shape} "
                f"{self.queries.dtype}, gt_ids={gt}, qrels={qr})")


def _as_vectors(a, name: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):  # keeps np.memmap arrays memory-mapped
        a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, dim), got shape {a.shape}")
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    if a.dtype not in (np.float16, np.float32):
        a = a.astype(np.float32)
    return a


def _as_id_array(a, name: str, ndims) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer ids, got dtype {a.dtype}")
    if a.ndim not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, got shape {a.shape}")
    return a.astype(np.int64, copy=False)


def _read_texts(folder: Optional[Path], filename: str, expected: int) -> List[str]:
    if folder is None or not (Path(folder) / filename).is_file():
        raise FileNotFoundError(f"no {filename} in {folder}")
    with gzip.open(Path(folder) / filename, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    if len(texts) != expected:
        raise ValueError(f"{filename} has {len(texts)} lines, expected {expected}")
    return texts


# --------------------------------------------------------------------------- .npy folders
# Accepted file names per array, in order of preference.
_NPY_NAMES = {
    "base": ("base.f16.npy", "base.f32.npy", "base.npy"),
    "queries": ("queries.f16.npy", "queries.f32.npy", "queries.npy"),
    "gt_ids": ("gt_ids.i32.npy", "gt_ids.i64.npy", "gt_ids.npy"),
    "qrels": ("qrels.i32.npy", "qrels.i64.npy", "qrels.npy"),
}


def _find(folder: Path, key: str) -> Optional[Path]:
    for name in _NPY_NAMES[key]:
        if (folder / name).is_file():
            return folder / name
    return None


def _folder_metric(folder: Path) -> str:
    if (folder / "metric.txt").is_file():
        metric = (folder / "metric.txt").read_text(encoding="utf-8").strip()
        source = "metric.txt"
    elif (folder / "info.json").is_file():
        with open(folder / "info.json", encoding="utf-8") as f:
            metric = json.load(f).get("metric", "ip")
        source = "info.json"
    else:
        return "ip"
    if metric not in METRICS:
        raise ValueError(f"{folder / source}: metric must be one of {METRICS}, got {metric!r}")
    return metric


def load_npy_folder(path: PathLike, *, mmap: bool = False) -> Dataset:
    """Load a folder of .npy files laid out like ``shared/data/wordnet-minilm``.

    Files (the first name found is used):

    * ``base.f16.npy`` | ``base.f32.npy`` | ``base.npy`` (required): (n, dim) vectors;
    * ``queries.f16.npy`` | ``queries.f32.npy`` | ``queries.npy`` (required);
    * ``gt_ids.i32.npy`` | ``gt_ids.i64.npy`` | ``gt_ids.npy`` (optional): exact top-k ids;
    * ``qrels.i32.npy`` | ``qrels.i64.npy`` | ``qrels.npy`` (optional): relevant ids;
    * ``metric.txt`` (one word) or ``info.json`` with ``{"metric": ...}`` (optional):
      the metric, "ip" if neither exists.

    float16 vectors are kept as float16; ids are returned as int64.

    Parameters
    ----------
    path : str or PathLike
        The folder.
    mmap : bool, keyword-only
        Memory-map the vector files read-only instead of reading them (large data).

    Raises
    ------
    FileNotFoundError
        No such folder, or no base / queries file in it.
    ValueError
        Shapes that do not fit together, an unknown metric.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    files = {key: _find(folder, key) for key in _NPY_NAMES}
    for key in ("base", "queries"):
        if files[key] is None:
            raise FileNotFoundError(f"{folder}: none of {', '.join(_NPY_NAMES[key])} found")
    mode = "r" if mmap else None
    arrays = {key: (np.load(f, mmap_mode=mode if key in ("base", "queries") else None,
                            allow_pickle=False) if f is not None else None)
              for key, f in files.items()}
    return Dataset(name=folder.resolve().name, metric=_folder_metric(folder), path=folder,
                   **arrays)


# --------------------------------------------------------------------------- HDF5
def load_ann_benchmarks_hdf5(path: PathLike) -> Dataset:
    """Load an ann-benchmarks HDF5 file (e.g. ``glove-100-angular.hdf5``).

    Datasets ``train`` (base), ``test`` (queries), ``neighbors`` (ground-truth
    ids, optional); the ``distance`` attribute gives the metric: "angular" ->
    "cosine", "euclidean" -> "l2", "dot" / "ip" -> "ip". The ``distances``
    dataset is not loaded (:func:`pyknn.evaluation.ground_truth` recomputes them).
    Requires h5py (``pip install h5py``).

    Parameters
    ----------
    path : str or PathLike
        The .hdf5 / .h5 file.

    Raises
    ------
    ImportError
        h5py is not installed.
    ValueError
        Missing datasets or an unsupported distance (e.g. jaccard, hamming).
    """
    try:
        import h5py
    except ImportError:
        raise ImportError("loading HDF5 datasets needs h5py: pip install h5py") from None
    path = Path(path)
    with h5py.File(path, "r") as f:
        for key in ("train", "test"):
            if key not in f:
                raise ValueError(f"{path}: no '{key}' dataset (found {sorted(f.keys())})")
        distance = f.attrs.get("distance", None)
        if isinstance(distance, bytes):
            distance = distance.decode()
        if distance is None:
            raise ValueError(f"{path}: no 'distance' attribute")
        metric = _HDF5_METRICS.get(str(distance).lower())
        if metric is None:
            raise ValueError(f"{path}: unsupported distance {distance!r}; supported: "
                             f"{sorted(_HDF5_METRICS)}")
        base = f["train"][()]
        queries = f["test"][()]
        gt = f["neighbors"][()] if "neighbors" in f else None
    return Dataset(name=path.stem, base=base, queries=queries, gt_ids=gt, metric=metric, path=None)


# --------------------------------------------------------------------------- TEXMEX *vecs
def _read_vecs(path: PathLike, value_dtype: np.dtype) -> np.ndarray:
    """Read records of (int32 dim, dim values); return a C-contiguous (n, dim) array."""
    path = Path(path)
    value_dtype = np.dtype(value_dtype).newbyteorder("<")
    size = path.stat().st_size
    if size == 0:
        return np.empty((0, 0), dtype=value_dtype.newbyteorder("="))
    if size < 4:
        raise ValueError(f"{path}: {size} bytes is too short for a record header")
    # Memory-mapped, so the only full-size allocation is the returned array.
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(size,))
    dim = int(np.asarray(raw[:4]).view("<i4")[0])
    if dim <= 0:
        raise ValueError(f"{path}: invalid dimension {dim} in the first record")
    record = 4 + dim * value_dtype.itemsize
    if raw.size % record:
        raise ValueError(f"{path}: size {raw.size} bytes is not a multiple of the record size "
                         f"{record} (4 + {dim} x {value_dtype.itemsize}); truncated or not this format")
    rec = raw.reshape(-1, record)
    dims = np.ascontiguousarray(rec[:, :4]).view("<i4").ravel()
    bad = np.flatnonzero(dims != dim)
    if bad.size:
        raise ValueError(f"{path}: record {int(bad[0])} has dimension {int(dims[bad[0]])}, "
                         f"expected {dim} (all records must have the same dimension)")
    out = np.ascontiguousarray(rec[:, 4:]).view(value_dtype)
    return out.astype(value_dtype.newbyteorder("="), copy=False)


def read_fvecs(path: PathLike) -> np.ndarray:
    """Read a TEXMEX .fvecs file into a float32 array (n, dim).

    Each record is a little-endian int32 dimension followed by that many float32.

    Raises
    ------
    ValueError
        File size not a multiple of the record size, or records of different dimensions.
    """
    return _read_vecs(path, np.float32)


def read_ivecs(path: PathLike) -> np.ndarray:
    """Read a TEXMEX .ivecs file (e.g. ground truth) into an int32 array (n, dim).

    Each record is a little-endian int32 dimension followed by that many int32.

    Raises
    ------
    ValueError
        File size not a multiple of the record size, or records of different dimensions.
    """
    return _read_vecs(path, np.int32)


def read_bvecs(path: PathLike) -> np.ndarray:
    """Read a TEXMEX .bvecs file (e.g. SIFT1B) into a uint8 array (n, dim).

    Each record is a little-endian int32 dimension followed by that many uint8.

    Raises
    ------
    ValueError
        File size not a multiple of the record size, or records of different dimensions.
    """
    return _read_vecs(path, np.uint8)


def _write_vecs(path: PathLike, x, value_dtype) -> None:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array (n, dim), got shape {x.shape}")
    n, dim = x.shape
    value_dtype = np.dtype(value_dtype).newbyteorder("<")
    rec = np.empty((n, 4 + dim * value_dtype.itemsize), dtype=np.uint8)
    rec[:, :4] = np.full((n, 1), dim, dtype="<i4").view(np.uint8)
    rec[:, 4:] = np.ascontiguousarray(x, dtype=value_dtype).view(np.uint8).reshape(n, -1)
    rec.tofile(Path(path))


def write_fvecs(path: PathLike, x) -> None:
    """Write a 2-D array as TEXMEX .fvecs (int32 dim + float32 values per row)."""
    _write_vecs(path, x, np.float32)


def write_ivecs(path: PathLike, x) -> None:
    """Write a 2-D integer array as TEXMEX .ivecs (int32 dim + int32 values per row)."""
    _write_vecs(path, x, np.int32)


def write_bvecs(path: PathLike, x) -> None:
    """Write a 2-D array of 0..255 values as TEXMEX .bvecs (int32 dim + uint8 values per row)."""
    _write_vecs(path, x, np.uint8)


# --------------------------------------------------------------------------- sample / dispatch
def sample_path() -> Path:
    """Folder of the bundled sample (wordnet-minilm, 10,000 documents, 1,000 queries)."""
    return Path(__file__).resolve().parent / "data" / SAMPLE_NAME


def load_sample() -> Dataset:
    """Load the bundled wordnet-minilm sample (see the README.md in :func:`sample_path`).

    10,000 WordNet synsets and 1,000 lemma queries embedded with all-MiniLM-L6-v2
    (384-d, float16, unit norm), exact top-100 inner-product ground truth and one
    judged-relevant document per query. Metric "ip".
    """
    return load_npy_folder(sample_path())


def load(path: Optional[PathLike] = None) -> Dataset:
    """Load a dataset, choosing the loader from the path.

    Parameters
    ----------
    path : str, PathLike or None
        None: the bundled sample (:func:`load_sample`); a folder:
        :func:`load_npy_folder`; a ``.hdf5`` / ``.h5`` file: :func:`load_ann_benchmarks_hdf5`.

    Raises
    ------
    ValueError
        Anything else (fvecs/ivecs/bvecs files are single arrays: use :func:`read_fvecs` etc.).
    """
    if path is None:
        return load_sample()
    p = Path(path)
    if p.is_dir():
        return load_npy_folder(p)
    if p.suffix.lower() in (".hdf5", ".h5"):
        if not p.is_file():
            raise FileNotFoundError(f"no such file: {p}")
        return load_ann_benchmarks_hdf5(p)
    raise ValueError(f"cannot load {p}: supported are None (the bundled sample), a folder of .npy "
                     f"files, or an ann-benchmarks .hdf5/.h5 file")
