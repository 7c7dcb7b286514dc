"""pyknn: vector search for retrieval, with SIMD-dispatched C++ kernels."""
from ._version import __version__

try:
    from ._core import FormatError
except ImportError as e:  # pragma: no cover - only in a source checkout without a build
    import os as _os
    raise ImportError(
        f"pyknn's compiled core could not be imported ({e}). If you are running Python from the "
        f"root of a pyknn source checkout, the folder {_os.path.dirname(__file__)} shadows the "
        "installed package: run from another directory, or install in place with "
        "'pip install -e .'.") from None
from ._simd import simd_level, set_simd_level, available_simd_levels, num_threads, set_num_threads
from ._guard import ModelMismatchError, NormWarning
from .indexes import FlatIndex, IVFFlatIndex, HNSWIndex, PQIndex, IVFPQIndex, RefineIndex, load
from .pq import ProductQuantizer
from .kmeans import KMeans
from .evaluation import recall_at_k, ndcg_at_k, mrr_at_k, ground_truth, evaluate
from .factory import index_factory, estimate_memory

__all__ = [
    "__version__",
    "FormatError",
    "ModelMismatchError",
    "NormWarning",
    "FlatIndex",
    "IVFFlatIndex",
    "HNSWIndex",
    "PQIndex",
    "IVFPQIndex",
    "RefineIndex",
    "ProductQuantizer",
    "KMeans",
    "load",
    "simd_level",
    "set_simd_level",
    "available_simd_levels",
    "num_threads",
    "set_num_threads",
    "recall_at_k",
    "ndcg_at_k",
    "mrr_at_k",
    "ground_truth",
    "evaluate",
    "index_factory",
    "estimate_memory",
]
