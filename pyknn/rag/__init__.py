"""The production layer for retrieval-augmented generation.

* :class:`TieredIndex`: a fresh exact tier in front of a large main index; merges in the
  background while searches go on.
"""
from .tiered import TieredIndex

__all__ = ["TieredIndex"]
