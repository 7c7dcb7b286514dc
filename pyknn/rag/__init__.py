"""The production layer for retrieval-augmented generation.

* :class:`TieredIndex`: a fresh exact tier in front of a large main index; merges in the
  background while searches go on.
* :class:`MatryoshkaIndex`: first stage over a re-normalised prefix of each vector, exact
  re-ranking of the shortlist with the full vectors.
* :class:`Collection`: an embedded vector store: texts and JSON metadata in SQLite, vectors in
  a TieredIndex, metadata filters, crash-safe persistence, bound to one embedding model.
"""
from .collection import Collection, CollectionLockedError, Hit
from .matryoshka import FIRST_STAGES, MatryoshkaIndex
from .tiered import TieredIndex

__all__ = ["TieredIndex", "MatryoshkaIndex", "FIRST_STAGES", "Collection", "CollectionLockedError", "Hit"]
