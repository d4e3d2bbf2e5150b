"""The index in Milvus (a real Milvus Lite database file): build, search, filter, add, remove,
reopen, doctor, the service, and agreement with FAISS."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from conftest import DATA, SAMPLE, Server, write_csv
from lookalike import VisualSearch
from lookalike.backends.milvus import MilvusIndex, backend_entry, client, filter_expression, release
from lookalike.catalog import read_catalog
from lookalike.errors import IndexError_, QueryError, StoreError
from lookalike.index import VectorIndex, prepare

EXE = [sys.executable, "-m", "lookalike.cli"]
QUERIES = sorted((SAMPLE / "queries").glob("*.jpg"))


def run(*args, check=True):
    proc = subprocess.run([*EXE, *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"lookalike {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def _ids(results):
    return [[h.id for h in r.hits] for r in results]


@pytest.fixture(scope="module")
def milvus_sample(tmp_path_factory):
    """The sample catalog in a Milvus Lite file, built by the CLI (so no test process holds the file)."""
    root = tmp_path_factory.mktemp("milvus")
    run("build", SAMPLE / "catalog.csv", "-o", root / "index", "--backend", "milvus", "--milvus-uri", root / "sample.db")
    return root


def test_exact_search_in_milvus_agrees_with_faiss_flat_on_coil_6view(coil_index, tmp_path):
    """Same top-10 ids for every one of the 600 coil-6view queries, and the same scores."""
    faiss_vs = VisualSearch(coil_index)
    queries = [r["image"] for r in csv.DictReader(open(DATA / "coil-6view" / "queries.csv"))]
    vectors = faiss_vs.featurizer.featurize([str(DATA / "coil-6view" / q) for q in queries]).vectors
    milvus_vs = VisualSearch.build(DATA / "coil-6view" / "gallery.csv", tmp_path / "index", backend="milvus",
                                   milvus_uri=tmp_path / "coil.db", collection="coil_6view")
    try:
        assert milvus_vs.info()["backend"] == {"name": "milvus", "uri": str(tmp_path / "coil.db"), "collection": "coil_6view"}
        assert milvus_vs._index.index is None  # no FAISS structure: the search is Milvus's
        got, want = milvus_vs.search(vectors, k=10), faiss_vs.search(vectors, k=10)
        assert len(got) == 600 and _ids(got) == _ids(want)
        scores = np.array([[h.score for h in r.hits] for r in got])
        assert np.allclose(scores, [[h.score for h in r.hits] for r in want], atol=1e-5)
        assert np.allclose([[h.distance for h in r.hits] for r in got], 1 - scores, atol=1e-6)
        # the protocol's own figure, from the Milvus index, as from FAISS
        labels = [r["label"] for r in csv.DictReader(open(DATA / "coil-6view" / "queries.csv"))]
        assert np.mean([r.hits[0].metadata["label"] == l for r, l in zip(got, labels)]) > 0.9
    finally:
        milvus_vs.close()
        faiss_vs.close()


def test_build_search_filter_as_faiss_from_the_command_line(milvus_sample, sample_index):
    index = milvus_sample / "index"
    info = json.loads(run("info", index, "--json").stdout)
    assert info["backend"] == {"name": "milvus", "uri": str(milvus_sample / "sample.db"), "collection": "lookalike_index"}
    assert info["count"] == 300 and info["index"] == "flat"
    assert not list(index.glob("index-*.faiss"))  # the index is the collection
    assert "backend" in run("info", index).stdout and "collection lookalike_index" in run("info", index).stdout
    for extra in ([], ["--filter", "label=Watches"], ["--filter", "label=Watches,Casual Shoes", "-k", "8"]):
        got = json.loads(run("search", index, *QUERIES[:3], "--json", *extra).stdout)
        want = json.loads(run("search", sample_index, *QUERIES[:3], "--json", *extra).stdout)
        assert [[h["id"] for h in q["hits"]] for q in got] == [[h["id"] for h in q["hits"]] for q in want]
        assert [[h["metadata"] for h in q["hits"]] for q in got] == [[h["metadata"] for h in q["hits"]] for q in want]
        for g, w in zip(got, want):
            assert np.allclose([h["score"] for h in g["hits"]], [h["score"] for h in w["hits"]], atol=1e-5)
    # k larger than the catalog returns all of it, most similar first
    everything = json.loads(run("search", index, QUERIES[0], "-k", "1000", "--json").stdout)[0]["hits"]
    assert len(everything) == 300 and len({h["id"] for h in everything}) == 300
    assert all(a["score"] >= b["score"] for a, b in zip(everything, everything[1:]))


def test_filters_become_milvus_expressions_that_match_what_sqlite_matches(milvus_sample, sample_index):
    assert filter_expression({"label": "Watches"}) == '(metadata["label"] == "Watches")'
    assert filter_expression({'a"b': ["x", 2, True, None]}) == \
        '(metadata["a\\"b"] == "x" or metadata["a\\"b"] == 2 or metadata["a\\"b"] == true)'
    assert filter_expression({"label": [None]}) == "int_id < 0"  # matches nothing, as in SQL
    with pytest.raises(QueryError, match="strings, numbers and booleans"):
        filter_expression({"label": {"nested": 1}})
    with pytest.raises(QueryError, match="not a number"):
        filter_expression({"n": float("nan")})
    rows = list(csv.DictReader(open(SAMPLE / "catalog.csv")))
    filters = [{"label": "Watches"}, {"gender": "Women", "label": ["Handbags", "Tshirts"]},
               {"colour": rows[7]["colour"], "label": rows[7]["label"]}, {"label": "no such label"}, {"title": rows[3]["title"]}]
    with VisualSearch(milvus_sample / "index") as milvus_vs, VisualSearch(sample_index) as faiss_vs:
        query = faiss_vs.featurizer.featurize([str(QUERIES[1])]).vectors
        for where in filters:
            got, want = milvus_vs.search(query, k=300, filter=where), faiss_vs.search(query, k=300, filter=where)
            assert _ids(got) == _ids(want), where
    release(str(milvus_sample / "sample.db"))


def test_add_remove_reopen_and_doctor(milvus_sample, tmp_path):
    uri = tmp_path / "own.db"
    vs = VisualSearch.build(SAMPLE / "catalog.csv", tmp_path / "index", backend="milvus", milvus_uri=uri, index="hnsw")
    try:
        assert vs.info()["index"] == "hnsw"
        items = read_catalog(SAMPLE / "catalog.csv")[:4]
        query = vs.featurizer.featurize([items[0].image]).vectors
        first = vs.search(query, k=1)[0].hits[0]
        assert first.id == items[0].id and first.score > 0.99
        new = [replace(it, id=f"copy-{it.id}", metadata=dict(it.metadata, label="Copies")) for it in items]
        assert vs.add(new).indexed == 4 and len(vs) == 304
        hits = vs.search(query, k=2)[0].hits
        assert {h.id for h in hits} == {items[0].id, f"copy-{items[0].id}"}
        assert [h.id for h in vs.search(query, k=10, filter={"label": "Copies"})[0].hits][:1] == [f"copy-{items[0].id}"]
        assert len(vs.search(query, k=10, filter={"label": "Copies"})[0].hits) == 4
        assert vs.remove([items[0].id, "copy-" + items[1].id]) == 2 and len(vs) == 302
        assert vs.search(query, k=1)[0].hits[0].id == f"copy-{items[0].id}"
        with pytest.raises(Exception, match="no item with id"):
            vs.remove(["nope"])
        counted = client(str(uri)).query("lookalike_index", filter="int_id >= 0", output_fields=["count(*)"])
        assert counted[0]["count(*)"] == 302  # removals reached the collection
    finally:
        vs.close()
    # another process opens it as it was left
    got = json.loads(run("search", tmp_path / "index", items[0].image, "-k", "2", "--json").stdout)[0]["hits"]
    assert [h["id"] for h in got][0] == f"copy-{items[0].id}" and got[0]["metadata"]["label"] == "Copies"

    # a collection lost (dropped by someone): opening says so and how to mend it; doctor rebuilds it
    client(str(uri)).drop_collection("lookalike_index")
    with pytest.raises(StoreError, match="lookalike_index is not in milvus .*`lookalike doctor"):
        VisualSearch(tmp_path / "index")
    report = VisualSearch.doctor(tmp_path / "index")
    assert report["repaired"] == ["rebuilt collection lookalike_index from the 302 stored vectors"] and report["ok"]
    with VisualSearch(tmp_path / "index") as again:
        assert len(again) == 302 and again.search(query, k=1)[0].hits[0].id == f"copy-{items[0].id}"
        assert len(again.search(query, k=10, filter={"label": "Copies"})[0].hits) == 3
        # reindex builds a new collection beside the old one and swaps them once committed
        assert again.reindex()["after"]["backend"]["collection"] == "lookalike_index"
        assert client(str(uri)).list_collections() == ["lookalike_index"]
        assert again.search(query, k=1)[0].hits[0].id == f"copy-{items[0].id}" and again.generation == 4
    release(str(uri))


def test_an_add_never_committed_stays_invisible_and_a_retry_overwrites_it(tmp_path):
    rng = np.random.default_rng(0)
    x = prepare(rng.standard_normal((200, 32)).astype(np.float32), "cosine")
    entry = backend_entry(str(tmp_path / "v.db"), "vecs")
    index = MilvusIndex.create("flat", "cosine", x[:100], np.arange(100), backend=entry,
                               metadata=[{"n": i} for i in range(100)])
    index.committed()
    view = index.copy()
    view.add(x[100:150], np.arange(100, 150), metadata=[{"n": i} for i in range(100, 150)])  # then "crashed"
    reopened, intact = MilvusIndex.load(index.spec, 32, x[:100], np.arange(100))
    assert intact and reopened.search(x[120:121], k=1)[2][0, 0] != 120  # the uncommitted item is not found
    assert reopened.search(x[:5], k=100)[2].max() < 100
    retry = reopened.copy()
    retry.add(x[150:200], np.arange(100, 150), metadata=[{"n": i} for i in range(100, 150)])
    retry.committed()
    after, intact = MilvusIndex.load(index.spec, 32, np.concatenate([x[:100], x[150:200]]), np.arange(150))
    assert intact and after.search(x[170:171], k=1)[2][0, 0] == 120  # the retried vectors, not the first ones
    # a removal that did not reach Milvus: the count no longer agrees, and opening says so
    kept = np.delete(np.arange(150), 50)
    stale, intact = MilvusIndex.load(index.spec, 32, np.concatenate([x[:100], x[150:200]])[kept], kept)
    assert not intact and "holds 150 items, the index 149" in stale.problem()
    release(entry["uri"])


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_scores_follow_the_same_conventions_as_faiss(metric, tmp_path):
    rng = np.random.default_rng(1)
    x = prepare(rng.standard_normal((300, 16)).astype(np.float32), metric)
    ids = np.arange(10, 310)
    faiss_index = VectorIndex.create("flat", metric, x, ids)
    milvus_index = MilvusIndex.create("flat", metric, x, ids, backend=backend_entry(str(tmp_path / "s.db"), "s"))
    q = rng.standard_normal((7, 16)).astype(np.float32)
    for k in (1, 10, 300, 1000):
        got, want = milvus_index.search(q, k), faiss_index.search(q, k)
        assert np.array_equal(got[2], want[2])
        assert np.allclose(got[0], want[0], atol=1e-4) and np.allclose(got[1], want[1], atol=1e-4)
    release(milvus_index.uri)


def test_a_collection_of_another_index_is_not_taken(tmp_path):
    """Two directories of one name share the default collection name: the second build had
    replaced the first index's collection (which then answered with the other's vectors)."""
    rows = list(csv.DictReader(open(SAMPLE / "catalog.csv")))
    first = write_csv(tmp_path / "first.csv", ["id", "image"], [[r["id"], str(SAMPLE / r["image"])] for r in rows[:8]])
    second = write_csv(tmp_path / "second.csv", ["id", "image"], [[r["id"], str(SAMPLE / r["image"])] for r in rows[8:16]])
    db = ["--backend", "milvus", "--milvus-uri", tmp_path / "shared.db"]
    run("build", first, "-o", tmp_path / "a" / "shop", *db, "-q")
    taken = run("build", second, "-o", tmp_path / "b" / "shop", *db, "-q", check=False)
    assert taken.returncode == 2 and "collection lookalike_shop in" in taken.stderr and "--collection" in taken.stderr
    run("build", second, "-o", tmp_path / "b" / "shop", *db, "--collection", "shop_b", "-q")
    run("build", first, "-o", tmp_path / "a" / "shop", *db, "--force", "-q")  # its own collection: rebuilt
    hit = json.loads(run("search", tmp_path / "a" / "shop", SAMPLE / rows[2]["image"], "-k", "1", "--json").stdout)
    assert hit[0]["hits"][0]["id"] == rows[2]["id"] and hit[0]["hits"][0]["score"] > 0.999


def test_refusals_come_before_featurizing(tmp_path):
    catalog = SAMPLE / "catalog.csv"
    cases = [
        (["--backend", "milvus"], "needs --milvus-uri"),
        (["--backend", "milvus", "--milvus-uri", tmp_path / "x.sqlite"], "path ending in .db"),
        (["--backend", "milvus", "--milvus-uri", tmp_path / "x.db", "--index", "ivfpq"], "not offered with the milvus"),
        (["--backend", "milvus", "--milvus-uri", tmp_path / "x.db", "--whiten", "64"], "whitening is not offered"),
        (["--backend", "milvus", "--milvus-uri", tmp_path / "x.db", "--collection", "9lives"], "collection name '9lives'"),
        (["--milvus-uri", tmp_path / "x.db"], "go with --backend milvus"),
        (["--backend", "milvus", "--milvus-uri", "http://127.0.0.1:9"], "milvus http://127.0.0.1:9: cannot connect"),
    ]
    for extra, message in cases:
        proc = run("build", catalog, "-o", tmp_path / "index", *extra, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (extra, proc.stderr)
        assert "featurizing" not in proc.stderr and not (tmp_path / "index").exists()
    with pytest.raises(IndexError_, match="not offered"):
        MilvusIndex.create("ivfpq", "cosine", np.zeros((2000, 8), np.float32), np.arange(2000),
                           backend=backend_entry(str(tmp_path / "y.db"), "y"))


def test_a_milvus_lite_file_is_one_process_at_a_time_with_a_message(tmp_path):
    path = str(tmp_path / "held.db")
    holder = subprocess.Popen([sys.executable, "-c", "import time; from lookalike.backends.milvus import client; "
                               f"client({path!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError, match="another process has this Milvus Lite database open"):
            client(path)
    finally:
        holder.kill()
        holder.wait()


def test_the_service_searches_a_milvus_index(milvus_sample, sample_index):
    import httpx

    srv = Server(milvus_sample / "index")
    try:
        with open(QUERIES[0], "rb") as f:
            body = f.read()
        got = httpx.post(f"{srv.url}/search", content=body, headers={"Content-Type": "image/jpeg"}, params={"k": 4}, timeout=60).json()
        with VisualSearch(sample_index) as faiss_vs:
            want = [h.id for h in faiss_vs.search(str(QUERIES[0]), k=4).hits]
        assert [h["id"] for h in got["results"][0]["hits"]] == want, got
        # and the CLI, beside it, is told why it cannot open the same Milvus Lite file
        proc = run("search", milvus_sample / "index", QUERIES[0], check=False)
        assert proc.returncode == 2 and "another process has this Milvus Lite database open" in proc.stderr
    finally:
        srv.stop()
    # nor may several workers serve it
    proc = run("serve", milvus_sample / "index", "--workers", "2", check=False)
    assert proc.returncode == 2 and "serve it with --workers 1, or keep it in a Milvus server" in proc.stderr


ODD_FILTERS = [{"big": 2**70}, {"": "empty key"}, {'k.e y"\'': "odd"}, {"ü": "ö"}, {"f": 1.5}, {"bool": True},
               {"num": 3}, {"num": "3"}, {"label": ["L", "M"]}, {"null": None}, {"nested": {"x": 1}},
               {"k\\ey": "a\\b"}, {"k\ney": "line\nbreak"}, {"v": 'x") or (true'}, {"v": ['x") or (true', "y"]}]


def test_odd_metadata_is_stored_and_filtered_alike_in_milvus_and_sqlite(tmp_path):
    """Keys with quotes and dots, numbers past 64 bits, booleans, nulls: the build keeps them, and
    every filter finds what the FAISS index's SQLite filter finds (a dict value: the same error)."""
    images = sorted((SAMPLE / "queries").glob("*.jpg"))
    rows = [
        {"id": "a", "image": str(images[0]), "big": 2**70, "nested": {"x": [1, 2, {"y": None}]}, "": "empty key",
         'k.e y"\'': "odd", "ü": "ö", "f": 1.5},
        {"id": "b", "image": str(images[1]), "big": -2**63, "list": [], "bool": True, "null": None, "long": "x" * 70000,
         "code": "30"},
        {"id": "c", "image": str(images[2]), "label": "L", "num": 3, "k\\ey": "a\\b", "k\ney": "line\nbreak",
         "v": 'x") or (true'},
    ]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with VisualSearch.build(tmp_path / "c.jsonl", tmp_path / "m", backend="milvus", milvus_uri=tmp_path / "m.db") as m, \
            VisualSearch.build(tmp_path / "c.jsonl", tmp_path / "f") as f:
        query = f._index.vectors[:1]
        for where in ODD_FILTERS:
            try:
                want = _ids(f.search(query, k=3, filter=where))
            except QueryError:
                with pytest.raises(QueryError):
                    m.search(query, k=3, filter=where)
                continue
            assert _ids(m.search(query, k=3, filter=where)) == want, where
        assert _ids(m.search(query, k=3, filter={"big": 2**70})) == [["a"]]
        assert _ids(m.search(query, k=3, filter={'k.e y"\'': "odd"})) == [["a"]]
        for where in ({"k\\ey": "a\\b"}, {"v": 'x") or (true'}):  # a backslash key; a value that looks like code
            assert _ids(m.search(query, k=3, filter=where)) == [["c"]]
        assert m.search(query, k=3)[0].hits[0].metadata == f.search(query, k=3)[0].hits[0].metadata
        # a number and its text find each other (a CSV's metadata are text, a command line's filter too)
        for where, want in (({"f": "1.5"}, "a"), ({"num": "3"}, "c"), ({"code": 30}, "b"), ({"code": "30"}, "b"),
                            ({"num": ["x", "3"]}, "c")):
            assert _ids(f.search(query, k=3, filter=where)) == _ids(m.search(query, k=3, filter=where)) == [[want]], where
        assert _ids(f.search(query, k=3, filter={"num": "03"})) == [[]]  # only the number's own spelling


def test_items_added_and_removed_over_http_reach_the_collection(tmp_path):
    import httpx

    from conftest import API_KEY

    run("build", SAMPLE / "catalog.csv", "-o", tmp_path / "index", "--backend", "milvus", "--milvus-uri", tmp_path / "w.db")
    new = SAMPLE / "queries" / "sunglasses-23724.jpg"
    srv = Server(tmp_path / "index", env={"LOOKALIKE_API_KEY": API_KEY})
    try:
        with httpx.Client(base_url=srv.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            r = c.post("/items", files={"file": ("s.jpg", new.read_bytes(), "image/jpeg")},
                       data={"id": "new-shades", "label": "Test shades"})
            assert r.status_code == 201, r.text
            found = c.post("/search", files={"file": ("q.jpg", new.read_bytes(), "image/jpeg")},
                           params={"k": 3, "filter": json.dumps({"label": "Test shades"})}).json()
            assert [h["id"] for h in found["results"][0]["hits"]] == ["new-shades"]  # its metadata is in Milvus
            assert c.delete("/items/new-shades").status_code == 200
            found = c.post("/search", files={"file": ("q.jpg", new.read_bytes(), "image/jpeg")},
                           params={"k": 3, "filter": json.dumps({"label": "Test shades"})}).json()
            assert found["results"][0]["hits"] == []
    finally:
        srv.stop()
    assert client(str(tmp_path / "w.db")).query("lookalike_index", filter="", output_fields=["count(*)"])[0]["count(*)"] == 300
    release(str(tmp_path / "w.db"))


def test_a_memory_budget_chooses_among_the_kinds_milvus_offers(tmp_path):
    with VisualSearch.build(SAMPLE / "catalog.csv", tmp_path / "index", backend="milvus", milvus_uri=tmp_path / "b.db",
                            max_memory="1GB") as vs:
        info = vs.info()
        assert info["index"] == "flat" and info["recall_at_10"] == 1.0 and info["index_params"]["max_memory"] == 2**30
        assert vs.reindex()["after"]["kind"] == "flat"  # chosen again with the same budget, in the same collection
        assert len(vs.search(vs._index.vectors[:2], k=3)[0].hits) == 3
    rng = np.random.default_rng(2)
    x = prepare(rng.standard_normal((3000, 64)).astype(np.float32), "cosine")
    entry = backend_entry(str(tmp_path / "b.db"), "budget")
    index = MilvusIndex.create("auto", "cosine", x, np.arange(3000), backend=entry, max_memory=300_000)  # codes only
    assert index.spec.kind == "ivfsq8" and index.spec.measured["recall_at_10"] >= 0.9
    index.committed()
    assert MilvusIndex.load(index.spec, 64, x, np.arange(3000))[1]
    release(entry["uri"])
