"""The index directory on disk: manifest, items.sqlite, vectors, FAISS file; atomic saves.

    INDEX_DIR/
      lookalike.json     the manifest, and the commit point of every change
      items.sqlite       items(int_id, id, label, image, metadata JSON, added_gen, removed_gen); WAL
      vectors-<gen>.npy  float32 [count, dim] as indexed; row i <-> ids-<gen>.npy[i]
      ids-<gen>.npy      int64 int ids
      index-<gen>.faiss  the FAISS index (derived from the vectors: `lookalike doctor` rebuilds it);
                         absent when the manifest names another backend (a Milvus collection)
      uploads/           images sent to the service (POST /items), named by their content

A change writes the next generation's files (fsynced), commits the SQLite rows tagged with
that generation, then atomically replaces the manifest. SQLite rows carry the generation that
added them and the one that removed them, so a reader of generation G sees exactly G's items
even while a writer prepares G+1, and a writer that crashed before the manifest rename is undone
by the next writer (rows of generations past the manifest's are dropped or restored).

The manifest carries a checksum of its own contents, so an edited or damaged manifest is
detected on open; every file's size is checked on open and its sha256 by ``verify``/``diagnose``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .errors import IndexBusyError, StoreError
from .types import Item, fits_int64

FORMAT_VERSION = 1
MANIFEST = "lookalike.json"
ITEMS_DB = "items.sqlite"
LOCK = ".lock"
LOCK_TIMEOUT = 10.0
# Rows of removed items stay this many generations, so a reader that has not yet switched to the
# newest generation (a service checks once a second) still finds every item its index returns.
KEEP_REMOVED_ROWS = 1000
SQL_IN_CHUNK = 900  # values in one IN (...) list: under SQLite's older limit of 999 parameters
UPLOADS = "uploads"  # the folder of images sent to the service
# An uploaded image no item uses is deleted only this long after it was last kept: an add that
# stored it may still be featurizing it (outside the lock) before it commits its item.
UPLOAD_GRACE_S = 600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    int_id INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    label TEXT,
    image TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    added_gen INTEGER NOT NULL,
    removed_gen INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS items_live_id ON items(id) WHERE removed_gen IS NULL;
CREATE INDEX IF NOT EXISTS items_id ON items(id);
"""

# Local features for geometric verification, one row per item that has them (int ids are never
# reused, so a row lives and dies with its item's row). Indexes made before it lack the table.
_LOCAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS local_features (
    int_id INTEGER PRIMARY KEY,
    points BLOB NOT NULL,
    descriptors BLOB NOT NULL
);
"""

_VISIBLE = "added_gen <= :gen AND (removed_gen IS NULL OR removed_gen > :gen)"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> dict[str, Any]:
    """Write a file through ``write(fileobj)`` to a temp name, fsync, rename; return size+sha256."""
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _copy(source: Path, out) -> None:
    with open(source, "rb") as f:
        shutil.copyfileobj(f, out)


def _checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's contents without its own checksum field."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove_abandoned(target: Path) -> None:
    """Delete staging folders of builds of ``target`` whose process is gone (killed mid-build)."""
    for p in target.parent.glob(f".{glob.escape(target.name)}.building-*"):
        pid = p.name[len(f".{target.name}.building-"):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _disk_error(path: Path, exc: BaseException, what: str) -> StoreError:
    reason = getattr(exc, "strerror", None) or str(exc)
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(path).free
        if free < 64 * 1024 * 1024 and "No space" not in reason:
            reason += f"; the disk is full: {free} bytes free"
    return StoreError(f"{path}: cannot {what} ({reason}); the index is unchanged", subject=str(path))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class IndexDir:
    """Read, validate and change one index directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # --- reading -------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        """The validated manifest; StoreError naming the problem and the way out."""
        p = self.path
        if not p.exists():
            raise StoreError(f"{p}: index directory does not exist; build one with `lookalike build`", subject=str(p))
        if not p.is_dir():
            raise StoreError(f"{p}: is a file, not an index directory", subject=str(p))
        mpath = p / MANIFEST
        if not mpath.is_file():
            raise StoreError(
                f"{p}: not a lookalike index (no {MANIFEST}); build one with `lookalike build`", subject=str(p)
            )
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"{mpath}: manifest is unreadable ({exc}); rebuild with `lookalike build`", subject=str(p)) from exc
        if not isinstance(manifest, dict):
            raise StoreError(f"{mpath}: manifest is not a JSON object; rebuild with `lookalike build`", subject=str(p))
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{p}: index is format {version}, this lookalike reads format {FORMAT_VERSION}; "
                "rebuild with `lookalike build`",
                subject=str(p),
            )
        for key in ("model", "metric", "index", "count", "generation", "files"):
            if key not in manifest:
                raise StoreError(f"{mpath}: manifest has no {key!r}; rebuild with `lookalike build`", subject=str(p))
        if "checksum" not in manifest:
            raise StoreError(f"{mpath}: manifest has no checksum, so it was edited or not written by lookalike; "
                             "restore it or rebuild with `lookalike build`", subject=str(p))
        if manifest["checksum"] != _checksum(manifest):
            raise StoreError(
                f"{mpath}: manifest was edited or damaged (its checksum does not match its contents); "
                "restore it or rebuild with `lookalike build`",
                subject=str(p),
            )
        return manifest

    def stamp(self) -> tuple[Any, Any] | None:
        """(generation, build_id) as the manifest on disk says now, unchecked; None if unreadable:
        what tells a check that a change was committed while it ran."""
        try:
            manifest = json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
            return manifest.get("generation"), manifest.get("build_id")
        except (OSError, ValueError, AttributeError):
            return None

    def load(self, check_faiss: bool = True) -> tuple[dict[str, Any], np.ndarray, np.ndarray, Path]:
        """(manifest, vectors, ids, faiss path) of the current generation, checked.

        Retries when a writer replaces the generation between reading the manifest and its files.
        ``check_faiss=False`` skips the FAISS file's checks (for ``doctor``, which rebuilds it).
        """
        for attempt in range(5):
            manifest = self.manifest()
            try:
                return self._load_generation(manifest, check_faiss)
            except FileNotFoundError:
                if self.manifest()["generation"] == manifest["generation"] or attempt == 4:
                    missing = [n for n in manifest["files"] if not (self.path / n).exists()]
                    raise StoreError(
                        f"{self.path}: index is damaged, missing {', '.join(missing) or 'files'}; "
                        "rebuild with `lookalike build`",
                        subject=str(self.path),
                    ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _load_generation(self, manifest, check_faiss: bool = True):
        gen = manifest["generation"]
        files = manifest["files"]
        dim = int(manifest["model"]["dim"])
        count = int(manifest["count"])
        names = {"vectors": f"vectors-{gen}.npy", "ids": f"ids-{gen}.npy", "faiss": f"index-{gen}.faiss"}
        for role in ("vectors", "ids"):
            path = self.path / names[role]
            if not path.exists():
                raise FileNotFoundError(path)
            expected = files.get(names[role], {}).get("size")
            if expected is not None and path.stat().st_size != expected:
                raise StoreError(
                    f"{path}: size {path.stat().st_size} differs from the manifest's {expected}; "
                    "rebuild with `lookalike build`",
                    subject=str(self.path),
                )
        try:
            vectors = np.load(self.path / names["vectors"], mmap_mode="r", allow_pickle=False)
            ids = np.load(self.path / names["ids"], allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise StoreError(f"{self.path}: vectors or ids unreadable ({exc}); rebuild with `lookalike build`") from exc
        if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[1] != dim:
            raise StoreError(
                f"{self.path}: vectors have shape {vectors.shape}, the manifest says dimension {dim}; "
                "rebuild with `lookalike build`",
                subject=str(self.path),
            )
        if len(vectors) != count or len(ids) != count:
            raise StoreError(
                f"{self.path}: manifest counts {count} items but vectors hold {len(vectors)} and ids {len(ids)}; "
                "rebuild with `lookalike build`",
                subject=str(self.path),
            )
        db_count = self.count_items(gen)
        if db_count != count:
            raise StoreError(
                f"{self.path}: manifest counts {count} items but {ITEMS_DB} holds {db_count}; "
                "rebuild with `lookalike build`",
                subject=str(self.path),
            )
        faiss_path = self.path / names["faiss"]
        expected = files.get(names["faiss"], {}).get("size")
        if manifest["index"].get("backend"):  # the index is elsewhere (a Milvus collection): no FAISS file
            check_faiss = False
        if check_faiss and (not faiss_path.exists() or expected is not None and faiss_path.stat().st_size != expected):
            what = "is missing" if not faiss_path.exists() else f"has size {faiss_path.stat().st_size}, the manifest says {expected}"
            raise StoreError(
                f"{faiss_path}: FAISS file {what}; `lookalike doctor {self.path}` rebuilds it from the stored vectors",
                subject=str(faiss_path),
            )
        return manifest, np.ascontiguousarray(vectors), ids, faiss_path

    # --- SQLite --------------------------------------------------------------------------

    def connect(self, readonly: bool = True) -> sqlite3.Connection:
        db = self.path / ITEMS_DB
        if not db.is_file():
            raise StoreError(f"{self.path}: index is damaged, {ITEMS_DB} is missing; rebuild with `lookalike build`")
        try:
            uri = f"file:{db}?mode={'ro' if readonly else 'rw'}"
            conn = sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)
            conn.execute("SELECT 1 FROM items LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{db}: not a readable items database ({exc}); rebuild with `lookalike build`") from exc
        return conn

    def count_items(self, gen: int) -> int:
        with contextlib.closing(self.connect()) as conn:
            try:
                return conn.execute(f"SELECT COUNT(*) FROM items WHERE {_VISIBLE}", {"gen": gen}).fetchone()[0]
            except sqlite3.DatabaseError as exc:
                raise StoreError(
                    f"{self.path / ITEMS_DB}: items database is damaged ({exc}); rebuild with `lookalike build`",
                    subject=str(self.path / ITEMS_DB),
                ) from exc

    # --- writing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """Hold the index's write lock; IndexBusyError if another process keeps it too long.

        The lock is a file in the directory, so a directory that ``create`` replaced (``build
        --force``, which holds the old one's lock for the swap) while this waited is locked again:
        the lock held is always the live directory's."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:  # a read-only or foreign directory: the index can be searched, not changed
                raise StoreError(f"{self.path}: cannot change the index here ({exc.strerror or exc}); "
                                 "copy it somewhere writable to change it", subject=str(self.path)) from exc
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise IndexBusyError(
                                f"{self.path}: index is being changed by another process; try again when it is done",
                                subject=str(self.path),
                            ) from None
                        time.sleep(0.05)
                held = os.fstat(fd)
                try:
                    live = os.stat(self.path / LOCK)
                    current = (live.st_dev, live.st_ino) == (held.st_dev, held.st_ino)
                except FileNotFoundError:
                    current = False
            except BaseException:
                os.close(fd)
                raise
            if current:
                break
            os.close(fd)  # the directory was replaced meanwhile: lock the new one
        try:
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @staticmethod
    def create(
        path: str | os.PathLike,
        manifest: dict[str, Any],
        items: list[tuple[int, Item]],
        vectors: np.ndarray,
        ids: np.ndarray,
        write_faiss,
        *,
        overwrite: bool = False,
        local: dict[int, tuple[bytes, bytes]] | None = None,
        model_files: dict[str, Path] | None = None,
    ) -> "IndexDir":
        """Write a new index directory (generation 1) beside the target, then move it into place.

        ``local``: int id -> (points, descriptors) blobs of the items' local features, if any.
        ``model_files``: name -> file copied into the directory, never changed afterwards (an int8
        index's own model); the manifest's ``model`` entry records its hash.
        """
        target = Path(path)
        if target.exists():
            if not target.is_dir():
                raise StoreError(f"{target}: exists and is a file", subject=str(target))
            is_index = (target / MANIFEST).exists()
            if any(target.iterdir()) and not (is_index and overwrite):
                what = "an index" if is_index else "a folder that is not empty"
                hint = "; pass --force to replace it" if is_index else ""
                raise StoreError(f"{target}: already exists and is {what}{hint}", subject=str(target))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _remove_abandoned(target)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-{os.getpid()}-", dir=target.parent))
        except OSError as exc:
            raise StoreError(f"{target.parent}: cannot create the index there ({exc.strerror or exc})", subject=str(target)) from exc
        try:
            new = IndexDir(staging)
            conn = sqlite3.connect(staging / ITEMS_DB)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA + _LOCAL_SCHEMA)
            conn.close()
            for name, source in (model_files or {}).items():
                _write_atomic(staging / name, lambda f, source=source: _copy(source, f))
            # build_id: which build this is, so that a process reading the index it replaces notices
            # (generations start again at 1 in a rebuilt index)
            manifest = dict(manifest, format_version=FORMAT_VERSION, generation=0, count=0, files={},
                            build_id=uuid.uuid4().hex)
            manifest.setdefault("created_at", now())
            new._commit(manifest, vectors, ids, write_faiss, added=items, removed=[], local=local)
            _fsync_dir(staging)
            if target.exists():
                # One atomic swap where the file system has it, so a crash leaves the old or the new index;
                # under the old index's lock, so that no change of it is half made into the new one (a
                # writer waiting for that lock then locks the new directory: see ``lock``).
                with IndexDir(target).lock() if (target / MANIFEST).exists() else contextlib.nullcontext():
                    if not _exchange(staging, target):
                        old = target.with_name(f".{target.name}.building-{os.getpid()}-old")
                        os.rename(target, old)
                        os.rename(staging, target)
                        staging = old
            else:
                os.rename(staging, target)
            _fsync_dir(target.parent)
        except (OSError, sqlite3.OperationalError, RuntimeError) as exc:
            raise StoreError(f"{target}: cannot write the index ({getattr(exc, 'strerror', None) or exc})", subject=str(target)) from exc
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return IndexDir(target)

    def commit(
        self,
        manifest: dict[str, Any],
        vectors: np.ndarray,
        ids: np.ndarray,
        write_faiss,
        *,
        added: list[tuple[int, Item]],
        removed: Iterable[int],
        local: dict[int, tuple[bytes, bytes]] | None = None,
    ) -> dict[str, Any]:
        """Make the next generation: call under ``lock()`` with the manifest read under it.

        ``local``: int id -> (points, descriptors) blobs of the added items' local features.
        """
        self.repair(manifest["generation"])
        return self._commit(manifest, vectors, ids, write_faiss, added=added, removed=list(removed), local=local)

    def _commit(self, manifest, vectors, ids, write_faiss, *, added, removed, local=None) -> dict[str, Any]:
        gen = int(manifest["generation"]) + 1
        try:
            new_manifest = self._write_generation(manifest, gen, vectors, ids, write_faiss, added, removed, local or {})
        except (OSError, sqlite3.OperationalError, RuntimeError) as exc:  # disk full, I/O error, read-only
            self._discard(gen)
            raise _disk_error(self.path, exc, f"write generation {gen}") from exc
        # Committed: what follows only tidies up, and may fail without harm.
        with contextlib.suppress(OSError):
            _fsync_dir(self.path)
        with contextlib.suppress(OSError, sqlite3.Error):
            self._cleanup(gen)
        return new_manifest

    def _write_generation(self, manifest, gen, vectors, ids, write_faiss, added, removed, local) -> dict[str, Any]:
        files = {
            f"vectors-{gen}.npy": _write_atomic(self.path / f"vectors-{gen}.npy", lambda f: np.save(f, vectors)),
            f"ids-{gen}.npy": _write_atomic(self.path / f"ids-{gen}.npy", lambda f: np.save(f, ids)),
        }
        if write_faiss is not None:  # None: the index is kept elsewhere (``backends``)
            faiss_path = self.path / f"index-{gen}.faiss"
            tmp = self.path / f".index-{gen}.faiss.tmp"
            write_faiss(str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, faiss_path)
            files[faiss_path.name] = {"size": faiss_path.stat().st_size, "sha256": _sha256(faiss_path)}

        conn = sqlite3.connect(self.path / ITEMS_DB, timeout=30)
        try:
            with conn:
                conn.executemany(
                    "INSERT INTO items(int_id, id, label, image, metadata, added_gen) VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (int(i), it.id, it.label, it.image, json.dumps(it.metadata, ensure_ascii=False, default=str), gen)
                        for i, it in added
                    ],
                )
                conn.executemany(
                    "UPDATE items SET removed_gen = ? WHERE int_id = ? AND removed_gen IS NULL",
                    [(gen, int(i)) for i in removed],
                )
                if local:
                    conn.execute(_LOCAL_SCHEMA)  # an index made before the table existed (same transaction)
                    conn.executemany(
                        "INSERT OR REPLACE INTO local_features(int_id, points, descriptors) VALUES (?, ?, ?)",
                        [(int(i), p, d) for i, (p, d) in local.items()],
                    )
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"{self.path}: {ITEMS_DB} refused the change ({exc})") from exc
        finally:
            conn.close()

        new_manifest = dict(manifest, generation=gen, count=int(len(ids)), files=files, updated_at=now())
        self.write_manifest(new_manifest)
        return new_manifest

    def write_manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Seal the manifest with its checksum and replace ``lookalike.json`` atomically (the commit point)."""
        manifest = dict(manifest, checksum=None)
        manifest["checksum"] = _checksum(manifest)
        data = json.dumps(manifest, indent=2, sort_keys=False).encode("utf-8") + b"\n"
        fd, tmp = tempfile.mkstemp(prefix="." + MANIFEST + ".", suffix=".tmp", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / MANIFEST)  # nothing that can fail comes after this
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return manifest

    def _discard(self, gen: int) -> None:
        """Delete the files of generation ``gen`` that a failed change left (its SQLite rows are undone by ``repair``)."""
        for name in (f"vectors-{gen}.npy", f"ids-{gen}.npy", f"index-{gen}.faiss", f".index-{gen}.faiss.tmp"):
            with contextlib.suppress(OSError):
                (self.path / name).unlink()
        with contextlib.suppress(OSError, sqlite3.Error):
            self.repair(gen - 1)

    def repair(self, gen: int) -> None:
        """Undo SQLite rows of a change that crashed before its manifest was committed."""
        conn = sqlite3.connect(self.path / ITEMS_DB, timeout=30)
        try:
            with conn:
                if _has_local_table(conn):
                    conn.execute("DELETE FROM local_features WHERE int_id IN (SELECT int_id FROM items WHERE added_gen > ?)", (gen,))
                conn.execute("DELETE FROM items WHERE added_gen > ?", (gen,))
                conn.execute("UPDATE items SET removed_gen = NULL WHERE removed_gen > ?", (gen,))
        finally:
            conn.close()

    def _cleanup(self, gen: int) -> None:
        """Delete other generations' files and rows removed before the previous generation."""
        keep = {f"vectors-{gen}.npy", f"ids-{gen}.npy", f"index-{gen}.faiss"}
        for p in self.path.iterdir():
            stale_gen = p.name.startswith(("vectors-", "ids-", "index-")) and p.name not in keep
            stale_tmp = p.name.startswith(".") and p.name.endswith(".tmp")
            if stale_gen or stale_tmp:
                with contextlib.suppress(OSError):
                    p.unlink()
        conn = sqlite3.connect(self.path / ITEMS_DB, timeout=30)
        try:
            with conn:  # readers still on an older generation look these rows up: keep recent ones
                old = (gen - KEEP_REMOVED_ROWS,)
                if _has_local_table(conn):
                    conn.execute("DELETE FROM local_features WHERE int_id IN "
                                 "(SELECT int_id FROM items WHERE removed_gen IS NOT NULL AND removed_gen < ?)", old)
                conn.execute("DELETE FROM items WHERE removed_gen IS NOT NULL AND removed_gen < ?", old)
        finally:
            conn.close()

    def diagnose(self) -> list[dict[str, Any]]:
        """Every problem found by a full check: [{"file", "problem", "fixable"}] (empty if none).

        ``fixable`` marks the problems ``doctor`` can repair: only the FAISS file's, which is
        derived from the stored vectors. Reads every file in full.
        """
        try:
            manifest = self.manifest()
        except StoreError as exc:
            return [{"file": MANIFEST, "problem": str(exc), "fixable": False}]
        problems = []
        gen = manifest["generation"]
        for name, info in manifest["files"].items():
            path = self.path / name
            fixable = name == f"index-{gen}.faiss"
            try:  # a file may also go while it is read (a writer's commit tidying up): missing too
                size = path.stat().st_size
                if size != info.get("size"):
                    problems.append({"file": name, "problem": f"size {size}, the manifest says {info.get('size')}", "fixable": fixable})
                elif _sha256(path) != info.get("sha256"):
                    problems.append({"file": name, "problem": "contents differ from the manifest's sha256", "fixable": fixable})
            except FileNotFoundError:
                problems.append({"file": name, "problem": "missing", "fixable": fixable})
        model_file = manifest["model"].get("model_file")
        if model_file:
            path = self.path / model_file["name"]
            if not path.is_file():
                problems.append({"file": model_file["name"], "problem": "missing", "fixable": False})
            elif _sha256(path) != model_file.get("sha256"):
                problems.append({"file": model_file["name"], "problem": "contents differ from the manifest's sha256", "fixable": False})
        db = self.path / ITEMS_DB
        try:
            with contextlib.closing(self.connect()) as conn:
                result = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
                bad = [r[0] for r in conn.execute("SELECT id FROM items WHERE NOT json_valid(metadata) LIMIT 4")] \
                    if result == ["ok"] else []
            count = self.count_items(gen) if result == ["ok"] else None
            if result != ["ok"]:
                problems.append({"file": ITEMS_DB, "problem": "; ".join(result[:3]), "fixable": False})
            elif count != manifest["count"]:
                problems.append({"file": ITEMS_DB, "problem": f"holds {count} items, the manifest says {manifest['count']}", "fixable": False})
            elif bad:
                shown = ", ".join(repr(i) for i in bad[:3]) + (" and more" if len(bad) > 3 else "")
                problems.append({"file": ITEMS_DB, "problem": f"the metadata of {shown} is not valid JSON", "fixable": False})
        except (StoreError, sqlite3.DatabaseError) as exc:
            problems.append({"file": ITEMS_DB, "problem": str(exc).replace(f"{db}: ", ""), "fixable": False})
        if not any(p["file"].startswith(("vectors-", "ids-")) or p["file"] == ITEMS_DB for p in problems):
            try:
                self.load(check_faiss=False)
            except StoreError as exc:
                problems.append({"file": f"vectors-{gen}.npy", "problem": str(exc), "fixable": False})
        return problems

    def replace_faiss(self, manifest: dict[str, Any], write_faiss) -> dict[str, Any]:
        """Rewrite the current generation's FAISS file (call under ``lock()``); the manifest records it."""
        gen = manifest["generation"]
        path = self.path / f"index-{gen}.faiss"
        tmp = self.path / f".index-{gen}.faiss.tmp"
        try:
            write_faiss(str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            files = dict(manifest["files"], **{path.name: {"size": path.stat().st_size, "sha256": _sha256(path)}})
            return self.write_manifest(dict(manifest, files=files))
        except (OSError, RuntimeError) as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _disk_error(path, exc, "write the rebuilt FAISS file") from exc

    def verify(self) -> list[str]:
        """Problems found by checking every file's sha256 against the manifest (empty if none)."""
        manifest = self.manifest()
        problems = []
        for name, info in manifest["files"].items():
            path = self.path / name
            if not path.exists():
                problems.append(f"{name} is missing")
            elif _sha256(path) != info.get("sha256"):
                problems.append(f"{name} does not match its sha256")
        return problems

    def keep_upload(self, data: bytes, suffix: str) -> Path:
        """Store an image sent to the service in ``uploads/`` under a name made of its content,
        and return its absolute path (the image of an item about to be added). Under the writers'
        lock, as ``sweep_uploads`` is: a file already there is kept and its time renewed, so a
        sweep never deletes the image of an add in flight, in this process or another."""
        folder = self.path.absolute() / UPLOADS
        path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}{suffix}"
        with self.lock():
            try:
                folder.mkdir(exist_ok=True)
                if path.exists():
                    os.utime(path)
                else:
                    _write_atomic(path, lambda f: f.write(data))
            except OSError as exc:
                raise _disk_error(self.path, exc, "store the uploaded image") from exc
        return path

    def sweep_uploads(self, grace_s: float = UPLOAD_GRACE_S) -> int:
        """Delete the uploaded images no item of the index uses, kept longer than ``grace_s``
        ago; how many."""
        folder = self.path / UPLOADS
        if not folder.is_dir():
            return 0
        deleted = 0
        with self.lock():
            conn = self.connect()
            try:
                used = {os.path.basename(image) for (image,) in conn.execute(
                    "SELECT image FROM items WHERE removed_gen IS NULL AND image LIKE ?", (f"%{UPLOADS}%",))}
            finally:
                conn.close()
            old = time.time() - grace_s
            for path in folder.iterdir():
                with contextlib.suppress(OSError):
                    if path.name not in used and path.stat().st_mtime < old:
                        path.unlink()
                        deleted += 1
        return deleted

    def disk_size(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())


class ItemTable:
    """Read-only queries on items.sqlite for one generation: lookups by int id, id, and filter."""

    def __init__(self, index_dir: IndexDir, gen: int):
        self.conn = index_dir.connect(readonly=True)
        self.gen = gen
        self.path = index_dir.path / ITEMS_DB

    def _metadata(self, text: str, id_: str) -> dict:
        """An item's stored metadata; StoreError naming it when the text is not JSON (edited outside lookalike)."""
        try:
            return json.loads(text)
        except (TypeError, json.JSONDecodeError):
            raise StoreError(f"{self.path}: the metadata of item {id_!r} is not valid JSON (edited outside lookalike?); "
                             "`lookalike doctor` lists such items; rebuild the index or correct them",
                             subject=str(self.path)) from None

    def close(self) -> None:
        self.conn.close()

    def rows(self, int_ids: Iterable[int]) -> dict[int, tuple[str, str | None, str | None, dict]]:
        """int_id -> (id, label, image, metadata) for the given int ids, in one query."""
        wanted = sorted({int(i) for i in int_ids})
        out = {}
        for marks, chunk in _in_chunks(wanted):
            for int_id, id_, label, image, metadata in self.conn.execute(
                f"SELECT int_id, id, label, image, metadata FROM items WHERE int_id IN ({marks})", chunk
            ):
                out[int_id] = (id_, label, image, self._metadata(metadata, id_))
        return out

    def int_ids(self, ids: Iterable[str]) -> dict[str, int]:
        """id -> int_id for those of ``ids`` that are in this generation."""
        wanted = list(dict.fromkeys(str(i) for i in ids))
        out = {}
        for marks, chunk in _in_chunks(wanted):
            for id_, int_id in self.conn.execute(
                f"SELECT id, int_id FROM items WHERE id IN ({marks}) AND {_VISIBLE.replace(':gen', '?')}",
                [*chunk, self.gen, self.gen],
            ):
                out[id_] = int_id
        return out

    def matching(self, where: dict[str, Any]) -> np.ndarray:
        """int ids whose metadata equals ``where`` (a list value means any of its values)."""
        clauses, params = [], []
        for key, value in where.items():
            path = '$."' + str(key).replace('"', '""') + '"'
            values = value if isinstance(value, (list, tuple, set)) else [value]
            if not values:
                return np.zeros(0, np.int64)
            marks = ",".join("?" * len(values))
            # A key a JSON path cannot quote (a double quote, a backslash, a control character) is
            # looked up among the row's own keys instead.
            if any(c in '"\\' or ord(c) < 0x20 for c in str(key)):
                clauses.append(f"EXISTS (SELECT 1 FROM json_each(items.metadata) AS e WHERE e.key = ? AND e.value IN ({marks}))")
                params.extend([str(key), *[_sql_value(v) for v in values]])
                continue
            clauses.append(f"json_extract(metadata, ?) IN ({marks})")
            params.extend([path, *[_sql_value(v) for v in values]])
        sql = f"SELECT int_id FROM items WHERE {_VISIBLE.replace(':gen', '?')}"
        params = [self.gen, self.gen, *params]
        if clauses:
            sql += " AND " + " AND ".join(clauses)
        return np.fromiter((r[0] for r in self.conn.execute(sql, params)), dtype=np.int64)

    def all_rows(self) -> list[tuple[int, str, str | None, str | None, dict]]:
        cur = self.conn.execute(
            f"SELECT int_id, id, label, image, metadata FROM items WHERE {_VISIBLE.replace(':gen', '?')} ORDER BY int_id",
            (self.gen, self.gen),
        )
        return [(i, id_, label, image, self._metadata(m, id_)) for i, id_, label, image, m in cur]

    def local_features(self, int_ids: Iterable[int]) -> dict[int, tuple[bytes, bytes]]:
        """int_id -> (points, descriptors) blobs, for those of ``int_ids`` that have local features."""
        if not _has_local_table(self.conn):
            return {}
        wanted = sorted({int(i) for i in int_ids})
        out = {}
        for marks, chunk in _in_chunks(wanted):
            for int_id, points, descriptors in self.conn.execute(
                f"SELECT int_id, points, descriptors FROM local_features WHERE int_id IN ({marks})", chunk
            ):
                out[int_id] = (points, descriptors)
        return out

    def local_descriptor_count(self, int_ids: Iterable[int]) -> int:
        """How many local descriptors (128 bytes each) these items hold, read without loading them."""
        if not _has_local_table(self.conn):
            return 0
        wanted = sorted({int(i) for i in int_ids})
        total = 0
        for marks, chunk in _in_chunks(wanted):
            row = self.conn.execute(
                f"SELECT SUM(length(descriptors)) FROM local_features WHERE int_id IN ({marks})", chunk).fetchone()
            total += int(row[0] or 0)
        return total // 128

    def max_int_id(self) -> int:
        row = self.conn.execute("SELECT MAX(int_id) FROM items").fetchone()
        return int(row[0]) if row and row[0] is not None else 0


def _in_chunks(values: list) -> Iterator[tuple[str, list]]:
    """``values`` in slices SQLite takes as one ``IN (...)`` list: (the "?,?,..." marks, the slice)."""
    for start in range(0, len(values), SQL_IN_CHUNK):
        chunk = values[start:start + SQL_IN_CHUNK]
        yield ",".join("?" * len(chunk)), chunk


def _has_local_table(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'local_features'").fetchone() is not None


def _sql_value(v: Any) -> Any:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int) and not fits_int64(v):
        return float(v)  # SQLite's integers are 64-bit; json_extract reads such numbers as reals
    if isinstance(v, (int, float, str)) or v is None:
        return v
    return json.dumps(v)
