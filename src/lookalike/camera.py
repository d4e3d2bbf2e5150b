"""Live search from a camera, a video file or a stream: query frames, show or print the top matches.

``lookalike camera INDEX --source 0`` opens a window with the live frame and a panel of the top
matches (thumbnail, title, location, score) and the achieved queries/s; ``--headless`` prints one
JSON line per query instead and, at the end, the queries/s. OpenCV is an optional extra
(``pip install 'lookalike[camera]'``) and is imported only here, only when the camera runs.

Pacing, at most one query per ``every_ms``:

- a live source (a camera number, an ``rtsp://``/``http://`` stream, a ``/dev/video*`` device)
  is read continuously in a background thread that keeps only the newest frame, so a query
  always sees the latest picture and slow queries never build a backlog; the query clock is
  wall time.
- a video file is read in order and paced by *video* time: the first frame, then the first
  frame at least ``every_ms`` of video after the previous queried one (the frames in between are
  grabbed, not converted). Headless, nothing waits: the file is processed as fast as the
  machine can, so the reported queries/s is what the machine achieves, and which frames are
  queried depends only on the video and ``every_ms`` (the same JSON on any machine, apart from
  ``t`` and ``ms``). With a window, the file plays in real time, as a camera would show it.

Every query is a full ``VisualSearch.search`` of the frame (BGR converted to an RGB array).
The end of the file, ``--max-queries``, ``q``/Esc in the window or Ctrl-C end the loop; the
summary (queries, seconds, queries/s) is printed either way.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import LookalikeError

WINDOW = "lookalike camera"
PANEL_WIDTH = 380
THUMB = 72
ROW_HEIGHT = 84
HEADER_HEIGHT = 40
VIEW_HEIGHT = 480
STALL_SECONDS = 10.0  # a live source that gives no new frame for this long has ended
LIVE_READ_FAILURES = 50  # consecutive failed reads (about 2 s of a stalled camera) end a live source

# --- OpenCV --------------------------------------------------------------------------------


def import_cv2():
    """The cv2 module, or a LookalikeError saying how to install it."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg quiet: our errors name the source instead
    try:
        import cv2
    except ImportError as exc:
        raise LookalikeError("the camera needs OpenCV: pip install 'lookalike[camera]'") from exc
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # no backend warnings on stderr
    except AttributeError:  # pragma: no cover - an OpenCV build without the utils module
        pass
    return cv2


def check_gui(cv2) -> None:
    """A LookalikeError unless OpenCV can open a window here (GUI build, and a display on Linux)."""
    hint = "run with --headless for JSON output"
    gui = ""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GUI:"):
            gui = line.split(":", 1)[1].strip()
    if gui.upper() == "NONE":
        raise LookalikeError(
            f"this OpenCV ({cv2.__version__}) is built without windows (opencv-python-headless); "
            f"{hint}, or pip install opencv-python"
        )
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise LookalikeError(f"no display to open a window on (DISPLAY is not set); {hint}")
    try:
        cv2.namedWindow(WINDOW, cv2.WINDOW_AUTOSIZE)
    except cv2.error as exc:
        raise LookalikeError(f"OpenCV cannot open a window: {str(exc).strip().splitlines()[-1]}; {hint}") from exc


def is_live(source: int | str) -> bool:
    """A camera number, a stream URL or a device node: read continuously, paced by wall time."""
    if isinstance(source, int):
        return True
    return "://" in source or source.startswith("/dev/")


def describe_source(source: int | str) -> str:
    return f"camera {source}" if isinstance(source, int) else str(source)


def open_source(cv2, source: int | str):
    """An opened cv2.VideoCapture, or a LookalikeError naming the source and the problem."""
    name = describe_source(source)
    if isinstance(source, str) and not is_live(source):
        path = Path(source)
        if not path.exists():
            raise LookalikeError(f"{name}: no such video file", subject=source)
        if not path.is_file():
            raise LookalikeError(f"{name}: is a directory, not a video file", subject=source)
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        cap.release()
        if isinstance(source, int):
            why = "cannot be opened (no such camera, no permission, or in use by another program)"
        elif is_live(source):
            why = "cannot be opened (unreachable, refused, or a format OpenCV cannot read)"
        else:
            why = "cannot be read as a video (not a video, or a codec this OpenCV lacks)"
        raise LookalikeError(f"{name}: {why}", subject=source)
    return cap


def to_rgb(cv2, frame: np.ndarray) -> np.ndarray:
    """An OpenCV frame (BGR, BGRA or grey) as an HxWx3 uint8 RGB array."""
    if frame.ndim == 2 or frame.shape[2] == 1:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


# --- frame sources -------------------------------------------------------------------------


class FileFeed:
    """A video file, in order, paced by video time (``frame index / fps``)."""

    def __init__(self, cap, cv2, *, realtime: bool):
        self.cap = cap
        self.cv2 = cv2
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if math.isfinite(fps) and 0 < fps <= 1000 else 25.0  # unknown: assume 25
        self.realtime = realtime
        self.index = -1
        self._t0: float | None = None

    def next(self, due_s: float = 0.0) -> tuple[int, float, np.ndarray] | None:
        """(index, video seconds, BGR frame) of the first frame at or after ``due_s``; None at the end.

        The frames before it are grabbed but not converted. In real time it also waits until the
        frame's moment has come, and skips the frames whose moment passed while a query ran.
        """
        if self.realtime and self._t0 is not None:
            due_s = max(due_s, time.perf_counter() - self._t0 - 1.0 / self.fps)
        while True:
            if not self.cap.grab():
                return None
            self.index += 1
            pos = self.index / self.fps
            if pos >= due_s - 5e-4:
                break
        if self.realtime:
            now = time.perf_counter()
            if self._t0 is None:
                self._t0 = now - pos
            wait = self._t0 + pos - now
            if wait > 0:
                time.sleep(wait)
        ok, frame = self.cap.retrieve()
        if not ok or frame is None:
            return None
        return self.index, pos, frame

    def close(self) -> None:
        self.cap.release()


class LiveFeed:
    """A camera or stream, read continuously in a thread that keeps only the newest frame."""

    def __init__(self, cap):
        self.cap = cap
        self._cond = threading.Condition()
        self._latest: tuple[int, float, np.ndarray] | None = None
        self._stop = False
        self.ended = False
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._read, name="lookalike-camera-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        index, failures = 0, 0
        try:
            while not self._stop:
                ok, frame = self.cap.read()
                if not ok or frame is None:
                    failures += 1
                    if failures >= LIVE_READ_FAILURES:
                        break
                    time.sleep(0.04)
                    continue
                failures = 0
                with self._cond:
                    self._latest = (index, time.perf_counter() - self._t0, frame)
                    self._cond.notify_all()
                index += 1
        finally:
            with self._cond:
                self.ended = True
                self._cond.notify_all()

    def next(self, newer_than: int = -1, timeout: float = 10.0) -> tuple[int, float, np.ndarray] | None:
        """The newest frame with an index above ``newer_than`` (waiting for one); None when the source ended."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._latest is None or self._latest[0] <= newer_than:
                if self.ended:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))
            return self._latest

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=5)
        if not self._thread.is_alive():  # releasing while a read is in progress can crash some backends
            self.cap.release()


# --- the window ------------------------------------------------------------------------------


class Thumbnails:
    """Catalog images as small BGR tiles, loaded once (a small LRU cache); a grey tile if unreadable."""

    def __init__(self, cv2, size: int = THUMB, capacity: int = 256):
        self.cv2, self.size, self.capacity = cv2, size, capacity
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, image: str | None) -> np.ndarray:
        key = image or ""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        tile = np.full((self.size, self.size, 3), 90, np.uint8)
        if image and "://" not in image and os.path.isfile(image):
            try:
                from PIL import Image

                with Image.open(image) as img:
                    img = img.convert("RGB")
                    img.thumbnail((self.size, self.size))
                    arr = np.asarray(img)[:, :, ::-1]
                h, w = arr.shape[:2]
                y, x = (self.size - h) // 2, (self.size - w) // 2
                tile[y:y + h, x:x + w] = arr
            except (OSError, ValueError):
                pass
        self._cache[key] = tile
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return tile


def _ascii(text: Any, limit: int) -> str:
    s = str(text if text is not None else "").encode("ascii", "replace").decode("ascii")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def compose(cv2, frame: np.ndarray, hits: list, thumbs: Thumbnails, status: str) -> np.ndarray:
    """The window's picture: the frame scaled to VIEW_HEIGHT, and a panel listing the hits on its right."""
    if frame.ndim == 2:
        frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    elif frame.shape[2] == 4:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    h, w = frame.shape[:2]
    vw = max(1, round(w * VIEW_HEIGHT / h))
    view = cv2.resize(frame, (vw, VIEW_HEIGHT), interpolation=cv2.INTER_AREA if h > VIEW_HEIGHT else cv2.INTER_LINEAR)
    height = max(VIEW_HEIGHT, HEADER_HEIGHT + ROW_HEIGHT * len(hits) + 8)
    canvas = np.full((height, vw + PANEL_WIDTH, 3), 32, np.uint8)
    canvas[:VIEW_HEIGHT, :vw] = view
    font, x0 = cv2.FONT_HERSHEY_SIMPLEX, vw + 10
    cv2.putText(canvas, _ascii(status, 48), (x0, 26), font, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
    if not hits:
        cv2.putText(canvas, "(no match yet)", (x0, HEADER_HEIGHT + 24), font, 0.5, (200, 200, 200), 1, cv2.LINE_AA)
    for i, hit in enumerate(hits):
        y = HEADER_HEIGHT + i * ROW_HEIGHT
        canvas[y:y + THUMB, x0:x0 + THUMB] = thumbs.get(hit.image)
        tx = x0 + THUMB + 10
        title = hit.metadata.get("title") or hit.metadata.get("label") or hit.id
        location = hit.metadata.get("location") or ""
        cv2.putText(canvas, _ascii(f"{hit.rank}. {title}", 36), (tx, y + 18), font, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        if location:
            cv2.putText(canvas, _ascii(location, 38), (tx, y + 40), font, 0.45, (120, 220, 255), 1, cv2.LINE_AA)
        verified = "  verified" if hit.verified else ""
        cv2.putText(canvas, _ascii(f"score {hit.score:.3f}{verified}  id {hit.id}", 38), (tx, y + 62), font, 0.42,
                    (170, 170, 170), 1, cv2.LINE_AA)
    return canvas


# --- the loop ----------------------------------------------------------------------------------


def run_camera(
    vs,
    source: int | str = 0,
    every_ms: int = 200,
    k: int = 5,
    headless: bool = False,
    max_queries: int | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    orient: bool | str = "auto",
    regions: bool | str = "auto",
    budget_ms: float | None = None,
) -> int:
    """Search ``vs`` with frames of ``source`` until it ends; the exit code (0).

    Headless: one JSON line per query on ``out``
    (``{"t": s since start, "frame": index, "ms": query latency, "hits": [...]}``, and with a budget
    ``"skipped_looks"``: the second looks it left out), then
    ``{"queries": N, "seconds": S, "queries_per_s": Q}``. A one-line summary goes to ``err``
    (default stderr) in both modes. Raises LookalikeError when OpenCV, the window or the
    source cannot be used. ``orient`` (``VisualSearch.search``'s; default "auto": a frame whose
    hits are unsure is also tried turned by 90/180/270 degrees, for a camera held on its side or
    pointing down). ``regions`` (default "auto"): also search with regions of the frame, for an
    item that fills only part of it, and a finer grid of them when the hits are still unsure.
    ``budget_ms``: a frame's time budget, within which those second looks must be expected to
    fit to be taken (``VisualSearch.search``'s; None: no limit). A budget with neither mode "auto"
    would limit nothing: a QueryError, as ``VisualSearch.search`` raises, before the source opens.
    """
    vs.check_budget(budget_ms, orient, regions)
    out = out or sys.stdout
    err = err or sys.stderr
    if every_ms < 1:
        raise LookalikeError(f"--every-ms must be at least 1, got {every_ms}")
    cv2 = import_cv2()
    if not headless:
        check_gui(cv2)
    name = describe_source(source)
    cap = open_source(cv2, source)
    live = is_live(source)
    feed: FileFeed | LiveFeed | None = None
    every = every_ms / 1000.0
    queries, latency_total, cut_short = 0, 0.0, 0  # cut_short: frames the budget left second looks out of
    start = time.perf_counter()
    try:
        vs.warm_up()  # the model loaded and run at every batch size, the vote made, before the clock starts
        width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        feed = LiveFeed(cap) if live else FileFeed(cap, cv2, realtime=not headless)
        kind = "live" if live else f"video file, {feed.fps:g} fps, paced by video time"
        budget = f", second looks within {budget_ms:g} ms" if budget_ms else ""
        print(f"camera: searching {name} ({width}x{height}, {kind}), at most one query per {every_ms} ms{budget}"
              + ("" if headless else "; q or Esc quits"), file=err, flush=True)
        thumbs = None if headless else Thumbnails(cv2)
        hits: list = []
        last_index, last_query_wall, last_query_pos = -1, -math.inf, -math.inf
        start = time.perf_counter()
        while max_queries is None or queries < max_queries:
            # the next frame to look at
            if live:
                if headless:  # nothing to show in between: sleep until a query is due
                    wait = last_query_wall + every - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                got = feed.next(newer_than=last_index, timeout=STALL_SECONDS)
            else:
                got = feed.next(0.0 if not headless else last_query_pos + every)
            if got is None:
                if live and not feed.ended and last_index >= 0:
                    print(f"camera: no new frame from {name} for {STALL_SECONDS:g} s; stopping", file=err, flush=True)
                break
            index, pos, frame = got
            last_index = index
            now = time.perf_counter()
            due = (now - last_query_wall >= every - 1e-3) if live else (pos - last_query_pos >= every - 5e-4)
            if due:
                t_query = time.perf_counter()
                result = vs.search(to_rgb(cv2, frame), k=k, orient=orient, regions=regions, budget_ms=budget_ms)
                ms = (time.perf_counter() - t_query) * 1000.0
                queries += 1
                latency_total += ms
                cut_short += bool(result.skipped)
                hits = result.hits
                last_query_wall, last_query_pos = t_query, pos
                if headless:
                    found = result.to_dict()  # hits, and skipped_looks with a budget
                    del found["query"]
                    line = {"t": round(t_query - start, 4), "frame": index, "ms": round(ms, 2), **found}
                    out.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
                    out.flush()
            if not headless:
                elapsed = time.perf_counter() - start
                rate = queries / elapsed if elapsed > 0 else 0.0
                status = f"{rate:.1f} queries/s  last {ms:.0f} ms" if queries else "searching..."
                cv2.imshow(WINDOW, compose(cv2, frame, hits, thumbs, status))
                key = cv2.waitKey(1) & 0xFF
                if key in (ord("q"), ord("Q"), 27):
                    break
                try:
                    if cv2.getWindowProperty(WINDOW, cv2.WND_PROP_VISIBLE) < 1:  # closed with the mouse
                        break
                except cv2.error:
                    break
        if queries == 0 and last_index < 0:
            raise LookalikeError(f"{name}: no frame could be read", subject=source)
    except KeyboardInterrupt:
        print("camera: interrupted", file=err, flush=True)
    finally:
        seconds = time.perf_counter() - start
        if feed is not None:
            feed.close()
        else:
            cap.release()
        if not headless:
            try:
                cv2.destroyAllWindows()
            except cv2.error:  # pragma: no cover
                pass
    rate = queries / seconds if seconds > 0 else 0.0
    mean = latency_total / queries if queries else 0.0
    if headless:
        out.write(json.dumps({"queries": queries, "seconds": round(seconds, 3), "queries_per_s": round(rate, 2)}) + "\n")
        out.flush()
    print(f"camera: {queries} queries in {seconds:.2f} s: {rate:.1f} queries/s "
          f"(mean query {mean:.1f} ms) from {name}", file=err, flush=True)
    if cut_short:
        print(f"camera: {cut_short} of {queries} frames called for second looks the {budget_ms:g} ms budget left out "
              "(a larger --budget-ms takes them, at a lower frame rate)", file=err, flush=True)
    return 0
