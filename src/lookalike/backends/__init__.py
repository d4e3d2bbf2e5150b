"""Where an index's vectors are searched: embedded FAISS (``index.VectorIndex``) or Milvus.

An ``IndexSpec``'s ``backend`` says which ({} is FAISS); these functions pick the class, so the
engine never branches on it. Each backend keeps the vectors and int ids as ``VectorIndex`` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import IndexError_
from ..index import VectorIndex
from ..types import IndexSpec

BACKENDS = ("faiss", "milvus")


def index_class(backend: dict[str, Any] | None) -> type[VectorIndex]:
    """The class that implements ``backend`` (an IndexSpec's; {} or None: FAISS)."""
    name = (backend or {}).get("name", "faiss")
    if name == "faiss":
        return VectorIndex
    if name == "milvus":
        from .milvus import MilvusIndex  # pymilvus is imported only by indexes that use it

        return MilvusIndex
    raise IndexError_(f"unknown index backend {name!r}; this lookalike knows {', '.join(BACKENDS)}", subject=name)


def create_index(kind: str, metric: str, vectors: np.ndarray, ids: np.ndarray, *, whiten: int = 0,
                 max_memory: "int | str | None" = None, backend: dict[str, Any] | None = None,
                 metadata: list[dict] | None = None) -> VectorIndex:
    """Plan and build an index over prepared vectors in ``backend``; ``metadata`` (each vector's
    item metadata) goes with the vectors to a backend that filters by it."""
    if not backend or backend.get("name", "faiss") == "faiss":
        return VectorIndex.create(kind, metric, vectors, ids, whiten=whiten, max_memory=max_memory)
    return index_class(backend).create(kind, metric, vectors, ids, whiten=whiten, max_memory=max_memory,
                                       backend=backend, metadata=metadata)


def load_index(spec: IndexSpec, dim: int, vectors: np.ndarray, ids: np.ndarray,
               faiss_path: str | None) -> tuple[VectorIndex, bool]:
    """Open a stored index -> (index, whether its structure was found intact); see ``VectorIndex.load``."""
    return index_class(spec.backend).load(spec, dim, vectors, ids, faiss_path)
