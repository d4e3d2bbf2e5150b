"""A build's featurized vectors, saved in shards as it goes, so a killed build can resume.

    <parent of OUTPUT>/.<OUTPUT name>.lookalike-build/
      build.json          what the build is: a fingerprint of the catalog and of every option that
                          changes a vector, and the runtime and precision that featurize
      shard-<n>.npz       the vectors of items [n*SHARD_ITEMS, (n+1)*SHARD_ITEMS) of the catalog,
                          which of them were read, and why the others were skipped
      model-int8.onnx     an int8 build's calibrated model (a resumed build runs the same one)

Every file is written whole and renamed into place, so a kill leaves whole shards only. Shard
boundaries are fixed multiples of SHARD_ITEMS from the start of the catalog, and batches never
cross them, so a resumed build featurizes every image in the same batch as an uninterrupted one
and the vectors are the same. The folder goes once the index is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StoreError
from .types import Item

SHARD_ITEMS = 1024  # items a shard (a multiple of every usual batch size)


def fingerprint(items: list[Item], options: dict[str, Any]) -> str:
    """sha256 of the catalog's items (id, image, in order) and the options that make vectors."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for item in items:
        h.update(f"{len(item.id)}:{item.id}{len(item.image)}:{item.image}".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


class BuildCheckpoint:
    """The shards of one build of ``output``."""

    def __init__(self, output: str | os.PathLike):
        output = Path(output).absolute()
        self.output = output
        self.path = output.parent / f".{output.name}.lookalike-build"

    def start(self, fingerprint: str, resume: bool) -> dict[str, Any]:
        """Begin (or, with ``resume``, go on with) the build; return its build.json.

        Without ``resume`` any earlier shards are dropped. With it, the shards must be of the same
        catalog and options (same fingerprint): a StoreError says what to do otherwise."""
        meta_path = self.path / "build.json"
        if resume:
            if not meta_path.exists():
                raise StoreError(f"{self.output}: no interrupted build to resume (no {self.path.name} beside it); "
                                 "build without --resume", subject=str(self.output))
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError) as exc:
                raise StoreError(f"{meta_path}: unreadable ({exc}); build without --resume", subject=str(meta_path)) from exc
            if meta.get("fingerprint") != fingerprint or meta.get("shard_items") != SHARD_ITEMS:
                raise StoreError(f"{self.output}: the interrupted build was of another catalog or other options; "
                                 "build without --resume to start again", subject=str(self.output))
            return meta
        self.discard()
        try:
            self.path.mkdir(parents=True)
            meta = {"fingerprint": fingerprint, "shard_items": SHARD_ITEMS}
            self._write(meta_path, json.dumps(meta).encode())
        except OSError as exc:
            self.discard()
            raise StoreError(f"{self.path}: cannot write the build's shards ({exc.strerror or exc})",
                             subject=str(self.path)) from exc
        return meta

    def update(self, meta: dict[str, Any], **values: Any) -> None:
        """Record more of what the build is (the runtime and precision chosen, ...) in build.json."""
        meta.update(values)
        try:
            self._write(self.path / "build.json", json.dumps(meta).encode())
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot write build.json ({exc.strerror or exc})", subject=str(self.path)) from exc

    def done(self) -> list[int]:
        """Numbers of the shards already written."""
        return sorted(int(p.stem.split("-")[1]) for p in self.path.glob("shard-*.npz"))

    def save(self, number: int, vectors: np.ndarray, ok: list[int], skipped: list[tuple[int, str]]) -> None:
        """Shard ``number``: ``vectors`` of the items at catalog positions ``ok``, and the
        (position, reason) of the items skipped."""
        buf = io.BytesIO()
        np.savez(buf, vectors=np.asarray(vectors, np.float32), ok=np.asarray(ok, np.int64),
                 skipped=np.array(json.dumps(skipped)))
        try:
            self._write(self.path / f"shard-{number:06d}.npz", buf.getvalue())
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot write shard {number} ({exc.strerror or exc})", subject=str(self.path)) from exc

    def load(self, number: int) -> tuple[np.ndarray, list[int], list[tuple[int, str]]] | None:
        """Shard ``number`` as saved, or None if it cannot be read (its items are featurized again)."""
        try:
            with np.load(self.path / f"shard-{number:06d}.npz", allow_pickle=False) as shard:
                skipped = [(int(i), str(r)) for i, r in json.loads(str(shard["skipped"]))]
                return shard["vectors"], shard["ok"].tolist(), skipped
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None

    def model_file(self, name: str) -> Path:
        return self.path / name

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
