"""A build's featurized vectors, saved in shards as it goes, so a killed build can resume.

    <parent of OUTPUT>/.<OUTPUT name>.lookalike-build/
      build.json          what the build is: a fingerprint of the catalog and of every option that
                          changes a vector, and the runtime and precision that featurize
      shard-<n>.npz       the vectors of items [n*SHARD_ITEMS, (n+1)*SHARD_ITEMS) of the catalog,
                          which of them were read, why the others were skipped, and each image
                          file's size and modification time (a shard whose files changed since
                          is featurized again: an image fixed or replaced before --resume)
      model-int8.onnx     an int8 build's calibrated model (a resumed build runs the same one)

Every file is written whole and renamed into place, so a kill leaves whole shards only. Shard
boundaries are fixed multiples of SHARD_ITEMS from the start of the catalog, and batches never
cross them, so a resumed build featurizes every image in the same batch as an uninterrupted one
and the vectors are the same. The folder goes once the index is written.
"""

from __future__ import annotations

import contextlib
import fcntl
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


def _hold(path: Path) -> int | None:
    """An exclusive lock of the file at ``path`` (made if need be): its descriptor, or None when
    another process holds it. The file may be unlinked by its last holder, so the lock got must be
    on the file that is at ``path`` now."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # the output's folder may not exist yet
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"{path.parent}: cannot write there ({exc.strerror or exc})", subject=str(path.parent)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            held, live = os.fstat(fd), os.stat(path)
            if (held.st_dev, held.st_ino) == (live.st_dev, live.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def file_stamps(items: list[Item]) -> np.ndarray:
    """int64 [n, 2]: each image file's size and modification time in ns; -1s for a URL or a file
    that cannot be read (what makes a saved shard stale when an image changes)."""
    out = np.full((len(items), 2), -1, np.int64)
    for row, item in enumerate(items):
        if "://" in item.image:
            continue
        try:
            st = os.stat(item.image)
        except (OSError, ValueError):
            continue
        out[row] = st.st_size, st.st_mtime_ns
    return out


class BuildCheckpoint:
    """The shards of one build of ``output``."""

    def __init__(self, output: str | os.PathLike):
        output = Path(output).absolute()
        self.output = output
        self.path = output.parent / f".{output.name}.lookalike-build"
        self._lock_path = output.parent / f".{output.name}.lookalike-build.lock"
        self._lock: int | None = None

    def start(self, fingerprint: str, resume: bool) -> dict[str, Any]:
        """Begin (or, with ``resume``, go on with) the build; return its build.json. Holds the
        build's lock until ``release``: a second build of the same output meanwhile is refused
        (it would have dropped this one's shards).

        Without ``resume`` any earlier shards are dropped. With it, the shards must be of the same
        catalog and options (same fingerprint): a StoreError says what to do otherwise."""
        self._lock = _hold(self._lock_path)
        if self._lock is None:
            raise StoreError(f"{self.output}: another build of it is running now; let it finish (or stop it) "
                             "before building it again", subject=str(self.output))
        try:
            return self._start(fingerprint, resume)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let another build of the same output begin (the lock file goes while still held)."""
        if self._lock is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._lock_path)
            os.close(self._lock)
            self._lock = None

    def _start(self, fingerprint: str, resume: bool) -> dict[str, Any]:
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

    def save(self, number: int, vectors: np.ndarray, ok: list[int], skipped: list[tuple[int, str]],
             stamps: np.ndarray) -> None:
        """Shard ``number``: ``vectors`` of the items at catalog positions ``ok``, the (position,
        reason) of the items skipped, and the ``file_stamps`` of all its items' images."""
        buf = io.BytesIO()
        np.savez(buf, vectors=np.asarray(vectors, np.float32), ok=np.asarray(ok, np.int64),
                 skipped=np.array(json.dumps(skipped)), stamps=np.asarray(stamps, np.int64))
        try:
            self._write(self.path / f"shard-{number:06d}.npz", buf.getvalue())
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot write shard {number} ({exc.strerror or exc})", subject=str(self.path)) from exc

    def load(self, number: int, stamps: np.ndarray) -> tuple[np.ndarray, list[int], list[tuple[int, str]]] | None:
        """Shard ``number`` as saved, or None if it cannot be read or its images' ``stamps`` are
        not those it was made from (its items are featurized again)."""
        try:
            with np.load(self.path / f"shard-{number:06d}.npz", allow_pickle=False) as shard:
                if not np.array_equal(shard["stamps"], stamps):
                    return None
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
