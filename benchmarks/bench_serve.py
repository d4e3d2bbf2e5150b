"""Service and camera throughput: ``POST /search`` under 1, 4 and 16 clients, and the camera CLI on a video.

Everything runs for real on this machine, and each figure is printed next to a baseline from the
same run:

- the sample catalog (300 items) is built into a temporary index with ``VisualSearch.build``;
- the query is a real 640x480 JPEG (quality 90): a fashion-products-2000 photo of a sample item
  pasted onto a real surface photo from ``backgrounds/``, as a phone or webcam would see it;
- baseline: ``vs.search(jpeg_bytes, k=5)`` in this process (decode + model + FAISS, no HTTP);
- the real service, ``lookalike serve INDEX --port P --quiet`` in a subprocess (ready when
  ``GET /readyz`` answers 200), gets ``POST /search?k=5`` with the JPEG as the multipart field
  ``file`` from 1, 4 and 16 concurrent clients, ``--seconds`` each (default 30). Reported:
  requests/s, p50/p95/p99 latency, errors (a status other than 200, or no answer);
- the camera CLI, ``lookalike camera INDEX --source VIDEO --headless --every-ms 50``, on an MJPG
  video of real catalog photos (640x480, 15 fps, 5 items x 2 s): its own queries/s summary, next
  to ``vs.search(frame)`` in this process for one such frame.

Targets: p50 under 50 ms at 1 client, zero errors at 16 clients, at least 10 camera queries/s.

The load generator shares the 2 cores with the server, so it is kept cheap: one thread per
client, each with its own keep-alive ``httpx.Client``, the multipart body encoded once and sent
as raw bytes, answers checked by status only (the first one is parsed to check the top hit).
The CPU it used is printed per phase ("load N cores"), as is the server's and that of every
other process on the machine ("others N%" of all cores: figures taken while others were busy
are low for that reason, so rerun them).

    .venv/bin/python benchmarks/bench_serve.py               # 3 x 30 s of HTTP + the camera: about 2 min
    .venv/bin/python benchmarks/bench_serve.py --seconds 5   # the quick run: about 30 s
    .venv/bin/python benchmarks/bench_serve.py --json        # one JSON object; exit status 1 on FAIL
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lookalike.runtimes import cpu_name  # noqa: E402
from cpu_usage import HZ, machine_busy, own_cpu  # noqa: E402
from live_service import Service  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "lookalike" / "data" / "sample"
TARGET_P50_MS = 50.0
TARGET_ERRORS_AT = 16
TARGET_CAMERA_QPS = 10.0
K = 5
QUERY_ITEM = "2246"  # a sample catalog item (an ADIDAS backpack): the top hit a correct answer has
BACKGROUND = "surface_1.jpg"
VIDEO_ITEMS = ["2246", "14881", "14380", "52851", "43405"]  # backpack, handbag, shoe, earrings, socks
VIDEO_FPS, VIDEO_SECONDS_EACH, VIDEO_SIZE = 15, 2, (640, 480)
CAMERA_EVERY_MS = 50

# --- how busy the machine was ----------------------------------------------------------------

def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r.ru_utime + r.ru_stime) * HZ


def _tree_cpu(root: int) -> float:
    """CPU ticks used so far by process ``root`` and its descendants (uvicorn workers)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        stats[int(entry)] = (int(fields[1]), float(int(fields[11]) + int(fields[12])))  # ppid, utime + stime
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
            todo.extend(p for p, (ppid, _) in stats.items() if ppid == pid)
    return total


class Usage:
    """Wall time of a block, the CPU of this process, of a watched process tree, and of all others."""

    def __init__(self, watch: int | None = None):
        self.watch = watch

    def _sample(self) -> tuple[float, float, float, float, float]:
        watched = _tree_cpu(self.watch) if self.watch else 0.0
        return time.perf_counter(), machine_busy(), own_cpu(), _children_cpu(), watched

    def __enter__(self) -> "Usage":
        self._start = self._sample()
        return self

    def __exit__(self, *exc) -> None:
        end = self._sample()
        t0, busy0, own0, kids0, watched0 = self._start
        t1, busy1, own1, kids1, watched1 = end
        self.seconds = t1 - t0
        wall_ticks = self.seconds * HZ
        self.own_cores = (own1 - own0) / wall_ticks
        self.child_cores = (kids1 - kids0) / wall_ticks  # children that were waited for in the block
        self.watched_cores = (watched1 - watched0) / wall_ticks
        others = (busy1 - busy0) - (own1 - own0) - (kids1 - kids0) - (watched1 - watched0)
        self.others = max(0.0, others / wall_ticks / (os.cpu_count() or 1))


# --- the inputs: real photos -----------------------------------------------------------------


def scene(item_image: Path, background: Path, size: tuple[int, int] = VIDEO_SIZE, height: float = 0.75) -> Image.Image:
    """A catalog photo pasted, ``height`` of the frame tall, centred on a real surface photo of ``size``."""
    w, h = size
    with Image.open(background) as bg:
        bg = bg.convert("RGB")
        scale = max(w / bg.width, h / bg.height)
        bg = bg.resize((round(bg.width * scale), round(bg.height * scale)), Image.Resampling.BICUBIC)
        left, top = (bg.width - w) // 2, (bg.height - h) // 2
        canvas = bg.crop((left, top, left + w, top + h))
    with Image.open(item_image) as item:
        item = item.convert("RGB")
        th = round(h * height)
        item = item.resize((round(item.width * th / item.height), th), Image.Resampling.BICUBIC)
    canvas.paste(item, ((w - item.width) // 2, (h - item.height) // 2))
    return canvas


def query_jpeg(data: Path) -> bytes:
    img = scene(data / "fashion-products-2000" / "images" / f"{QUERY_ITEM}.jpg", data / "backgrounds" / BACKGROUND)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_video(data: Path, path: Path) -> tuple[list[str], float]:
    """An MJPG .avi of the VIDEO_ITEMS in turn, each on the background; the item shown per frame, and fps."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), VIDEO_FPS, VIDEO_SIZE)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write an MJPG video to {path}")
    shown = []
    for item_id in VIDEO_ITEMS:
        img = scene(data / "fashion-products-2000" / "images" / f"{item_id}.jpg", data / "backgrounds" / BACKGROUND)
        frame = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR)
        for _ in range(VIDEO_FPS * VIDEO_SECONDS_EACH):
            writer.write(frame)
            shown.append(item_id)
    writer.release()
    return shown, float(VIDEO_FPS)


def multipart(jpeg: bytes) -> tuple[bytes, dict[str, str]]:
    """The request body of ``POST /search`` with the JPEG as field ``file``, encoded once."""
    boundary = "lookalike-bench-" + uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"query.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode()
    body = head + jpeg + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


# --- the phases ----------------------------------------------------------------------------------


def _percentiles(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    p50, p95, p99 = np.percentile(np.asarray(ms), [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def in_process(vs, query, seconds: float, min_runs: int = 20) -> dict:
    """``vs.search(query)`` one after another for ``seconds`` (at least ``min_runs`` times)."""
    for _ in range(3):
        vs.search(query, k=K)
    ms = []
    with Usage() as u:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(ms) < min_runs:
            t0 = time.perf_counter()
            vs.search(query, k=K)
            ms.append((time.perf_counter() - t0) * 1000)
    return {"runs": len(ms), "per_s": len(ms) / u.seconds, **_percentiles(ms), "others": u.others}


def load(url: str, body: bytes, headers: dict[str, str], clients: int, seconds: float, server_pid: int) -> dict:
    """``clients`` threads posting the body back to back for ``seconds``; latencies and errors."""
    import httpx

    target = f"{url}/search?k={K}"
    sessions = [httpx.Client(timeout=60) for _ in range(clients)]
    for s in sessions:  # connect and warm each connection outside the timed window
        s.post(target, content=body, headers=headers)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[list[str]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    deadline = 0.0

    def client(i: int) -> None:
        session, lat, err = sessions[i], latencies[i], errors[i]
        barrier.wait()
        while True:
            t0 = time.perf_counter()
            if t0 >= deadline:
                return
            try:
                r = session.post(target, content=body, headers=headers)
                if r.status_code == 200:
                    lat.append((time.perf_counter() - t0) * 1000)
                else:
                    err.append(f"HTTP {r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as exc:
                err.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    with Usage(watch=server_pid) as u:
        deadline = time.perf_counter() + seconds
        barrier.wait()
        for t in threads:
            t.join()
    for s in sessions:
        s.close()
    ms = [x for lat in latencies for x in lat]
    errs = [e for err in errors for e in err]
    return {
        "clients": clients, "seconds": u.seconds, "requests": len(ms), "requests_per_s": len(ms) / u.seconds,
        **_percentiles(ms), "errors": len(errs), "error_examples": sorted(set(errs))[:3],
        "server_cores": u.watched_cores, "load_cores": u.own_cores, "others": u.others,
    }


def camera(index: Path, video: Path, shown: list[str]) -> dict:
    """The real camera CLI, headless, on the video: its summary line, and the hits checked against ``shown``."""
    exe = Path(sys.executable).with_name("lookalike")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lookalike.cli"]
    cmd += ["camera", str(index), "--source", str(video), "--headless", "--every-ms", str(CAMERA_EVERY_MS), "-k", str(K)]
    with Usage() as u:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"lookalike camera exited with {run.returncode}: {run.stderr.strip()[-2000:]}")
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    queries, summary = lines[:-1], lines[-1]
    correct = sum(1 for q in queries if q["hits"] and q["hits"][0]["id"] == shown[q["frame"]])
    ms = [q["ms"] for q in queries]
    return {
        "frames": len(shown), "queries": summary["queries"], "seconds": summary["seconds"],
        "queries_per_s": summary["queries_per_s"], "every_ms": CAMERA_EVERY_MS,
        "query_ms_mean": statistics.fmean(ms) if ms else float("nan"), **_percentiles(ms),
        "top1_correct": correct / len(queries) if queries else 0.0, "process_seconds": u.seconds,
        "cli_cores": u.child_cores, "others": u.others,
    }


# --- reporting ---------------------------------------------------------------------------------


def _settle() -> None:
    time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                    help="the shared data folder (default: ../shared/data from the repository root)")
    ap.add_argument("--seconds", type=float, default=30.0, help="seconds of load per client count (default 30; 5 for a quick run)")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated concurrent client counts (default 1,4,16)")
    ap.add_argument("--workers", type=int, default=1, help="`lookalike serve --workers` (default 1)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    args = ap.parse_args(argv)
    try:
        client_counts = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--clients must be whole numbers separated by commas, got {args.clients!r}")
    if not client_counts or min(client_counts) < 1 or args.seconds <= 0 or args.workers < 1:
        ap.error("--clients, --seconds and --workers must be positive")
    for needed in (args.data / "fashion-products-2000" / "images" / f"{QUERY_ITEM}.jpg", args.data / "backgrounds" / BACKGROUND):
        if not needed.is_file():
            print(f"error: {needed} not found; pass --data DIR (the folder holding fashion-products-2000/)", file=sys.stderr)
            return 2
    for module, extra in (("httpx", "dev"), ("cv2", "camera"), ("uvicorn", "serve")):
        try:
            __import__(module)
        except ImportError:
            print(f"error: this benchmark needs {module}: pip install 'lookalike[{extra}]'", file=sys.stderr)
            return 2

    say = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))
    from lookalike import VisualSearch
    from lookalike.featurizer import cpu_count

    with tempfile.TemporaryDirectory(prefix="lookalike-bench-serve-") as tmp:
        work = Path(tmp)
        say(f"lookalike serve benchmark: machine {cpu_count()} cores, {cpu_name()}")
        t0 = time.perf_counter()
        vs = VisualSearch.build(SAMPLE / "catalog.csv", work / "index")
        say(f"index: the sample catalog, {len(vs)} items, built in {time.perf_counter() - t0:.1f} s")
        jpeg = query_jpeg(args.data)
        say(f"query: 640x480 JPEG, quality 90, {len(jpeg) / 1024:.0f} KiB (item {QUERY_ITEM} from "
            f"fashion-products-2000 on backgrounds/{BACKGROUND})")
        top = vs.search(jpeg, k=K).hits[0].id
        frame_rgb = np.asarray(scene(args.data / "fashion-products-2000" / "images" / f"{VIDEO_ITEMS[0]}.jpg",
                                     args.data / "backgrounds" / BACKGROUND))
        _settle()
        base_seconds = min(10.0, max(2.0, args.seconds / 3))
        base_jpeg = in_process(vs, jpeg, base_seconds)
        say(f"in process: vs.search(jpeg bytes) p50 {base_jpeg['p50_ms']:.1f} ms, p95 {base_jpeg['p95_ms']:.1f} ms "
            f"({base_jpeg['per_s']:.1f}/s one at a time, others {100 * base_jpeg['others']:.0f}%; top hit {top})")

        body, headers = multipart(jpeg)
        service = Service(work / "index", "--workers", str(args.workers), log_dir=work, timeout=180)
        phases = []
        try:
            import httpx

            r = httpx.post(f"{service.url}/search?k={K}", content=body, headers=headers, timeout=60)
            r.raise_for_status()
            http_top = r.json()["results"][0]["hits"][0]["id"]
            for _ in range(20):  # warm the server: thread pool, allocations
                httpx.post(f"{service.url}/search?k={K}", content=body, headers=headers, timeout=60)
            say(f"service: lookalike serve --workers {args.workers} --quiet (no access log), ready in "
                f"{service.start_seconds:.1f} s; POST /search?k={K} multipart 'file', top hit {http_top}")
            say(f"load: {args.seconds:g} s per client count; a thread per client, each with its own keep-alive "
                f"httpx.Client, the multipart body encoded once, answers checked by status only")
            for n in client_counts:
                _settle()
                p = load(service.url, body, headers, n, args.seconds, service.proc.pid)
                phases.append(p)
                say(f"  {n:>3} clients: {p['requests_per_s']:6.1f} req/s  p50 {p['p50_ms']:6.1f} ms  "
                    f"p95 {p['p95_ms']:6.1f} ms  p99 {p['p99_ms']:6.1f} ms  errors {p['errors']}  "
                    f"(server {p['server_cores']:.2f} cores, load {p['load_cores']:.2f} cores, others {100 * p['others']:.0f}%)")
                for e in p["error_examples"]:
                    say(f"        e.g. {e}")
        finally:
            service.stop()

        _settle()
        base_frame = in_process(vs, frame_rgb, min(base_seconds, 5.0))
        vs.close()
        del vs
        say(f"in process: vs.search(one {VIDEO_SIZE[0]}x{VIDEO_SIZE[1]} RGB frame) p50 {base_frame['p50_ms']:.1f} ms "
            f"({base_frame['per_s']:.1f}/s one at a time, others {100 * base_frame['others']:.0f}%)")
        _settle()
        video = work / "camera.avi"
        shown, fps = write_video(args.data, video)
        say(f"camera: {video.name}, MJPG {VIDEO_SIZE[0]}x{VIDEO_SIZE[1]} {fps:g} fps, {len(shown)} frames "
            f"({len(VIDEO_ITEMS)} catalog items x {VIDEO_SECONDS_EACH} s on a real surface)")
        cam = camera(work / "index", video, shown)
        say(f"  lookalike camera --headless --every-ms {CAMERA_EVERY_MS}: {cam['queries']} queries, "
            f"{cam['queries_per_s']:.1f} queries/s (query p50 {cam['p50_ms']:.1f} ms, top hit right "
            f"{100 * cam['top1_correct']:.0f}%; process {cam['process_seconds']:.1f} s with start-up; others {100 * cam['others']:.0f}%)")
        shutil.rmtree(work / "index", ignore_errors=True)

    by_clients = {p["clients"]: p for p in phases}
    one = by_clients.get(1)
    many = by_clients.get(TARGET_ERRORS_AT)
    passes = {
        "p50_at_1_client": one is not None and one["p50_ms"] < TARGET_P50_MS,
        "zero_errors_at_16_clients": many is not None and many["errors"] == 0,
        "camera_queries_per_s": cam["queries_per_s"] >= TARGET_CAMERA_QPS,
    }
    passes["all"] = all(passes.values())
    result = {
        "cores": cpu_count(), "cpu": cpu_name(), "seconds_per_phase": args.seconds, "workers": args.workers,
        "query": {"bytes": len(jpeg), "size": list(VIDEO_SIZE), "quality": 90, "item": QUERY_ITEM, "top_hit": top},
        "in_process": {"jpeg": base_jpeg, "frame": base_frame},
        "http": phases, "camera": cam,
        "targets": {"p50_ms_at_1_client": TARGET_P50_MS, "errors_at_clients": TARGET_ERRORS_AT,
                    "camera_queries_per_s": TARGET_CAMERA_QPS},
        "pass": passes,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if passes["all"] else 1

    print()
    print(f"{'clients':>8} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7}   cpu: server / load / others")
    print(f"{'in-proc':>8} {base_jpeg['per_s']:8.1f} {base_jpeg['p50_ms']:8.1f} {base_jpeg['p95_ms']:8.1f} "
          f"{base_jpeg['p99_ms']:8.1f} {'-':>7}   vs.search(jpeg) one at a time, no HTTP (others {100 * base_jpeg['others']:.0f}%)")
    for p in phases:
        print(f"{p['clients']:>8} {p['requests_per_s']:8.1f} {p['p50_ms']:8.1f} {p['p95_ms']:8.1f} {p['p99_ms']:8.1f} "
              f"{p['errors']:>7}   {p['server_cores']:.2f} / {p['load_cores']:.2f} cores / {100 * p['others']:.0f}%")
    if one:
        print(f"HTTP overhead at 1 client: p50 {one['p50_ms'] - base_jpeg['p50_ms']:+.1f} ms over in-process "
              f"({one['p50_ms']:.1f} vs {base_jpeg['p50_ms']:.1f} ms)")
    print(f"camera   {cam['queries_per_s']:6.1f} queries/s   the CLI on a {VIDEO_FPS} fps video, every frame due "
          f"(--every-ms {CAMERA_EVERY_MS}); in process one {VIDEO_SIZE[0]}x{VIDEO_SIZE[1]} frame: p50 "
          f"{base_frame['p50_ms']:.1f} ms = {1000 / base_frame['p50_ms']:.1f}/s (CLI query p50 {cam['p50_ms']:.1f} ms; "
          f"others {100 * base_frame['others']:.0f}% / {100 * cam['others']:.0f}%)")

    def line(ok: bool, text: str) -> None:
        print(f"target   {'PASS' if ok else 'FAIL'}  {text}")

    line(passes["p50_at_1_client"], f"p50 < {TARGET_P50_MS:.0f} ms at 1 client: "
         + (f"{one['p50_ms']:.1f} ms" if one else "not measured (--clients has no 1)"))
    line(passes["zero_errors_at_16_clients"], f"zero errors at {TARGET_ERRORS_AT} clients: "
         + (f"{many['errors']} errors in {many['requests'] + many['errors']} requests" if many else "not measured"))
    line(passes["camera_queries_per_s"], f">= {TARGET_CAMERA_QPS:.0f} camera queries/s: {cam['queries_per_s']:.1f}")
    print(f"\n{'PASS' if passes['all'] else 'FAIL'}")
    return 0 if passes["all"] else 1


if __name__ == "__main__":
    sys.exit(main())
