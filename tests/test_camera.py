"""The camera CLI on a real video file made of sample catalog photos: JSON lines, pacing, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, SAMPLE

cv2 = pytest.importorskip("cv2")

ITEM_A, ITEM_B = "14881", "14380"  # a handbag, then a casual shoe
FPS, FRAMES_EACH, SIZE = 15, 24, (320, 240)  # 1.6 s of each item at 15 fps


def catalog_frame(item_id: str, size: tuple[int, int] = SIZE) -> np.ndarray:
    """A catalog photo centred on a white frame of ``size``, as OpenCV's BGR."""
    with Image.open(SAMPLE / "images" / f"{item_id}.jpg") as img:
        img = img.convert("RGB")
        img.thumbnail(size)
        canvas = Image.new("RGB", size, (255, 255, 255))
        canvas.paste(img, ((size[0] - img.width) // 2, (size[1] - img.height) // 2))
    return cv2.cvtColor(np.asarray(canvas), cv2.COLOR_RGB2BGR)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """An MJPG .avi: FRAMES_EACH frames of item A, then FRAMES_EACH of item B."""
    path = tmp_path_factory.mktemp("camera") / "shelf.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, SIZE)
    assert writer.isOpened()
    for item_id in (ITEM_A, ITEM_B):
        frame = catalog_frame(item_id)
        for _ in range(FRAMES_EACH):
            writer.write(frame)
    writer.release()
    return path


def camera(index: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lookalike.cli", "camera", str(index), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def parse(stdout: str) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert lines, "no JSON lines"
    return lines[:-1], lines[-1]


def test_headless_video_file_finds_each_item_in_turn(sample_index, video):
    run = camera(sample_index, "--source", str(video), "--headless", "--every-ms", "50")
    assert run.returncode == 0, run.stderr
    queries, summary = parse(run.stdout)
    # 15 fps: a frame every 66.7 ms of video, so with --every-ms 50 every frame is queried
    assert [q["frame"] for q in queries] == list(range(2 * FRAMES_EACH))
    for q in queries:
        assert set(q) == {"t", "frame", "ms", "hits", "skipped_looks"}  # skipped_looks: with the default budget
        assert len(q["hits"]) == 5 and [h["rank"] for h in q["hits"]] == [1, 2, 3, 4, 5]
        assert set(q["hits"][0]) >= {"rank", "id", "score", "distance", "metadata"}
        assert q["ms"] > 0
    expected = [ITEM_A] * FRAMES_EACH + [ITEM_B] * FRAMES_EACH
    assert [q["hits"][0]["id"] for q in queries] == expected
    assert queries[0]["hits"][0]["metadata"]["title"] and queries[0]["hits"][0]["metadata"]["location"]
    ts = [q["t"] for q in queries]
    assert ts == sorted(ts)
    assert summary["queries"] == len(queries) == 2 * FRAMES_EACH
    assert summary["seconds"] > 0 and summary["queries_per_s"] > 0
    print(f"\ncamera CLI on a {2 * FRAMES_EACH}-frame video: {summary['queries_per_s']} queries/s "
          f"(mean query {sum(q['ms'] for q in queries) / len(queries):.1f} ms)")
    assert "queries/s" in run.stderr.splitlines()[-1]
    assert "second looks within 150 ms" in run.stderr  # the default frame budget
    assert all(set(q["skipped_looks"]) <= {"turn", "grid"} for q in queries)  # what it left out of each frame


def test_every_ms_is_video_time_and_max_queries_stops(sample_index, video):
    run = camera(sample_index, "--source", str(video), "--headless", "--every-ms", "200", "--max-queries", "5", "-k", "2",
                 "--orient", "always", "--regions", "always")
    assert run.returncode == 0, run.stderr
    queries, summary = parse(run.stdout)
    # 200 ms of video is exactly 3 frames at 15 fps: frames 0, 3, 6, ... however fast the machine
    assert [q["frame"] for q in queries] == [0, 3, 6, 9, 12]
    assert all(len(q["hits"]) == 2 and q["hits"][0]["id"] == ITEM_A for q in queries)
    assert all("skipped_looks" not in q for q in queries)  # nothing "auto": no second looks for a budget to limit
    assert summary["queries"] == 5
    wrong = camera(sample_index, "--source", str(video), "--headless", "--orient", "sideways")
    assert wrong.returncode == 2 and "--orient" in wrong.stderr
    wrong = camera(sample_index, "--source", str(video), "--headless", "--regions", "sometimes")
    assert wrong.returncode == 2 and "--regions" in wrong.stderr and "'never'" in wrong.stderr
    wrong = camera(sample_index, "--source", str(video), "--headless", "--budget-ms", "-5")
    assert wrong.returncode == 2 and "--budget-ms" in wrong.stderr
    wrong = camera(sample_index, "--source", str(video), "--headless", "--budget-ms", "100", "--orient", "never",
                   "--regions", "always")  # nothing auto for a budget to limit: refused, as search's
    assert wrong.returncode == 2 and "--budget-ms limits the second looks" in wrong.stderr
    unlimited = camera(sample_index, "--source", str(video), "--headless", "--max-queries", "2", "--budget-ms", "0")
    assert unlimited.returncode == 0, unlimited.stderr
    assert "second looks within" not in unlimited.stderr and parse(unlimited.stdout)[1]["queries"] == 2


def test_ctrl_c_ends_cleanly_with_the_summary(sample_index, tmp_path):
    path = tmp_path / "long.avi"  # 30 s of video: still running when interrupted
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, SIZE)
    frame = catalog_frame(ITEM_A)
    for _ in range(30 * FPS):
        writer.write(frame)
    writer.release()
    cmd = [sys.executable, "-m", "lookalike.cli", "camera", str(sample_index), "--source", str(path), "--headless",
           "--every-ms", "50"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        first = json.loads(proc.stdout.readline())  # the loop is running
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = [first] + [json.loads(line) for line in rest.splitlines()]
    summary = lines[-1]
    assert summary["queries"] == len(lines) - 1 < 30 * FPS
    assert "interrupted" in err and "queries/s" in err.splitlines()[-1]


def test_missing_video_file_is_an_error(sample_index, tmp_path):
    missing = tmp_path / "no-such-video.avi"
    run = camera(sample_index, "--source", str(missing), "--headless")
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and str(missing) in run.stderr and "no such video file" in run.stderr
    assert run.stdout == ""


def test_a_file_that_is_no_video_is_an_error(sample_index, tmp_path):
    bogus = tmp_path / "notes.avi"
    bogus.write_text("this is not a video\n" * 100)
    run = camera(sample_index, "--source", str(bogus), "--headless")
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and str(bogus) in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


@pytest.mark.skipif("NONE" not in cv2.getBuildInformation().split("GUI:")[1].splitlines()[0],
                    reason="this OpenCV can open windows")
def test_window_mode_without_gui_opencv_says_use_headless(sample_index, video):
    run = camera(sample_index, "--source", str(video))
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and "--headless" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_run_camera_refuses_a_budget_with_nothing_auto_as_search_does(sample_index, video):
    from lookalike import QueryError, VisualSearch
    from lookalike.camera import run_camera

    vs = VisualSearch.open(sample_index)
    with pytest.raises(QueryError, match="budget_ms limits the second looks"):
        run_camera(vs, source=str(video), headless=True, orient=False, regions=True, budget_ms=100)
    with pytest.raises(QueryError, match="budget_ms must be a number"):
        run_camera(vs, source=str(video), headless=True, budget_ms=-1)


def test_live_feed_keeps_only_the_newest_frame(video):
    from lookalike.camera import LiveFeed, open_source

    feed = LiveFeed(open_source(cv2, str(video)))  # a file read as if live: as fast as it decodes
    try:
        seen = []
        while (got := feed.next(newer_than=seen[-1] if seen else -1)) is not None:
            seen.append(got[0])
        assert seen == sorted(set(seen)) and seen[-1] == 2 * FRAMES_EACH - 1
    finally:
        feed.close()


def test_window_picture_shows_frame_and_matches(sample_index, video):
    from lookalike.camera import VIEW_HEIGHT, Thumbnails, compose
    from lookalike.engine import VisualSearch

    frame = catalog_frame(ITEM_A)
    with VisualSearch.open(sample_index) as vs:
        hits = vs.search(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), k=5).hits
    thumbs = Thumbnails(cv2)
    picture = compose(cv2, frame, hits, thumbs, "12.0 queries/s")
    view_width = SIZE[0] * VIEW_HEIGHT // SIZE[1]
    assert picture.shape[0] >= VIEW_HEIGHT and picture.shape[1] > view_width and picture.dtype == np.uint8
    expected = cv2.resize(frame, (view_width, VIEW_HEIGHT))
    assert np.abs(picture[:VIEW_HEIGHT, :view_width].astype(int) - expected).mean() < 2
    first = thumbs.get(hits[0].image)
    assert first.shape == (72, 72, 3) and first.std() > 10  # the real photo, not the grey placeholder
    assert thumbs.get(hits[0].image) is first  # cached
    assert thumbs.get("/no/such/image.jpg").std() == 0  # a grey tile, no error
