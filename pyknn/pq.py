"""ProductQuantizer: vector compression by product quantization, on the C++ core."""
import numpy as np

from . import _core
from ._validation import as_matrix, check_dim, check_positive_int

__all__ = ["ProductQuantizer"]


def _check_pq_args(dim, pq_m, nbits):
    dim = check_dim(dim)
    pq_m = check_positive_int(pq_m, "pq_m", maximum=4096)
    nbits = check_positive_int(nbits, "nbits", maximum=64)
    return dim, pq_m, nbits


def as_codes(codes, code_size):
    """Codes as a C-contiguous uint8 (n, code_size) array; a 1-D array is one code."""
    a = codes if isinstance(codes, np.ndarray) else np.asarray(codes)
    if a.dtype.kind not in "iu":
        raise TypeError(f"codes must be an array of integers (uint8), got dtype {a.dtype}")
    if a.ndim == 1:
        a = a.reshape(1, -1)
    if a.ndim != 2 or a.shape[1] != code_size:
        raise ValueError(f"codes: expected shape (n, {code_size}) (code_size bytes per vector), "
                         f"got {a.shape}")
    if a.dtype != np.uint8 and a.size and (int(a.min()) < 0 or int(a.max()) > 255):
        raise ValueError(f"codes must be bytes (0 ... 255), got values in "
                         f"[{int(a.min())}, {int(a.max())}]")
    return np.ascontiguousarray(a, dtype=np.uint8)


class ProductQuantizer:
    """Product quantizer (PQ, Jegou, Douze & Schmid 2011): a vector becomes pq_m small codes.

    The dim dimensions are cut into pq_m sub-vectors of dsub = dim / pq_m dimensions; each
    sub-vector is replaced by the index of its nearest centroid among ksub = 2**nbits, learnt by
    one k-means (L2) per sub-space.

    Parameters
    ----------
    dim : int
        Number of dimensions of the vectors.
    pq_m : int
        Number of sub-quantizers (M in the paper); must divide dim.
    nbits : 4 | 8
        Bits per sub-quantizer code (ksub = 2**nbits centroids per sub-space).

    Codes (:meth:`encode`, :meth:`decode`): uint8 arrays of shape (n, code_size) with
    code_size = pq_m * nbits / 8 rounded up. nbits=8: byte j is sub-quantizer j's centroid index.
    nbits=4: two codes per byte, sub-quantizer 2j in the low nibble of byte j and 2j+1 in the
    high nibble (FAISS's bit order).

    Bad parameters raise ValueError here: pq_m not dividing dim (the message lists the valid
    pq_m values), nbits other than 4 or 8.
    """

    def __init__(self, dim: int, pq_m: int, nbits: int = 8):
        self._core = _core.ProductQuantizer(*_check_pq_args(dim, pq_m, nbits))

    dim = property(lambda self: self._core.dim, doc="Number of dimensions of the vectors.")
    pq_m = property(lambda self: self._core.pq_m, doc="Number of sub-quantizers.")
    nbits = property(lambda self: self._core.nbits, doc="Bits per sub-quantizer code.")
    dsub = property(lambda self: self._core.dsub, doc="Dimensions per sub-vector (dim / pq_m).")
    ksub = property(lambda self: self._core.ksub, doc="Centroids per sub-space (2**nbits).")
    code_size = property(lambda self: self._core.code_size,
                         doc="Bytes per encoded vector: pq_m * nbits / 8, rounded up.")
    is_trained = property(lambda self: self._core.is_trained, doc="Whether train() has run.")

    @property
    def centroids(self):
        """float32 (pq_m, ksub, dsub): centroid j of sub-space m is ``centroids[m, j]``."""
        return self._core.centroids()

    def train(self, x, n_iter: int = 25, seed: int = 0):
        """Learn the centroids: one k-means per sub-space on x (n >= 2**nbits rows); returns self.

        At most 256 * ksub training vectors are used (a seeded subsample), as FAISS does.
        """
        x = as_matrix(x, self.dim, "training vectors")
        n_iter = check_positive_int(n_iter, "n_iter", maximum=(1 << 31) - 1)
        seed = check_positive_int(seed, "seed", minimum=0, maximum=(1 << 64) - 1)
        self._core.train(x, n_iter, seed)
        return self

    def _require_trained(self, what):
        if not self.is_trained:
            raise RuntimeError(f"ProductQuantizer is not trained: call train() first "
                               f"(before {what})")

    def encode(self, x):
        """Codes of x: uint8 (n, code_size), in the layout described in the class docstring."""
        self._require_trained("encode()")
        return self._core.encode(as_matrix(x, self.dim, "vectors"))

    def decode(self, codes):
        """Approximate vectors float32 (n, dim) from codes (n, code_size) uint8."""
        self._require_trained("decode()")
        return self._core.decode(as_codes(codes, self.code_size))

    def __repr__(self):
        return (f"ProductQuantizer(dim={self.dim}, pq_m={self.pq_m}, nbits={self.nbits}, "
                f"trained={self.is_trained})")

    def __reduce__(self):
        return (_restore, (self.dim, self.pq_m, self.nbits,
                           self.centroids if self.is_trained else None))


def _restore(dim, pq_m, nbits, centroids):
    pq = ProductQuantizer(dim, pq_m, nbits)
    if centroids is not None:
        pq._core.set_centroids(np.ascontiguousarray(centroids, dtype=np.float32).ravel())
    return pq
