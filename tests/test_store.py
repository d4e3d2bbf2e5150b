"""The index directory: atomic generations, crash safety under SIGKILL, locking, repair."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from conftest import ROOT, SAMPLE, write_csv
from lookalike import IndexBusyError, StoreError, VisualSearch
from lookalike.store import IndexDir

QUERY = SAMPLE / "queries" / "watches-45260.jpg"

@pytest.mark.slow
def test_sigkill_at_random_points_leaves_the_old_or_the_new_index():
    """A short seeded run of the crash harness (benchmarks/crash.py runs 200 kills)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import crash

    tally = crash.run(kills=20, seed=20261126)
    print(tally["by_operation"])
    assert tally["failures"] == [] and tally["survived"] == tally["kills"] == 20
    assert tally["by_operation"]["add/remove"]["distinct_states_seen"] >= 5, "the writers made progress between kills"
    assert tally["by_operation"]["build"]["kills"] == 10  # states seen depend on the machine's speed: not asserted
    assert tally["leftover_files"] == []


def test_a_second_writer_gets_a_clear_busy_error(sample_copy):
    store = IndexDir(sample_copy)
    other = IndexDir(sample_copy)
    with store.lock():
        with pytest.raises(IndexBusyError, match="being changed by another process"):
            with other.lock(timeout=0.2):
                pass
    with other.lock(timeout=0.2):
        pass


def test_a_directory_it_cannot_write_to_refuses_changes_with_a_clear_error(sample_copy):
    """Where the lock file cannot be made (a read-only mount; here a folder in its place), a
    change is refused with a StoreError and the index stays searchable."""
    (sample_copy / ".lock").unlink(missing_ok=True)
    (sample_copy / ".lock").mkdir()
    vs = VisualSearch.open(sample_copy)
    with pytest.raises(StoreError, match="cannot change the index here"):
        vs.remove(["watches-45260"])
    assert len(vs) == 300 and vs.search(QUERY, k=1).hits


def test_a_reader_follows_an_index_rebuilt_in_its_place_with_another_model(sample_copy, tmp_path):
    """build --force over an index a service is reading: generations start again at 1, and the
    features are made another way; the reader notices, and makes its queries the new way."""
    rows = list(csv.DictReader(open(SAMPLE / "catalog.csv")))[:20]
    small = write_csv(tmp_path / "small.csv", ["id", "image"], [[r["id"], str(SAMPLE / r["image"])] for r in rows])
    VisualSearch.build(small, tmp_path / "idx", progress=False)
    reader = VisualSearch.open(tmp_path / "idx")
    assert reader.search(SAMPLE / rows[0]["image"], k=1).hits[0].score > 0.999  # its model loaded
    VisualSearch.build(small, tmp_path / "idx", progress=False, tta="none", force=True)
    assert reader.generation == 1 and reader.stale()  # the same generation, another build
    assert reader.refresh() and reader.spec.tta == "none" and reader.featurizer.spec.tta == "none"
    hit = reader.search(SAMPLE / rows[0]["image"], k=1).hits[0]
    assert hit.id == rows[0]["id"] and hit.score > 0.999  # the query made as the new vectors were
    assert not reader.refresh()


def test_a_reader_keeps_its_generation_while_a_writer_changes_the_index(sample_copy, tmp_path):
    reader = VisualSearch.open(sample_copy)
    writer = VisualSearch.open(sample_copy)
    writer.add(write_csv(tmp_path / "n.csv", ["id", "image"], [["new-one", str(QUERY)]]))
    assert len(reader) == 300 and reader.search(QUERY, k=1).hits[0].id != "new-one"
    assert len(VisualSearch.open(sample_copy)) == 301
    assert reader.refresh() and len(reader) == 301 and reader.search(QUERY, k=1).hits[0].id == "new-one"
    assert not reader.refresh()


def test_manifest_records_what_the_index_is(sample_index):
    m = json.loads((sample_index / "lookalike.json").read_text())
    assert m["format_version"] == 1 and m["generation"] == 1 and m["count"] == 300
    assert m["model"]["name"] == "efficientnet-lite0" and m["model"]["dim"] == 1280
    assert m["model"]["preprocessing"]["input_size"] == 224 and len(m["model"]["weights"]["sha256"]) == 64
    assert m["metric"] == "cosine" and m["index"]["kind"] == "flat"
    assert set(m["files"]) == {"vectors-1.npy", "ids-1.npy", "index-1.faiss"}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in m["files"].values())
    assert IndexDir(sample_index).verify() == []


def test_verify_finds_a_changed_file(sample_copy):
    path = sample_copy / "index-1.faiss"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    assert IndexDir(sample_copy).verify() == ["index-1.faiss does not match its sha256"]
