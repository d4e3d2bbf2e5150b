"""The HTTP service: FastAPI routes over one VisualSearch — search, /invocations, items, health, metrics, the page.

Every route goes through the same ``VisualSearch`` as the CLI and the Python API. Inference runs
in worker threads, never on the event loop. Searches share the index under a read lock; changes
(``POST /items``, ``DELETE /items/{id}``) and the switch to a generation that another process
committed take the write lock, so a search sees the index before or after a change, never a mix.
Every error is JSON ``{"error": ..., "detail": ...}`` with a 4xx code; a 500 is a bug.
"""

from __future__ import annotations

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
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine import VisualSearch, vote
from ..errors import (
    CatalogError,
    ImageCorruptError,
    ImageError,
    ImageFetchError,
    ImageFormatError,
    ImageNotFoundError,
    ImageTooLargeError,
    IndexBusyError,
    LookalikeError,
    ModelError,
    QueryError,
    StoreError,
)
from ..images import ImagePolicy, is_url, load_image
from ..types import Item, SearchResult
from . import sagemaker
from .metrics import Metrics

log = logging.getLogger("lookalike.server")

STATIC = Path(__file__).parent / "static"
UPLOADS = "uploads"  # folder in the index directory for images added by upload
DRAIN_LIMIT = 256 * 1024 * 1024  # bytes of a refused upload read and dropped before answering 413
SETTINGS_ENV = "LOOKALIKE_SERVE_SETTINGS"  # how `serve --workers N` hands the settings to each worker
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; script-src 'self'; "
    "style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


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
    refresh_seconds: float = 1.0  # how often to look for a generation committed by another process
    thumbnail_cache: int = 512
    api_key: str | None = None  # required as "Authorization: Bearer <key>" by the routes that change the index

    def __repr__(self) -> str:  # never show the key
        return f"ServerSettings(index_dir={self.index_dir!r}, api_key={'set' if self.api_key else None})"

    def policy(self) -> ImagePolicy:
        return ImagePolicy(
            max_pixels=self.max_pixels, max_bytes=self.max_upload_bytes, allow_urls=self.allow_urls, allow_private_urls=False
        )


# --- errors ------------------------------------------------------------------------------


class HTTPError(LookalikeError):
    """An error the service answers with a given status (404, 409, 413, 415 ...)."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.error = error


# (type, status, short error) — the first matching type wins, so subclasses come first.
_STATUS: list[tuple[type, int, str]] = [
    (ImageTooLargeError, 422, "image too large"),
    (ImageCorruptError, 422, "corrupt image"),
    (ImageFormatError, 415, "unsupported image type"),
    (ImageFetchError, 400, "image URL refused or unreachable"),
    (ImageNotFoundError, 400, "image not found"),
    (ImageError, 422, "unusable image"),
    (sagemaker.UnsupportedMediaType, 415, "unsupported media type"),
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
        self.vs = VisualSearch.open(settings.index_dir, device=settings.device, policy=settings.policy())
        self.lock = ReadWriteLock()
        self.compute = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))  # model calls at once
        self._checked = time.monotonic()
        self._refresh_lock = threading.Lock()
        self._thumbs: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()
        # Load the model now and run it once, so the first query is as fast as the others.
        self.vs.featurizer.featurize([_blank(self.vs.spec.input_size)], strict=True)

    def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.settings.refresh_seconds or not self._refresh_lock.acquire(blocking=False):
            return
        try:
            self._checked = now
            if self.vs.stale():
                with self.lock.write():
                    if self.vs.refresh():
                        log.info("switched to generation %s (%s items)", self.vs.generation, len(self.vs))
        finally:
            self._refresh_lock.release()

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


def _blank(size: int):
    from PIL import Image

    return Image.new("RGB", (size, size), (128, 128, 128))


def _hit_dict(hit) -> dict[str, Any]:
    return {**hit.to_dict(), "image_url": image_url(hit.id)}


def image_url(item_id: str) -> str:
    return f"/items/{quote(item_id, safe='')}/image"


def _item_dict(item: Item) -> dict[str, Any]:
    return {"id": item.id, "label": item.label, "metadata": item.metadata, "image_url": image_url(item.id)}


# --- request parsing ----------------------------------------------------------------------


def _int_param(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise QueryError(f"{name} must be a whole number from {low} to {high}, got {str(value)[:40]!r}")
    return number


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
            value = json.loads(value)
        except json.JSONDecodeError:
            raise QueryError('filter must be a JSON object such as {"colour": "Black"}') from None
    if not isinstance(value, dict):
        raise QueryError('filter must be a JSON object such as {"colour": "Black"}')
    scalar = (str, int, float, bool, type(None))
    for key, v in value.items():
        if not (isinstance(v, scalar) or isinstance(v, list) and all(isinstance(x, scalar) for x in v)):
            raise QueryError(f"filter value of {key!r} must be a string, number, or a list of them")
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


def _json_queries(body: dict[str, Any], allow_urls: bool) -> list[Query]:
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
    return queries


# --- the app --------------------------------------------------------------------------------


def create_app(settings: ServerSettings):
    """The FastAPI application serving the index at ``settings.index_dir`` (opened now)."""
    shared = SharedIndex(settings)
    metrics = Metrics()
    policy = settings.policy()
    app = FastAPI(
        title="lookalike",
        version=__version__,
        description="Visual search: send a picture of a thing, get the catalog items that look most like it.",
    )
    app.state.shared = shared

    def error_response(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(LookalikeError)
    async def _lookalike_error(request: Request, exc: LookalikeError):
        status, error = error_status(exc)
        if isinstance(exc, HTTPError) and exc.status == 413:
            metrics.count("rejected_uploads")
        return error_response(status, error, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path"))
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return error_response(422, "invalid request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        phrase = {404: "not found", 405: "method not allowed", 400: "bad request"}.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return error_response(exc.status_code, phrase, detail, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # a 500 is a bug: log it, answer in our shape
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error", f"{type(exc).__name__}: {exc}")

    app.add_middleware(_Guard, max_body=settings.max_upload_bytes, metrics=metrics)

    def require_key(request: Request) -> None:
        """Write routes: the API key must be given; with none configured they are off."""
        if not settings.api_key:
            raise HTTPError(403, "writes disabled", "this service was started without an API key, so the routes that "
                            "change the index are off; start it with --api-key-file PATH or LOOKALIKE_API_KEY set")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.api_key.encode()):
            metrics.count("unauthorized")
            raise HTTPError(401, "unauthorized", "this route changes the index: send the API key as 'Authorization: Bearer <key>'")

    # --- search ---------------------------------------------------------------------------

    async def read_queries(request: Request) -> tuple[list[Query], dict[str, Any]]:
        """The request's queries and its parameters (k, min_score, filter) from form or JSON fields."""
        params: dict[str, Any] = dict(request.query_params)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            form = await request.form(max_files=settings.max_files, max_fields=100)
            queries = []
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    queries.append(Query(value.filename or f"upload {len(queries) + 1}", data=await value.read()))
                elif key in ("k", "min_score", "filter"):
                    params[key] = value
                elif key == "image_url":
                    queries.append(Query(value, url=_url_param(value, "image_url", settings.allow_urls)))
            await form.close()
            if not queries:
                raise QueryError("the form holds no image: send one or more files in a field named 'file'")
            return queries, params
        if ctype in ("application/json", ""):
            raw = await request.body()
            if not raw.strip():
                raise QueryError('send a multipart upload ("file"), or JSON with "image_url", "image_base64" or "vector"')
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                raise QueryError("request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise QueryError("request body must be a JSON object")
            params.update({key: body[key] for key in ("k", "min_score", "filter") if key in body})
            return _json_queries(body, settings.allow_urls), params
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            return [Query("<body>", data=await request.body())], params
        raise sagemaker.UnsupportedMediaType(
            f"Content-Type {ctype!r} is not accepted by /search: send multipart/form-data, application/json or the image bytes", 415
        )

    def run_search(queries: list[Query], k: int, filter: dict | None, min_score: float | None) -> list[dict[str, Any]]:
        with shared.reading() as vs:
            inputs = []
            for q in queries:
                if q.vector is not None:
                    inputs.append(q.vector)
                elif q.url is not None:
                    inputs.append(load_image(q.url, policy=policy, draft_size=vs.spec.resize_size))
                else:
                    inputs.append(load_image(q.data, policy=policy, draft_size=vs.spec.resize_size, name=q.name))
            with shared.compute:
                results: list[SearchResult] = vs.search(inputs, k=k, filter=filter, min_score=min_score)
        return [{"query": q.name, "hits": [_hit_dict(h) for h in r.hits]} for q, r in zip(queries, results)]

    @app.post(
        "/search",
        summary="Search by image (upload, URL, base64) or by feature vector",
        openapi_extra={"requestBody": {"content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
            "application/json": {"schema": {"type": "object", "properties": {
                "image_url": {"type": "string"}, "image_base64": {"type": "string"},
                "vector": {"type": "array", "items": {"type": "number"}},
                "k": {"type": "integer"}, "min_score": {"type": "number"}, "filter": {"type": "object"}}}},
        }}},
    )
    async def search(request: Request, k: int | None = None, min_score: float | None = None, filter: str | None = None):
        """The most similar catalog items of each query image, most similar first.

        Parameters (query string, form fields or JSON keys): ``k`` hits per query, ``min_score``
        (hits below it are dropped: no match is an empty list), ``filter`` (JSON object of
        metadata equalities; a list value means any of).
        """
        start = time.perf_counter()
        queries, params = await read_queries(request)
        k_ = _int_param(params.get("k", settings.k), "k", 1, settings.max_k)
        min_score_ = _float_param(params["min_score"], "min_score") if params.get("min_score") not in (None, "") else None
        filter_ = _filter_param(params.get("filter"))
        results = await run_in_threadpool(run_search, queries, k_, filter_, min_score_)
        return {"results": results, "took_ms": round((time.perf_counter() - start) * 1000, 2)}

    # --- SageMaker k-NN -------------------------------------------------------------------

    @app.post(
        "/invocations",
        summary="SageMaker k-NN inference (text/csv, application/json, application/jsonlines)",
        openapi_extra={"requestBody": {"content": {
            "text/csv": {"schema": {"type": "string"}},
            "application/json": {"schema": {"type": "object"}},
            "application/jsonlines": {"schema": {"type": "string"}},
        }}},
    )
    async def invocations(request: Request, k: int | None = None):
        """Feature vectors in, the voted label of each one's k nearest neighbours out.

        ``Accept: application/json; verbose=true`` adds each neighbour's ``labels`` and ``distances``,
        most similar first; every prediction carries the neighbours' ``ids``.
        """
        media = sagemaker.response_type(request.headers.get("accept"))
        vectors = sagemaker.parse_request(await request.body(), request.headers.get("content-type"))
        k_ = _int_param(k if k is not None else settings.k, "k", 1, settings.max_k)

        def run() -> list[dict[str, Any]]:
            with shared.reading() as vs:
                results = vs.search(list(vectors), k=k_)
            results = [results] if isinstance(results, SearchResult) else results
            return [sagemaker.prediction(vote(r)["label"], [h.to_dict() for h in r.hits], media.verbose) for r in results]

        body, content_type = sagemaker.write_response(await run_in_threadpool(run), media)
        return Response(body, media_type=content_type)

    # --- items ------------------------------------------------------------------------------

    def find(item_id: str) -> tuple[Item, int]:
        with shared.reading() as vs:
            item = vs.get(item_id)
            generation = vs.generation
        if item is None:
            raise HTTPError(404, "not found", f"no item with id {item_id!r}")
        return item, generation

    @app.get("/items/{item_id:path}/image", summary="The catalog image of an item, as a JPEG thumbnail")
    async def item_image(item_id: str, size: int = 256):
        if not 16 <= size <= 1024:
            raise QueryError(f"size must be from 16 to 1024 pixels, got {size}")
        item, generation = await run_in_threadpool(find, item_id)
        if is_url(item.image):
            return RedirectResponse(item.image, status_code=307)
        try:
            data = await run_in_threadpool(shared.thumbnail, item, generation, size)
        except ImageError as exc:
            raise HTTPError(404, "image not available", str(exc)) from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=300"})

    @app.get("/items/{item_id:path}", summary="An item's id, label and metadata")
    async def get_item(item_id: str):
        item, _ = await run_in_threadpool(find, item_id)
        return _item_dict(item)

    @app.post(
        "/items",
        status_code=201,
        summary="Add an item: an uploaded image or an image URL, with id, label and metadata",
        openapi_extra={"requestBody": {"content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "string", "format": "binary"}, "image_url": {"type": "string"},
                "id": {"type": "string"}, "label": {"type": "string"}, "metadata": {"type": "string"}}}},
            "application/json": {"schema": {"type": "object", "properties": {
                "id": {"type": "string"}, "image_url": {"type": "string"}, "image_base64": {"type": "string"},
                "label": {"type": "string"}, "metadata": {"type": "object"}}}},
        }}},
    )
    async def add_item(request: Request):
        """Featurize one image and add it to the index (committed to disk before the answer). Needs the API key."""
        require_key(request)
        fields, data, url = await read_item(request)
        return await run_in_threadpool(add_one, fields, data, url)

    async def read_item(request: Request) -> tuple[dict[str, Any], bytes | None, str | None]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        fields: dict[str, Any] = {}
        data = url = None
        if ctype == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=100)
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    data = await value.read()
                elif key == "metadata":
                    try:
                        fields["metadata"] = json.loads(value)
                    except json.JSONDecodeError:
                        raise QueryError("metadata must be a JSON object") from None
                elif key == "image_url":
                    url = _url_param(value, "image_url", settings.allow_urls)
                else:
                    fields[key] = value
            await form.close()
        elif ctype in ("application/json", ""):
            try:
                fields = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                raise QueryError("request body is not valid JSON") from None
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
        item_id = str(fields.get("id") or digest[:16]).strip()
        if not item_id or len(item_id) > 500:
            raise QueryError("id must be 1 to 500 characters")
        label = fields.get("label")
        metadata = dict(fields.get("metadata") or {})
        for key, value in fields.items():  # other plain fields are metadata too, as in a catalog row
            if key not in ("id", "label", "metadata") and isinstance(value, (str, int, float, bool)):
                metadata.setdefault(key, value)
        if label is not None:
            metadata.setdefault("label", str(label))
        written = new_file = None
        with shared.writing() as vs:
            if vs.get(item_id) is not None:
                raise HTTPError(409, "already exists", f"an item with id {item_id!r} is already in the index; delete it first")
            if data is not None:
                folder = vs.path / UPLOADS
                folder.mkdir(exist_ok=True)
                written = folder / f"{digest[:32]}{suffix}"
                new_file = not written.exists()
                if new_file:
                    tmp = written.with_suffix(".tmp")
                    tmp.write_bytes(data)
                    os.replace(tmp, written)
                image = str(written)
            else:
                image = url
            item = Item(id=item_id, image=image, label=str(label) if label is not None else None, metadata=metadata, row="request")
            try:
                with shared.compute:
                    vs.add([item], strict=True)
            except LookalikeError:
                if new_file:
                    written.unlink(missing_ok=True)
                raise
            return {**_item_dict(vs.get(item_id)), "generation": vs.generation, "items": len(vs)}

    @app.delete("/items/{item_id:path}", summary="Remove an item")
    async def delete_item(item_id: str, request: Request):
        """Remove an item from the index. Needs the API key."""
        require_key(request)
        def run():
            with shared.writing() as vs:
                if vs.get(item_id) is None:
                    raise HTTPError(404, "not found", f"no item with id {item_id!r}")
                vs.remove([item_id])
                return {"removed": item_id, "generation": vs.generation, "items": len(vs)}

        return await run_in_threadpool(run)

    # --- health, metrics, the page ------------------------------------------------------------

    @app.get("/livez", summary="The process is up")
    async def livez():
        return {"status": "ok"}

    @app.get("/readyz", summary="The index is loaded and can be searched")
    async def readyz():
        def run():
            with shared.reading() as vs:
                return {"ready": True, "items": len(vs), "generation": vs.generation, "model": vs.spec.name,
                        "metric": vs.metric, "dim": vs.dim}

        return await run_in_threadpool(run)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus():
        def gauges():
            with shared.reading() as vs:
                return {
                    "index_items": (len(vs), "Items in the served index."),
                    "index_generation": (vs.generation, "Generation of the served index."),
                    "index_dimension": (vs.dim, "Length of the feature vectors."),
                    "index_disk_bytes": (vs.info()["size_bytes"], "Size of the index directory on disk."),
                }

        text = metrics.render(await run_in_threadpool(gauges))
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page():
        if not (STATIC / "index.html").is_file():
            raise HTTPError(404, "not found", "the web page is not installed with this copy of lookalike")
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP})

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _format_of(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.format or ""


class _Guard:
    """ASGI middleware: refuses bodies over the limit (413), counts requests and times them per route."""

    def __init__(self, app, max_body: int, metrics: Metrics):
        self.app, self.max_body, self.metrics = app, max_body, metrics

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
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-content-type-options", b"nosniff")]
            await send(message)

        async def refuse(detail: str):
            # Read and drop what the client is still sending (up to a bound), so it gets the answer
            # instead of a connection reset in the middle of its upload.
            drained, more = 0, True
            while more and drained < DRAIN_LIMIT:
                message = await receive()
                if message["type"] != "http.request":
                    break
                drained += len(message.get("body", b""))
                more = message.get("more_body", False)
            body = json.dumps({"error": "request too large", "detail": detail}).encode()
            self.metrics.count("rejected_uploads")
            await send_wrapper({"type": "http.response.start", "status": 413, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})

        limit_text = f"request body is over the {self.max_body}-byte limit ({self.max_body // (1024 * 1024)} MiB)"
        length = headers.get(b"content-length")
        try:
            declared = int(length) if length is not None else None
        except ValueError:
            declared = None
        received = 0

        async def receive_limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge()
            return message

        try:
            if declared is not None and declared > self.max_body:
                await refuse(limit_text + f": it declares {declared} bytes")
            else:
                try:
                    await self.app(scope, receive_limited, send_wrapper)
                except _BodyTooLarge:
                    if state["started"]:
                        raise
                    await refuse(limit_text)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "(unmatched)"
            self.metrics.observe(method, template, state["status"], time.perf_counter() - start)


class _BodyTooLarge(Exception):
    pass


# --- running it -------------------------------------------------------------------------------


def app_from_env():
    """App factory for uvicorn's worker processes (`serve --workers N`): settings from the environment."""
    return create_app(ServerSettings(**json.loads(os.environ[SETTINGS_ENV])))


def serve(settings: ServerSettings, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, quiet: bool = False) -> None:
    """Run the service until interrupted (what `lookalike serve` does)."""
    import uvicorn
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s: %(message)s")
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    print(f"lookalike: changes over HTTP (POST/DELETE /items) are "
          f"{'on, with the API key' if settings.api_key else 'off: no API key given (--api-key-file)'}", flush=True)
    level = "warning" if quiet else "info"
    if workers == 1:
        app = create_app(settings)  # opens the index now: a bad one fails before the port is taken
        items = len(app.state.shared.vs)
        print(f"lookalike: serving {settings.index_dir} ({items} items) at http://{shown}:{port}/  (API docs: /docs)", flush=True)
        uvicorn.run(app, host=host, port=port, log_level=level, access_log=not quiet)
    else:
        with VisualSearch.open(settings.index_dir) as vs:  # fail early, in this process
            items = len(vs)
        os.environ[SETTINGS_ENV] = json.dumps(dataclasses.asdict(settings))
        print(f"lookalike: serving {settings.index_dir} ({items} items) with {workers} workers at "
              f"http://{shown}:{port}/  (API docs: /docs)", flush=True)
        uvicorn.run("lookalike.server.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=level, access_log=not quiet)
