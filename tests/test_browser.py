"""The web page at `/`, driven in a real browser (Debian's Chromium through Playwright) against a
real `lookalike serve` of the sample catalog: upload, drag-and-drop, paste, "no match", API errors,
live camera mode (Chromium's fake camera playing a Y4M video made of a real catalog photo) and the
explanations shown when there is no camera.

Every page is watched for uncaught JS errors and Content-Security-Policy violations.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("LOOKALIKE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync", "--disable-quic",
]
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

CATALOG = {row["id"]: row for row in csv.DictReader(open(SAMPLE / "catalog.csv", newline=""))}
QUERIES = {row["id"]: row for row in csv.DictReader(open(SAMPLE / "queries" / "queries.csv", newline=""))}

# A real query photo (a different pair of sunglasses than any in the catalog) whose top hits through
# the API are all labelled Sunglasses (top score ~0.85, next label far below).
QUERY_PHOTO = "23724"
# The camera film: a backpack whose image is far from every other item (runner-up score ~0.6).
CAMERA_ITEM = "2246"


# --- helpers ---------------------------------------------------------------------------------


def write_y4m(path: Path, image: Path, *, width: int = 320, height: int = 240, fps: int = 15,
              seconds: float = 2.0, background=(118, 118, 118)) -> Path:
    """A YUV4MPEG2 (C420jpeg: full-range BT.601, 4:2:0) video of `image` letterboxed into the frame,
    drifting by a few pixels and slightly changing size from frame to frame like a hand-held shot."""
    src = Image.open(image).convert("RGB")
    rng = np.random.default_rng(0)
    frames = max(1, round(fps * seconds))
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for _ in range(frames):
            scale = min(width / src.width, height / src.height) * rng.uniform(0.85, 0.95)
            tile = src.resize((round(src.width * scale), round(src.height * scale)), Image.BILINEAR)
            dx, dy = (int(v) for v in rng.integers(-6, 7, size=2))
            frame = Image.new("RGB", (width, height), background)
            frame.paste(tile, ((width - tile.width) // 2 + dx, (height - tile.height) // 2 + dy))
            ycc = np.asarray(frame.convert("YCbCr"), dtype=np.float32)  # full-range JPEG YCbCr
            chroma = ycc[:, :, 1:].reshape(height // 2, 2, width // 2, 2, 2).mean(axis=(1, 3))
            f.write(b"FRAME\n")
            f.write(ycc[:, :, 0].round().astype(np.uint8).tobytes())
            f.write(chroma[:, :, 0].round().clip(0, 255).astype(np.uint8).tobytes())
            f.write(chroma[:, :, 1].round().clip(0, 255).astype(np.uint8).tobytes())
    return path


def api_search(url: str, data: bytes, filename: str, **params) -> tuple[int, dict]:
    """POST one file to /search the way the page does (multipart, field `file`)."""
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    query = "&".join(f"{k}={v}" for k, v in params.items())
    req = urllib.request.Request(f"{url}/search" + (f"?{query}" if query else ""), data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@contextmanager
def open_page(browser, url: str, *, viewport=LAPTOP, **context_args):
    """A fresh context and page on `url`; fails if the page threw or broke its CSP."""
    context = browser.new_context(viewport=viewport, **context_args)
    page = context.new_page()
    page.set_default_timeout(20_000)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"uncaught: {exc}"))
    page.on("console", lambda msg: problems.append(f"console: {msg.text}")
            if msg.type == "error" and ("Content Security Policy" in msg.text or "Uncaught" in msg.text) else None)
    try:
        page.goto(url)
        yield page
        page.wait_for_timeout(50)  # let late events arrive
        assert problems == [], problems
    finally:
        context.close()


def wait_until(page, js: str, arg=None, timeout: float = 20.0):
    """Poll a JS function until it returns something truthy. (Playwright's wait_for_function evals a
    string inside the page, which the page's Content-Security-Policy rightly forbids.)"""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(js, arg)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {js}")
        page.wait_for_timeout(50)


def wait_ready(page) -> None:
    page.wait_for_selector("#ready.ok")


def wait_for_top(page, item_id: str) -> None:
    wait_until(page, "id => document.querySelector('#results .hit')?.dataset.id === id", item_id)


def first_hit(page):
    return page.locator("#results .hit").first


def hit_ids(page) -> list[str]:
    return page.eval_on_selector_all("#results .hit", "els => els.map(e => e.dataset.id)")


def thumbnail_loaded(page, nth: int = 0) -> None:
    wait_until(page, "n => { const i = document.querySelectorAll('#results .hit .thumb')[n];"
                     " return !!i && i.complete && i.naturalWidth > 0 }", nth)


def hand_over(page, path: Path, how: str) -> None:
    """Give the page a file the way a user would by dropping it or pasting it (real DataTransfer)."""
    page.evaluate(
        """([b64, name, how]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: "image/jpeg"}));
            if (how === "paste") {
                document.body.dispatchEvent(new ClipboardEvent("paste", {bubbles: true, cancelable: true, clipboardData: dt}));
                return;
            }
            const zone = document.getElementById("drop-zone");
            for (const type of ["dragenter", "dragover", "drop"])
                zone.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: dt}));
        }""",
        [base64.b64encode(path.read_bytes()).decode(), path.name, how],
    )


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def playwright():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium (or set LOOKALIKE_CHROMIUM)"
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def camera_video(tmp_path_factory):
    return write_y4m(tmp_path_factory.mktemp("camera") / "backpack.y4m", SAMPLE / "images" / f"{CAMERA_ITEM}.jpg")


@pytest.fixture(scope="module")
def browser(playwright, camera_video):
    """Chromium with a fake camera that plays `camera_video`. A context opened with
    permissions=["camera"] may use it; any other context is refused (NotAllowedError)."""
    browser = playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=[*CHROMIUM_ARGS, "--use-fake-device-for-media-stream", f"--use-file-for-fake-video-capture={camera_video}"],
    )
    yield browser
    browser.close()


# --- still images ----------------------------------------------------------------------------


def test_upload_catalog_image_shows_it_first_with_thumbnail_and_metadata(browser, server):
    item = CATALOG["10998"]  # a watch
    with open_page(browser, server.url + "/") as page:
        wait_ready(page)
        assert page.locator("#ready").inner_text() == "300 items indexed"
        page.set_input_files("#file-input", str(SAMPLE / item["image"]))
        page.wait_for_selector("#results .hit")
        top = first_hit(page)
        assert top.get_attribute("data-id") == item["id"]
        thumbnail_loaded(page)
        assert top.locator(".title").inner_text() == item["title"]
        assert top.locator(".location").is_visible()
        assert item["location"] in top.locator(".location").inner_text()
        for field in ("label", "colour", "gender"):
            assert top.locator(f'.meta .field[data-field="{field}"] dd').inner_text() == item[field]
        assert page.locator("#results .hit").count() == 5  # the default k
        scores = [float(t.split()[1]) for t in page.locator("#results .hit .score").all_inner_texts()]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0.99
        assert page.eval_on_selector("#query-image", "i => !i.hidden && i.complete && i.naturalWidth > 0")
        assert "5 matches" in page.locator("#status").inner_text()

        # k is sent with the query: the same picture again with k=3 gives 3 cells
        page.fill("#k", "3")
        page.set_input_files("#file-input", str(SAMPLE / item["image"]))
        wait_until(page, "() => document.querySelectorAll('#results .hit').length === 3")
        assert hit_ids(page)[0] == item["id"]


def test_thumbnails_of_items_whose_images_are_urls_show(browser, tmp_path):
    """A catalog of image URLs: a hit's thumbnail is a redirect to its URL, which the page's
    Content-Security-Policy must let it load (it had allowed images of its own address only)."""
    import functools
    import http.server
    import threading

    from conftest import Server, write_csv
    from lookalike import ImagePolicy, VisualSearch

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(SAMPLE / "images"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        ids = list(CATALOG)[:6]
        catalog = write_csv(tmp_path / "urls.csv", ["id", "image"], [[i, f"{base}/{i}.jpg"] for i in ids])
        VisualSearch.build(catalog, tmp_path / "idx", policy=ImagePolicy(allow_private_urls=True), progress=False)
        srv = Server(tmp_path / "idx")
        try:
            with open_page(browser, srv.url + "/") as page:  # fails on a CSP violation
                wait_ready(page)
                page.set_input_files("#file-input", str(SAMPLE / "images" / f"{ids[2]}.jpg"))
                wait_for_top(page, ids[2])
                thumbnail_loaded(page)  # from the image server, through the service's redirect
        finally:
            srv.stop()
    finally:
        httpd.shutdown()


def test_real_photo_finds_an_item_of_its_label(browser, server):
    query = QUERIES[QUERY_PHOTO]
    photo = SAMPLE / "queries" / query["image"]
    status, body = api_search(server.url, photo.read_bytes(), photo.name, k=5)
    assert status == 200 and body["results"][0]["hits"][0]["metadata"]["label"] == query["label"]
    with open_page(browser, server.url + "/", viewport=PHONE) as page:
        wait_ready(page)
        page.set_input_files("#file-input", str(photo))
        page.wait_for_selector("#results .hit")
        top = first_hit(page)
        assert top.get_attribute("data-id") == body["results"][0]["hits"][0]["id"]
        label = top.locator('.meta .field[data-field="label"] dd')
        assert label.is_visible() and label.inner_text() == query["label"] == "Sunglasses"
        thumbnail_loaded(page)
        # laid out for a phone: nothing wider than the screen, two cells per row
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        boxes = [page.locator("#results .hit").nth(i).bounding_box() for i in range(2)]
        assert boxes[0]["y"] == boxes[1]["y"] and boxes[1]["x"] > boxes[0]["x"]


def test_drop_and_paste(browser, server):
    with open_page(browser, server.url + "/") as page:
        wait_ready(page)
        hand_over(page, SAMPLE / "images" / "23804.jpg", "drop")
        wait_for_top(page, "23804")
        hand_over(page, SAMPLE / "images" / "9492.jpg", "paste")
        wait_for_top(page, "9492")
        thumbnail_loaded(page)
        assert "9492.jpg" in page.locator("#status").inner_text()


def test_no_match_is_said_clearly(browser, server):
    photo = SAMPLE / "queries" / QUERIES[QUERY_PHOTO]["image"]
    with open_page(browser, server.url + "/") as page:
        wait_ready(page)
        page.fill("#min-score", "0.99")
        page.set_input_files("#file-input", str(photo))
        no_match = page.locator("#no-match")
        no_match.wait_for(state="visible")
        assert no_match.inner_text().startswith("No match")
        assert "0.99" in no_match.inner_text()
        assert page.locator("#results .hit").count() == 0
        # lowering min score brings the matches back (the last picture is searched again)
        page.fill("#min-score", "")
        page.dispatch_event("#min-score", "change")
        page.wait_for_selector("#results .hit")
        assert no_match.is_hidden()


def test_api_error_is_shown_readably(browser, server, tmp_path):
    junk = tmp_path / "notes.jpg"
    junk.write_bytes(b"this is not a picture\n" * 20)
    status, body = api_search(server.url, junk.read_bytes(), junk.name)
    assert 400 <= status < 500 and body.get("error"), (status, body)
    with open_page(browser, server.url + "/") as page:
        wait_ready(page)
        page.set_input_files("#file-input", str(SAMPLE / "images" / "2246.jpg"))
        page.wait_for_selector("#results .hit")
        page.set_input_files("#file-input", str(junk))
        page.wait_for_selector("#status.error")
        message = page.locator("#status").inner_text()
        assert body["error"] in message and (not body.get("detail") or str(body["detail"]) in message)
        assert page.locator("#results .hit").count() == 0  # the old matches are not left standing


def test_the_badge_says_when_the_index_goes_away_and_comes_back(browser, sample_copy):
    """The page keeps checking /readyz (it had stopped after a minute, and said "index loading…"
    for an index that was gone): a search answered 503 shows at the top at once, and the badge
    comes back by itself once the index does."""
    from conftest import Server

    srv = Server(sample_copy)
    manifest = sample_copy / "lookalike.json"
    good = manifest.read_bytes()
    try:
        with open_page(browser, srv.url + "/") as page:
            wait_ready(page)
            manifest.write_bytes(good[:-20])  # damaged under the running service
            time.sleep(1.2)  # past the service's once-a-second look at the disk
            page.set_input_files("#file-input", str(SAMPLE / "images" / "2246.jpg"))
            page.wait_for_selector("#status.error")
            page.wait_for_selector("#ready.bad")
            assert page.locator("#ready").inner_text() == "index unavailable"
            assert "lookalike.json" in page.locator("#ready").get_attribute("title")
            manifest.write_bytes(good)
            page.wait_for_selector("#ready.ok")
            assert page.locator("#ready").inner_text() == "300 items indexed"
            page.set_input_files("#file-input", str(SAMPLE / "images" / "2246.jpg"))
            wait_for_top(page, "2246")
    finally:
        manifest.write_bytes(good)
        srv.stop()


def test_the_api_docs_render_without_the_internet(browser, server):
    # Swagger UI's files come from the service itself (FastAPI's /docs loads them from a CDN)
    with open_page(browser, server.url + "/docs") as page:
        page.wait_for_selector(".opblock-summary-path")
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        assert {"/search", "/invocations", "/readyz"} <= {p.replace("\u200b", "") for p in paths}


# --- camera ----------------------------------------------------------------------------------

# Counts the /search requests in flight, and makes each take 250 ms or more: slower than the
# 100 ms camera ticks, so a page that did not skip ticks would have several in flight.
SLOW_AND_COUNT_SEARCHES = """
    window.__searches = {now: 0, max: 0, started: 0, urls: []};
    const realFetch = window.fetch;
    window.fetch = async function (...args) {
        const isSearch = String(args[0]).includes("/search");
        if (!isSearch) return realFetch.apply(this, args);
        __searches.urls.push(String(args[0]));
        __searches.now += 1;
        __searches.started += 1;
        __searches.max = Math.max(__searches.max, __searches.now);
        try {
            const [response] = await Promise.all([realFetch.apply(this, args), new Promise(r => setTimeout(r, 250))]);
            await response.clone().text();
            return response;
        } finally {
            __searches.now -= 1;
        }
    };
"""


def test_camera_finds_the_filmed_item(browser, server):
    with open_page(browser, server.url + "/", permissions=["camera"]) as page:
        page.add_init_script(SLOW_AND_COUNT_SEARCHES)
        page.reload()
        wait_ready(page)
        page.select_option("#interval", "100")  # ask faster than the server answers: ticks must be skipped
        page.click("#camera-start")
        page.locator("#camera-video").wait_for(state="visible")
        assert page.locator("#camera-error").is_hidden()
        wait_for_top(page, CAMERA_ITEM)
        thumbnail_loaded(page)
        wait_until(page, "() => parseFloat(document.getElementById('rate').dataset.rate) > 0")
        assert float(page.locator("#rate").inner_text().split()[0]) > 0
        assert "ms" in page.locator("#latency").inner_text()
        assert "frames" in first_hit(page).locator(".score").inner_text()

        # later frames update the same cells in place and keep the item on top
        page.eval_on_selector("#results .hit", "e => { e.__mark = 1 }")
        seen = int(page.locator("#rate").get_attribute("data-queries"))
        wait_until(page, "n => +document.getElementById('rate').dataset.queries >= n", seen + 4)
        assert page.eval_on_selector("#results .hit", "e => e.__mark === 1 && e.dataset.id") == CAMERA_ITEM
        assert page.evaluate("window.__searches.max") == 1
        assert page.evaluate("window.__searches.urls.every(u => new URL(u).searchParams.get('regions') === 'auto')")
        assert page.evaluate("window.__searches.urls.every(u => new URL(u).searchParams.get('orient') === 'auto')")
        assert page.evaluate("window.__searches.urls.every(u => new URL(u).searchParams.get('budget_ms') === '150')")

        page.eval_on_selector("#camera-video", "v => { window.__tracks = v.srcObject.getTracks() }")
        page.click("#camera-stop")
        assert page.eval_on_selector("#camera-video", "v => v.hidden && v.srcObject === null")
        assert page.evaluate("() => __tracks.length > 0 && __tracks.every(t => t.readyState === 'ended')")
        assert page.locator("#camera-start").is_visible()
        count = "() => [window.__searches.started, document.getElementById('rate').dataset.queries]"
        before = page.evaluate(count)
        page.wait_for_timeout(600)
        assert page.evaluate(count) == before  # no more frames sent, no late answer shown


def test_camera_permission_denied_is_explained(browser, server):
    with open_page(browser, server.url + "/") as page:  # no camera permission in this context
        wait_ready(page)
        page.click("#camera-start")
        error = page.locator("#camera-error")
        error.wait_for(state="visible")
        assert "permission was denied" in error.inner_text()
        assert page.locator("#camera-video").is_hidden() and page.locator("#camera-start").is_enabled()


@pytest.fixture(scope="module")
def plain_browser(playwright):
    """Chromium without any camera, resolving the made-up host `lookalike.test` to this machine
    (to open the page from an origin that is neither https nor localhost)."""
    browser = playwright.chromium.launch(
        executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP lookalike.test 127.0.0.1"],
    )
    yield browser
    browser.close()


def test_no_camera_is_explained(plain_browser, server):
    with open_page(plain_browser, server.url + "/", permissions=["camera"]) as page:
        wait_ready(page)
        page.click("#camera-start")
        page.locator("#camera-error").wait_for(state="visible")
        assert "No camera was found" in page.locator("#camera-error").inner_text()


def test_insecure_page_explains_https(plain_browser, server):
    """Opened over plain http from another host (a phone on the LAN, say), the browser hides
    navigator.mediaDevices: the page says why and what to do; still images keep working."""
    url = server.url.replace("127.0.0.1", "lookalike.test") + "/"
    with open_page(plain_browser, url, permissions=["camera"]) as page:
        wait_ready(page)
        assert page.evaluate("window.isSecureContext") is False
        page.click("#camera-start")
        error = page.locator("#camera-error")
        error.wait_for(state="visible")
        text = error.inner_text()
        assert "secure" in text and "https" in text and "localhost" in text and url.rstrip("/") in text
        page.set_input_files("#file-input", str(SAMPLE / "images" / "2246.jpg"))
        wait_for_top(page, "2246")
        thumbnail_loaded(page)
