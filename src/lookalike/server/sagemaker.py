"""The SageMaker k-NN inference formats of ``POST /invocations``: parse requests, write responses.

Requests (``Content-Type``), one feature vector per record:

    text/csv                one vector per line, comma-separated numbers
    application/json        {"instances": [{"features": [...]}, {"data": {"features": {"values": [...]}}}]}
    application/jsonlines   one {"features": [...]} or {"data": {"features": {"values": [...]}}} per line

Responses (``Accept``; ``verbose=true`` adds the k neighbours' ``labels`` and ``distances``):

    application/json        {"predictions": [{"predicted_label": ..., "ids": [...]}, ...]}
    application/jsonlines   one prediction object per line

Unlike the service it replaces, the neighbours come most similar first, and every prediction
also carries the neighbours' string ``ids`` so their metadata can be looked up. Pure functions:
no web framework and no index here.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import QueryError, one_line

REQUEST_TYPES = ("text/csv", "application/json", "application/jsonlines")
RESPONSE_TYPES = ("application/json", "application/jsonlines")
FLOAT32_MAX = float(np.finfo(np.float32).max)  # a larger feature would become infinity
MAX_RECORDS = 1000  # feature vectors one request may hold (SageMaker's 6 MB payloads hold about 500 of 1,280)


class UnsupportedMediaType(QueryError):
    """A Content-Type (415) or Accept (406) that /invocations does not speak."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class MediaType:
    """A parsed Content-Type or Accept value: ``application/json; verbose=true``."""

    type: str
    params: dict[str, str]

    @classmethod
    def parse(cls, header: str | None, default: str) -> "MediaType":
        text = (header or "").strip() or default
        kind, *rest = text.split(";")
        params = {}
        for part in rest:
            key, _, value = part.partition("=")
            if key.strip():
                params[key.strip().lower()] = value.strip().strip('"').lower()
        return cls(kind.strip().lower(), params)

    @property
    def verbose(self) -> bool:
        return self.params.get("verbose") in ("true", "1", "yes")


def parse_request(body: bytes, content_type: str | None, dim: int | None = None,
                  max_records: int = MAX_RECORDS) -> np.ndarray:
    """The request's feature vectors as float32 [n, d]; QueryError naming the first bad record
    (one of another length than ``dim``, where given) or saying there are over ``max_records``."""
    media = MediaType.parse(content_type, "application/json")
    if media.type not in REQUEST_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {media.type!r} is not supported by /invocations; use one of {', '.join(REQUEST_TYPES)}", 415
        )
    try:
        text = body.decode(media.params.get("charset", "utf-8"))
    except (UnicodeError, LookupError) as exc:  # UnicodeError: e.g. charset=undefined or idna
        charset = media.params.get("charset", "utf-8")
        raise QueryError(one_line(f"request body is not {charset} text ({exc})")) from None
    text = text.removeprefix("\ufeff")  # the byte-order mark a spreadsheet program writes first
    if media.type == "application/json":
        doc = _json(text, "request body")
        instances = doc.get("instances") if isinstance(doc, dict) else None
        if not isinstance(instances, list):
            raise QueryError('a JSON request must be an object with an "instances" list')
        records = [(f"instance {n}", r) for n, r in enumerate(instances, start=1)]
    else:  # lines read one at a time: a body of millions of short lines is refused at the limit
        records = []
        for n, line in enumerate(io.StringIO(text, newline=None), start=1):
            if line.strip():
                records.append((f"line {n}", line))
                if len(records) > max_records:
                    break
    if not records:
        raise QueryError("the request holds no feature vectors")
    if len(records) > max_records:
        raise QueryError(f"the request holds more than {max_records} feature vectors; send at most {max_records} a request")
    out = None
    for row, (where, record) in enumerate(records):
        if media.type == "text/csv":
            values = _csv_row(record, where)
        else:
            values = _record(_json(record, where) if media.type == "application/jsonlines" else record, where)
        expected = dim or (out.shape[1] if out is not None else len(values))
        if len(values) != expected:
            whose = "the index's vectors have" if dim else "the request's first vector has"
            raise QueryError(f"{where}: a vector of dimension {len(values)}, but {whose} dimension {expected}")
        if out is None:
            out = np.empty((len(records), expected), np.float32)
        out[row] = values
    return out


def _csv_row(line: str, where: str) -> list[float]:
    values = []
    for cell in line.split(","):
        cell = cell.strip()
        if len(cell) >= 2 and cell[0] == cell[-1] == '"':  # a quoted cell, as spreadsheets may write
            cell = cell[1:-1].strip()
        try:
            if "_" in cell:  # float() reads 1_0 as 10: not a number a CSV writer makes
                raise ValueError
            values.append(float(cell))
        except ValueError:
            raise QueryError(f"{where}: {cell[:40]!r} is not a number") from None
    return _finite(values, where)


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, or an integer over 4300 digits
        raise QueryError(f"{where}: not valid JSON ({exc})") from None


def _record(record: Any, where: str) -> list[float]:
    """The vector of one record: {"features": [...]} or {"data": {"features": {"values": [...]}}}."""
    values = None
    if isinstance(record, dict):
        if "features" in record:
            values = record["features"]
        elif isinstance(record.get("data"), dict) and isinstance(record["data"].get("features"), dict):
            values = record["data"]["features"].get("values")
    if not isinstance(values, list) or not values:
        raise QueryError(f'{where}: expected {{"features": [numbers]}} or {{"data": {{"features": {{"values": [numbers]}}}}}}')
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise QueryError(f"{where}: features must all be numbers")
    try:
        floats = [float(v) for v in values]
    except OverflowError:  # an integer beyond any float, e.g. 10**400
        raise _not_finite(where) from None
    return _finite(floats, where)


def _finite(values: list[float], where: str) -> list[float]:
    if not all(math.isfinite(v) and abs(v) <= FLOAT32_MAX for v in values):
        raise _not_finite(where)
    return values


def _not_finite(where: str) -> QueryError:
    return QueryError(f"{where}: features must be finite float32 numbers (no NaN or infinity, |x| <= 3.4e38)")


def response_type(accept: str | None) -> MediaType:
    """The response format an Accept header asks for (JSON when it names none we speak)."""
    for part in (accept or "").split(","):
        media = MediaType.parse(part, "application/json")
        if media.type in RESPONSE_TYPES:
            return media
        if media.type in ("*/*", "application/*", ""):
            return MediaType("application/json", media.params)
    raise UnsupportedMediaType(f"Accept {accept!r} is not supported by /invocations; use one of {', '.join(RESPONSE_TYPES)}", 406)


def prediction(label: Any, hits: list[dict[str, Any]], verbose: bool) -> dict[str, Any]:
    """One prediction: the voted label, the neighbours' ids, and with ``verbose`` their labels and distances."""
    out: dict[str, Any] = {"predicted_label": label}
    if verbose:
        out["labels"] = [h["metadata"].get("label") for h in hits]
        out["distances"] = [h["distance"] for h in hits]
    out["ids"] = [h["id"] for h in hits]
    return out


def write_response(predictions: list[dict[str, Any]], media: MediaType) -> tuple[bytes, str]:
    """The response body and its Content-Type."""
    if media.type == "application/jsonlines":
        body = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    else:
        body = json.dumps({"predictions": predictions}, ensure_ascii=False)
    content_type = media.type + ("; verbose=true" if media.verbose else "")
    return body.encode(), content_type
