"""pyknn: vector search for retrieval, with SIMD-dispatched C++ kernels."""
from ._version import __version__
from ._core import FormatError
from ._simd import simd_level, set_simd_level, available_simd_levels, num_threads, set_num_threads
from .indexes import FlatIndex, IVFFlatIndex, load
from .kmeans import KMeans
from .evaluation import recall_at_k, ndcg_at_k, mrr_at_k, ground_truth

__all__ = [
    "__version__",
    "FormatError",
    "FlatIndex",
    "IVFFlatIndex",
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
]
