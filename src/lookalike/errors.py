"""The error types: every expected failure is a LookalikeError with a one-line message.

    LookalikeError                  anything lookalike expects can go wrong
    ├── ImageError                  an input image cannot be used
    │   ├── ImageNotFoundError      a path that does not exist
    │   ├── ImageFormatError        not an image, or a format not allowed
    │   │   └── ImageCorruptError   an image file that is damaged, truncated or empty
    │   ├── ImageTooLargeError      too many pixels (decompression bomb) or too many bytes
    │   └── ImageFetchError         a URL that cannot or may not be fetched
    ├── CatalogError                a catalog that cannot be read (missing, no image column, dup ids)
    ├── ModelError                  an unknown model, or weights that cannot be found or loaded
    ├── QueryError                  a bad query: k < 1, a vector of the wrong size or with NaN/inf
    ├── IndexError_                 the vector index cannot do what was asked
    └── StoreError                  an index directory that is missing, damaged or of another version
        └── IndexBusyError          another process is changing the index

Each error carries the input it is about (``.subject``) so front ends can show it.
"""

from __future__ import annotations


def one_line(text: object) -> str:
    """``text`` for a one-line message: line breaks and other control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


class LookalikeError(Exception):
    """Base class of every error lookalike raises on purpose."""

    def __init__(self, message: str, *, subject: object = None):
        super().__init__(message)
        self.message = message
        self.subject = subject

    def __str__(self) -> str:
        return self.message


class ImageError(LookalikeError):
    """An input image cannot be used."""


class ImageNotFoundError(ImageError):
    """A path that does not exist or is not a file."""


class ImageFormatError(ImageError):
    """Not an image, a corrupt image, or a format not on the allow-list."""


class ImageCorruptError(ImageFormatError):
    """An image of an allowed format whose data is damaged, truncated or empty."""


class ImageTooLargeError(ImageError):
    """An image with more pixels or bytes than the limits allow."""


class ImageFetchError(ImageError):
    """A URL that cannot be fetched, or may not be (private address, URL fetching off)."""


class CatalogError(LookalikeError):
    """A catalog that cannot be read: missing, no image column, duplicate ids, bad rows."""


class ModelError(LookalikeError):
    """An unknown model name, or weights that cannot be found or loaded."""


class QueryError(LookalikeError):
    """A bad query: k < 1, a vector of the wrong dimension or with NaN/inf, an unknown input type."""


class IndexError_(LookalikeError):
    """The vector index cannot do what was asked (unknown kind or metric, bad parameters)."""


class StoreError(LookalikeError):
    """An index directory that is missing, damaged, inconsistent or of another format version."""


class IndexBusyError(StoreError):
    """Another process holds the index's write lock."""


class BackendError(StoreError):
    """The index's backend (a Milvus server or Milvus Lite file) refused a request or cannot be reached."""


class ClusterError(LookalikeError):
    """A Ray cluster could not be started or joined, or lacks what the work needs."""


__all__ = [
    "BackendError",
    "CatalogError",
    "ClusterError",
    "ImageCorruptError",
    "ImageError",
    "ImageFetchError",
    "ImageFormatError",
    "ImageNotFoundError",
    "ImageTooLargeError",
    "IndexBusyError",
    "IndexError_",
    "LookalikeError",
    "ModelError",
    "QueryError",
    "StoreError",
]
