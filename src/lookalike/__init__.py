"""lookalike: show it a picture of a thing, get the catalog items that look most like it."""

__version__ = "0.1.0"

from .engine import Report, VisualSearch  # noqa: E402
from .errors import (  # noqa: E402
    BackendError,
    CatalogError,
    ClusterError,
    ImageCorruptError,
    ImageError,
    ImageFetchError,
    ImageFormatError,
    ImageNotFoundError,
    ImageTooLargeError,
    IndexBusyError,
    IndexError_,
    LookalikeError,
    ModelError,
    QueryError,
    StoreError,
)
from .images import ImagePolicy  # noqa: E402
from .types import Hit, IndexSpec, Item, ModelSpec, SearchResult  # noqa: E402

__all__ = [
    "BackendError",
    "CatalogError",
    "ClusterError",
    "Hit",
    "ImageCorruptError",
    "ImageError",
    "ImageFetchError",
    "ImageFormatError",
    "ImageNotFoundError",
    "ImagePolicy",
    "ImageTooLargeError",
    "IndexBusyError",
    "IndexError_",
    "IndexSpec",
    "Item",
    "LookalikeError",
    "ModelError",
    "ModelSpec",
    "QueryError",
    "Report",
    "SearchResult",
    "StoreError",
    "VisualSearch",
    "__version__",
]
