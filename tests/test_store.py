"""The index directory: atomic generations, crash safety under SIGKILL, locking, repair."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import SAMPLE, write_csv
from lookalike import IndexBusyError, VisualSearch
from lookalike.store import IndexDir

QUERY = SAMPLE / "queries" / "watches-45260.jpg"

WRITER = textwrap.dedent(
    """
    import sys, csv
    from lookalike import VisualSearch
    index, query, catalogs = sys.argv[1], sys.argv[2], sys.argv[3]
    vs = VisualSearch.open(index)
    vs.featurizer  # load the model before the first change
    print("ready", flush=True)
    while True:
        j = vs.info()["generation"] - 1       # operations done so far, by any writer
        name = f"c{j // 2}"
        if j % 2 == 0:
            path = f"{catalogs}/{name}.csv"
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows([["id", "image", "label"], [name, query, "crash"]])
            vs.add(path)
        else:
            vs.remove([name])
    """
)


def _expected_ids(base: set[str], generation: int) -> set[str]:
    ops = generation - 1
    return base | {f"c{(ops - 1) // 2}"} if ops % 2 else set(base)


@pytest.mark.slow
def test_sigkill_at_random_points_leaves_the_old_or_the_new_index(sample_copy, tmp_path):
    base = {h.id for h in VisualSearch.open(sample_copy).search(QUERY, k=1000).hits}
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    (tmp_path / "catalogs").mkdir()
    rng = random.Random(20261126)
    generations = []
    for _ in range(20):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(sample_copy), str(QUERY), str(tmp_path / "catalogs")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rng.uniform(0.05, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        vs = VisualSearch.open(sample_copy)  # opens every time
        gen = vs.info()["generation"]
        generations.append(gen)
        hits = vs.search(QUERY, k=1000).hits
        ids = {h.id for h in hits}
        assert ids == _expected_ids(base, gen), f"generation {gen}"
        assert len(vs) == len(ids) == vs.info()["count"]
        if len(ids) > len(base):  # the added item's vector is the query's own
            assert hits[0].id.startswith("c") and hits[0].score > 0.999
        vs.close()
    print("generations after each kill:", generations)
    assert generations[-1] > 3, "the writers made progress between kills"
    # a writer after all the crashes finds a consistent index and can change it
    vs = VisualSearch.open(sample_copy)
    gen = vs.info()["generation"]
    extra = write_csv(tmp_path / "extra.csv", ["id", "image"], [["after-crashes", str(QUERY)]])
    vs.add(extra)
    assert VisualSearch.open(sample_copy).info()["count"] == len(_expected_ids(base, gen)) + 1
    leftovers = [p.name for p in sample_copy.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_a_second_writer_gets_a_clear_busy_error(sample_copy):
    store = IndexDir(sample_copy)
    other = IndexDir(sample_copy)
    with store.lock():
        with pytest.raises(IndexBusyError, match="being changed by another process"):
            with other.lock(timeout=0.2):
                pass
    with other.lock(timeout=0.2):
        pass


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
