"""The vector index: FAISS flat | hnsw | ivf | ivfsq8 | ivfpq over int ids, with exact fallbacks and filters.

The index keeps the vectors it holds (as indexed: L2-normalised for ``cosine``) beside the
FAISS structure, so the FAISS file is only a cache: removal from HNSW, exact search when ``k``
covers the whole catalog, and filtered search over a small subset all work from the vectors.

Optional PCA-whitening (``whiten=D``) is learned from the catalog's vectors when the index is
built and lives in the FAISS structure as a transform in front of it (FAISS's PCAMatrix with
eigenvalue power -1/2, then L2 normalisation for ``cosine``): the stored vectors and the query
vectors stay the model's, and the index searches D-dimensional whitened vectors. Rebuilding the
FAISS file from the vectors learns it again from the items the index then holds.

Kind ``auto`` chooses from the catalog size and a memory budget (``plan_for_memory``): exact
search up to EXACT_MAX items, then HNSW or IVF-Flat while the vectors fit, then IVF-SQ8 while
their 8-bit codes do, then IVF-PQ over PCA-reduced vectors whose candidates are ranked again
exactly from the stored vectors (read from the memory-mapped vectors file, which is not counted
in the budget). Its search parameters are then tuned on held-aside catalog items until recall@10
against exact search reaches TARGET_RECALL plus TUNE_MARGIN, and the recall measured is kept in
the spec.

FAISS files open memory-mapped (``IO_FLAG_MMAP_IFC``): opening is quick and service workers
share the pages. FAISS aborts the process on a change to a mapped index, so every change goes to
an owned copy first.

Scores (higher is more similar) and distances (the metric's raw value):
- cosine: score = inner product of normalised vectors, distance = 1 - score
- l2:     distance = squared L2, score = 1 / (1 + distance)
- ip:     score = inner product, distance = -score
"""

from __future__ import annotations

import math
import mmap
import warnings
from dataclasses import replace

import faiss
import numpy as np

from .errors import IndexError_, QueryError
from .types import IndexSpec

OMP_THREADS = faiss.omp_get_max_threads()  # FAISS's own default: one per core
FEW_QUERIES = 8  # searches of fewer queries run on one thread

KINDS = ("flat", "hnsw", "ivf", "ivfsq8", "ivfpq")
IVF_KINDS = ("ivf", "ivfsq8", "ivfpq")  # trained: coarse lists, and codes for the last two
AUTO = "auto"  # a kind chosen by plan_for_memory
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
TRAIN_POINTS_PER_CENTROID = 64  # k-means learns from at most this many vectors a list (FAISS: 256)
TRAIN_MAX = 2**18  # PCA, whitening and k-means learn from at most this many vectors (an even sample)

# Kind "auto" (plan_for_memory)
EXACT_MAX = 50_000  # up to this many items: exact search, if it fits
HNSW_MAX = 200_000  # up to this many: HNSW, if it fits (its build time grows fastest); then IVF-Flat
PQ_PCA_DIM = 256  # IVF-PQ searches vectors PCA-reduced to this many dimensions (cosine and l2)
PQ_RERANK = 10  # IVF-PQ fetches this many candidates per result and ranks them exactly
TARGET_RECALL = 0.95  # the recall@10 queries should see ...
TUNE_MARGIN = 0.02  # ... so search parameters are raised until held-aside catalog items see this much more
RECALL_QUERIES = 500  # (measured with this many of them as queries)
RECALL_K = 10


class IndexWarning(UserWarning):
    """The index could not be what was asked and did something safe instead."""


def check_spec(kind: str, metric: str, auto: bool = False) -> None:
    kinds = KINDS + ((AUTO,) if auto else ())
    if kind not in kinds:
        raise IndexError_(f"unknown index kind {kind!r}; use one of {', '.join(kinds)}", subject=kind)
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


def check_k(k) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise QueryError(f"k must be a whole number >= 1, got {k!r}", subject=k)


def no_hits(n_queries: int):
    """(scores, distances, int ids) of n queries that found nothing."""
    empty = np.zeros((n_queries, 0))
    return empty.astype(np.float32), empty.astype(np.float32), empty.astype(np.int64)


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


def plan_index(kind: str, metric: str, n: int, dim: int, whiten: int = 0,
               max_memory: "int | str | None" = None) -> IndexSpec:
    """The spec ``VectorIndex.create`` builds: ``plan``, or ``plan_for_memory`` for kind ``auto``."""
    if kind == AUTO:
        if whiten:
            raise IndexError_("whitening is not combined with a memory budget (kind auto): give one or the other",
                              subject=whiten)
        if max_memory is None:
            raise IndexError_("index kind auto needs a memory budget (max_memory, e.g. '2GB')", subject=kind)
        spec = plan_for_memory(metric, n, dim, max_memory)
    else:
        spec = plan(kind, metric, n, dim, whiten)
    if spec.kind in IVF_KINDS or spec.params.get("whiten"):
        spec.params["trained_on"] = n  # add() keeps what was learned; reindex() learns again
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
    if kind == "ivfsq8":
        why += f"; vectors as 8-bit scalar codes ({dim} bytes a vector)"
    if kind == "ivfpq":
        # 8-bit codes (256 centroids per sub-quantizer: MIN_ITEMS_IVF vectors are enough to train
        # them), and up to 64 sub-quantizers of at least 2 dimensions each.
        m = max(d for d in range(1, max(1, min(64, dim // 2)) + 1) if dim % d == 0)
        params.update({"m": m, "nbits": 8})
        why += f"; PQ with {m} sub-quantizers of 8 bits ({m} bytes a vector)"
    return IndexSpec(kind, metric, params, why)


_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


def parse_size(size: "int | str") -> int:
    """Bytes from a whole number or a size such as '2GB', '512 MB', '1.5G' (binary units: 1 GB = 2**30)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size > 0:
        return int(size)
    text = str(size).strip().upper().replace(" ", "")
    number = text.rstrip("BKMGTI")
    unit = text[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not math.isfinite(value) or value <= 0:
        raise IndexError_(f"memory size {size!r}: expected a size such as 2GB or 512MB", subject=str(size))
    return int(value * _UNITS[unit])


def memory_bytes(kind: str, params: dict, n: int, dim: int, metric: str = "cosine") -> int:
    """About how much memory the FAISS structure of this kind takes for ``n`` vectors (the
    stored vectors file, memory-mapped and read only for exact re-ranking, is not counted)."""
    ids = 8 * n  # int64 ids (an IDMap, or the inverted lists' ids)
    if kind == "flat":
        return 4 * dim * n + ids
    if kind == "hnsw":
        # 2*M int32 links a vector on level 0, a few more on the levels above, and its level
        return (4 * dim + 2 * int(params["M"]) * 4 + 16) * n + ids
    d = int(params.get("whiten") or params.get("pca") or dim)
    pretransform = 4 * dim * d if d != dim else 0
    centroids = 4 * d * int(params["nlist"])
    if kind == "ivf":
        return 4 * d * n + ids + centroids + pretransform
    if kind == "ivfsq8":
        return d * n + ids + centroids + pretransform + 8 * d  # a byte a dimension, and each one's range
    if kind == "ivfpq":
        codebooks = 4 * 256 * d
        # L2 search (as every PCA-reduced one is) precomputes a table of nlist * m * 256 floats
        tables = 4 * int(params["nlist"]) * int(params["m"]) * 256 if params.get("pca") or metric == "l2" else 0
        return int(params["m"]) * n + ids + centroids + codebooks + pretransform + tables
    raise IndexError_(f"unknown index kind {kind!r}", subject=kind)


def plan_for_memory(metric: str, n: int, dim: int, max_memory: "int | str") -> IndexSpec:
    """Choose the kind and its parameters from the catalog size and a memory budget.

    Exact search up to EXACT_MAX items; then HNSW (up to HNSW_MAX items) or IVF-Flat while the
    vectors fit; then IVF-SQ8 (a byte a dimension) while those codes fit; then IVF-PQ over vectors
    PCA-reduced to PQ_PCA_DIM dimensions, with the most bytes a code that fit, and exact
    re-ranking of PQ_RERANK candidates per result.
    """
    check_spec("flat", metric)
    budget = parse_size(max_memory)

    def size(b: int) -> str:
        if b < 2**20:
            return f"{b / 2**10:,.0f} KB"
        return f"{b / 2**20:,.0f} MB" if b < 2**30 else f"{b / 2**30:,.2f} GB"

    def need(spec: IndexSpec) -> int:
        return memory_bytes(spec.kind, spec.params, n, dim, metric)

    def because(spec: IndexSpec, why: str) -> IndexSpec:
        return replace(spec, chosen_because=f"{why}, {size(need(spec))} of the {size(budget)} budget")

    flat = IndexSpec("flat", metric, {}, "")
    vectors = size(need(flat))
    if n <= EXACT_MAX and need(flat) <= budget:
        spec = because(flat, f"{n} items (<= {EXACT_MAX:,}): exact search")
    elif n < MIN_ITEMS_IVF:
        raise IndexError_(f"{n} vectors of dimension {dim} need {vectors} for exact "
                          f"search; --max-memory {size(budget)} is too small", subject=str(max_memory))
    else:
        hnsw, ivf, sq8 = (_plan_kind(kind, metric, n, dim) for kind in ("hnsw", "ivf", "ivfsq8"))
        if n <= HNSW_MAX and need(hnsw) <= budget:
            spec = because(hnsw, f"{n:,} items (<= {HNSW_MAX:,}), the graph fits: HNSW, M={HNSW_M}")
        elif need(ivf) <= budget:
            spec = because(ivf, f"the vectors fit: IVF-Flat, {ivf.params['nlist']} lists")
        elif need(sq8) <= budget:
            spec = because(sq8, f"the vectors ({vectors}) do not fit, their 8-bit codes do: IVF-SQ8, "
                                f"{sq8.params['nlist']} lists")
        else:
            spec = _plan_pq(metric, n, dim, budget)
            if spec is None:
                smallest = memory_bytes("ivfpq", {"nlist": 1, "m": 4, "pca": min(dim, PQ_PCA_DIM)}, n, dim)
                raise IndexError_(f"{n:,} vectors of dimension {dim} need at least {size(smallest)} even as 4-byte "
                                  f"PQ codes; --max-memory {size(budget)} is too small", subject=str(max_memory))
            spec = because(spec, f"the vectors ({vectors}) do not fit: {spec.chosen_because}")
    spec.params["max_memory"] = budget
    return spec


def _plan_pq(metric: str, n: int, dim: int, budget: int) -> IndexSpec | None:
    """IVF-PQ with the longest codes (up to 64 bytes) that fit, or None if none does."""
    reduce = metric != "ip" and dim > PQ_PCA_DIM  # PCA centres the vectors: inner products would change
    d = PQ_PCA_DIM if reduce else dim
    base = _plan_kind("ivf", metric, n, d)
    for m in (64, 32, 16, 8, 4):
        if d % m or m > d:
            continue
        params = {**base.params, "m": m, "nbits": 8, "rerank": PQ_RERANK, **({"pca": d} if reduce else {})}
        if memory_bytes("ivfpq", params, n, dim, metric) <= budget:
            why = (f"IVF-PQ{f' over {d} PCA dimensions' if reduce else ''}, {base.params['nlist']} lists, "
                   f"{m}-byte codes, the best {PQ_RERANK} candidates a result ranked again exactly")
            return IndexSpec("ivfpq", metric, params, why)
    return None


def _read_at_random(array: np.ndarray) -> None:
    """Tell the kernel that this memory-mapped array's rows are read at random: no read-ahead, so
    re-ranking brings in the pages of its candidates only, not the megabytes around each (without
    it, 1,000 queries on a million vectors had paged in the whole 4.9 GB file)."""
    while array is not None and not isinstance(getattr(array, "_mmap", None), mmap.mmap):
        array = getattr(array, "base", None)
    if array is not None and hasattr(mmap, "MADV_RANDOM"):
        try:
            array._mmap.madvise(mmap.MADV_RANDOM)
        except (OSError, ValueError):  # advice only
            pass


class VectorIndex:
    """FAISS index plus the vectors and int ids it holds; search returns scores and int ids.

    This is also the interface of the other backends (``backends``): they subclass it and keep
    the vectors and ids as it does, which exact search, recall measurement and rebuilding read.
    """

    filters_metadata = False  # True: search takes a metadata filter itself, not a subset of int ids
    one_process = False  # True: only one process at a time may open it (an embedded database file)

    def __init__(self, spec: IndexSpec, dim: int, vectors: np.ndarray, ids: np.ndarray, index=None, mapped: bool = False):
        check_spec(spec.kind, spec.metric)
        self.mapped = mapped  # the FAISS structure is a read-only view of its file: never change it in place
        self._sorted: bool | None = None  # whether self.ids ascend (they do unless ids were given out of order)
        self.spec = spec
        self.dim = dim
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, dim)
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(self.vectors) != len(self.ids):
            raise IndexError_(f"{len(self.vectors)} vectors but {len(self.ids)} ids")
        if self.spec.params.get("rerank"):
            _read_at_random(self.vectors)
        self.index = index if index is not None else self._build()
        if self.index.ntotal != len(self.ids):
            raise IndexError_(f"FAISS index holds {self.index.ntotal} vectors, expected {len(self.ids)}")

    @classmethod
    def create(cls, kind: str, metric: str, vectors: np.ndarray, ids: np.ndarray, whiten: int = 0,
               max_memory: "int | str | None" = None) -> "VectorIndex":
        """Plan the kind for this many vectors, and build it over (already prepared) vectors.

        Kind ``auto`` is chosen by ``plan_for_memory`` within ``max_memory`` and then tuned to
        TARGET_RECALL (``tune``)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        spec = plan_index(kind, metric, len(vectors), vectors.shape[1], whiten, max_memory)
        built = cls(spec, vectors.shape[1], vectors, ids)
        if kind == AUTO:
            built.tune()
        return built

    def copy(self) -> "VectorIndex":
        """An independent copy to change, owning its FAISS structure (nothing is trained again)."""
        return VectorIndex(replace(self.spec, params=dict(self.spec.params), measured=dict(self.spec.measured)),
                           self.dim, self.vectors, self.ids, self._owned_faiss())

    def _owned_faiss(self):
        # clone_index keeps a mapped structure's views, which FAISS then refuses (by abort) to change
        if self.mapped:
            return faiss.deserialize_index(faiss.serialize_index(self.index))
        return faiss.clone_index(self.index)

    def _own(self) -> None:
        """Make the FAISS structure this object's own before changing it."""
        if self.mapped:
            self.index, self.mapped = self._owned_faiss(), False

    @property
    def asked_kind(self) -> str:
        """The kind this index was asked to be: ``auto`` when a memory budget chose it; an IVF kind
        that fell back to exact search while the catalog was too small says so in its reason."""
        if "max_memory" in self.spec.params:
            return AUTO
        for kind in IVF_KINDS:
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

    @property
    def pca(self) -> int:
        """The PCA-reduced dimension an IVF-PQ structure searches (0: not reduced); its candidates
        are always ranked again exactly."""
        return int(self.spec.params.get("pca", 0))

    @property
    def memory_bytes(self) -> int:
        """About how much memory the FAISS structure takes (see ``memory_bytes``)."""
        return memory_bytes(self.spec.kind, self.spec.params, len(self), self.dim, self.spec.metric)

    def __len__(self) -> int:
        return len(self.ids)

    # --- building ------------------------------------------------------------------------

    def _empty(self):
        d, metric, p = self.whiten or self.pca or self.dim, _faiss_metric(self.spec.metric), self.spec.params
        if self.pca:  # PCA centres the vectors, which keeps L2 ranks (cosine: of unit vectors) but not inner products
            metric = faiss.METRIC_L2
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
        elif kind == "ivfsq8":
            index = faiss.IndexIVFScalarQuantizer(quantizer, d, int(p["nlist"]), faiss.ScalarQuantizer.QT_8bit, metric)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, int(p["nlist"]), int(p["m"]), int(p["nbits"]), metric)
            index.pq.cp.min_points_per_centroid = 1  # small catalogs are expected: no stderr warning
        index.cp.max_points_per_centroid = TRAIN_POINTS_PER_CENTROID  # k-means on a sample, not all of 1M vectors
        index.own_fields = True
        quantizer.this.disown()
        return self._whitened(index)

    def _whitened(self, inner):
        """``inner`` behind the learned whitening (and L2 normalisation for cosine), or the PCA
        reduction (with a random rotation, which spreads variance evenly over PQ's sub-vectors)."""
        if not self.whiten and not self.pca:
            return inner
        index = faiss.IndexPreTransform(inner)
        if self.pca:
            chain = [faiss.PCAMatrix(self.dim, self.pca, 0.0, True)]
        else:
            chain = [faiss.PCAMatrix(self.dim, self.whiten, -0.5, False)]
        if self.whiten and self.spec.metric == "cosine":
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
        if self.spec.kind in IVF_KINDS or self.whiten or self.pca:
            if len(self.vectors) == 0:
                raise IndexError_(f"an {self.spec.kind} index needs vectors to train on")
            train = self.vectors
            if len(train) > TRAIN_MAX:
                train = train[np.sort(np.random.default_rng(0).choice(len(train), TRAIN_MAX, replace=False))]
            index.train(np.ascontiguousarray(train))
        if len(self.ids):
            index.add_with_ids(self.vectors, self.ids)
        return index

    # --- changing ------------------------------------------------------------------------

    def add(self, vectors: np.ndarray, ids: np.ndarray, metadata: list[dict] | None = None) -> None:
        """Add prepared vectors under new int ids (IVF kinds keep their trained centroids).

        ``metadata`` (each item's) is for backends that filter by it themselves; FAISS's filters
        go through items.sqlite."""
        vectors = check_vectors(vectors, self.dim, "added vectors")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        self._own()
        self.vectors = np.concatenate([self.vectors, vectors])
        self.ids = np.concatenate([self.ids, ids])
        self._sorted = None
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
        self._own()
        self._sorted = None
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
        return self.vectors[self._positions(int_ids.ravel())].reshape(*int_ids.shape, self.dim)

    def _positions(self, int_ids: np.ndarray) -> np.ndarray:
        """Rows of these (existing) int ids in self.vectors."""
        if self._sorted is None:  # ids grow with every add: they ascend unless given otherwise
            self._sorted = bool(len(self.ids) < 2 or (self.ids[1:] > self.ids[:-1]).all())
        if self._sorted:
            return np.searchsorted(self.ids, int_ids)
        order = np.argsort(self.ids, kind="stable")
        return order[np.searchsorted(self.ids, int_ids, sorter=order)]

    def search(self, queries: np.ndarray, k: int, subset: np.ndarray | None = None):
        """Return (scores, distances, int_ids), each [n_queries, k'], most similar first.

        k' = min(k, number of candidates); there is never padding with -1. ``subset`` limits the
        search to those int ids (a metadata filter), inside the index search.
        """
        check_k(k)
        queries = prepare(check_vectors(queries, self.dim, "query vector"), self.spec.metric)
        # A few queries run on one thread: FAISS's OpenMP threads go on spinning after a search, on
        # the cores the next query's model needs (1.3 ms of an 8 ms camera query, measured).
        faiss.omp_set_num_threads(1 if len(queries) < FEW_QUERIES else OMP_THREADS)
        n_candidates = len(self.ids) if subset is None else int(np.isin(subset, self.ids).sum())
        kk = min(int(k), n_candidates)
        if kk == 0:
            return no_hits(len(queries))
        exact = self.spec.kind == "flat" or kk >= len(self.ids) or (subset is not None and n_candidates <= EXACT_SUBSET_MAX)
        if subset is not None and exact:
            distances, ids = self._exact(queries, kk, np.isin(self.ids, subset))
        elif exact and self.spec.kind != "flat":
            distances, ids = self._exact(queries, kk, None)
        else:
            distances, ids = self._approximate(queries, kk, subset)
        values, ids = self._drop_missing(distances, ids)
        return self.scores(values), self.distances(values), ids

    def _approximate(self, queries: np.ndarray, k: int, subset: np.ndarray | None):
        """The index structure's own search of prepared queries -> (FAISS values, int ids)."""
        if self.spec.params.get("rerank"):
            return self._reranked(queries, k, subset)
        return self.index.search(queries, k, params=self._params(subset))

    def _reranked(self, queries: np.ndarray, k: int, subset: np.ndarray | None):
        """FAISS finds rerank*k candidates; their stored vectors rank them exactly."""
        wanted = min(len(self.ids), k * int(self.spec.params["rerank"]))
        _, candidates = self.index.search(queries, wanted, params=self._params(subset))
        found = candidates >= 0
        vectors = self.vectors[self._positions(np.where(found, candidates, self.ids[0]).ravel())]
        vectors = vectors.reshape(*candidates.shape, self.dim)
        if self.spec.metric == "l2":
            values = ((vectors - queries[:, None, :]) ** 2).sum(axis=2)
            values[~found] = np.inf
            order = np.argsort(values, axis=1, kind="stable")[:, :k]
        else:
            values = np.einsum("qcd,qd->qc", vectors, queries)
            values[~found] = -np.inf
            order = np.argsort(-values, axis=1, kind="stable")[:, :k]
        ids = np.where(np.take_along_axis(found, order, 1), np.take_along_axis(candidates, order, 1), -1)
        return np.take_along_axis(values, order, 1).astype(np.float32), ids

    # --- measuring -----------------------------------------------------------------------

    def recall(self, queries: int = RECALL_QUERIES, k: int = RECALL_K, seed: int = 0) -> float:
        """Recall@k of this index's search against exact search, with ``queries`` catalog items
        (evenly drawn) as queries, each held aside from its own results."""
        sample = self._sample(queries, seed)
        return self._recall(sample, self._truth(sample, k), k)

    def tune(self, target: float = TARGET_RECALL + TUNE_MARGIN, queries: int = RECALL_QUERIES, seed: int = 0) -> dict:
        """Raise the search parameter (nprobe, efSearch) until recall@10 on held-aside catalog
        items reaches ``target``, keep the smallest that does (or the largest tried), and record
        what was measured in ``spec.measured``. The margin over TARGET_RECALL is for queries less
        like the catalog than its own items (at 1M vectors, the first nprobe past 0.95 on held-aside
        items gave fresh queries 0.959: too close to the edge)."""
        kind, p = self.spec.kind, self.spec.params
        k = min(RECALL_K, len(self) - 1)
        if kind == "flat" or k < 1:
            self.spec = replace(self.spec, measured={"recall_at_10": 1.0, "queries": 0, "note": "exact search"})
            return self.spec.measured
        sample = self._sample(queries, seed)
        truth = self._truth(sample, k)
        if kind == "hnsw":
            name, ladder = "ef_search", [ef for ef in (16, 32, 64, 128, 256, 512) if ef >= k + 1]
        else:
            name, ladder = "nprobe", [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if n <= int(p["nlist"])]
        tried: dict[str, float] = {}
        for value in ladder:
            p[name] = value
            tried[str(value)] = round(self._recall(sample, truth, k), 4)
            if tried[str(value)] >= target:
                break
        got = tried[str(p[name])]
        verdict = "reaches" if got >= target else f"is the best tried, short of the target {target}:"
        self.spec = replace(
            self.spec, measured={"recall_at_10": got, "queries": len(sample), "target": target, name: tried},
            chosen_because=f"{self.spec.chosen_because}; {name} {p[name]} {verdict} recall@{k} {got:.3f} "
                           f"on {len(sample)} held-aside items",
        )
        return self.spec.measured

    def _sample(self, queries: int, seed: int) -> np.ndarray:
        n = len(self)
        return np.sort(np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False))

    def _truth(self, sample: np.ndarray, k: int) -> np.ndarray:
        queries = np.ascontiguousarray(self.vectors[sample])
        _, ids = self._exact(queries, k + 1, None)  # whitened: in the whitened space, which is what is searched
        return self._without_self(ids, self.ids[sample], k)

    def _recall(self, sample: np.ndarray, truth: np.ndarray, k: int) -> float:
        faiss.omp_set_num_threads(OMP_THREADS)
        queries = np.ascontiguousarray(self.vectors[sample])
        _, found = self._approximate(queries, k + 1, None)
        found = self._without_self(found, self.ids[sample], k)
        hits = (found[:, :, None] == truth[:, None, :]) & (truth[:, None, :] >= 0)
        return float(hits.any(axis=2).sum() / max(1, (truth >= 0).sum()))

    @staticmethod
    def _without_self(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
        """The first k ids of each row other than the row's own item."""
        order = np.argsort(ids == own[:, None], axis=1, kind="stable")[:, :k]
        return np.take_along_axis(ids, order, 1)

    def _params(self, subset: np.ndarray | None):
        p = self.spec.params
        selector = faiss.IDSelectorBatch(np.asarray(subset, dtype=np.int64)) if subset is not None else None
        kind = self.spec.kind
        if kind in IVF_KINDS:
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
        # straight from the (maybe memory-mapped) vectors: no copy of them into a flat index
        distances, positions = faiss.knn(self._transform(queries), self._transform(np.ascontiguousarray(vectors)),
                                         min(k, len(ids)), metric=_faiss_metric(self.spec.metric))
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

    def close(self) -> None:
        """Let go of connections (FAISS holds none: its file's mapping goes with the object)."""

    def committed(self) -> None:
        """Called once the store has committed the generation this index was made for. FAISS's
        structure is in that generation's own file: nothing is left to do."""

    def write_faiss(self, path: str) -> None:
        faiss.write_index(self.index, path)

    @classmethod
    def load(cls, spec: IndexSpec, dim: int, vectors: np.ndarray, ids: np.ndarray, faiss_path: str | None):
        """Open from stored vectors and ids; the FAISS file is used (memory-mapped) if it matches,
        else rebuilt."""
        index, mapped = None, False
        if faiss_path is not None:
            for flags in (faiss.IO_FLAG_MMAP_IFC, 0):  # a structure FAISS cannot map is read
                try:
                    index = faiss.read_index(faiss_path, flags)
                except RuntimeError:
                    continue
                mapped = flags != 0
                break
            if index is not None and (index.ntotal != len(ids) or index.d != dim):
                index, mapped = None, False
        return cls(spec, dim, vectors, ids, index, mapped=mapped), index is not None

    def with_spec(self, spec: IndexSpec) -> "VectorIndex":
        return VectorIndex(replace(spec, params=dict(spec.params), measured=dict(spec.measured)), self.dim, self.vectors, self.ids)
