"""The index directory: atomic generations, crash safety under SIGKILL, locking, repair."""

from __future__ import annotations

import csv
import json
import os
import sys
import time

import pytest

from conftest import ROOT, SAMPLE, write_csv
from lookalike import IndexBusyError, Item, StoreError, VisualSearch
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


def test_build_force_waits_for_a_writer_and_a_waiting_writer_then_locks_the_new_directory(tmp_path):
    """build --force swaps directories under the old one's lock, and a writer that waited on the
    old directory's lock ends holding the new one's: never two writers at once, never a change of
    the old index committed into the new one."""
    import threading

    rows = list(csv.DictReader(open(SAMPLE / "catalog.csv")))[:6]
    small = write_csv(tmp_path / "small.csv", ["id", "image"], [[r["id"], str(SAMPLE / r["image"])] for r in rows])
    path = tmp_path / "idx"
    VisualSearch.build(small, path, progress=False)
    old_build = json.loads((path / "lookalike.json").read_text())["build_id"]
    holder = IndexDir(path).lock()
    holder.__enter__()  # a writer in the middle of a change of the old index
    seen: dict[str, object] = {}

    def waiting_writer():
        with IndexDir(path).lock(timeout=60):
            seen["build"] = json.loads((path / "lookalike.json").read_text())["build_id"]
            try:  # while it holds the lock, nobody else gets the live directory's
                with IndexDir(path).lock(timeout=0.3):
                    seen["second"] = True
            except IndexBusyError:
                seen["second"] = False

    def rebuild():
        VisualSearch.build(small, path, progress=False, tta="none", force=True)
        seen["built_at"] = time.monotonic()

    threads = [threading.Thread(target=rebuild)]
    threads[0].start()
    time.sleep(0.5)
    threads.append(threading.Thread(target=waiting_writer))
    threads[1].start()
    time.sleep(6)  # the build's featurizing is done by now, and it waits for the lock
    assert "built_at" not in seen and (path / "lookalike.json").exists()
    released = time.monotonic()
    holder.__exit__(None, None, None)
    for t in threads:
        t.join(120)
    assert seen["built_at"] >= released  # the swap waited for the writer of the old index
    assert seen["second"] is False  # one writer at a time, also across the swap
    new_build = json.loads((path / "lookalike.json").read_text())["build_id"]
    assert new_build != old_build and seen["build"] in (old_build, new_build)
    assert IndexDir(path).diagnose() == [] and len(VisualSearch.open(path)) == 6


def test_an_add_featurized_with_a_model_the_index_no_longer_has_is_refused(tmp_path):
    """add featurizes before it takes the lock: a build --force in between (here with other
    features) would have made its vectors unlike the index's. It is refused, nothing written."""
    rows = list(csv.DictReader(open(SAMPLE / "catalog.csv")))
    small = write_csv(tmp_path / "small.csv", ["id", "image"], [[r["id"], str(SAMPLE / r["image"])] for r in rows[:6]])
    more = write_csv(tmp_path / "more.csv", ["id", "image"], [[r["id"], str(SAMPLE / r["image"])] for r in rows[6:9]])
    path = tmp_path / "idx"
    VisualSearch.build(small, path, progress=False)
    writer = VisualSearch.open(path)

    class RebuildMidway:  # a progress bar whose first update rebuilds the index another way
        def __init__(self, total):
            self.done = False

        def update(self, n):
            if not self.done:
                self.done = True
                VisualSearch.build(small, path, progress=False, tta="none", force=True)

        def close(self):
            pass

    with pytest.raises(StoreError, match="rebuilt in its place while these items were featurized"):
        writer.add(more, progress=RebuildMidway)
    after = VisualSearch.open(path)
    assert len(after) == 6 and after.spec.tta == "none" and after.generation == 1
    report = writer.add(more)  # again: now with the new build's model
    assert report.indexed == 3 and writer.search(SAMPLE / rows[7]["image"], k=1).hits[0].score > 0.999


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


def test_uploads_are_kept_by_content_and_only_unused_old_ones_are_swept(sample_copy):
    store = IndexDir(sample_copy)
    photo = QUERY.read_bytes()
    first, again = store.keep_upload(photo, ".jpg"), store.keep_upload(photo, ".jpg")
    assert first == again and first.is_absolute() and first.read_bytes() == photo
    other = store.keep_upload(b"not used by any item", ".img")
    vs = VisualSearch.open(sample_copy)
    vs.add([Item(id="uploaded", image=str(first))])
    hour_ago = time.time() - 3600
    for path in (first, other):
        os.utime(path, (hour_ago, hour_ago))
    fresh = store.keep_upload(b"an add of this one is in flight", ".img")
    assert store.sweep_uploads() == 1  # the old unused one; the item's image and the fresh one stay
    assert first.is_file() and fresh.is_file() and not other.exists()
    store.keep_upload(photo, ".jpg")  # kept again (another add of the same picture): its time renewed
    vs.remove(["uploaded"])
    assert store.sweep_uploads() == 0 and first.is_file()  # unused now, but kept again a moment ago
    os.utime(first, (hour_ago, hour_ago))
    assert store.sweep_uploads() == 1 and not first.exists()


def test_doctor_gives_no_false_alarm_while_another_process_keeps_changing_the_index(sample_copy):
    """A writer's commit deletes the generation a check is reading: doctor checks again instead
    of reporting missing files (it had said "damaged beyond what doctor repairs")."""
    import subprocess

    loop = ("import sys\nfrom lookalike import VisualSearch\nvs = VisualSearch.open(sys.argv[1])\n"
            "for _ in range(int(sys.argv[2])):\n    vs.reindex()\n")
    writer = subprocess.Popen([sys.executable, "-c", loop, str(sample_copy), "60"])
    try:
        reports = []
        while writer.poll() is None:
            reports.append(VisualSearch.doctor(sample_copy, repair=False))
    finally:
        writer.wait()
    assert len(reports) >= 3 and writer.returncode == 0
    assert [r["problems"] for r in reports if not r["ok"]] == []
