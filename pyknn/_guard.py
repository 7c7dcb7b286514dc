"""The embedding-model guard and the normalisation policy, shared by every index kind.

An index remembers which embedding model made its vectors (``metadata["model_id"]``, saved in
the file). Vectors of two models live in unrelated spaces: mixing them gives results that look
plausible and are meaningless, so a mismatch is an error, not a warning.

:class:`Guarded` is the base of every index (the compiled ones in :mod:`pyknn.indexes` and the
composite ones in :mod:`pyknn.rag`). A subclass only writes ``add`` and ``search``; the
``__init_subclass__`` hook wraps them once, so every index kind (including ones added later)
accepts ``model_id=`` on both, and ``strict=`` on ``add``. The checks run only in the outermost
call: an index built from other indexes (a TieredIndex) checks once, not once per tier.
"""
from __future__ import annotations

import datetime
import functools
import threading
import warnings

import numpy as np

from ._validation import as_matrix
from ._version import __version__

__all__ = ["ModelMismatchError", "NormWarning", "Guarded", "NORM_TOLERANCE"]

#: |‖x‖ - 1| beyond which a vector counts as not unit length (float16 storage rounds norms by
#: about 1e-4; real un-normalised embeddings are off by far more).
NORM_TOLERANCE = 1e-3


class ModelMismatchError(ValueError):
    """Vectors or queries from one embedding model used with an index built from another."""


class NormWarning(UserWarning):
    """Vectors added to an inner-product index are not unit length."""


_local = threading.local()


def as_bool(value, name: str) -> bool:
    """``value`` as a bool; TypeError for anything but True / False (numpy bools too), so that
    strict="no" is an error rather than True."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def new_metadata(kind: str, dim: int, metric: str) -> dict:
    """The metadata every new index starts with."""
    return {
        "pyknn_version": __version__,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "index": kind,
        "dim": int(dim),
        "metric": metric,
        # Whether every stored vector is unit length: always under cosine (normalised when
        # added); for ip and l2, tracked on every add (vacuously true while empty).
        "normalized": True,
        "model_id": None,
    }


def check_model_id(metadata: dict, model_id, what: str) -> None:
    """Raise ModelMismatchError if ``model_id`` differs from the index's bound model."""
    if model_id is None:
        return
    if not isinstance(model_id, str) or not model_id:
        raise TypeError(f"model_id must be a non-empty string, got {model_id!r}")
    bound = metadata.get("model_id")
    if bound is not None and bound != model_id:
        raise ModelMismatchError(
            f"{what} with embedding model {model_id!r}, but the index holds vectors of model "
            f"{bound!r}; vectors of different models are not comparable (re-embed the corpus "
            "with one model, or use the model the index was built with)")


def check_norms(x: np.ndarray, metric: str, strict: bool, where: str):
    """Norm policy on added vectors; returns whether all of x is unit length (None: not checked).

    "ip": vectors off unit length by more than :data:`NORM_TOLERANCE` give one NormWarning per
    call (or ValueError when ``strict``), since raw inner product then favours long vectors.
    "cosine" normalises at write time, so nothing to check; "l2" is only tracked.
    """
    if metric == "cosine" or x.shape[0] == 0:
        return True if metric == "cosine" else None
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    bad = np.abs(norms - 1.0) > NORM_TOLERANCE
    n_bad = int(np.count_nonzero(bad))
    if n_bad == 0 or metric != "ip":
        return n_bad == 0
    first = int(np.argmax(bad))
    message = (f"{where}: {n_bad} of {x.shape[0]} vectors are not unit length (norms "
               f"{norms[bad].min():.4g} to {norms[bad].max():.4g}, first at row {first}, "
               f"tolerance {NORM_TOLERANCE:g}); with metric 'ip' long vectors win regardless "
               "of direction. Normalise them, or use metric='cosine'")
    if strict:
        raise ValueError(message + " (strict=True: nothing was added)")
    warnings.warn(message + " (strict=True makes this an error)", NormWarning, stacklevel=3)
    return False


class Guarded:
    """Mixin: metadata, the model guard on ``add`` / ``search``, and the norm policy.

    Subclasses provide ``_metadata`` (dict), ``dim`` and ``metric``, and define ``add(x, ids,
    ...)`` and ``search(q, k, ...)``; both are wrapped here to accept ``model_id=`` (and
    ``strict=`` on add).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "add" in cls.__dict__ and not getattr(cls.__dict__["add"], "_guarded", False):
            cls.add = _guard_add(cls.__dict__["add"])
        if "search" in cls.__dict__ and not getattr(cls.__dict__["search"], "_guarded", False):
            cls.search = _guard_search(cls.__dict__["search"])

    # -- the model --------------------------------------------------------------------------
    @property
    def metadata(self) -> dict:
        """A JSON-serialisable dict saved with the index.

        Keys set by pyknn: ``model_id`` (the embedding model the vectors come from, or None),
        ``dim``, ``metric``, ``normalized`` (every stored vector unit length), ``created_at``
        (UTC, ISO 8601), ``pyknn_version`` and ``index``. Add your own keys: they survive
        save/load and pickle.
        """
        return self._metadata

    @property
    def model_id(self):
        """The embedding model the stored vectors come from (None until one is bound)."""
        return self._metadata.get("model_id")

    def bind_model(self, model_id: str) -> None:
        """Record that this index holds vectors of ``model_id``.

        Done automatically by the first ``add(..., model_id=...)`` or :meth:`add_texts`.
        Raises ModelMismatchError if a different model is already bound.
        """
        check_model_id(self._metadata, model_id, "binding the index")
        self._metadata["model_id"] = model_id

    @property
    def strict_norms(self) -> bool:
        """Default of ``add(strict=...)``: non-unit vectors under "ip" are an error, not a warning."""
        return bool(self._metadata.get("strict_norms", False))

    @strict_norms.setter
    def strict_norms(self, value: bool):
        self._metadata["strict_norms"] = as_bool(value, "strict_norms")

    def _check_can_add(self) -> None:
        """Raise if ``add`` cannot succeed whatever the vectors (untrained, read-only ...)."""
        if not getattr(self, "is_trained", True):
            raise RuntimeError(f"{type(self).__name__} is not trained: call train(x) before add()")

    # -- text in, through an embedder ----------------------------------------------------------
    def add_texts(self, texts, embedder, ids=None, **kwargs):
        """Embed ``texts`` as documents with ``embedder`` and add them (model guard applies).

        Returns the ids of the added vectors, int64 (n,): ``ids`` as given, or the default ids
        the index assigned. Raises ModelMismatchError, without embedding anything, if the index
        holds vectors of another model.
        """
        check_model_id(self._metadata, embedder.model_id, "adding documents")
        vectors = embedder.encode_documents(texts)
        if ids is not None:
            from ._validation import as_ids
            ids = as_ids(ids, vectors.shape[0])
            self.add(vectors, ids, model_id=embedder.model_id, **kwargs)
            return ids
        # Default ids are consecutive and larger than every id stored before: the new ones are
        # the n largest ids that were not there (other threads' concurrent adds aside).
        before = np.asarray(self.ids)
        self.add(vectors, None, model_id=embedder.model_id, **kwargs)
        new = np.setdiff1d(np.asarray(self.ids), before)
        return new[new.size - vectors.shape[0]:].astype(np.int64)

    def search_texts(self, queries, embedder, k: int = 10, **params):
        """Embed ``queries`` with ``embedder`` and search (model guard applies).

        ``queries`` is one string or a sequence of strings; returns (distances, ids) with one
        row per query, as :meth:`search` does.
        """
        check_model_id(self._metadata, embedder.model_id, "searching")
        if isinstance(queries, str):
            queries = [queries]
        return self.search(embedder.encode_queries(queries), k, model_id=embedder.model_id,
                           **params)


class inner:
    """Context manager: calls of guarded methods inside it skip the checks (the caller did them).

    Composite indexes wrap the calls they make on their parts in it, so that a merge thread
    does not warn again about vectors that were checked when they were first added.
    """

    def __enter__(self):
        _local.depth = getattr(_local, "depth", 0) + 1
        return self

    def __exit__(self, *exc):
        _local.depth -= 1
        return False


def _outermost():
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    return depth == 0


def _leave():
    _local.depth -= 1


def _guard_add(add):
    @functools.wraps(add)
    def guarded_add(self, x, ids=None, *args, model_id=None, strict=None, **kwargs):
        if not _outermost():
            try:
                return add(self, x, ids, *args, **kwargs)
            finally:
                _leave()
        try:
            check_model_id(self._metadata, model_id, f"adding vectors to {type(self).__name__}")
            # An index that cannot take vectors says so before any warning about them.
            self._check_can_add()
            x = as_matrix(x, self.dim, "vectors")
            strict = self.strict_norms if strict is None else as_bool(strict, "strict")
            unit = check_norms(x, self.metric, strict, f"{type(self).__name__}.add")
            out = add(self, x, ids, *args, **kwargs)
            # Only after a successful add: a failed call leaves the metadata unchanged too.
            if model_id is not None:
                self._metadata["model_id"] = model_id
            if unit is False:
                self._metadata["normalized"] = False
            return out
        finally:
            _leave()

    guarded_add._guarded = True
    return guarded_add


def _guard_search(search):
    @functools.wraps(search)
    def guarded_search(self, q, *args, model_id=None, **kwargs):
        if model_id is not None:
            check_model_id(self._metadata, model_id, f"searching {type(self).__name__}")
        return search(self, q, *args, **kwargs)

    guarded_search._guarded = True
    return guarded_search
