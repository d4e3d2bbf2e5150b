"""Featurization on Ray (a real local Ray with 2 CPUs): the same index as a single-process build,
bad images skipped and reported the same, and clear errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import COIL, SAMPLE, kill_once_saved
from lookalike import VisualSearch
from lookalike.errors import ImageNotFoundError
from lookalike.runtimes import int8_saturates

MODEL = {"runtime": "onnxruntime", "precision": "fp32"}  # the same model runs in both builds


@pytest.fixture(scope="module")
def ray_here():
    """One local Ray with 2 CPUs for this module's in-process builds (they join it; the CLI's
    builds start their own, as a build without an address does)."""
    import time

    import ray

    # A raylet that misses Ray's 30 s to register fails the start (seen in CI: all three tests of this
    # module lost at once); a modest object store leaves the machine's memory to the rest of the run.
    for attempt in range(3):
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, object_store_memory=512 * 2**20)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(5)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def coil_with_bad_images(tmp_path_factory):
    """coil-100's 1,200 images, plus a missing file and a corrupt one among them."""
    root = tmp_path_factory.mktemp("coil-ray")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    rows = list(csv.DictReader(open(COIL / "items.csv")))
    out = [{"id": r["id"], "image": str(COIL / r["image"]), "label": r["label"]} for r in rows]
    out.insert(5, {"id": "missing", "image": str(root / "nowhere.png"), "label": "none"})
    out.insert(1100, {"id": "corrupt", "image": str(root / "corrupt.png"), "label": "none"})
    with open(root / "catalog.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "image", "label"])
        writer.writeheader()
        writer.writerows(out)
    return root / "catalog.csv"


@pytest.fixture(scope="module")
def built_here(coil_with_bad_images, tmp_path_factory):
    """That catalog built by one process (the reference): its path and what its build skipped."""
    path = tmp_path_factory.mktemp("here") / "index"
    vs = VisualSearch.build(coil_with_bad_images, path, **MODEL)
    vs.close()
    return path, vs.build_report.skipped


def test_a_ray_build_makes_the_single_process_index(coil_with_bad_images, built_here, ray_here, tmp_path):
    here = VisualSearch(built_here[0])
    on_ray = VisualSearch.build(coil_with_bad_images, tmp_path / "ray", ray=True, **MODEL)
    assert len(on_ray) == len(here) == 1200
    assert np.array_equal(on_ray._index.ids, here._index.ids)
    assert np.allclose(on_ray._index.vectors, here._index.vectors, atol=1e-5)
    ids = lambda vs: [row[1] for row in vs._items.all_rows()]  # noqa: E731
    assert ids(on_ray) == ids(here)
    assert on_ray.build_report.skipped == built_here[1]
    assert [i for i, _ in on_ray.build_report.skipped] == ["missing", "corrupt"]
    assert on_ray.build_report.skipped[0][1].startswith("missing: ")
    assert not list(tmp_path.glob(".*lookalike-build"))  # the shards are gone once the index holds them
    query = here._index.vectors[:20]
    assert [[h.id for h in r.hits] for r in on_ray.search(query, k=5)] == [[h.id for h in r.hits] for r in here.search(query, k=5)]


def test_strict_on_ray_raises_what_a_single_process_build_raises(coil_with_bad_images, ray_here, tmp_path):
    with pytest.raises(ImageNotFoundError, match="nowhere.png"):
        VisualSearch.build(coil_with_bad_images, tmp_path / "ray", ray=True, strict=True, **MODEL)
    assert not (tmp_path / "ray").exists()


def test_ray_from_the_command_line(tmp_path):
    cmd = [sys.executable, "-m", "lookalike.cli", "build", str(SAMPLE / "catalog.csv"), "-o", str(tmp_path / "idx")]
    proc = subprocess.run([*cmd, "--ray", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["indexed"] == 300 and report["index"]["count"] == 300
    proc = subprocess.run([*cmd, "--ray", "127.0.0.1:9", "--force"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Ray at 127.0.0.1:9: nothing answers there" in proc.stderr, proc.stderr


@pytest.mark.skipif(int8_saturates(), reason="this CPU has no VNNI: int8 is refused here (test_runtimes checks that), "
                    "and Ray's actors see the real CPU")
def test_an_int8_build_on_ray_runs_the_index_s_own_model(ray_here, tmp_path):
    """The int8 model is calibrated in the driver and reaches the actors through Ray's object store."""
    vs = VisualSearch.build(SAMPLE / "catalog.csv", tmp_path / "idx", ray=True, runtime="onnxruntime", precision="int8")
    assert vs.info()["precision"] == "int8" and len(vs) == 300
    rows = vs._items.all_rows()[:8]
    again = vs.featurizer.featurize([image for _, _, _, image, _ in rows]).vectors
    stored = vs._index.vectors_of(np.array([int_id for int_id, *_ in rows]))
    again /= np.linalg.norm(again, axis=1, keepdims=True)
    assert np.allclose(again, stored, atol=1e-5)


def test_a_build_killed_in_one_process_resumes_on_ray(coil_with_bad_images, built_here, tmp_path):
    """The shards are the same on Ray or not: what one process saved, Ray goes on from."""
    cmd = [sys.executable, "-m", "lookalike.cli", "build", str(coil_with_bad_images), "-o", str(tmp_path / "idx"),
           "--runtime", "onnxruntime", "--precision", "fp32", "--json"]
    shards = tmp_path / ".idx.lookalike-build"
    kill_once_saved(cmd, shards / "shard-000000.npz")  # the first of its two shards
    assert (shards / "shard-000000.npz").exists() and not (shards / "shard-000001.npz").exists()
    done = subprocess.run([*cmd, "--ray", "--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["resumed"] == 1024 and report["indexed"] == 1200 and not shards.exists()
    # the first from the saved shard, the second from Ray: as one process reported them
    assert [(s["id"], s["reason"]) for s in report["skipped"]] == built_here[1]
    with VisualSearch(tmp_path / "idx") as resumed, VisualSearch(built_here[0]) as here:
        assert np.array_equal(resumed._index.ids, here._index.ids)
        assert np.allclose(resumed._index.vectors, here._index.vectors, atol=1e-5)
