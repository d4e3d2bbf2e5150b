"""Read a catalog (folder, CSV, JSONL, Parquet or "title, image_url" text) into Items.

Formats:
- a folder of images: the first-level sub-folder is the ``label``; the id is the path relative
  to the folder without its suffix (``mugs/blue-01``; the file stem for files at the top);
- ``.csv`` / ``.jsonl`` / ``.parquet``: one item per row, an ``image`` column (a path relative to
  the manifest, an absolute path, or an http(s) URL), optional ``id`` and ``label``; every other
  column is kept as metadata;
- ``.txt``: the plain format of older tools, one ``title, image_url`` per line, split on the
  first comma.

Ids are strings; without an ``id`` column an item's id is its image's file stem. Two items with
one id are a CatalogError naming both rows.
"""

from __future__ import annotations

import csv
import json
import math
import os
import urllib.parse
from pathlib import Path
from typing import Any, Iterable

from .errors import CatalogError, one_line
from .images import IMAGE_SUFFIXES, is_url
from .types import Item

# Metadata nested deeper than this is refused: no catalog needs it, and a bound known in advance
# keeps the recursive cleaning below far from Python's recursion limit, whatever the caller's depth.
MAX_NESTING = 32

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet", ".txt")


def read_catalog(path: str | os.PathLike) -> list[Item]:
    """Return the catalog's items in order; raise CatalogError when it cannot be used."""
    root = Path(path)
    if not root.exists():
        raise CatalogError(f"{root}: catalog does not exist", subject=str(root))
    if root.is_dir():
        items = _read_folder(root)
    else:
        suffix = root.suffix.lower()
        if suffix == ".csv":
            items = _items_from_rows(_csv_rows(root), root)
        elif suffix in (".jsonl", ".ndjson"):
            items = _items_from_rows(_jsonl_rows(root), root)
        elif suffix == ".parquet":
            items = _items_from_rows(_parquet_rows(root), root)
        elif suffix == ".txt":
            items = _items_from_rows(_text_rows(root), root)
        else:
            raise CatalogError(
                f"{root}: unknown catalog format {suffix or '(no suffix)'}; "
                "use a folder of images, .csv, .jsonl, .parquet or a 'title, image_url' .txt",
                subject=str(root),
            )
    if not items:
        raise CatalogError(f"{root}: catalog holds no items", subject=str(root))
    check_unique(items)
    return items


def check_unique(items: Iterable[Item]) -> None:
    """Raise CatalogError if two items share an id, naming both rows."""
    seen: dict[str, Item] = {}
    for item in items:
        first = seen.get(item.id)
        if first is not None:
            raise CatalogError(f"duplicate id {item.id!r}: {first.row} and {item.row}", subject=item.id)
        seen[item.id] = item


def _read_folder(root: Path) -> list[Item]:
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            file = Path(dirpath) / name
            rel = file.relative_to(root)
            label = rel.parts[0] if len(rel.parts) > 1 else None
            item_id = rel.with_suffix("").as_posix()
            metadata = {"label": label} if label is not None else {}
            items.append(Item(id=item_id, image=str(file.resolve()), label=label, metadata=metadata, row=str(file)))
    return items


def _csv_rows(path: Path):
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                return
            _require_image_column(reader.fieldnames, path)
            for line, row in enumerate(reader, start=2):
                if None in row:
                    raise CatalogError(f"{path}:{line}: more fields than the header has", subject=str(path))
                yield f"{path}:{line}", {k: v for k, v in row.items() if v is not None}
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not UTF-8 text ({exc.reason})", subject=str(path)) from exc
    except csv.Error as exc:
        raise CatalogError(f"{path}: malformed CSV ({exc})", subject=str(path)) from exc


def _jsonl_rows(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CatalogError(f"{path}:{line_no}: not valid JSON ({exc.msg})", subject=str(path)) from exc
                except (ValueError, RecursionError) as exc:  # an integer over 4300 digits; nesting too deep
                    raise CatalogError(f"{path}:{line_no}: not valid JSON ({one_line(exc)})", subject=str(path)) from exc
                if not isinstance(row, dict):
                    raise CatalogError(f"{path}:{line_no}: each line must be a JSON object", subject=str(path))
                if "\\u" in line and not _is_unicode(row):  # "\ud800": valid JSON, not valid text
                    raise CatalogError(
                        f"{path}:{line_no}: a string holds an unpaired surrogate escape (not valid Unicode)", subject=str(path)
                    )
                _require_image_column(row.keys(), path, f"{path}:{line_no}")
                yield f"{path}:{line_no}", row
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not UTF-8 text ({exc.reason})", subject=str(path)) from exc


def _parquet_rows(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is a dependency
        raise CatalogError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)", subject=str(path)) from exc
    try:
        table = pq.read_table(path)
        columns = table.column_names  # UnicodeDecodeError for a name that is not UTF-8
    except Exception as exc:  # pyarrow raises many types for a bad file
        raise CatalogError(f"{path}: not a readable Parquet file ({one_line(exc)})", subject=str(path)) from exc
    _require_image_column(columns, path)
    try:
        rows = table.to_pylist()
    except (ValueError, ArithmeticError) as exc:  # e.g. a date past year 9999, invalid UTF-8
        raise CatalogError(f"{path}: holds a value that cannot be read ({one_line(exc)})", subject=str(path)) from exc
    for i, row in enumerate(rows, start=1):
        yield f"{path}:row {i}", row


def _text_rows(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                title, sep, url = line.partition(",")
                if not sep or not url.strip():
                    raise CatalogError(f"{path}:{line_no}: expected 'title, image_url'", subject=str(path))
                yield f"{path}:{line_no}", {"title": title.strip(), "image": url.strip()}
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not UTF-8 text ({exc.reason})", subject=str(path)) from exc


def _require_image_column(columns, path: Path, where: str | None = None) -> None:
    if "image" not in columns:
        have = one_line(", ".join(map(str, columns))) or "none"
        raise CatalogError(f"{where or path}: no 'image' column (columns: {have})", subject=str(path))


def _items_from_rows(rows, manifest: Path) -> list[Item]:
    base = manifest.resolve().parent
    items = []
    for where, row in rows:
        image = row.get("image")
        if image is None or (isinstance(image, str) and not image.strip()):
            raise CatalogError(f"{where}: empty 'image'", subject=where)
        if isinstance(image, (dict, list, tuple, bool)):
            raise CatalogError(f"{where}: 'image' must be a path or URL, not a {type(image).__name__}", subject=where)
        if _too_deep(row):
            raise CatalogError(f"{where}: values nested more than {MAX_NESTING} levels deep", subject=where)
        image = str(image).strip()
        if "\x00" in image:
            raise CatalogError(f"{where}: 'image' holds a NUL character", subject=where)
        if is_url(image):
            try:
                urllib.parse.urlsplit(image)
            except ValueError as exc:  # e.g. "http://[abc/x.jpg": Invalid IPv6 URL
                raise CatalogError(f"{where}: 'image' is not a valid URL ({one_line(exc)})", subject=where) from exc
        else:
            image = str((base / image).resolve()) if not os.path.isabs(image) else image
        item_id = row.get("id")
        if item_id is None or str(item_id).strip() == "":
            item_id = _stem(image)
        item_id = str(_clean(item_id)).strip()
        metadata = {k: _clean(v) for k, v in row.items() if k not in ("id", "image")}
        label = metadata.get("label")
        items.append(
            Item(id=item_id, image=image, label=None if label is None else str(label), metadata=metadata, row=where)
        )
    return items


def _is_unicode(value: Any) -> bool:
    """False if a string anywhere in ``value`` (keys included) holds a lone surrogate."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    except (ValueError, RecursionError):  # too deep to check here: _clean raises a CatalogError
        return True
    return True


def _stem(image: str) -> str:
    if is_url(image):
        path = urllib.parse.urlsplit(image).path
        stem = Path(urllib.parse.unquote(path)).stem
        return stem or image
    return Path(image).stem


def _too_deep(row: dict) -> bool:
    """True if lists and dicts in ``row`` nest deeper than MAX_NESTING (checked without recursion)."""
    level = [row]  # the containers at depth 0, 1, ... (the row's own values are at depth 1)
    for _ in range(MAX_NESTING + 1):
        level = [
            child
            for value in level
            for child in (value.values() if isinstance(value, dict) else value)
            if isinstance(child, (dict, list, tuple))
        ]
        if not level:
            return False
    return True


def _clean(value: Any) -> Any:
    """Make a metadata value JSON-friendly: numpy/pyarrow scalars to Python, NaN to None."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (AttributeError, ValueError):
            pass
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value
