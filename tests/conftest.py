"""Shared fixtures: real data from ../shared/data, the sample catalog, real index directories."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LOOKALIKE_DATA", ROOT.parent / "shared" / "data"))
SAMPLE = ROOT / "src" / "lookalike" / "data" / "sample"
COIL = DATA / "coil-100"
FASHION = DATA / "fashion-products-2000"

sys.path.insert(0, str(ROOT / "benchmarks"))
from live_service import Service  # noqa: E402  (shared with the benchmarks)


def pytest_configure(config):
    if not DATA.is_dir():
        raise pytest.UsageError(f"test data not found at {DATA}; set LOOKALIKE_DATA")


@pytest.fixture(scope="session")
def sample_index(tmp_path_factory):
    """A real index of the built-in 300-item sample catalog (read-only for tests: copy to change)."""
    from lookalike import VisualSearch

    path = tmp_path_factory.mktemp("sample") / "index"
    VisualSearch.build(SAMPLE / "catalog.csv", path)
    return path


@pytest.fixture
def sample_copy(sample_index, tmp_path):
    """A private copy of the sample index that a test may change."""
    dest = tmp_path / "index"
    shutil.copytree(sample_index, dest)
    return dest


@pytest.fixture(scope="session")
def coil_index(tmp_path_factory):
    """The coil-6view gallery (600 real photos), default model and metric."""
    from lookalike import VisualSearch

    path = tmp_path_factory.mktemp("coil") / "index"
    VisualSearch.build(DATA / "coil-6view" / "gallery.csv", path)
    return path


class Server(Service):
    """A real `lookalike serve` process on a free localhost port (access log on, key only if given)."""

    def __init__(self, index_dir: Path, *extra: str, env: dict[str, str] | None = None):
        super().__init__(index_dir, *extra, api_key=(env or {}).get("LOOKALIKE_API_KEY"), quiet=False)


@pytest.fixture(scope="session")
def server(sample_index):
    """`lookalike serve` on the sample index (read-only: use `writable_server` to change it)."""
    srv = Server(sample_index)
    yield srv
    srv.stop()


API_KEY = "test-key-0123456789abcdef"


@pytest.fixture
def writable_server(sample_copy):
    """`lookalike serve` on a private copy of the sample index, with write routes on (``API_KEY``)."""
    srv = Server(sample_copy, env={"LOOKALIKE_API_KEY": API_KEY})
    yield srv
    srv.stop()


def kill_once_saved(cmd: list, path: Path, seconds: float = 120) -> None:
    """Run ``cmd`` and SIGKILL it as soon as ``path`` exists (or when it ends, or after ``seconds``)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + seconds
        while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under path (to prove nothing on disk changed)."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file() and p.name != ".lock" and not p.name.endswith(("-wal", "-shm")):
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path
