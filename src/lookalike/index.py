"""The vector index: FAISS flat | hnsw | ivf | ivfpq over int ids, with exact fallbacks and filters.

The index keeps the vectors it holds (as indexed: L2-normalised for ``cosine``) beside the
FAISS structure, so the FAISS file is only a cache: removal from HNSW, exact search when ``k``
covers the whole catalog, and filtered search over a small subset all work from the vectors.

Optional PCA-whitening (``whiten=D``) is learned from the catalog's vectors when the index is
built and lives in the FAISS structure as a transform in front of it (FAISS's PCAMatrix with
eigenvalue power -1/2, then L2 normalisation for ``cosine``): the stored vectors and the query
vectors stay the model's, and the index searches D-dimensional whitened vectors. Rebuilding the
FAISS file from the vectors learns it again from the items the index then holds.

Scores (higher is more similar) and distances (the metric's raw value):
- cosine: score = inner product of normalised vectors, distance = 1 - score
- l2:     distance = squared L2, score = 1 / (1 + distance)
- ip:     score = inner product, distance = -score
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import faiss
import numpy as np

from .errors import IndexError_, QueryError
from .types import IndexSpec

OMP_THREADS = faiss.omp_get_max_threads()  # FAISS's own default: one per core
FEW_QUERIES = 8  # searches of fewer queries run on one thread

KINDS = ("flat", "hnsw", "ivf", "ivfpq")
METRICS = ("cosine", "l2", "ip")

# Named thresholds for the approximate kinds (see the FAISS wiki's guidelines).
MIN_ITEMS_IVF = 1000  # fewer vectors than this cannot train a useful IVF: exact search instead
POINTS_PER_CENTROID = 39  # FAISS wants at least this many training points per centroid
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
EXACT_SUBSET_MAX = 200_000  # a filter matching at most this many items is searched exactly
WHITEN_ITEMS_PER_DIM = 2  # whitening to D dimensions is learned only from at least 2*D items
REINDEX_GROWTH = 2.0  # a trained index that grew or shrank this many times since training: retrain advised


class IndexWarning(UserWarning):
    """The index could not be what was asked and did something safe instead."""


def check_spec(kind: str, metric: str) -> None:
    if kind not in KINDS:
        raise IndexError_(f"unknown index kind {kind!r}; use one of {', '.join(KINDS)}", subject=kind)
    if metric not in METRICS:
        raise IndexError_(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}", subject=metric)


def check_vectors(vectors, dim: int, what: str = "vector") -> np.ndarray:
    """Return ``vectors`` as C-contiguous float32 [n, dim]; QueryError on shape, NaN or inf."""
    try:
        arr = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise QueryError(f"{what}: not numeric ({exc})", subject=what) from exc
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        got = arr.shape[-1] if arr.ndim >= 1 else 0
        raise QueryError(f"{what}: has dimension {got}, the index has {dim}", subject=what)
    if not np.isfinite(arr).all():
        raise QueryError(f"{what}: contains NaN or infinite values", subject=what)
    return np.ascontiguousarray(arr)


def prepare(vectors: np.ndarray, metric: str) -> np.ndarray:
    """Vectors as the index holds them: L2-normalised for cosine, unchanged otherwise."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cosine":
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, x)))))


def plan(kind: str, metric: str, n: int, dim: int, whiten: int = 0) -> IndexSpec:
    """Choose the kind's parameters from the catalog size; fall back to flat when too small.

    ``whiten``: PCA-whiten to that many dimensions (0: off); a catalog of fewer than
    WHITEN_ITEMS_PER_DIM * whiten items gets a warning and no whitening.
    """
    check_spec(kind, metric)
    if isinstance(whiten, bool) or not isinstance(whiten, (int, np.integer)) or not 0 <= whiten <= dim:
        raise IndexError_(f"whiten must be a whole number from 0 (off) to the dimension {dim}, got {whiten!r}", subject=whiten)
    if whiten and n < WHITEN_ITEMS_PER_DIM * whiten:
        warnings.warn(f"whitening to {whiten} dimensions needs at least {WHITEN_ITEMS_PER_DIM * whiten} items to learn "
                      f"from, the catalog has {n}; not whitened", IndexWarning, stacklevel=2)
        whiten = 0
    spec = _plan_kind(kind, metric, n, whiten or dim)
    if whiten:
        spec.params["whiten"] = int(whiten)
        spec = replace(spec, chosen_because=f"{spec.chosen_because}; PCA-whitened to {whiten} dimensions, "
                                            f"learned from the {n} items")
    return spec


def _plan_kind(kind: str, metric: str, n: int, dim: int) -> IndexSpec:
    if kind == "flat":
        return IndexSpec("flat", metric, {}, "exact search (asked for)")
    if kind == "hnsw":
        params = {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
        return IndexSpec("hnsw", metric, params, f"HNSW graph, M={HNSW_M} (asked for)")
    if n < MIN_ITEMS_IVF:
        reason = f"{kind} asked for, but {n} items are too few to train it (needs {MIN_ITEMS_IVF}); exact search instead"
        warnings.warn(reason, IndexWarning, stacklevel=2)
        return IndexSpec("flat", metric, {}, reason)
    # About 4*sqrt(n) lists (a power of two), with at least POINTS_PER_CENTROID vectors each.
    nlist = min(_pow2_floor(4 * math.sqrt(n)), _pow2_floor(n / POINTS_PER_CENTROID))
    nprobe = min(nlist, max(8, nlist // 8))
    params = {"nlist": nlist, "nprobe": nprobe}
    why = f"{n} items: {nlist} lists (about 4*sqrt(n), >= {POINTS_PER_CENTROID} items each), nprobe {nprobe}"
    if kind == "ivfpq":
        # 8-bit codes (256 centroids per sub-quantizer: MIN_ITEMS_IVF vectors are enough to train
        # them), and up to 64 sub-quantizers of at least 2 dimensions each.
        m = max(d for d in range(1, max(1, min(64, dim // 2)) + 1) if dim % d == 0)
        params.update({"m": m, "nbits": 8})
        why += f"; PQ with {m} sub-quantizers of 8 bits ({m} bytes a vector)"
    return IndexSpec(kind, metric, params, why)


class VectorIndex:
    """FAISS index plus the vectors and int ids it holds; search returns scores and int ids."""

    def __init__(self, spec: IndexSpec, dim: int, vectors: np.ndarray, ids: np.ndarray, index=None):
        check_spec(spec.kind, spec.metric)
        self.spec = spec
        self.dim = dim
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, dim)
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(self.vectors) != len(self.ids):
            raise IndexError_(f"{len(self.vectors)} vectors but {len(self.ids)} ids")
        self.index = index if index is not None else self._build()
        if self.index.ntotal != len(self.ids):
            raise IndexError_(f"FAISS index holds {self.index.ntotal} vectors, expected {len(self.ids)}")

    @classmethod
    def create(cls, kind: str, metric: str, vectors: np.ndarray, ids: np.ndarray, whiten: int = 0) -> "VectorIndex":
        """Plan the kind for this many vectors, and build it over (already prepared) vectors."""
        vectors = np.asarray(vectors, dtype=np.float32)
        spec = plan(kind, metric, len(vectors), vectors.shape[1], whiten)
        if spec.kind in ("ivf", "ivfpq") or spec.params.get("whiten"):
            spec.params["trained_on"] = len(vectors)  # add() keeps what was learned; reindex() learns again
        return cls(spec, vectors.shape[1], vectors, ids)

    def copy(self) -> "VectorIndex":
        """An independent copy to change (the FAISS structure cloned: nothing is trained again)."""
        return VectorIndex(replace(self.spec, params=dict(self.spec.params)), self.dim, self.vectors, self.ids,
                           faiss.clone_index(self.index))

    @property
    def asked_kind(self) -> str:
        """The kind this index was asked to be: an IVF kind that fell back to exact search while
        the catalog was too small says so in its reason."""
        for kind in ("ivfpq", "ivf"):
            if self.spec.kind == "flat" and self.spec.chosen_because.startswith(f"{kind} asked for"):
                return kind
        return self.spec.kind

    def retrain_advice(self) -> str | None:
        """Why retraining (``reindex``) would help, or None: the catalog has grown or shrunk
        REINDEX_GROWTH times since its clustering or whitening was learned, or has grown big
        enough for the IVF kind that was asked for when it was too small."""
        n = len(self)
        if self.asked_kind != self.spec.kind and n >= MIN_ITEMS_IVF:
            return (f"{self.asked_kind} was asked for when the catalog was too small; it now holds {n} items: "
                    f"`lookalike reindex` builds the {self.asked_kind} index")
        trained_on = int(self.spec.params.get("trained_on", 0))
        if not trained_on:
            return None
        if n >= REINDEX_GROWTH * trained_on or n * REINDEX_GROWTH <= trained_on:
            return (f"learned from {trained_on} items and now holds {n}: `lookalike reindex` learns it again "
                    "from the stored vectors")
        return None

    @property
    def whiten(self) -> int:
        """The whitened dimension the FAISS structure searches (0: not whitened)."""
        return int(self.spec.params.get("whiten", 0))

    def __len__(self) -> int:
        return len(self.ids)

    # --- building ------------------------------------------------------------------------

    def _empty(self):
        d, metric, p = self.whiten or self.dim, _faiss_metric(self.spec.metric), self.spec.params
        kind = self.spec.kind
        if kind == "flat":
            return faiss.IndexIDMap2(self._whitened(faiss.IndexFlat(d, metric)))
        if kind == "hnsw":
            inner = faiss.IndexHNSWFlat(d, int(p["M"]), metric)
            inner.hnsw.efConstruction = int(p["ef_construction"])
            return faiss.IndexIDMap2(self._whitened(inner))
        quantizer = faiss.IndexFlat(d, metric)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, int(p["nlist"]), metric)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, int(p["nlist"]), int(p["m"]), int(p["nbits"]), metric)
            index.pq.cp.min_points_per_centroid = 1  # small catalogs are expected: no stderr warning
        index.own_fields = True
        quantizer.this.disown()
        return self._whitened(index)

    def _whitened(self, inner):
        """``inner`` behind the learned whitening (and L2 normalisation for cosine), if any."""
        if not self.whiten:
            return inner
        index = faiss.IndexPreTransform(inner)
        chain = [faiss.PCAMatrix(self.dim, self.whiten, -0.5, False)]
        if self.spec.metric == "cosine":
            chain.append(faiss.NormalizationTransform(self.whiten, 2.0))
        for transform in reversed(chain):
            index.prepend_transform(transform)
        index.own_fields = True  # the C++ index deletes its parts: Python must not delete them too
        inner.this.disown()
        for transform in chain:
            transform.this.disown()
        return index

    def _transform(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors as the FAISS structure compares them: whitened when the index is."""
        if not self.whiten:
            return vectors
        index = faiss.downcast_index(self.index)
        if isinstance(index, faiss.IndexIDMap2):
            index = faiss.downcast_index(index.index)
        for i in range(index.chain.size()):
            vectors = faiss.downcast_VectorTransform(index.chain.at(i)).apply(np.ascontiguousarray(vectors))
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _build(self):
        index = self._empty()
        if self.spec.kind in ("ivf", "ivfpq") or self.whiten:
            if len(self.vectors) == 0:
                raise IndexError_(f"an {self.spec.kind} index needs vectors to train on")
            index.train(self.vectors)
        if len(self.ids):
            index.add_with_ids(self.vectors, self.ids)
        return index

    # --- changing ------------------------------------------------------------------------

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add prepared vectors under new int ids (IVF kinds keep their trained centroids)."""
        vectors = check_vectors(vectors, self.dim, "added vectors")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        self.vectors = np.concatenate([self.vectors, vectors])
        self.ids = np.concatenate([self.ids, ids])
        if not self.index.is_trained:  # a whitened index that was emptied: learn it again
            self.index = self._build()
        else:
            self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove the given int ids; return how many were removed."""
        ids = np.asarray(ids, dtype=np.int64)
        keep = ~np.isin(self.ids, ids)
        removed = int((~keep).sum())
        if removed == 0:
            return 0
        self.vectors = np.ascontiguousarray(self.vectors[keep])
        self.ids = np.ascontiguousarray(self.ids[keep])
        if self.spec.kind == "hnsw":  # HNSW cannot delete: rebuild the graph from the vectors
            self.index = self._build() if len(self.ids) or not self.whiten else self._empty()
        else:
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
        return removed

    # --- searching -----------------------------------------------------------------------

    def vectors_of(self, int_ids: np.ndarray) -> np.ndarray:
        """The stored (prepared) vectors of these int ids, in their shape + [dim]; all must exist."""
        int_ids = np.asarray(int_ids, dtype=np.int64)
        order = np.argsort(self.ids, kind="stable")  # ids grow with every add, so this is cheap
        pos = order[np.searchsorted(self.ids, int_ids.ravel(), sorter=order)]
        return self.vectors[pos].reshape(*int_ids.shape, self.dim)

    def search(self, queries: np.ndarray, k: int, subset: np.ndarray | None = None):
        """Return (scores, distances, int_ids), each [n_queries, k'], most similar first.

        k' = min(k, number of candidates); there is never padding with -1. ``subset`` limits the
        search to those int ids (a metadata filter), inside the index search.
        """
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise QueryError(f"k must be a whole number >= 1, got {k!r}", subject=k)
        queries = prepare(check_vectors(queries, self.dim, "query vector"), self.spec.metric)
        # A few queries run on one thread: FAISS's OpenMP threads go on spinning after a search, on
        # the cores the next query's model needs (1.3 ms of an 8 ms camera query, measured).
        faiss.omp_set_num_threads(1 if len(queries) < FEW_QUERIES else OMP_THREADS)
        n_candidates = len(self.ids) if subset is None else int(np.isin(subset, self.ids).sum())
        kk = min(int(k), n_candidates)
        if kk == 0:
            empty = np.zeros((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.float32), empty.astype(np.int64)
        exact = self.spec.kind == "flat" or kk >= len(self.ids) or (subset is not None and n_candidates <= EXACT_SUBSET_MAX)
        if subset is not None and exact:
            distances, ids = self._exact(queries, kk, np.isin(self.ids, subset))
        elif exact and self.spec.kind != "flat":
            distances, ids = self._exact(queries, kk, None)
        else:
            distances, ids = self.index.search(queries, kk, params=self._params(subset))
        values, ids = self._drop_missing(distances, ids)
        return self.scores(values), self.distances(values), ids

    def _params(self, subset: np.ndarray | None):
        p = self.spec.params
        selector = faiss.IDSelectorBatch(np.asarray(subset, dtype=np.int64)) if subset is not None else None
        kind = self.spec.kind
        if kind in ("ivf", "ivfpq"):
            params = faiss.SearchParametersIVF(nprobe=int(p["nprobe"]))
        elif kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=int(p["ef_search"]))
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
            params._selector = selector  # keep it alive as long as params
        return params

    def _exact(self, queries: np.ndarray, k: int, mask: np.ndarray | None):
        vectors, ids = (self.vectors, self.ids) if mask is None else (self.vectors[mask], self.ids[mask])
        flat = faiss.IndexFlat(self.whiten or self.dim, _faiss_metric(self.spec.metric))
        flat.add(self._transform(np.ascontiguousarray(vectors)))
        distances, positions = flat.search(self._transform(queries), min(k, len(ids)))
        return distances, np.where(positions >= 0, ids[np.maximum(positions, 0)], -1)

    @staticmethod
    def _drop_missing(distances: np.ndarray, ids: np.ndarray):
        """Approximate kinds may return fewer than k (-1 ids): trim to the columns all queries filled."""
        if (ids >= 0).all():
            return distances, ids
        filled = int((ids >= 0).sum(axis=1).min())
        return distances[:, :filled], ids[:, :filled]

    def scores(self, faiss_values: np.ndarray) -> np.ndarray:
        """FAISS values -> similarity scores (higher is closer)."""
        if self.spec.metric == "l2":
            return (1.0 / (1.0 + np.maximum(faiss_values, 0.0))).astype(np.float32)
        return faiss_values.astype(np.float32)

    def distances(self, faiss_values: np.ndarray) -> np.ndarray:
        """FAISS values -> the metric's raw distance."""
        if self.spec.metric == "cosine":
            return 1.0 - faiss_values
        if self.spec.metric == "ip":
            return -faiss_values
        return faiss_values

    # --- files ---------------------------------------------------------------------------

    def write_faiss(self, path: str) -> None:
        faiss.write_index(self.index, path)

    @classmethod
    def load(cls, spec: IndexSpec, dim: int, vectors: np.ndarray, ids: np.ndarray, faiss_path: str | None):
        """Open from stored vectors and ids; the FAISS file is used if it matches, else rebuilt."""
        index = None
        if faiss_path is not None:
            try:
                index = faiss.read_index(faiss_path)
                if index.ntotal != len(ids) or index.d != dim:
                    index = None
            except RuntimeError:
                index = None
        return cls(spec, dim, vectors, ids, index), index is not None

    def with_spec(self, spec: IndexSpec) -> "VectorIndex":
        return VectorIndex(replace(spec), self.dim, self.vectors, self.ids)
