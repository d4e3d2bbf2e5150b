"""The HTTP service, started for real by `lookalike serve` on the sample catalog and driven over HTTP."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conftest import API_KEY, SAMPLE, Server

CATALOG = list(csv.DictReader(open(SAMPLE / "catalog.csv")))
QUERIES = list(csv.DictReader(open(SAMPLE / "queries" / "queries.csv")))
JEANS = SAMPLE / "queries" / "jeans-18193.jpg"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def vectors(sample_index):
    """Features of the sample's query photos, computed in process (to send as vectors)."""
    from lookalike import VisualSearch

    with VisualSearch.open(sample_index) as vs:
        return vs.featurize([SAMPLE / "queries" / q["image"] for q in QUERIES])


@pytest.fixture(scope="module")
def in_process(sample_index):
    """What the Python API answers for the query photos: top-1 ids and 5-NN voted labels."""
    from lookalike import VisualSearch

    with VisualSearch.open(sample_index) as vs:
        paths = [SAMPLE / "queries" / q["image"] for q in QUERIES]
        top = [r.hits[0].id for r in vs.search(paths, k=1)]
        voted = [v["label"] for v in vs.classify(paths, k=5)]
    return top, voted


def upload(client, *paths, **params):
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    return client.post("/search", files=files, params=params)


def assert_error(response, status: int, needle: str = ""):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert needle.lower() in body["detail"].lower(), body


# --- /search ------------------------------------------------------------------------------------


def test_catalog_image_finds_itself_first(client):
    row = CATALOG[17]
    r = upload(client, SAMPLE / row["image"], k=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"results", "took_ms"} and body["took_ms"] > 0
    (result,) = body["results"]
    hits = result["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["id"] == row["id"] and hits[0]["score"] > 0.999
    assert set(hits[0]) == {"rank", "id", "score", "distance", "metadata", "image_url"}
    assert hits[0]["metadata"]["title"] == row["title"] and hits[0]["metadata"]["location"] == row["location"]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert hits[0]["image_url"] == f"/items/{row['id']}/image"


def test_query_photos_in_one_request_answer_as_the_python_api_does(client, in_process):
    paths = [SAMPLE / "queries" / q["image"] for q in QUERIES]
    r = upload(client, *paths, k=1)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [res["query"] for res in results] == [p.name for p in paths]
    assert [res["hits"][0]["id"] for res in results] == in_process[0]


def test_base64_vector_and_raw_body_queries_agree_with_the_upload(client, vectors):
    by_upload = upload(client, JEANS, k=5).json()["results"][0]["hits"]
    ids = [h["id"] for h in by_upload]
    b64 = client.post("/search", json={"image_base64": base64.b64encode(JEANS.read_bytes()).decode(), "k": 5})
    raw = client.post("/search", content=JEANS.read_bytes(), headers={"Content-Type": "image/jpeg"}, params={"k": 5})
    jeans = [q["image"] for q in QUERIES].index(JEANS.name)
    vec = client.post("/search", json={"vector": vectors[jeans].tolist(), "k": 5})
    for r in (b64, raw, vec):
        assert r.status_code == 200, r.text
        assert [h["id"] for h in r.json()["results"][0]["hits"]] == ids
        assert r.json()["results"][0]["hits"][0]["score"] == pytest.approx(by_upload[0]["score"], abs=1e-4)


def test_min_score_filter_and_k_larger_than_the_catalog(client):
    none = upload(client, JEANS, min_score=0.99)
    assert none.status_code == 200 and none.json()["results"][0]["hits"] == []
    some = upload(client, JEANS, k=50, min_score=0.8).json()["results"][0]["hits"]
    assert some and all(h["score"] >= 0.8 for h in some)
    women = upload(client, JEANS, k=20, filter=json.dumps({"gender": "Women"})).json()["results"][0]["hits"]
    assert len(women) == 20 and all(h["metadata"]["gender"] == "Women" for h in women)
    form = client.post("/search", files=[("file", ("q.jpg", JEANS.read_bytes(), "image/jpeg"))],
                       data={"k": "2", "filter": json.dumps({"label": ["Watches", "Jeans"]})})
    assert [h["metadata"]["label"] for h in form.json()["results"][0]["hits"]] == ["Jeans", "Jeans"]
    everything = upload(client, JEANS, k=1000).json()["results"][0]["hits"]
    assert len(everything) == len(CATALOG)
    # whole numbers are matched as 64-bit integers: one past the range is refused, the edges are not
    assert_error(upload(client, JEANS, filter=json.dumps({"year": 2**63})), 422, "out of the 64-bit range")
    for edge in (2**63 - 1, -2**63):
        assert upload(client, JEANS, filter=json.dumps({"year": edge})).json()["results"][0]["hits"] == []


def test_query_expansion_answers_as_the_python_api_does(client, sample_index):
    from lookalike import VisualSearch

    expected = [h.id for h in VisualSearch.open(sample_index).search(JEANS, k=5, expand=3).hits]
    by_query = upload(client, JEANS, k=5, expand=3)
    by_form = client.post("/search", files=[("file", ("q.jpg", JEANS.read_bytes(), "image/jpeg"))], data={"k": "5", "expand": "3"})
    by_json = client.post("/search", json={"image_base64": base64.b64encode(JEANS.read_bytes()).decode(), "k": 5, "expand": 3})
    for r in (by_query, by_form, by_json):
        assert r.status_code == 200, r.text
        assert [h["id"] for h in r.json()["results"][0]["hits"]] == expected


def test_a_sideways_photo_with_orient_answers_as_the_python_api_does(client, sample_index, tmp_path):
    from PIL import Image

    from lookalike import VisualSearch

    sideways = tmp_path / "sideways.jpg"
    Image.open(JEANS).rotate(90, expand=True).save(sideways, quality=95)
    expected = [h.id for h in VisualSearch.open(sample_index).search(sideways, k=5, orient=True).hits]
    by_query = upload(client, sideways, k=5, orient="true")
    by_form = client.post("/search", files=[("file", ("q.jpg", sideways.read_bytes(), "image/jpeg"))], data={"k": "5", "orient": "1"})
    by_json = client.post("/search", json={"image_base64": base64.b64encode(sideways.read_bytes()).decode(), "k": 5, "orient": True})
    for r in (by_query, by_form, by_json):
        assert r.status_code == 200, r.text
        assert [h["id"] for h in r.json()["results"][0]["hits"]] == expected
    assert by_json.json()["results"][0]["hits"][0]["metadata"]["label"] == "Jeans"
    # orient=auto (the camera page's): the same hits as the Python API, upright and sideways, with regions too
    vs = VisualSearch.open(sample_index)
    for photo in (sideways, JEANS):
        for regions in (False, True, "auto"):
            expected = [(h.id, round(h.score, 4)) for h in vs.search(photo, k=5, orient="auto", regions=regions).hits]
            by_query = upload(client, photo, k=5, orient="auto", regions=str(regions).lower())
            by_json = client.post("/search", json={"image_base64": base64.b64encode(photo.read_bytes()).decode(), "k": 5,
                                                   "orient": "auto", "regions": regions})
            for r in (by_query, by_json):
                assert r.status_code == 200, r.text
                assert [(h["id"], round(h["score"], 4)) for h in r.json()["results"][0]["hits"]] == expected
    # budget_ms (the camera page sends one): a photo's second looks only when they fit in it. A shop
    # photo of a thing the catalog lacks, turned: unsure at the first look, so it takes second looks
    from conftest import DATA

    stranger = tmp_path / "stranger.jpg"
    Image.open(sorted((DATA / "grocery" / "photos" / "God-Morgon-Orange-Juice").glob("*.jpg"))[0]).rotate(
        90, expand=True).save(stranger, quality=95)
    first_look = vs.search(stranger, k=5, regions=True)
    every_look = vs.search(stranger, k=5, orient="auto", regions="auto")
    assert vs.unsure(first_look.hits) and [h.id for h in every_look.hits] != [h.id for h in first_look.hits]
    for budget, expected, skipped in ((1, first_look, ["turn", "grid"]), (60_000, every_look, [])):
        by_query = upload(client, stranger, k=5, orient="auto", regions="auto", budget_ms=str(budget))
        by_json = client.post("/search", json={"image_base64": base64.b64encode(stranger.read_bytes()).decode(), "k": 5,
                                               "orient": "auto", "regions": "auto", "budget_ms": budget})
        for r in (by_query, by_json):
            assert r.status_code == 200, r.text
            assert [(h["id"], round(h["score"], 4)) for h in r.json()["results"][0]["hits"]] == \
                [(h.id, round(h.score, 4)) for h in expected.hits]
            assert r.json()["results"][0]["skipped_looks"] == skipped  # the looks the budget left out
    no_budget = upload(client, stranger, k=5, orient="auto", regions="auto")
    assert "skipped_looks" not in no_budget.json()["results"][0]
    for bad in ({"orient": "sometimes"}, {"orient": 2}, {"regions": "sometimes"}):
        r = client.post("/search", json={"image_base64": base64.b64encode(JEANS.read_bytes()).decode(), **bad})
        assert_error(r, 422, f"{next(iter(bad))} must be true")
    for bad in ("0", "-3", "soon", "nan"):
        r = client.post("/search", files=[("file", ("q.jpg", JEANS.read_bytes(), "image/jpeg"))],
                        data={"regions": "auto", "budget_ms": bad})
        assert_error(r, 422, "budget_ms must be a")
    r = client.post("/search", json={"image_base64": base64.b64encode(JEANS.read_bytes()).decode(), "budget_ms": "soon"})
    assert_error(r, 422, "budget_ms must be a finite number")
    r = client.post("/search", files=[("file", ("q.jpg", JEANS.read_bytes(), "image/jpeg"))],
                    data={"regions": "true", "budget_ms": "100"})  # nothing "auto" for it to limit
    assert_error(r, 422, "budget_ms limits the second looks of orient or regions 'auto'")
    unverified = upload(client, JEANS, k=5, verify="false")  # an index without local features: the same hits
    assert [h["id"] for h in unverified.json()["results"][0]["hits"]] == [h["id"] for h in upload(client, JEANS, k=5).json()["results"][0]["hits"]]
    assert "verified" not in unverified.json()["results"][0]["hits"][0]


# --- /invocations --------------------------------------------------------------------------------


def test_invocations_speaks_the_sagemaker_knn_formats(client, vectors, in_process):
    as_csv = "\n".join(",".join(repr(float(x)) for x in row) for row in vectors)
    r = client.post("/invocations", content=as_csv, headers={"Content-Type": "text/csv"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    predictions = r.json()["predictions"]
    assert [p["predicted_label"] for p in predictions] == in_process[1]
    assert all(set(p) == {"predicted_label", "ids"} and len(p["ids"]) == 5 for p in predictions)

    instances = [{"features": vectors[0].tolist()}, {"data": {"features": {"values": vectors[1].tolist()}}}]
    r = client.post("/invocations", json={"instances": instances}, params={"k": 3},
                    headers={"Accept": "application/json; verbose=true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body) == ["predictions"] and len(body["predictions"]) == 2
    for p in body["predictions"]:
        assert set(p) == {"predicted_label", "labels", "distances", "ids"}
        assert p["predicted_label"] == max(set(p["labels"]), key=p["labels"].count)
        assert len(p["labels"]) == len(p["distances"]) == len(p["ids"]) == 3
        assert p["distances"] == sorted(p["distances"])  # most similar first
        assert all(isinstance(d, float) for d in p["distances"])
    # the neighbours are the ones /search gives for the same vector
    same = client.post("/search", json={"vector": vectors[0].tolist(), "k": 3}).json()["results"][0]["hits"]
    assert body["predictions"][0]["ids"] == [h["id"] for h in same]
    assert body["predictions"][0]["distances"] == pytest.approx([h["distance"] for h in same], abs=1e-6)

    lines = "".join(json.dumps({"features": v.tolist()}) + "\n" for v in vectors[:2])
    r = client.post("/invocations", content=lines, headers={"Content-Type": "application/jsonlines", "Accept": "application/jsonlines"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/jsonlines")
    assert [json.loads(x)["predicted_label"] for x in r.text.splitlines()] == in_process[1][:2]


# --- bad requests: 4xx JSON, never a 500, and the service keeps answering --------------------------


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, "PNG")  # 100 M pixels in a few kB
    return buf.getvalue()


def test_bad_requests_get_4xx_json_and_the_service_keeps_answering(client, server):
    jpeg = JEANS.read_bytes()
    html = b"<!doctype html><html><body><script>alert(1)</script></body></html>"
    cases = [
        (upload_bytes(client, jpeg[: len(jpeg) // 3]), 422, "truncated"),
        (upload_bytes(client, html), 415, "not a recognised image"),
        (client.post("/search", content=html, headers={"Content-Type": "image/jpeg"}), 415, "not a recognised image"),
        (upload_bytes(client, _bomb_png()), 422, "pixel"),
        (upload_bytes(client, b""), 415, ""),
        (client.post("/search", json={"vector": [0.5] * 7}), 422, "dimension 7"),
        (client.post("/search", content='{"vector": [' + ", ".join(["NaN"] * 1280) + "]}",
                     headers={"Content-Type": "application/json"}), 422, "finite"),
        (client.post("/search", json={"vector": ["a"] * 1280}), 422, "numbers"),
        (client.post("/search", json={"image_url": "http://127.0.0.1:1/x.jpg"}), 400, "does not fetch"),
        (client.post("/search", json={"image_url": "/etc/passwd"}), 422, "http"),
        (client.post("/search", json={"image_base64": "!!!"}), 422, "base64"),
        (client.post("/search", json={"image_base64": "aGk=", "vector": [1]}), 422, "exactly one"),
        (client.post("/search", json=[1, 2]), 422, "object"),
        (client.post("/search", content=b"{", headers={"Content-Type": "application/json"}), 422, "json"),
        (client.post("/search", content=b"x", headers={"Content-Type": "text/plain"}), 415, ""),
        (upload(client, JEANS, k=0), 422, ""),
        (upload(client, JEANS, k="abc"), 422, ""),
        (upload(client, JEANS, filter="gender=Women"), 422, "json object"),
        (upload(client, JEANS, min_score="nan"), 422, "finite"),
        (upload(client, JEANS, expand=51), 422, ""),
        (upload(client, JEANS, orient="maybe"), 422, ""),
        (upload(client, JEANS, regions="maybe"), 422, ""),
        (client.post("/search", json={"image_base64": "aGk=", "regions": 1}), 422, "regions"),
        (upload(client, JEANS, verify="true"), 422, "without local features"),
        (client.post("/search", json={"image_base64": "aGk=", "orient": "yes"}), 422, "orient"),
        (client.post("/search", json={"image_base64": "aGk=", "expand": "2"}), 422, "expand"),
        (client.post("/search", files=[("other", ("a.txt", b"hi", "text/plain"))]), 415, ""),
        (client.post("/search", data={"k": "3"}), 415, "multipart"),
        (client.post("/search", files=[("k", (None, "3"))]), 422, "no image"),
        (client.post("/search", content=b"x" * (21 * 1024 * 1024), headers={"Content-Type": "image/jpeg"}), 413, "limit"),
        (client.post("/invocations", content="1,2,nan", headers={"Content-Type": "text/csv"}), 422, "finite"),
        (client.post("/invocations", content="1,2,3", headers={"Content-Type": "text/csv"}), 422, "dimension 3"),
        (client.post("/invocations", content="1,x", headers={"Content-Type": "text/csv"}), 422, "not a number"),
        (client.post("/invocations", json={"instances": [{"features": []}]}), 422, "features"),
        (client.post("/invocations", json={"rows": []}), 422, "instances"),
        (client.post("/invocations", content=b"\x00", headers={"Content-Type": "application/x-recordio-protobuf"}), 415, "text/csv"),
        (client.post("/invocations", content="1", headers={"Content-Type": "text/csv", "Accept": "text/html"}), 406, "accept"),
        (client.get("/items/no-such-item"), 404, "no-such-item"),
        (client.get("/items/..%2F..%2Fetc%2Fpasswd/image"), 404, "etc/passwd"),
        (client.get("/items/../../etc/passwd"), 404, ""),
        (client.get(f"/items/{CATALOG[0]['id']}/image", params={"size": 5}), 422, "size"),
        (client.get("/no/such/route"), 404, ""),
        (client.put("/search"), 405, ""),
        (client.post("/items", json={"id": "x", "image_url": "http://10.0.0.1/a.jpg"}), 403, "api key"),
        (client.delete(f"/items/{CATALOG[0]['id']}"), 403, "api key"),
    ]
    for response, status, needle in cases:
        assert_error(response, status, needle)
    assert client.get("/readyz").status_code == 200
    assert upload(client, JEANS, k=1).json()["results"][0]["hits"][0]["metadata"]["label"] == "Jeans"
    assert "Traceback" not in server.output()


def upload_bytes(client, data: bytes, name: str = "upload.jpg"):
    return client.post("/search", files=[("file", (name, data, "image/jpeg"))])


def test_chunked_body_over_the_limit_is_refused(client):
    def chunks():
        for _ in range(22):
            yield b"\xff" * (1024 * 1024)

    r = client.post("/search", content=chunks(), headers={"Content-Type": "image/jpeg"})
    assert_error(r, 413, "limit")


def test_url_fetching_when_on_still_refuses_private_and_loopback_addresses(sample_index):
    srv = Server(sample_index, "--allow-urls")
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for url in (f"{srv.url}/items/{CATALOG[0]['id']}/image", "http://localhost/x.jpg", "http://10.1.2.3/x.jpg",
                        "http://[::1]/x.jpg", "http://169.254.169.254/latest/meta-data"):
                assert_error(c.post("/search", json={"image_url": url}), 400, "private or local")
            assert c.get("/readyz").status_code == 200
    finally:
        srv.stop()


# --- items ------------------------------------------------------------------------------------------


def test_items_and_their_thumbnails(client):
    row = CATALOG[3]
    item = client.get(f"/items/{row['id']}").json()
    assert item == {"id": row["id"], "label": row["label"], "image_url": f"/items/{row['id']}/image",
                    "metadata": {k: row[k] for k in ("label", "title", "location", "colour", "gender")}}
    for size, expected in ((None, 256), (64, 64)):
        r = client.get(item["image_url"], params={} if size is None else {"size": size})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        img = Image.open(io.BytesIO(r.content))
        original = Image.open(SAMPLE / row["image"])
        assert max(img.size) <= expected and max(img.size) == min(expected, max(original.size))
    # HEAD (uptime checkers, caches): the GET's status and headers, no body
    for path in ("/livez", "/readyz", item["image_url"], f"/items/{row['id']}", "/items/no-such-item"):
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code and head.content == b"", path
        assert head.headers["content-type"] == got.headers["content-type"], path
        assert head.headers.get("content-length") == got.headers.get("content-length"), path


def test_add_search_and_delete_an_item_over_http(writable_server):
    new = SAMPLE / "queries" / "sunglasses-23724.jpg"
    with httpx.Client(base_url=writable_server.url, timeout=60, headers=AUTH) as c:
        before = c.get("/readyz").json()
        r = c.post("/items", files={"file": ("s.jpg", new.read_bytes(), "image/jpeg")},
                   data={"id": "new-sunglasses", "label": "Sunglasses", "metadata": json.dumps({"title": "Test shades", "location": "Aisle 9"})})
        assert r.status_code == 201, r.text
        assert r.json()["id"] == "new-sunglasses" and r.json()["items"] == before["items"] + 1
        hits = upload(c, new, k=1).json()["results"][0]["hits"]
        assert hits[0]["id"] == "new-sunglasses" and hits[0]["score"] > 0.999
        assert hits[0]["metadata"] == {"title": "Test shades", "location": "Aisle 9", "label": "Sunglasses"}
        assert c.get("/items/new-sunglasses/image").status_code == 200
        assert_error(c.post("/items", files={"file": ("s.jpg", new.read_bytes(), "image/jpeg")}, data={"id": "new-sunglasses"}), 409, "already")
        assert_error(c.post("/items", files={"file": ("p.html", b"<html></html>", "image/jpeg")}, data={"id": "html"}), 415, "not a recognised image")
        two_labels = c.post("/items", files={"file": ("s.jpg", new.read_bytes(), "image/jpeg")},
                            data={"id": "two-labels", "label": "X", "metadata": json.dumps({"label": "Y"})})
        assert_error(two_labels, 422, "label 'X' and the metadata's label 'Y' differ")
        # JSON with base64, id derived from the content
        r = c.post("/items", json={"image_base64": base64.b64encode(JEANS.read_bytes()).decode(), "label": "Jeans"})
        assert r.status_code == 201, r.text
        derived = r.json()["id"]
        assert len(derived) == 16
        assert c.get("/readyz").json()["items"] == before["items"] + 2
        from lookalike import VisualSearch

        kept = Path(VisualSearch.open(writable_server.index_dir).get("new-sunglasses").image)
        assert kept.is_absolute() and kept.parent == writable_server.index_dir.absolute() / "uploads" and kept.is_file()
        os.utime(kept, (time.time() - 3600, time.time() - 3600))  # kept an hour ago: past the grace of adds in flight
        assert c.delete("/items/new-sunglasses").json()["removed"] == "new-sunglasses"
        assert not kept.exists()  # its uploaded image went with it
        assert c.delete(f"/items/{derived}").status_code == 200
        assert_error(c.get("/items/new-sunglasses"), 404)
        assert upload(c, new, k=1).json()["results"][0]["hits"][0]["id"] != "new-sunglasses"
        after = c.get("/readyz").json()
        assert after["items"] == before["items"] and after["generation"] == before["generation"] + 4
    from lookalike import VisualSearch

    with VisualSearch.open(writable_server.index_dir) as vs:  # the changes are on disk
        assert len(vs) == before["items"] and vs.get("new-sunglasses") is None


def test_every_id_has_a_thumbnail_url_that_works(writable_server):
    # ids that are dot segments ("." and "..": a client resolves /items/../image as /image) or hold a slash
    photo = SAMPLE / "queries" / "sunglasses-23724.jpg"
    odd = ["..", ".", "shelf/3", "a b?c#d"]
    with httpx.Client(base_url=writable_server.url, timeout=60, headers=AUTH) as c:
        for item_id in odd:
            r = c.post("/items", files={"file": ("s.jpg", photo.read_bytes(), "image/jpeg")}, data={"id": item_id})
            assert r.status_code == 201, r.text
        hits = upload(c, photo, k=len(odd)).json()["results"][0]["hits"]
        assert sorted(h["id"] for h in hits) == sorted(odd)
        for hit in hits:
            r = c.get(hit["image_url"])
            assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", (hit["id"], hit["image_url"])
            item = c.get(hit["image_url"].removesuffix("/image"))
            assert item.status_code == 200 and item.json()["id"] == hit["id"]


def test_write_routes_need_the_api_key(writable_server):
    new = SAMPLE / "queries" / "sunglasses-23724.jpg"
    with httpx.Client(base_url=writable_server.url, timeout=60) as c:
        before = c.get("/readyz").json()
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789abc"}, {"Authorization": API_KEY},
                        {"Authorization": f"Basic {API_KEY}"}, {"Authorization": f"Bearer {API_KEY}x"}):
            r = c.post("/items", files={"file": ("s.jpg", new.read_bytes(), "image/jpeg")}, data={"id": "x"}, headers=headers)
            assert_error(r, 401, "authorization: bearer")
            assert_error(c.delete(f"/items/{CATALOG[0]['id']}", headers=headers), 401)
            assert API_KEY not in r.text
        assert c.get("/readyz").json() == before
        assert "lookalike_unauthorized_total 10" in c.get("/metrics").text
        assert_error(c.post("/items", json={"id": "x", "image_url": "http://10.0.0.1/a.jpg"}, headers=AUTH), 400, "does not fetch")
        assert_error(c.delete("/items/never-there", headers=AUTH), 404, "never-there")
    assert API_KEY not in writable_server.output()


def test_service_follows_changes_made_by_another_process(writable_server):
    with httpx.Client(base_url=writable_server.url, timeout=60, headers=AUTH) as c:
        before = c.get("/readyz").json()
        gone = CATALOG[0]["id"]
        cli = subprocess.run([sys.executable, "-m", "lookalike.cli", "remove", str(writable_server.index_dir), gone],
                             capture_output=True, text=True)
        assert cli.returncode == 0, cli.stderr
        import time

        deadline = time.monotonic() + 10
        while c.get("/readyz").json()["generation"] == before["generation"] and time.monotonic() < deadline:
            time.sleep(0.2)
        after = c.get("/readyz").json()
        assert after["generation"] == before["generation"] + 1 and after["items"] == before["items"] - 1
        assert_error(c.get(f"/items/{gone}"), 404)
        hits = upload(c, SAMPLE / CATALOG[0]["image"], k=3).json()["results"][0]["hits"]
        assert gone not in [h["id"] for h in hits]


def test_service_follows_an_index_rebuilt_in_its_place_and_says_when_it_is_gone(writable_server, tmp_path):
    """build --force over the served index with another way of making features: the service
    makes what it adds the new way (it had kept the old model and stored vectors that did not
    match); /readyz reads the index on disk, so a damaged manifest is 503 there too."""
    import time

    from lookalike import VisualSearch

    rebuilt = subprocess.run([sys.executable, "-m", "lookalike.cli", "build", str(SAMPLE / "catalog.csv"), "-o",
                              str(writable_server.index_dir), "--force", "--tta", "none", "-q"], capture_output=True, text=True)
    assert rebuilt.returncode == 0, rebuilt.stderr
    with httpx.Client(base_url=writable_server.url, timeout=60, headers=AUTH) as c:
        assert c.get("/readyz").json()["generation"] == 1  # as before the rebuild: only the build_id tells them apart
        picture = SAMPLE / CATALOG[0]["image"]
        r = c.post("/items", files={"file": ("p.jpg", picture.read_bytes(), "image/jpeg")}, data={"id": "same-picture"})
        assert r.status_code in (200, 201), r.text
        with VisualSearch.open(writable_server.index_dir) as vs:
            assert vs.spec.tta == "none"
            scores = {h.id: h.score for h in vs.search(picture, k=2).hits}
        assert set(scores) == {CATALOG[0]["id"], "same-picture"}
        assert abs(scores["same-picture"] - scores[CATALOG[0]["id"]]) < 1e-4  # featurized as the build did
        manifest = writable_server.index_dir / "lookalike.json"
        good = manifest.read_bytes()
        manifest.write_bytes(good[:-20])
        time.sleep(0.1)
        assert_error(c.get("/readyz"), 503, "lookalike.json")
        vector = {"vector": [0.0] * 1279 + [1.0], "k": 1}
        # every search answers as the last look at the disk did (it looks once a second), never from memory
        assert [c.post("/search", json=vector).status_code for _ in range(8)] == [503] * 8
        manifest.write_bytes(good)
        assert c.get("/readyz").status_code == 200
        assert [c.post("/search", json=vector).status_code for _ in range(4)] == [200] * 4


def test_searches_while_items_are_added_and_removed_never_fail(writable_server):
    errors: list[str] = []
    done = threading.Event()
    paths = [SAMPLE / row["image"] for row in CATALOG[:8]]

    def searcher(i: int):
        with httpx.Client(base_url=writable_server.url, timeout=60, headers=AUTH) as c:
            n = 0
            while not done.is_set() or n < 3:
                r = upload(c, paths[i % len(paths)], k=3)
                n += 1
                if r.status_code != 200 or len(r.json()["results"][0]["hits"]) != 3:
                    errors.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=searcher, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        with httpx.Client(base_url=writable_server.url, timeout=60, headers=AUTH) as c:
            for i in range(4):
                r = c.post("/items", files={"file": ("x.jpg", paths[i].read_bytes(), "image/jpeg")}, data={"id": f"copy-{i}"})
                assert r.status_code == 201, r.text
            for i in range(4):
                assert c.delete(f"/items/copy-{i}").status_code == 200
    finally:
        done.set()
        for t in threads:
            t.join()
    assert errors == []


# --- health, metrics, docs, page ----------------------------------------------------------------------


def test_health_metrics_and_docs(client):
    assert client.get("/livez").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["items"] == len(CATALOG) and ready["model"] == "efficientnet-lite0"
    upload(client, JEANS)
    client.get("/items/no-such")
    text = client.get("/metrics").text
    assert 'lookalike_requests_total{method="POST",route="/search",status="200"}' in text
    assert 'lookalike_requests_total{method="GET",route="/items/{item_id:path}",status="404"}' in text
    assert 'lookalike_request_duration_seconds_bucket{method="POST",route="/search",le="+Inf"}' in text
    assert f"lookalike_index_items {len(CATALOG)}" in text
    spec = client.get("/openapi.json").json()
    assert {"/search", "/invocations", "/items", "/items/{item_id}", "/readyz", "/metrics"} <= set(spec["paths"]) | {
        p.replace(":path", "") for p in spec["paths"]}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text and "cdn." not in docs.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):  # served from here: the docs work offline
        assert client.get(f"/docs-assets/{asset}").status_code == 200


def test_several_workers_serve_the_same_index(sample_index):
    srv = Server(sample_index, "--workers", "2")
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            ids = {upload(c, JEANS, k=1).json()["results"][0]["hits"][0]["id"] for _ in range(6)}
            assert len(ids) == 1
    finally:
        srv.stop()


def test_a_verifying_index_answers_with_inliers_as_the_python_api_does(tmp_path):
    from conftest import DATA, Server

    from lookalike import VisualSearch

    index = tmp_path / "grocery"
    vs = VisualSearch.build(DATA / "grocery" / "catalog.csv", index, local_features=True)
    photos = sorted((DATA / "grocery" / "photos" / "God-Morgon-Orange-Juice").glob("*.jpg"))[:3]
    expected = [[(h.id, h.inliers, h.verified) for h in r.hits] for r in vs.search(photos, k=5)]
    srv = Server(index)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for photo, want in zip(photos, expected):
                r = c.post("/search", files=[("file", (photo.name, photo.read_bytes(), "image/jpeg"))], params={"k": 5})
                assert r.status_code == 200, r.text
                got = [(h["id"], h["inliers"], h["verified"]) for h in r.json()["results"][0]["hits"]]
                assert [g[0] for g in got] == [w[0] for w in want] and got[0][2] is True
                assert all(abs(g[1] - w[1]) <= 3 for g, w in zip(got, want))  # the service decodes JPEGs reduced
            off = c.post("/search", json={"image_base64": base64.b64encode(photos[0].read_bytes()).decode(), "verify": False})
            assert "verified" not in off.json()["results"][0]["hits"][0]
    finally:
        srv.stop()


def test_regions_answer_as_the_python_api_does(client, sample_index, vectors):
    """regions=true on /search (query string, form field, JSON): the hits the Python API gives."""
    from lookalike import VisualSearch

    photo = SAMPLE / "queries" / QUERIES[0]["image"]
    with VisualSearch.open(sample_index) as vs:
        want = [h.id for h in vs.search(photo, k=5, regions=True).hits]
        plain_vector = [h.id for h in vs.search(vectors[0], k=5).hits]
    for r in (upload(client, photo, k=5, regions="true"),
              client.post("/search", files=[("file", (photo.name, photo.read_bytes(), "image/jpeg")), ("regions", (None, "1")),
                                            ("k", (None, "5"))]),
              client.post("/search", json={"image_base64": base64.b64encode(photo.read_bytes()).decode(), "k": 5,
                                           "regions": True})):
        assert r.status_code == 200, r.text
        got = [h["id"] for h in r.json()["results"][0]["hits"]]
        assert got[:3] == want[:3], (got, want)  # the service decodes JPEGs reduced: the tail may differ
    r = client.post("/search", json={"vector": vectors[0].tolist(), "k": 5, "regions": True})
    assert [h["id"] for h in r.json()["results"][0]["hits"]] == plain_vector  # a vector has no regions
