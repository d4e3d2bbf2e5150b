"""The HTTP service: FastAPI routes over one VisualSearch — search, /invocations, items, health, metrics, the page.

Every route goes through the same ``VisualSearch`` as the CLI and the Python API. Inference runs
in worker threads, never on the event loop. Searches share the index under a read lock; changes
(``POST /items``, ``DELETE /items/{id}``) and the switch to a generation that another process
committed take the write lock, so a search sees the index before or after a change, never a mix.
Every error is JSON ``{"error": ..., "detail": ...}`` with a 4xx code; a 500 is a bug.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import math
import os
import socket
import threading
import time
from collections import OrderedDict
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Path as PathParam, Query as QueryParam, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match

from .. import __version__
from ..engine import MAX_EXPAND, VisualSearch, vote
from ..errors import (
    CatalogError,
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
from ..featurizer import REGIONS, TURNS
from ..images import ImagePolicy, is_url, load_image
from ..local import LocalFeatures, extract_query
from ..types import Hit, Item, SearchResult, fits_int64
from . import sagemaker
from .metrics import Metrics

log = logging.getLogger("lookalike.server")

STATIC = Path(__file__).parent / "static"
DRAIN_LIMIT = 256 * 1024 * 1024  # bytes of a refused upload read and dropped before answering 413
SETTINGS_ENV = "LOOKALIKE_SERVE_SETTINGS"  # how `serve --workers N` hands the settings to each worker
# img-src also http: and https:: the thumbnail of an item whose image is a URL is a redirect there
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob: https: http:; media-src 'self' blob:; script-src 'self'; "
    "style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {"Content-Security-Policy": PAGE_CSP, "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


@dataclass(frozen=True)
class ServerSettings:
    """What `lookalike serve` was asked for."""

    index_dir: str
    k: int = 5  # hits per query when a request gives no k (also /invocations' k)
    max_k: int = 1000
    max_upload_bytes: int = 20 * 1024 * 1024  # whole request body
    max_pixels: int = 40_000_000
    max_files: int = 16  # images in one request
    allow_urls: bool = False
    device: str = "cpu"
    runtime: str = "auto"
    refresh_seconds: float = 1.0  # how often to look for a generation committed by another process
    thumbnail_cache: int = 512
    api_key: str | None = None  # required as "Authorization: Bearer <key>" by the routes that change the index
    protect_reads: bool = False  # the read routes (search, invocations, items, metrics) need the key too
    cors_origins: tuple[str, ...] = ()  # origins allowed to call the API from a browser (CORS); none by default
    max_queue: int = 32  # requests waiting for a model slot; one more is answered 429
    upload_memory_bytes: int = 0  # request bodies held at once; 0: 4 x max_upload_bytes; over it, 429
    body_timeout_s: float = 20.0  # a request body that goes this long without a byte is answered 408

    def __post_init__(self) -> None:
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins or ()))
        if self.protect_reads and not self.api_key:
            raise ValueError("protect_reads needs an API key")

    def __repr__(self) -> str:  # never show the key
        return (f"ServerSettings(index_dir={self.index_dir!r}, api_key={'set' if self.api_key else None}, "
                f"protect_reads={self.protect_reads})")

    @property
    def body_budget(self) -> int:
        return self.upload_memory_bytes or 4 * self.max_upload_bytes

    def policy(self) -> ImagePolicy:
        return ImagePolicy(
            max_pixels=self.max_pixels, max_bytes=self.max_upload_bytes, allow_urls=self.allow_urls, allow_private_urls=False
        )


# --- errors ------------------------------------------------------------------------------


class HTTPError(LookalikeError):
    """An error the service answers with a given status (404, 409, 413, 415 ...)."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.error = error
        self.headers = headers


# (type, status, short error) — the first matching type wins, so subclasses come first.
_STATUS: list[tuple[type, int, str]] = [
    (ImageTooLargeError, 422, "image too large"),
    (ImageCorruptError, 422, "corrupt image"),
    (ImageFormatError, 415, "unsupported image type"),
    (ImageFetchError, 400, "image URL refused or unreachable"),
    (ImageNotFoundError, 400, "image not found"),
    (ImageError, 422, "unusable image"),
    (QueryError, 422, "invalid query"),
    (CatalogError, 422, "invalid item"),
    (IndexBusyError, 409, "index busy"),
    (StoreError, 503, "index unavailable"),
    (ModelError, 503, "model unavailable"),
    (LookalikeError, 400, "bad request"),
]


def error_status(exc: LookalikeError) -> tuple[int, str]:
    """The HTTP status and short error name for an expected failure."""
    if isinstance(exc, HTTPError):
        return exc.status, exc.error
    if isinstance(exc, sagemaker.UnsupportedMediaType):
        return exc.status, "unsupported media type" if exc.status == 415 else "not acceptable"
    for kind, status, error in _STATUS:
        if isinstance(exc, kind):
            return status, error
    return 400, "bad request"  # pragma: no cover - LookalikeError is last in _STATUS


# --- what the OpenAPI schema says the answers are --------------------------------------------
# Documentation only: the routes build plain dicts (no response_model re-validation on the hot
# path); tests/test_service_hardening.py checks with schemathesis that the answers match.


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Strict):
    """Every 4xx (and, being a bug, a 500) is answered with this."""

    error: str = Field(description="short name of the failure, e.g. 'invalid query'")
    detail: str = Field(description="what was wrong, for a person to read")


class HitOut(_Strict):
    rank: int = Field(ge=1)
    id: str
    score: float = Field(description="similarity, higher is more similar")
    distance: float = Field(description="distance under the index's metric, lower is more similar")
    metadata: dict[str, Any]
    image_url: str = Field(description="the item's thumbnail, GET /items/{item_id}/image")
    inliers: int | None = Field(None, ge=0, description="geometric verification: local features that match the "
                                "query in one perspective (only where the index has local features)")
    verified: bool | None = Field(None, description="enough inliers to be sure it is this item; verified hits come first")


class QueryResultOut(_Strict):
    query: str = Field(description="the uploaded file's name, the URL, '<body>', 'image_base64' or '<vector>'")
    hits: list[HitOut]
    skipped_looks: list[Literal["turn", "grid"]] | None = Field(
        None, description="only with budget_ms: the second looks the hits called for that the budget left out")


class SearchOut(_Strict):
    results: list[QueryResultOut]
    took_ms: float


class ItemOut(_Strict):
    id: str
    label: str | None
    metadata: dict[str, Any]
    image_url: str


class AddedOut(ItemOut):
    generation: int = Field(description="the index generation that holds the new item")
    items: int


class RemovedOut(_Strict):
    removed: str
    generation: int
    items: int


class LiveOut(_Strict):
    status: str


class ReadyOut(_Strict):
    ready: bool
    items: int
    generation: int = Field(description="the generation this worker process serves")
    model: str
    metric: str
    dim: int
    pid: int = Field(description="the worker process that answered (serve --workers N runs several)")


class PredictionOut(_Strict):
    predicted_label: Any = Field(description="the majority label of the k neighbours")
    labels: list[Any] | None = Field(None, description="with verbose=true: the neighbours' labels, most similar first")
    distances: list[float] | None = Field(None, description="with verbose=true: the neighbours' distances")
    ids: list[str]


class PredictionsOut(_Strict):
    predictions: list[PredictionOut]


_ERROR_TEXT = {
    400: "Bad request: malformed multipart body, or an image URL that is refused or unreachable",
    401: "Missing or wrong API key ('Authorization: Bearer <key>')",
    403: "This service was started without an API key, so the routes that change the index are off",
    404: "No such item, or its image is not available",
    405: "The method is not allowed on this path (see the Allow header)",
    406: "The Accept header asks for a format this route does not write",
    409: "Conflict: the id is taken, or another process holds the index",
    413: "The request body is over the service's size limit",
    415: "Unsupported Content-Type, or the bytes are not a supported image",
    422: "Invalid request: parameters, JSON, vector dimension, or an image that is corrupt or too large",
    429: "Too many requests are waiting for the model or hold upload memory; retry after Retry-After seconds",
    503: "The index or the model is not available",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
_WWW_AUTH = {"WWW-Authenticate": {"description": "the scheme to use: Bearer", "schema": {"type": "string"}}}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these error statuses, all in the {"error","detail"} shape."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": ErrorBody, "description": _ERROR_TEXT[code]}
        if code == 429:
            entry["headers"] = _RETRY_AFTER
        elif code == 401:
            entry["headers"] = _WWW_AUTH
        out[code] = entry
    return out


# --- limits on work and memory ---------------------------------------------------------------


class Busy(HTTPError):
    """429: the service is at its limit; the client should retry later."""

    def __init__(self, detail: str, retry_after: int = 1):
        super().__init__(429, "too many requests", detail, headers={"Retry-After": str(retry_after)})


class Gate:
    """At most ``slots`` decode+featurize jobs at once, at most ``max_queue`` waiting; more is a 429.

    Used on the event loop only: waiting requests hold no worker thread, and the queue is bounded,
    so a burst of uploads cannot pile up decoded images or threads without limit.
    """

    def __init__(self, slots: int, max_queue: int):
        self.slots, self.max_queue = slots, max_queue
        self.running = self.waiting = 0
        self._sem: asyncio.Semaphore | None = None

    @property
    def sem(self) -> asyncio.Semaphore:
        if self._sem is None:  # created on the serving loop
            self._sem = asyncio.Semaphore(self.slots)
        return self._sem

    @contextlib.asynccontextmanager
    async def enter(self):
        if self.running >= self.slots and self.waiting >= self.max_queue:
            raise Busy(f"{self.running} requests are being computed and {self.waiting} are waiting, the most this "
                       "service queues; retry shortly")
        self.waiting += 1
        try:
            await self.sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self.sem.release()


class BodyBudget:
    """Bytes of request bodies held in memory at once (event loop only): reserve or refuse, release at the end."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def reserve(self, n: int) -> bool:
        if n > 0 and self.used + n > self.limit:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n


# --- the shared index ----------------------------------------------------------------------


class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds new readers back so it is not starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class SharedIndex:
    """The served VisualSearch, shared by the request threads; follows generations committed elsewhere."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.vs = VisualSearch.open(settings.index_dir, device=settings.device, policy=settings.policy(),
                                     runtime=settings.runtime)
        self.lock = ReadWriteLock()
        self.compute = threading.BoundedSemaphore(usable_cpus())  # model calls at once
        self._checked = time.monotonic()
        self._problem: StoreError | None = None  # what the last look at the index on disk found wrong
        self._refresh_lock = threading.Lock()
        self._thumbs: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()
        self.vs.warm_up()  # the model loaded and run, the vote made: the first query as fast as the others

    def _maybe_refresh(self) -> None:
        """Follow the index on disk, at most every ``refresh_seconds`` (a search need not wait for
        it). An index the last look found gone or damaged stays so until a look finds it back:
        searches between two looks answer as the last look did, not from memory."""
        if time.monotonic() - self._checked < self.settings.refresh_seconds or not self._refresh_lock.acquire(blocking=False):
            if self._problem is not None:
                raise StoreError(str(self._problem), subject=self._problem.subject)
            return
        try:
            self._follow()
        finally:
            self._refresh_lock.release()

    def follow_now(self) -> None:
        """Follow the index on disk now (``/readyz``): StoreError if it is gone or damaged there."""
        with self._refresh_lock:
            self._follow()

    def _follow(self) -> None:
        self._checked = time.monotonic()
        try:
            if self.vs.stale():
                with self.lock.write():
                    if self.vs.refresh():
                        log.info("switched to generation %s (%s items)", self.vs.generation, len(self.vs))
        except StoreError as exc:
            self._problem = exc
            raise
        self._problem = None

    @contextmanager
    def reading(self) -> Iterator[VisualSearch]:
        self._maybe_refresh()
        with self.lock.read():
            yield self.vs

    @contextmanager
    def writing(self) -> Iterator[VisualSearch]:
        with self.lock.write():
            self.vs.refresh()
            yield self.vs

    def thumbnail(self, item: Item, generation: int, size: int) -> bytes:
        """The item's catalog image as a JPEG whose longer side is at most ``size`` (cached)."""
        key = (item.id, generation, size)
        with self._thumbs_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        img = load_image(item.image, draft_size=size, name=f"image of item {item.id!r}")
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        with self._thumbs_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > self.settings.thumbnail_cache:
                self._thumbs.popitem(last=False)
        return data


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def image_url(item_id: str) -> str:
    """The item's thumbnail URL: its id one path segment, and "." or ".." spelt %2E, which clients
    would otherwise resolve as the folder itself or its parent (GET /items/../image is GET /image)."""
    segment = quote(item_id, safe="")
    return f"/items/{segment.replace('.', '%2E') if item_id in ('.', '..') else segment}/image"


def _item_dict(item: Item) -> dict[str, Any]:
    return {"id": item.id, "label": item.label, "metadata": item.metadata, "image_url": image_url(item.id)}


# --- request parsing ----------------------------------------------------------------------


def _no_constant(name: str):
    raise QueryError(f"{name} is not allowed in JSON: numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise QueryError(f"{text[:40]} is out of range: numbers must be finite")
    return value


def _check_json(value: Any, where: str, depth: int = 0) -> None:
    """Refuse what JSON can carry but the index cannot store or match: lone surrogates, huge integers, deep nesting."""
    if depth > 32:
        raise QueryError(f"{where}: nested too deeply")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise QueryError(f"{where}: text holds an unpaired surrogate (\\ud800-\\udfff), which is not valid Unicode") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        if not fits_int64(value):
            raise QueryError(f"{where}: integer {str(value)[:40]} is out of the 64-bit range")
    elif isinstance(value, dict):
        for key, v in value.items():
            _check_json(key, where, depth + 1)
            _check_json(v, where, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_json(v, where, depth + 1)


def _loads(raw: bytes | str, what: str = "request body") -> Any:
    """Parse JSON from a request strictly: finite numbers only, valid Unicode, 64-bit integers."""
    try:
        value = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise QueryError(f"{what} is not valid JSON") from None
    _check_json(value, what)
    return value


def _text_field(value: Any, where: str) -> Any:
    if isinstance(value, str):
        _check_json(value, where)
    return value


def _int_param(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise QueryError(f"{name} must be a whole number from {low} to {high}, got {str(value)[:40]!r}")
    return number


ORIENT_DOC = ("also try each photo turned by 90, 180 and 270 degrees (about 4x the featurizing time); auto: only a "
              "photo whose best hit is neither verified nor scores well upright (the web page's camera mode)")
REGIONS_DOC = ("also search with regions of each photo (its corners and centre) and score each item by its best region: "
               "finds an item that fills only part of the frame (six model runs without the flip: about 3x the featurizing "
               "time); auto: the same, and a photo whose best hit is still neither verified nor scores well also searches "
               "a 3x3 grid of smaller squares (the web page's camera mode)")
BUDGET_DOC = ("with orient or regions auto: each photo's time budget in ms; its second looks (turned, finer grid) are "
              "taken only when they are expected to fit in it (the web page's camera mode sends 150); default: no limit")
VERIFY_DOC = ("geometric verification of the best candidates with local features (default: on when the index has "
              "them); verified hits come first and carry inliers and verified")
BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False}  # a yes/no in a query string or form field


def _auto_param(value: Any, name: str) -> bool | str:
    """orient and regions: a yes/no, or "auto"."""
    return "auto" if value == "auto" else _bool_param(value, name, " or auto")


def _bool_param(value: Any, name: str, also: str = "") -> bool:
    if isinstance(value, bool):
        return value
    if value not in BOOL_WORDS:
        raise QueryError(f"{name} must be true, false, 1 or 0{also}, got {str(value)[:40]!r}")
    return BOOL_WORDS[value]


def _float_param(value: Any, name: str) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise QueryError(f"{name} must be a finite number, got {str(value)[:40]!r}")
    return number


def _filter_param(value: Any) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = _loads(value, "filter")
        except QueryError as exc:
            raise QueryError(f'filter must be a JSON object such as {{"colour": "Black"}} ({exc})') from None
    _check_json(value, "filter")
    if not isinstance(value, dict):
        raise QueryError('filter must be a JSON object such as {"colour": "Black"}')
    scalar = (str, int, float, bool, type(None))
    values = 0
    for key, v in value.items():
        if not (isinstance(v, scalar) or isinstance(v, list) and all(isinstance(x, scalar) for x in v)):
            raise QueryError(f"filter value of {key!r} must be a string, number, or a list of them")
        values += len(v) if isinstance(v, list) else 1
    if values > 500:  # each is an SQL parameter; SQLite allows 999 in a statement on old builds
        raise QueryError(f"filter holds {values} values; at most 500")
    return value


def _decode_base64(text: Any, name: str) -> bytes:
    if not isinstance(text, str):
        raise QueryError(f"{name} must be a base64 string")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise QueryError(f"{name} is not valid base64") from None


def _url_param(url: Any, name: str, allowed: bool) -> str:
    if not isinstance(url, str) or not is_url(url):
        raise QueryError(f"{name} must be an http:// or https:// URL")
    if not allowed:
        raise ImageFetchError(f"{url}: this service does not fetch image URLs (start it with --allow-urls)", subject=url)
    return url


class Query:
    """One query of a request: an image (bytes or URL) or a vector, with the name it is reported under."""

    def __init__(self, name: str, data: bytes | None = None, url: str | None = None, vector: list | None = None):
        self.name, self.data, self.url, self.vector = name, data, url, vector


def _json_queries(body: dict[str, Any], allow_urls: bool, dim: int | None = None) -> list[Query]:
    queries = []
    if "image_url" in body:
        queries.append(Query(body["image_url"] if isinstance(body["image_url"], str) else "image_url", url=_url_param(body["image_url"], "image_url", allow_urls)))
    if "image_base64" in body:
        queries.append(Query("image_base64", data=_decode_base64(body["image_base64"], "image_base64")))
    if "vector" in body:
        vector = body["vector"]
        if not isinstance(vector, list) or not vector or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vector):
            raise QueryError("vector must be a non-empty list of numbers")
        queries.append(Query("<vector>", vector=vector))
    if len(queries) != 1:
        raise QueryError('give exactly one of "image_url", "image_base64" or "vector"')
    vector = queries[0].vector
    if vector is not None and dim is not None:
        if len(vector) != dim:
            raise QueryError(f"vector has dimension {len(vector)}, but the index holds vectors of dimension {dim}")
        with np.errstate(over="ignore"):
            _finite_vectors(np.asarray([vector], dtype=np.float64).astype(np.float32))
    return queries


# --- the app --------------------------------------------------------------------------------


def _vector_schema(dim: int) -> dict[str, Any]:
    return {"type": "array", "minItems": dim, "maxItems": dim, "items": {"type": "number"},
            "description": f"a feature vector of the index's model: {dim} finite numbers"}


_FILTER_SCHEMA = {
    "type": "object",
    "description": 'metadata equalities, e.g. {"colour": "Black"}; a list value means any of',
    "additionalProperties": {"anyOf": [
        {"type": ["string", "number", "boolean", "null"]},
        {"type": "array", "items": {"type": ["string", "number", "boolean", "null"]}},
    ]},
}


def create_app(settings: ServerSettings):
    """The FastAPI application serving the index at ``settings.index_dir`` (opened now)."""
    shared = SharedIndex(settings)
    metrics = Metrics()
    policy = settings.policy()
    gate = Gate(usable_cpus(), settings.max_queue)
    app = FastAPI(
        docs_url=None,  # /docs is made below, with Swagger UI's files served from here
        title="lookalike",
        version=__version__,
        description="Visual search: send a picture of a thing, get the catalog items that look most like it.\n\n"
        "Every error is JSON `{\"error\": ..., \"detail\": ...}` with a 4xx status. Item ids may contain `/`: "
        "send it as `%2F` in `/items/{item_id}` (a literal `/image` at the end names the item's thumbnail).",
    )
    app.state.shared = shared
    app.state.gate = gate
    dim = shared.vs.dim
    # Without a key the write routes are simply off (403 whatever is sent): no credentials to declare.
    write_security = {"security": [{"bearerAuth": []}]} if settings.api_key else {}
    write_auth = (401, 403) if settings.api_key else (403,)
    read_security = write_security if settings.protect_reads else {}
    read_auth = (401,) if settings.protect_reads else ()

    def error_response(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(LookalikeError)
    async def _lookalike_error(request: Request, exc: LookalikeError):
        status, error = error_status(exc)
        if isinstance(exc, HTTPError) and exc.status == 413:
            metrics.count("rejected_uploads")
        if isinstance(exc, Busy):
            metrics.count("busy")
        return error_response(status, error, str(exc), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path"))
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return error_response(422, "invalid request", "; ".join(parts) or "invalid request")

    def allowed_methods(scope) -> list[str]:
        """The methods of the route template that a path matches (all routes of that template, not the first one)."""
        first, methods = None, set()
        for route in app.router.routes:
            route_methods = getattr(route, "methods", None)
            if not route_methods:
                continue
            match, _ = route.matches(scope)
            if match is Match.NONE:
                continue
            first = first or route.path
            if route.path == first:
                methods |= set(route_methods)
        return sorted(methods)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        phrase = {404: "not found", 405: "method not allowed", 400: "bad request"}.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            methods = allowed_methods(request.scope)
            if methods:
                headers["Allow"] = ", ".join(methods)
        return error_response(exc.status_code, phrase, detail, headers or None)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect):  # the client left mid-upload: not our error
        metrics.count("client_disconnects")
        return Response(status_code=499)  # nginx's "client closed request": no one reads it, the metrics count it

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # a 500 is a bug: log it, answer in our shape
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error", f"{type(exc).__name__}: {exc}")

    # Outermost first: HEAD as GET, security headers on every answer, then CORS (only when origins
    # are named), then the body limits and metrics.
    guard_budget = BodyBudget(settings.body_budget)
    app.add_middleware(_Guard, max_body=settings.max_upload_bytes, metrics=metrics, budget=guard_budget,
                       body_timeout=settings.body_timeout_s)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Accept"], expose_headers=["Retry-After", "X-Index-Generation"],
            max_age=600,
        )
    app.add_middleware(_SecurityHeaders)
    app.add_middleware(_HeadAsGet)

    def check_key(request: Request, what: str) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.api_key.encode()):
            metrics.count("unauthorized")
            raise HTTPError(401, "unauthorized", f"{what}: send the API key as 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})

    def require_key(request: Request) -> None:
        """Write routes: the API key must be given; with none configured they are off."""
        if not settings.api_key:
            raise HTTPError(403, "writes disabled", "this service was started without an API key, so the routes that "
                            "change the index are off; start it with --api-key-file PATH or LOOKALIKE_API_KEY set")
        check_key(request, "this route changes the index")

    def require_read_key(request: Request) -> None:
        """Read routes: the API key is needed only when the service was started with --protect-reads."""
        if settings.protect_reads:
            check_key(request, "this service protects its read routes (--protect-reads)")

    # --- search ---------------------------------------------------------------------------

    async def read_queries(request: Request) -> tuple[list[Query], dict[str, Any]]:
        """The request's queries and its parameters (k, min_score, filter, expand) from form or JSON fields."""
        params: dict[str, Any] = dict(request.query_params)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            form = await request.form(max_files=settings.max_files, max_fields=100)
            queries = []
            try:
                for key, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        queries.append(Query(value.filename or f"upload {len(queries) + 1}", data=await value.read()))
                    elif key in ("k", "min_score", "filter", "expand", "orient", "verify", "regions", "budget_ms"):
                        params[key] = _text_field(value, key)
                    elif key == "image_url":
                        queries.append(Query(value, url=_url_param(_text_field(value, key), "image_url", settings.allow_urls)))
            finally:
                await form.close()
            if not queries:
                raise QueryError("the form holds no image: send one or more files in a field named 'file'")
            return queries, params
        if ctype in ("application/json", ""):
            raw = await request.body()
            if not raw.strip():
                raise QueryError('send a multipart upload ("file"), or JSON with "image_url", "image_base64" or "vector"')
            body = _loads(raw)
            if not isinstance(body, dict):
                raise QueryError("request body must be a JSON object")
            if "k" in body and (not isinstance(body["k"], int) or isinstance(body["k"], bool)):
                raise QueryError(f"k must be a whole number from 1 to {settings.max_k}")
            if "expand" in body and (not isinstance(body["expand"], int) or isinstance(body["expand"], bool)):
                raise QueryError(f"expand must be a whole number from 0 to {MAX_EXPAND}")
            for key in ("orient", "verify", "regions"):
                if key in body and not isinstance(body[key], bool) and not (key != "verify" and body[key] == "auto"):
                    raise QueryError(f"{key} must be true or false" + (' or "auto"' if key != "verify" else ""))
            for key in ("min_score", "budget_ms"):
                if key in body and (not isinstance(body[key], (int, float)) or isinstance(body[key], bool)):
                    raise QueryError(f"{key} must be a finite number")
            if "filter" in body and not isinstance(body["filter"], dict):
                raise QueryError('filter must be a JSON object such as {"colour": "Black"}')
            params.update({key: body[key] for key in ("k", "min_score", "filter", "expand", "orient", "verify", "regions",
                                                      "budget_ms") if key in body})
            return _json_queries(body, settings.allow_urls, dim), params
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            return [Query("<body>", data=await request.body())], params
        raise sagemaker.UnsupportedMediaType(
            f"Content-Type {ctype!r} is not accepted by /search: send multipart/form-data, application/json or the image bytes", 415
        )

    def run_search(
        queries: list[Query], k: int, filter: dict | None, min_score: float | None, expand: int, orient: bool | str,
        verify: bool | None, regions: bool = False, budget_ms: float | None = None,
    ) -> tuple[list[dict[str, Any]], int]:
        # One image decoded and featurized at a time, outside the index lock: a request's memory is
        # one decoded image however many it sends, and writers wait only for the index search.
        build = shared.vs.manifest.get("build_id")  # an index rebuilt in its place meanwhile: see the end
        featurizer = shared.vs.featurizer
        draft = featurizer.draft_size(regions)
        if verify and not shared.vs.has_local_features:
            raise QueryError("this index was built without local features, so it cannot verify (build it with --local-features)")
        verifying = shared.vs.has_local_features if verify is None else verify
        inputs: list[Any] = []
        local: list[LocalFeatures | None] = []
        settled: dict[int, list[Hit]] = {}  # orient or regions "auto": queries searched one by one, as search() does
        skipped: dict[int, list[str]] = {}  # with budget_ms: the second looks it left out, per query
        generation = None
        for q in queries:
            if q.vector is not None:
                vector = np.asarray(q.vector, np.float32)
                inputs.append(np.repeat(vector[None], REGIONS, axis=0) if regions else vector)
                local.append(None)
                continue
            started = time.perf_counter()  # the query's clock for budget_ms: from its decoding
            image = load_image(q.url if q.url is not None else q.data, policy=policy, draft_size=draft, name=q.name)
            q.data = None
            turn = 0
            if orient is True:
                with shared.compute:
                    turned = featurizer.featurize_turned([image])
                with shared.reading() as vs:
                    turn = int(vs.best_turn(turned, filter=filter)[0])
            with shared.compute:
                if regions:
                    inputs.append(featurizer.featurize_regions([image], [TURNS[turn]])[0])
                elif orient is True:
                    inputs.append(turned[0, turn])
                else:
                    inputs.append(featurizer.featurize([image], strict=True).vectors[0])
                local.append(extract_query(image) if verifying else None)
            if orient == "auto" or regions == "auto":  # with second looks where its hits are unsure
                skipped[len(inputs) - 1] = []
                settled[len(inputs) - 1] = shared.vs.search_featurized(
                    image, inputs[-1], k=k, filter=filter, expand=expand, local=local[-1], orient=orient, regions=regions,
                    reading=shared.reading, compute=lambda: shared.compute, budget_ms=budget_ms, started=started,
                    skipped=skipped[len(inputs) - 1])
                generation = shared.vs.generation
            del image
        todo = [i for i in range(len(inputs)) if i not in settled]
        if todo:
            with shared.reading() as vs:
                hits = vs.search_vectors(np.stack([inputs[i] for i in todo]), k=k, filter=filter, expand=expand,
                                         local=[local[i] for i in todo] if verifying else None)
                generation = vs.generation
            settled.update(zip(todo, hits))
        if shared.vs.manifest.get("build_id") != build:  # vectors of the old model, searched in the new index
            raise HTTPError(503, "index rebuilt", "the index was rebuilt in its place while this query ran; send "
                            "it again", headers={"Retry-After": "1"})
        results = []
        for i, q in enumerate(queries):  # SearchResult's own JSON (skipped_looks only with a budget), with image URLs
            result = SearchResult(q.name, VisualSearch.passing(settled[i], min_score),
                                  tuple(skipped.get(i, [])) if budget_ms is not None else None).to_dict()
            results.append({**result, "hits": [{**h, "image_url": image_url(h["id"])} for h in result["hits"]]})
        return results, generation

    # Image URLs are part of the schema only when the service fetches them (--allow-urls).
    url_field = {"image_url": {"type": "string", "format": "uri", "description": "an image URL"}} if settings.allow_urls else {}

    def one_image(keys: list[str], combine: str = "oneOf") -> dict[str, Any]:
        keys = [*keys, "image_url"] if settings.allow_urls else keys
        return {combine: [{"required": [key]} for key in keys]} if len(keys) > 1 else {"required": keys}

    expand_schema = {"type": "integer", "minimum": 0, "maximum": MAX_EXPAND,
                     "description": "query expansion over that many nearest items (0: off)"}
    search_body = {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object",
            "properties": {
                "file": {"type": "array", "minItems": 1, "maxItems": settings.max_files,
                         "items": {"type": "string", "format": "binary"}, "description": "one or more images"},
                **url_field,
                "k": {"type": "integer", "minimum": 1, "maximum": settings.max_k},
                "min_score": {"type": "number"},
                "filter": {"type": "string", "description": 'a JSON object, e.g. {"colour": "Black"}'},
                "expand": expand_schema,
                "orient": {"type": "string", "enum": [*BOOL_WORDS, "auto"], "description": ORIENT_DOC},
                "verify": {"type": "string", "enum": list(BOOL_WORDS), "description": VERIFY_DOC},
                "regions": {"type": "string", "enum": [*BOOL_WORDS, "auto"], "description": REGIONS_DOC},
                "budget_ms": {"type": "number", "exclusiveMinimum": 0, "description": BUDGET_DOC},
            },
            **one_image(["file"], "anyOf"),
        }},
        "application/json": {"schema": {
            "type": "object",
            "properties": {
                **url_field,
                "image_base64": {"type": "string", "contentEncoding": "base64", "description": "image bytes, base64 (a data: URL too)"},
                "vector": _vector_schema(dim),
                "k": {"type": "integer", "minimum": 1, "maximum": settings.max_k},
                "min_score": {"type": "number"},
                "filter": _FILTER_SCHEMA,
                "expand": expand_schema,
                "orient": {"oneOf": [{"type": "boolean"}, {"const": "auto"}], "description": ORIENT_DOC},
                "verify": {"type": "boolean", "description": VERIFY_DOC},
                "regions": {"oneOf": [{"type": "boolean"}, {"const": "auto"}], "description": REGIONS_DOC},
                "budget_ms": {"type": "number", "exclusiveMinimum": 0, "description": BUDGET_DOC},
            },
            **one_image(["image_base64", "vector"]),
        }},
        **{t: {"schema": {"type": "string", "format": "binary"}} for t in (
            "image/jpeg", "image/png", "image/webp", "application/octet-stream")},
    }}

    @app.post(
        "/search",
        operation_id="search",
        summary="Search by image (upload, URL, base64) or by feature vector",
        responses={200: {"model": SearchOut, "headers": {"X-Index-Generation": {
            "description": "the index generation that answered", "schema": {"type": "integer"}}}},
            **_errors(400, *read_auth, 413, 415, 422, 429, 503)},
        openapi_extra={"requestBody": search_body, **read_security},
    )
    async def search(
        request: Request,
        k: int | None = QueryParam(None, ge=1, le=settings.max_k, description="hits per query"),
        min_score: float | None = QueryParam(None, description="hits scoring below it are dropped"),
        filter: str | None = QueryParam(None, description='a JSON object of metadata equalities, e.g. {"colour": "Black"}'),
        expand: int | None = QueryParam(None, ge=0, le=MAX_EXPAND, description="query expansion over that many nearest items (0: off)"),
        orient: Literal["true", "false", "1", "0", "auto"] | None = QueryParam(None, description=ORIENT_DOC),
        verify: Literal["true", "false", "1", "0"] | None = QueryParam(None, description=VERIFY_DOC),
        regions: Literal["true", "false", "1", "0", "auto"] | None = QueryParam(None, description=REGIONS_DOC),
        budget_ms: float | None = QueryParam(None, gt=0, description=BUDGET_DOC),
    ):
        """The most similar catalog items of each query image, most similar first.

        Parameters (query string, form fields or JSON keys): ``k`` hits per query, ``min_score``
        (hits below it are dropped: no match is an empty list), ``filter`` (JSON object of
        metadata equalities; a list value means any of), ``expand`` (query expansion; the scores
        are then similarities to the expanded query), ``orient`` (also try each photo turned by
        90, 180 and 270 degrees; about 4x the featurizing time; ``auto``: only a photo whose hits
        are unsure), ``verify`` (geometric verification; on by default when the index has local
        features), ``regions`` (also search with regions of each photo, each item scored by its
        best region; about 3x the featurizing; ``auto``: and a photo whose hits are still unsure
        also searches a finer grid), ``budget_ms`` (with ``auto``: each photo's time budget, from
        its decoding; its second looks are taken only when they are expected to fit in it).
        """
        start = time.perf_counter()
        require_read_key(request)
        queries, params = await read_queries(request)
        k_ = _int_param(params.get("k", settings.k), "k", 1, settings.max_k)
        min_score_ = _float_param(params["min_score"], "min_score") if params.get("min_score") not in (None, "") else None
        filter_ = _filter_param(params.get("filter"))
        expand_ = _int_param(params.get("expand", 0), "expand", 0, MAX_EXPAND)
        orient_ = _auto_param(params.get("orient", False), "orient")
        verify_ = _bool_param(params["verify"], "verify") if params.get("verify") is not None else None
        regions_ = _auto_param(params.get("regions", False), "regions")
        budget_ = _float_param(params["budget_ms"], "budget_ms") if params.get("budget_ms") not in (None, "") else None
        VisualSearch.check_budget(budget_, orient_, regions_)  # before any photo is featurized
        async with gate.enter():
            results, generation = await run_in_threadpool(
                run_search, queries, k_, filter_, min_score_, expand_, orient_, verify_, regions_, budget_)
        return JSONResponse({"results": results, "took_ms": round((time.perf_counter() - start) * 1000, 2)},
                            headers={"X-Index-Generation": str(generation)})

    # --- SageMaker k-NN -------------------------------------------------------------------

    vector = _vector_schema(dim)
    invocations_body = {"required": True, "content": {
        "text/csv": {"schema": {"type": "string", "description": f"one vector per line: {dim} comma-separated numbers"}},
        "application/json": {"schema": {
            "type": "object", "required": ["instances"],
            "properties": {"instances": {"type": "array", "minItems": 1, "items": {"anyOf": [
                {"type": "object", "required": ["features"], "properties": {"features": vector}},
                {"type": "object", "required": ["data"], "not": {"required": ["features"]}, "properties": {"data": {
                    "type": "object", "required": ["features"], "properties": {"features": {
                        "type": "object", "required": ["values"], "properties": {"values": vector}}}}}},
            ]}}},
        }},
        "application/jsonlines": {"schema": {"type": "string", "description": 'one {"features": [...]} object per line'}},
    }}

    @app.post(
        "/invocations",
        operation_id="invocations",
        summary="SageMaker k-NN inference (text/csv, application/json, application/jsonlines)",
        response_class=Response,
        responses={200: {"description": "one prediction per vector", "model": PredictionsOut, "content": {
            "application/jsonlines": {"schema": {"type": "string", "description": "one prediction object per line"}}}},
            **_errors(400, *read_auth, 406, 413, 415, 422, 429, 503)},
        openapi_extra={"requestBody": invocations_body, **read_security},
    )
    async def invocations(request: Request, k: int | None = QueryParam(None, ge=1, le=settings.max_k, description="neighbours that vote")):
        """Feature vectors in, the voted label of each one's k nearest neighbours out.

        ``Accept: application/json; verbose=true`` adds each neighbour's ``labels`` and ``distances``,
        most similar first; every prediction carries the neighbours' ``ids``.
        """
        require_read_key(request)
        media = sagemaker.response_type(request.headers.get("accept"))
        raw = await request.body()
        k_ = _int_param(k if k is not None else settings.k, "k", 1, settings.max_k)

        def run() -> list[dict[str, Any]]:
            vectors = _finite_vectors(sagemaker.parse_request(raw, request.headers.get("content-type"), dim=shared.vs.dim))
            with shared.reading() as vs:
                results = vs.search(list(vectors), k=k_)
            results = [results] if isinstance(results, SearchResult) else results
            return [sagemaker.prediction(vote(r)["label"], [h.to_dict() for h in r.hits], media.verbose) for r in results]

        async with gate.enter():
            predictions = await run_in_threadpool(run)
        body, content_type = sagemaker.write_response(predictions, media)
        return Response(body, media_type=content_type)

    # --- items ------------------------------------------------------------------------------

    def find(item_id: str) -> tuple[Item, int]:
        with shared.reading() as vs:
            item = vs.get(item_id)
            generation = vs.generation
        if item is None:
            raise HTTPError(404, "not found", f"no item with id {item_id!r}")
        return item, generation

    example = _an_item_id(shared.vs)

    def item_id_param():
        return PathParam(..., description="the item's id; a '/' in it is sent as %2F",
                         openapi_examples={"an item of the index": {"value": example}} if example else None)

    @app.get(
        "/items/{item_id:path}/image",
        operation_id="get_item_image",
        summary="The catalog image of an item, as a JPEG thumbnail",
        response_class=Response,
        responses={200: {"description": "a JPEG whose longer side is at most `size`",
                         "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
                   307: {"description": "the item's image is a URL: go there"},
                   **_errors(*read_auth, 404, 422, 503)},
        openapi_extra=read_security,
    )
    async def item_image(request: Request, item_id: str = item_id_param(),
                         size: int = QueryParam(256, ge=16, le=1024, description="longer side, in pixels")):
        if not _names_image(request, item_id + "/image"):  # /items/a%2Fimage: the item "a/image" itself
            return JSONResponse(await get_item(request, item_id + "/image"))
        require_read_key(request)
        item, generation = await run_in_threadpool(find, item_id)
        if is_url(item.image):
            return RedirectResponse(item.image, status_code=307)
        try:
            data = await run_in_threadpool(shared.thumbnail, item, generation, size)
        except ImageError as exc:
            raise HTTPError(404, "image not available", str(exc)) from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=300"})

    @app.get(
        "/items/{item_id:path}",
        operation_id="get_item",
        summary="An item's id, label and metadata",
        responses={200: {"model": ItemOut}, **_errors(*read_auth, 404, 422, 503)},
        openapi_extra=read_security,
    )
    async def get_item(request: Request, item_id: str = item_id_param()):
        require_read_key(request)
        item, _ = await run_in_threadpool(find, item_id)
        return _item_dict(item)

    item_fields = {
        "id": {"type": ["string", "integer"], "maxLength": 500,
               "description": "empty or missing: derived from the image's content"},
        "label": {"type": ["string", "integer"]},
    }
    add_body = {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object",
            "properties": {
                "file": {"type": "string", "format": "binary", "description": "the image"},
                **url_field,
                # Form fields are text whatever they look like ("true", "12"): no JSON type to declare.
                "id": {"maxLength": 500, "description": "text; empty or missing: derived from the image's content"},
                "label": {"description": "text"},
                "metadata": {"type": ["string", "object"], "description": "a JSON object, as text"},
            },
            **one_image(["file"]),
        }},
        "application/json": {"schema": {
            "type": "object",
            "properties": {
                **item_fields,
                **url_field,
                "image_base64": {"type": "string", "contentEncoding": "base64", "description": "image bytes, base64"},
                "metadata": {"type": "object"},
            },
            **one_image(["image_base64"]),
        }},
    }}

    @app.post(
        "/items",
        operation_id="add_item",
        status_code=201,
        summary="Add an item: an uploaded image or an image URL, with id, label and metadata",
        responses={201: {"model": AddedOut, "links": {  # the id of the new item is in the answer, not the request
            name: {"operationId": op, "parameters": {"item_id": "$response.body#/id"}}
            for name, op in (("GetItem", "get_item"), ("GetItemImage", "get_item_image"), ("DeleteItem", "delete_item"))}},
            **_errors(400, *write_auth, 409, 413, 415, 422, 429, 503)},
        openapi_extra={"requestBody": add_body, **write_security},
    )
    async def add_item(request: Request):
        """Featurize one image and add it to the index (committed to disk before the answer). Needs the API key."""
        require_key(request)
        fields, data, url = await read_item(request)
        async with gate.enter():
            added = await run_in_threadpool(add_one, fields, data, url)
        return JSONResponse(added, status_code=201)

    async def read_item(request: Request) -> tuple[dict[str, Any], bytes | None, str | None]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        fields: dict[str, Any] = {}
        data = url = None
        if ctype == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=100)
            try:
                for key, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        data = await value.read()
                    elif key == "metadata":
                        fields["metadata"] = _loads(value, "metadata")
                    elif key == "image_url":
                        url = _url_param(_text_field(value, key), "image_url", settings.allow_urls)
                    else:
                        fields[key] = _text_field(value, key)
            finally:
                await form.close()
        elif ctype in ("application/json", ""):
            fields = _loads(await request.body())
            if not isinstance(fields, dict):
                raise QueryError("request body must be a JSON object")
            if "image_base64" in fields:
                data = _decode_base64(fields.pop("image_base64"), "image_base64")
            if "image_url" in fields:
                url = _url_param(fields.pop("image_url"), "image_url", settings.allow_urls)
        else:
            raise sagemaker.UnsupportedMediaType(f"Content-Type {ctype!r} is not accepted by /items", 415)
        if (data is None) == (url is None):
            raise QueryError('give exactly one image: a file upload ("file"), "image_url" or "image_base64"')
        metadata = fields.get("metadata", {})
        if not isinstance(metadata, dict):
            raise QueryError("metadata must be a JSON object")
        for key in ("id", "label"):
            if key in fields and not isinstance(fields[key], (str, int)) or key in fields and isinstance(fields[key], bool):
                raise QueryError(f"{key} must be a string")
        return fields, data, url

    def add_one(fields: dict[str, Any], data: bytes | None, url: str | None) -> dict[str, Any]:
        if data is not None:
            load_image(data, policy=policy, name="the uploaded image")  # refuse non-images before writing
            digest = hashlib.sha256(data).hexdigest()
            ext = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
            suffix = ext.get(_format_of(data), ".img")
        else:
            digest = hashlib.sha256(url.encode()).hexdigest()
        given = fields.get("id")
        item_id = (digest[:16] if given is None or given == "" else str(given)).strip()
        if not item_id or len(item_id) > 500:
            raise QueryError("id must be 1 to 500 characters")
        label = fields.get("label")
        metadata = dict(fields.get("metadata") or {})
        for key, value in fields.items():  # other plain fields are metadata too, as in a catalog row
            if key not in ("id", "label", "metadata") and isinstance(value, (str, int, float, bool)):
                metadata.setdefault(key, value)
        if label is not None:
            if str(metadata.get("label", label)) != str(label):
                raise QueryError(f"label {str(label)[:40]!r} and the metadata's label {str(metadata['label'])[:40]!r} differ; "
                                 "give one of them (the label is the metadata's 'label')")
            metadata["label"] = str(label)
        with shared.writing() as vs:
            if vs.get(item_id) is not None:
                raise HTTPError(409, "already exists", f"an item with id {item_id!r} is already in the index; delete it first")
            # The image is kept by content (an absolute path, whatever folder the service runs in); one
            # another request or worker also uses is never deleted: sweeps delete only unused ones.
            image = vs.keep_upload(data, suffix) if data is not None else url
            item = Item(id=item_id, image=image, label=str(label) if label is not None else None, metadata=metadata, row="request")
            try:
                with shared.compute:
                    vs.add([item], strict=True)
            except CatalogError as exc:
                if vs.get(item_id) is not None:  # another worker added this id meanwhile: as in one worker
                    raise HTTPError(409, "already exists", f"an item with id {item_id!r} is already in the index; "
                                    "delete it first") from exc
                raise
            return {**_item_dict(vs.get(item_id)), "generation": vs.generation, "items": len(vs)}

    @app.delete(
        "/items/{item_id:path}",
        operation_id="delete_item",
        summary="Remove an item",
        responses={200: {"model": RemovedOut}, **_errors(*write_auth, 404, 405, 409, 422, 503)},
        openapi_extra=write_security,
    )
    async def delete_item(request: Request, item_id: str = item_id_param()):
        """Remove an item from the index. Needs the API key."""
        if _names_image(request, item_id):  # DELETE /items/{id}/image: the image is not deleted on its own
            raise StarletteHTTPException(405, "Method Not Allowed")
        require_key(request)

        def run():
            with shared.writing() as vs:
                if vs.get(item_id) is None:
                    raise HTTPError(404, "not found", f"no item with id {item_id!r}")
                try:
                    vs.remove([item_id])
                except CatalogError as exc:  # another worker removed it meanwhile: as in one worker
                    raise HTTPError(404, "not found", f"no item with id {item_id!r}") from exc
                with contextlib.suppress(LookalikeError):  # its uploaded image, unless another item uses it
                    vs.sweep_uploads()
                return {"removed": item_id, "generation": vs.generation, "items": len(vs)}

        return await run_in_threadpool(run)

    # --- health, metrics, the page ------------------------------------------------------------

    @app.get("/livez", operation_id="livez", summary="The process is up (never needs the key)", responses={200: {"model": LiveOut}})
    async def livez():
        return {"status": "ok"}

    @app.get("/readyz", operation_id="readyz", summary="The index is loaded and can be searched (never needs the key)",
             responses={200: {"model": ReadyOut}, **_errors(503)})
    async def readyz():
        def run():
            shared.follow_now()  # the index on disk, not only the one in memory: a deleted or damaged one is not ready
            with shared.reading() as vs:
                return {"ready": True, "items": len(vs), "generation": vs.generation, "model": vs.spec.name,
                        "metric": vs.metric, "dim": vs.dim, "pid": os.getpid()}

        return await run_in_threadpool(run)

    @app.get(
        "/metrics",
        operation_id="metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"description": "Prometheus text format 0.0.4",
                         "content": {"text/plain": {"schema": {"type": "string"}}}},
                   **_errors(*read_auth, 503)},
        openapi_extra=read_security,
    )
    async def prometheus(request: Request):
        require_read_key(request)

        def gauges():
            with shared.reading() as vs:
                return {
                    "index_items": (len(vs), "Items in the served index."),
                    "index_generation": (vs.generation, "Generation of the served index."),
                    "index_dimension": (vs.dim, "Length of the feature vectors."),
                    "index_disk_bytes": (vs.info()["size_bytes"], "Size of the index directory on disk."),
                    "requests_waiting": (gate.waiting, "Requests waiting for a model slot."),
                    "upload_bytes_held": (guard_budget.used, "Bytes of request bodies held in memory now."),
                }

        text = metrics.render(await run_in_threadpool(gauges))
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page():
        if not (STATIC / "index.html").is_file():
            raise HTTPError(404, "not found", "the web page is not installed with this copy of lookalike")
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # The API docs page with Swagger UI's files from the fastapi-offline package, so that it works
    # offline (FastAPI's own /docs loads them from a CDN); without the package, from the CDN.
    docs_assets = _swagger_ui_files()
    if docs_assets is not None:
        app.mount("/docs-assets", StaticFiles(directory=docs_assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        local = {"swagger_js_url": "/docs-assets/swagger-ui-bundle.js", "swagger_css_url": "/docs-assets/swagger-ui.css",
                 "swagger_favicon_url": "/docs-assets/favicon.png"} if docs_assets is not None else {}
        return get_swagger_ui_html(openapi_url="/openapi.json", title="lookalike API", **local)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "the key given to `lookalike serve` by --api-key-file or $LOOKALIKE_API_KEY"}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def _swagger_ui_files() -> Path | None:
    """The folder of Swagger UI's files (a version that reads OpenAPI 3.1, FastAPI's) that the
    fastapi-offline package ships, or None."""
    import importlib.util

    found = importlib.util.find_spec("fastapi_offline")
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / "static"
    return path if (path / "swagger-ui-bundle.js").is_file() and (path / "swagger-ui.css").is_file() else None


def _names_image(request: Request, item_id: str) -> bool:
    """Whether the path ends in a literal ``/image`` segment (not an id's ``%2Fimage``): the thumbnail route."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    return item_id.endswith("/image") and raw.split(b"?")[0].endswith(b"/image")


def _an_item_id(vs: VisualSearch) -> str | None:
    """The id of one item of the index (an example for the API docs), or None when it is empty."""
    import numpy as np

    if not len(vs):
        return None
    return vs.search(np.ones(vs.dim, np.float32), k=1).hits[0].id


def _finite_vectors(vectors):
    """float32 query vectors that FAISS can score: finite, and with a finite norm."""
    import numpy as np

    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    if not np.isfinite(vectors).all() or not np.isfinite(norms).all() or (norms > 1e18).any():
        raise QueryError("feature vectors must hold finite numbers of a sensible size (each |value| well under 1e18)")
    return vectors


def _format_of(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.format or ""


class _HeadAsGet:
    """ASGI middleware: a HEAD request answered as its GET (status and headers, Content-Length
    included) without the body, as HTTP asks; uptime checkers and caches send HEAD."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def send_wrapper(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_wrapper)


class _SecurityHeaders:
    """ASGI middleware: ``X-Content-Type-Options: nosniff`` on every answer, CORS preflights included."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]
            await send(message)

        await self.app(scope, receive, send_wrapper)


class _Guard:
    """ASGI middleware: refuses bodies over the limit (413) or over the memory budget (429), counts and times requests."""

    def __init__(self, app, max_body: int, metrics: Metrics, budget: BodyBudget, body_timeout: float):
        self.app, self.max_body, self.metrics, self.budget = app, max_body, metrics, budget
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        state = {"status": 500, "started": False}
        method = scope["method"]
        headers = dict(scope.get("headers") or [])

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
            await send(message)

        async def refuse(status: int, error: str, detail: str, extra: list[tuple[bytes, bytes]] = ()):
            # Read and drop what the client is still sending (up to a bound), so it gets the answer
            # instead of a connection reset in the middle of its upload.
            drained, more = 0, True
            while more and drained < DRAIN_LIMIT:
                message = await receive()
                if message["type"] != "http.request":
                    break
                drained += len(message.get("body", b""))
                more = message.get("more_body", False)
            body = json.dumps({"error": error, "detail": detail}).encode()
            self.metrics.count("rejected_uploads" if status == 413 else "busy")
            await send_wrapper({"type": "http.response.start", "status": status, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"), *extra]})
            await send({"type": "http.response.body", "body": body})

        limit_text = f"request body is over the {self.max_body}-byte limit ({self.max_body // (1024 * 1024)} MiB)"
        busy_text = (f"the service holds as many request bodies as it will ({self.budget.limit // (1024 * 1024)} MiB "
                     "of uploads at once); retry shortly")
        retry = [(b"retry-after", b"1")]
        length = headers.get(b"content-length")
        try:
            declared = int(length) if length is not None else None
        except ValueError:
            declared = None
        received = reserved = 0
        body_done = method in ("GET", "HEAD", "OPTIONS") and declared is None

        async def receive_limited():
            # The budget counts bytes as they arrive, not as declared: a client that declares a large
            # body and sends nothing holds nothing; one that stops sending is let go after body_timeout.
            nonlocal received, reserved, body_done
            if body_done:  # the body is in: what follows is the wait for a disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                raise _BodyStalled() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_body:
                    raise _BodyTooLarge()
                if received > reserved:
                    if not self.budget.reserve(received - reserved):
                        raise _OverBudget()
                    reserved = received
            return message

        try:
            if declared is not None and declared > self.max_body:
                await refuse(413, "request too large", limit_text + f": it declares {declared} bytes")
            else:
                try:
                    await self.app(scope, receive_limited, send_wrapper)
                except _BodyStalled:
                    if state["started"]:
                        raise
                    body = json.dumps({"error": "request timeout", "detail": f"no part of the request body came "
                                       f"for {self.body_timeout:g} s; send it again"}).encode()
                    self.metrics.count("stalled_uploads")
                    await send_wrapper({"type": "http.response.start", "status": 408, "headers": [
                        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close")]})
                    await send({"type": "http.response.body", "body": body})
                except _BodyTooLarge:
                    if state["started"]:
                        raise
                    await refuse(413, "request too large", limit_text)
                except _OverBudget:
                    if state["started"]:
                        raise
                    await refuse(429, "too many requests", busy_text, retry)
        finally:
            self.budget.release(reserved)
            route = scope.get("route")
            template = getattr(route, "path", None) or "(unmatched)"
            self.metrics.observe(method, template, state["status"], time.perf_counter() - start)


class _BodyTooLarge(Exception):
    pass


class _OverBudget(Exception):
    pass


class _BodyStalled(Exception):
    pass


# --- running it -------------------------------------------------------------------------------


def app_from_env():
    """App factory for uvicorn's worker processes (`serve --workers N`): settings from the environment."""
    return create_app(ServerSettings(**json.loads(os.environ[SETTINGS_ENV])))


def _check_address(host: str, port: int) -> None:
    """LookalikeError unless ``host:port`` can be listened on now (an unknown address, a port in
    use): told before "serving ..." is printed, not by the web server afterwards."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server will
            probe.bind(address)
    except (OSError, OverflowError) as exc:
        raise LookalikeError(f"{host}:{port}: cannot listen there ({getattr(exc, 'strerror', None) or exc}); "
                             "choose another --host or --port", subject=f"{host}:{port}") from None


def serve(settings: ServerSettings, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, quiet: bool = False) -> None:
    """Run the service until interrupted (what `lookalike serve` does)."""
    import uvicorn
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s: %(message)s")
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    print(f"lookalike: changes over HTTP (POST/DELETE /items) are "
          f"{'on, with the API key' if settings.api_key else 'off: no API key given (--api-key-file)'}", flush=True)
    if settings.protect_reads:
        print("lookalike: reads need the API key too (--protect-reads); the web page's searches will fail", flush=True)
    if settings.cors_origins:
        print(f"lookalike: CORS allows {', '.join(settings.cors_origins)}", flush=True)
    level = "warning" if quiet else "info"
    _check_address(host, port)
    if workers == 1:
        app = create_app(settings)  # opens the index now: a bad one fails before the port is taken
        items = len(app.state.shared.vs)
        print(f"lookalike: serving {settings.index_dir} ({items} items) at http://{shown}:{port}/  (API docs: /docs)", flush=True)
        uvicorn.run(app, host=host, port=port, log_level=level, access_log=not quiet)
    else:
        with VisualSearch.open(settings.index_dir) as vs:  # fail early, in this process
            items, one_process, backend = len(vs), vs.one_process, vs.info()["backend"]
        if one_process:
            raise IndexError_(f"{settings.index_dir}: its index is in a Milvus Lite file ({backend['uri']}), which one "
                              "process at a time may open: serve it with --workers 1, or keep it in a Milvus server",
                              subject=str(settings.index_dir))
        os.environ[SETTINGS_ENV] = json.dumps(dataclasses.asdict(settings))
        print(f"lookalike: serving {settings.index_dir} ({items} items) with {workers} workers at "
              f"http://{shown}:{port}/  (API docs: /docs)", flush=True)
        uvicorn.run("lookalike.server.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=level, access_log=not quiet)
