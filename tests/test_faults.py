"""Faults on disk: damaged index files are named on open, `doctor` repairs what it can, a full disk loses nothing."""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SAMPLE, write_csv
from lookalike import StoreError, VisualSearch

QUERY = SAMPLE / "queries" / "jeans-18193.jpg"


def cli(*args: str, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lookalike.cli", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=preexec_fn)


def top5(index: Path) -> list[str]:
    with VisualSearch.open(index) as vs:
        return [h.id for h in vs.search(QUERY, k=5).hits]


def faiss_file(index: Path) -> Path:
    return next(index.glob("index-*.faiss"))


# --- damage is found on open, naming the file ---------------------------------------------------


def test_truncated_faiss_file_is_named_and_doctor_rebuilds_it(sample_copy):
    expected = top5(sample_copy)
    f = faiss_file(sample_copy)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(StoreError, match=rf"{f.name}: FAISS file has size \d+, the manifest says \d+; `lookalike doctor"):
        VisualSearch.open(sample_copy)
    check = cli("doctor", sample_copy, "--check-only")
    assert check.returncode == 2 and f"problem: {f.name}: size" in check.stdout and "doctor can rebuild it" in check.stdout
    fixed = cli("doctor", sample_copy, "--json")
    report = json.loads(fixed.stdout)
    assert fixed.returncode == 0 and report["ok"] and report["repaired"] == [f"rebuilt {f.name} from the 300 stored vectors"]
    assert top5(sample_copy) == expected
    again = cli("doctor", sample_copy)
    assert again.returncode == 0 and "every file checks out" in again.stdout


def test_faiss_file_of_the_right_size_but_garbage_is_named(sample_copy):
    expected = top5(sample_copy)
    f = faiss_file(sample_copy)
    f.write_bytes(os.urandom(f.stat().st_size))
    with pytest.raises(StoreError, match=rf"{f.name}: FAISS cannot read it.*lookalike doctor"):
        VisualSearch.open(sample_copy)
    assert cli("doctor", sample_copy).returncode == 0
    assert top5(sample_copy) == expected


def test_garbage_in_items_sqlite_is_named_and_doctor_says_rebuild(sample_copy):
    db = sample_copy / "items.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(db.read_bytes())
    data[0:16] = b"not sqlite at al"  # the header
    db.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="items.sqlite: not a readable items database"):
        VisualSearch.open(sample_copy)
    r = cli("doctor", sample_copy)
    assert r.returncode == 2 and "problem: items.sqlite" in r.stdout and "rebuild it with `lookalike build`" in r.stderr
    assert "problem: vectors-" not in r.stdout  # the one broken file is named once, as itself


def test_damaged_pages_in_items_sqlite_are_found(sample_copy):
    db = sample_copy / "items.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = conn.execute("PRAGMA page_size").fetchone()[0]
    data = bytearray(db.read_bytes())
    for offset in range(page * 2, len(data), page):  # scribble over every page after the first two
        data[offset + 8: offset + 200] = os.urandom(192)
    db.write_bytes(bytes(data))
    r = cli("search", sample_copy, QUERY)
    assert r.returncode == 2 and "items.sqlite" in r.stderr and "Traceback" not in r.stderr
    doctor = cli("doctor", sample_copy, "--json")
    assert doctor.returncode == 2
    assert any(p["file"] == "items.sqlite" for p in json.loads(doctor.stdout)["problems"])


def test_metadata_edited_into_bad_json_is_named_not_a_crash(sample_copy):
    with sqlite3.connect(sample_copy / "items.sqlite") as conn:
        conn.execute("UPDATE items SET metadata = '{bad json' WHERE id = (SELECT id FROM items ORDER BY int_id LIMIT 1)")
        broken = conn.execute("SELECT id FROM items ORDER BY int_id LIMIT 1").fetchone()[0]
    r = cli("search", sample_copy, QUERY, "-k", "300")
    assert r.returncode == 2 and f"the metadata of item {broken!r} is not valid JSON" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    doctor = cli("doctor", sample_copy, "--json")
    assert doctor.returncode == 2
    assert {"file": "items.sqlite", "problem": f"the metadata of {broken!r} is not valid JSON", "fixable": False} \
        in json.loads(doctor.stdout)["problems"]


def test_edited_manifest_is_detected(sample_copy):
    path = sample_copy / "lookalike.json"
    manifest = json.loads(path.read_text())
    manifest["metric"] = "l2"  # a plausible edit that would silently change every score
    path.write_text(json.dumps(manifest, indent=2))
    r = cli("info", sample_copy)
    assert r.returncode == 2 and "lookalike.json: manifest was edited or damaged" in r.stderr
    assert cli("doctor", sample_copy).returncode == 2


def test_vectors_that_no_longer_match_their_hash_are_reported(sample_copy):
    v = next(sample_copy.glob("vectors-*.npy"))
    data = bytearray(v.read_bytes())
    data[-100:] = bytes(100)  # same size, different contents: only a full check sees it
    v.write_bytes(bytes(data))
    report = json.loads(cli("doctor", sample_copy, "--json").stdout)
    assert not report["ok"] and report["problems"][0]["file"] == v.name and not report["problems"][0]["fixable"]


# --- a full disk ------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 10 MiB (where mounting is allowed), else None: the test limits file size instead."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    yield mnt if ok else None
    if ok:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _snapshot(index: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(index.iterdir())
            if p.is_file() and not p.name.startswith("items.sqlite") and p.name != ".lock"}


def test_add_on_a_full_disk_fails_clearly_and_leaves_the_index_as_it_was(sample_index, small_disk, tmp_path):
    new = write_csv(tmp_path / "new.csv", ["id", "image"], [[f"n{i}", str(SAMPLE / "queries" / "jeans-18193.jpg")] for i in range(3)])
    if small_disk is not None:  # a real ENOSPC: the next generation does not fit beside this one
        index = small_disk / "index"
        import shutil

        shutil.copytree(sample_index, index)
        filler = small_disk / "filler"
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler.write_bytes(b"\0" * max(0, free - 600_000))
        limit = None
    else:  # no mount here: a file-size limit gives EFBIG the same way
        import shutil

        index = tmp_path / "index"
        shutil.copytree(sample_index, index)
        limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, 500_000))  # noqa: E731
    before, ids_before = _snapshot(index), set(top5(index))
    r = cli("add", index, new, preexec_fn=limit)
    assert r.returncode == 2, r.stderr
    assert "cannot write generation" in r.stderr and "the index is unchanged" in r.stderr
    if small_disk is not None:
        assert any(why in r.stderr for why in ("No space left on device", "the disk is full")), r.stderr
    assert _snapshot(index) == before, "no file of the index changed, and no half-written one is left"
    with VisualSearch.open(index) as vs:
        assert len(vs) == 300 and set(h.id for h in vs.search(QUERY, k=5).hits) == ids_before
        assert vs.get("n0") is None
    if small_disk is not None:
        filler.unlink()  # with room again, the same add works
        assert cli("add", index, new).returncode == 0
        with VisualSearch.open(index) as vs:
            assert len(vs) == 303


def test_build_on_a_full_disk_fails_clearly_and_leaves_nothing(small_disk, tmp_path):
    where = small_disk if small_disk is not None else tmp_path
    limit = None if small_disk is not None else (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)))
    if small_disk is not None:
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        (small_disk / "filler").write_bytes(b"\0" * max(0, free - 400_000))
    r = cli("build", SAMPLE / "catalog.csv", "-o", where / "index", "-q", preexec_fn=limit)
    assert r.returncode == 2 and "cannot" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (where / "index").exists()
    assert [p.name for p in where.iterdir() if p.name.startswith(".")] == []
