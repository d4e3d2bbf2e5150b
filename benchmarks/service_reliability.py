"""Service reliability: schemathesis against the live schema, uploads at the limit, readers with writers.

Everything runs against the real service, ``lookalike serve`` in a subprocess, on the sample catalog
(300 items) built into a temporary index with ``VisualSearch.build``:

1. **schemathesis** (``st run``, every phase: examples, coverage, fuzzing, stateful; every check)
   against the service's own ``/openapi.json``, in four set-ups: a service with an API key,
   called with the key (writes on) and without it (writes 401); a ``--protect-reads`` service
   called without the key (reads 401 too); a service with no key at all (writes 403). Seeds are
   run until the requested number of requests is reached. Reported: requests (from the HAR
   report, one entry per request), 5xx answers, and schema failures (schemathesis' failures:
   status codes, content types, headers and bodies that do not conform, and the other checks).
   ``positive_data_acceptance`` is off for POST /search, /invocations and /items only: their
   bodies carry image bytes or CSV text whose validity JSON Schema cannot express.
2. **uploads at the limit**: ``--upload-clients`` clients (default 16) at once, each sending in
   turn a real JPEG padded to the body limit (multipart), a decode-heavy PNG of ~36 M pixels of
   real photos (raw body), and a body over the limit (raw, then chunked). The service runs with
   ``--max-upload-mb`` (default 8). Reported: the service process's peak RSS during the load
   (``VmHWM`` after resetting it through ``/proc/PID/clear_refs``; sampled RSS where that is not
   possible), its RSS before, and the answers by status; an error is any other status, an answer
   not in the ``{"error", "detail"}`` shape, a 429 without Retry-After, or no answer.
3. **readers and writers**: ``--workers 2``; 4 client threads search continuously (catalog photos,
   k=5, a fresh connection every few requests so both workers serve) while items are added and
   removed with the CLI (``python -m lookalike.cli add/remove`` in subprocesses) for
   ``--rw-seconds``. Every search must answer 200 with exactly k hits, and its hits must agree
   with the generation it reports (``X-Index-Generation``): an added copy of the query's photo is
   among the top 2 exactly when that generation holds it. Afterwards both workers must report the
   latest generation on ``/readyz``. Reported: minutes of concurrent reading and writing, errors.

    .venv/bin/python benchmarks/service_reliability.py                  # ~2,400 requests, 60 s of read-write
    .venv/bin/python benchmarks/service_reliability.py --rw-seconds 10 --schemathesis-requests 400
    .venv/bin/python benchmarks/service_reliability.py --json           # one JSON object; exit 1 on any failure

``run(schemathesis_requests, rw_seconds, upload_clients)`` returns the summary dict for other scripts.
"""

from __future__ import annotations

import argparse
import collections
import csv
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live_service import Service  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "lookalike" / "data" / "sample"
API_KEY = "reliability-key-0123456789abcdef"
ST_CONFIG = """\
# positive_data_acceptance: a schema-valid body of these routes may still hold bytes that are not
# an image (or CSV text that is not vectors), which JSON Schema cannot express: 415/422 by design.
[[operations]]
include-path-regex = "^/(search|invocations|items)$"
include-method = "POST"
checks.positive_data_acceptance.enabled = false
"""


# --- the service -------------------------------------------------------------------------------


def build_sample(dest: Path) -> Path:
    from lookalike import VisualSearch

    VisualSearch.build(SAMPLE / "catalog.csv", dest)
    return dest


# --- 1. schemathesis ---------------------------------------------------------------------------


def _st_command() -> list[str]:
    st = Path(sys.executable).with_name("st")
    return [str(st)] if st.exists() else [sys.executable, "-m", "schemathesis.cli"]


def schemathesis_pass(url: str, workdir: Path, *, api_key: str | None = None, seed: int = 1, max_examples: int = 20,
                      timeout: float = 600) -> dict[str, Any]:
    """One ``st run`` over every operation of ``url``/openapi.json: requests, statuses, 5xx, failures."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "schemathesis.toml"
    config.write_text(ST_CONFIG)
    reports = Path(tempfile.mkdtemp(prefix="st-", dir=workdir))
    cmd = [*_st_command(), "--config-file", str(config), "run", f"{url}/openapi.json", "--seed", str(seed),
           "--max-examples", str(max_examples), "--workers", "1", "--report", "har,json", "--report-dir", str(reports),
           "--no-color"]
    if api_key:
        cmd += ["--header", f"Authorization: Bearer {api_key}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=workdir,
                          env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": ""})
    har_files, json_files = glob.glob(str(reports / "har-*.json")), glob.glob(str(reports / "json-*.json"))
    if not har_files or not json_files:
        raise RuntimeError(f"schemathesis wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    entries = json.load(open(har_files[0]))["log"]["entries"]
    report = json.load(open(json_files[0]))
    statuses = collections.Counter(int(e["response"]["status"]) for e in entries)
    failures = [{"code": f["code"], "title": f["title"], "count": f["count"], "operations": f["operations"]}
                for f in report.get("failures", [])]
    errors = report.get("errors") or []
    shutil.rmtree(reports, ignore_errors=True)
    return {
        "requests": len(entries),
        "statuses": dict(sorted(statuses.items())),
        "5xx": sum(n for s, n in statuses.items() if s >= 500),
        "schema_failures": sum(f["count"] for f in failures),
        "failures": failures,
        "errors": len(errors),
        "exit_code": proc.returncode,
        "output": _failure_text(proc.stdout) if (failures or errors or proc.returncode) else "",
    }


def _failure_text(stdout: str, limit: int = 8000) -> str:
    """The FAILURES and ERRORS sections of ``st run``'s output (else its end), at most ``limit`` characters."""
    start = min((i for i in (stdout.find("= FAILURES ="), stdout.find("= ERRORS =")) if i >= 0), default=-1)
    if start < 0:
        return stdout[-limit:]
    end = stdout.find("= SUMMARY =", start)
    return stdout[start:end if end > 0 else None][:limit]


def schemathesis_campaign(index: Path, workdir: Path, target_requests: int, seed: int = 1) -> dict[str, Any]:
    """schemathesis in four set-ups (key given / not given / --protect-reads / no key at all) until ``target_requests``."""
    setups = [  # (name, serve arguments, server key, client key)
        ("key configured, no key sent", (), API_KEY, None),
        ("key configured, key sent", (), API_KEY, API_KEY),
        ("--protect-reads, no key sent", ("--protect-reads",), API_KEY, None),
        ("no key configured", (), None, None),
    ]
    share = max(1, -(-target_requests // len(setups)))
    out: dict[str, Any] = {"requests": 0, "5xx": 0, "schema_failures": 0, "errors": 0, "setups": []}
    for n, (name, extra, server_key, client_key) in enumerate(setups):
        copy = workdir / f"st-index-{n}"
        shutil.copytree(index, copy)
        done, runs, statuses, failures = 0, 0, collections.Counter(), []
        with Service(copy, *extra, api_key=server_key, log_dir=workdir) as svc:
            while done < share:
                result = schemathesis_pass(svc.url, workdir, api_key=client_key, seed=seed + 1000 * n + runs,
                                           max_examples=max(2, min(30, share // 20)))  # 30: ~700 requests a run
                runs += 1
                done += result["requests"]
                statuses.update({int(k): v for k, v in result["statuses"].items()})
                failures += result["failures"]
                for key in ("5xx", "schema_failures", "errors"):
                    out[key] += result[key]
                if result["output"]:
                    out.setdefault("outputs", []).append(f"[{name}] " + result["output"])
                if result["requests"] == 0:
                    break
            traceback_in_log = "Traceback" in svc.output()
        out["requests"] += done
        out["setups"].append({"setup": name, "requests": done, "runs": runs, "statuses": dict(sorted(statuses.items())),
                              "failures": failures, "traceback_in_log": traceback_in_log})
        shutil.rmtree(copy, ignore_errors=True)
    return out


# --- 2. uploads at the limit --------------------------------------------------------------------


def _photos() -> list[Path]:
    rows = list(csv.DictReader(open(SAMPLE / "catalog.csv")))
    return [SAMPLE / r["image"] for r in rows]


def _mosaic(width: int, height: int, tile: tuple[int, int], resample) -> Any:
    """A width x height canvas of real catalog photos, each scaled to ``tile``."""
    from PIL import Image

    canvas = Image.new("RGB", (width, height))
    photos = _photos()
    n = 0
    for y in range(0, height, tile[1]):
        for x in range(0, width, tile[0]):
            with Image.open(photos[n % len(photos)]) as im:
                canvas.paste(im.convert("RGB").resize(tile, resample), (x, y))
            n += 1
    return canvas


def upload_payloads(limit: int, max_pixels: int = 40_000_000) -> dict[str, bytes]:
    """Real-photo bodies: a JPEG padded to exactly the limit (less the multipart framing), a PNG of
    ~90% of max_pixels that fits under the limit, and a JPEG 512 KiB over the limit."""
    from PIL import Image

    side = int((max_pixels * 0.9 * 3 / 4) ** 0.5)  # 4:3, ~90% of the pixel limit
    width, height = side * 4 // 3 // 8 * 8, side // 8 * 8
    big = _mosaic(width, height, (480, 640), Image.BICUBIC)
    jpeg = b""
    for quality in (95, 90, 80, 70, 60, 50, 40):
        buf = io.BytesIO()
        big.save(buf, "JPEG", quality=quality)
        jpeg = buf.getvalue()
        if len(jpeg) <= limit - 4096:
            break
    if len(jpeg) > limit - 4096:
        raise RuntimeError(f"cannot fit a {width}x{height} JPEG under {limit} bytes")
    at_limit = jpeg + b"\0" * (limit - 1024 - len(jpeg))  # bytes after the EOI marker are ignored by decoders
    # Decode-heavy: every 8x8 block one colour, so the PNG is small while it decodes to width*height*3 bytes.
    small = _mosaic(width // 8, height // 8, (60, 80), Image.BICUBIC)
    scale = 1.0
    while True:
        w, h = int(width * scale), int(height * scale)
        buf = io.BytesIO()
        small.resize((w, h), Image.NEAREST).save(buf, "PNG", compress_level=6)
        png = buf.getvalue()
        if len(png) <= limit - 1024 or scale < 0.3:
            break
        scale *= 0.85
    over = jpeg + b"\0" * (limit + 512 * 1024 - len(jpeg))
    return {"jpeg_at_limit": at_limit, "png_heavy": png, "over_limit": over,
            "_sizes": json.dumps({"jpeg": [width, height], "png": [w, h]}).encode()}


class PeakRSS:
    """Peak resident memory of a process tree while a block runs (VmHWM after a reset, else sampled)."""

    def __init__(self, pid: int):
        import psutil

        self.proc = psutil.Process(pid)
        self.sampled = 0
        self._stop = threading.Event()

    def _tree(self):
        try:
            return [self.proc, *self.proc.children(recursive=True)]
        except Exception:
            return [self.proc]

    def rss(self) -> int:
        total = 0
        for p in self._tree():
            try:
                total += p.memory_info().rss
            except Exception:
                pass
        return total

    def _hwm(self) -> int | None:
        total = 0
        for p in self._tree():
            try:
                for line in open(f"/proc/{p.pid}/status"):
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                return None
        return total

    def __enter__(self) -> "PeakRSS":
        self.before = self.rss()
        self.reset = True
        for p in self._tree():
            try:
                with open(f"/proc/{p.pid}/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
            except OSError:
                self.reset = False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sampled = max(self.sampled, self.rss())
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        hwm = self._hwm() if self.reset else None
        self.peak = max(self.sampled, hwm or 0)
        self.method = "VmHWM" if hwm else "sampled"


def upload_load(url: str, pid: int, clients: int, limit: int, rounds: int = 2, payloads: dict[str, bytes] | None = None,
                timeout: float = 300) -> dict[str, Any]:
    """``clients`` threads at once, each sending every payload ``rounds`` times; peak RSS of ``pid``."""
    import httpx

    payloads = payloads or upload_payloads(limit)
    sizes = json.loads(payloads.get("_sizes", b"{}"))
    boundary = "reliability-boundary-7f3a"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode()
    multipart = head + payloads["jpeg_at_limit"] + f"\r\n--{boundary}--\r\n".encode()
    assert len(multipart) <= limit, (len(multipart), limit)
    over = payloads["over_limit"]

    def chunks():
        for i in range(0, len(over), 256 * 1024):
            yield over[i:i + 256 * 1024]

    kinds = [
        ("jpeg_at_limit", lambda c: c.post("/search", content=multipart, headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}"})),
        ("png_heavy", lambda c: c.post("/search", content=payloads["png_heavy"], headers={"Content-Type": "image/png"})),
        ("over_limit", lambda c: c.post("/search", content=over, headers={"Content-Type": "image/jpeg"})),
        ("over_limit_chunked", lambda c: c.post("/search", content=chunks(), headers={"Content-Type": "image/jpeg"})),
    ]
    answers: collections.Counter = collections.Counter()
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    problems: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout) as c:
            barrier.wait()
            for r in range(rounds):
                for j in range(len(kinds)):
                    name, send = kinds[(i + j + r) % len(kinds)]  # clients start at different kinds
                    try:
                        resp = send(c)
                        status, problem = resp.status_code, None
                        if status != 200:
                            body = resp.json()
                            if set(body) != {"error", "detail"}:
                                problem = f"{name}: {status} body {resp.text[:200]}"
                        if status == 429 and not resp.headers.get("retry-after"):
                            problem = f"{name}: 429 without Retry-After"
                        if status not in (200, 413, 429):
                            problem = f"{name}: {status} {resp.text[:200]}"
                        if status == 200 and name.startswith("over_limit"):
                            problem = f"{name}: accepted a body over the limit"
                    except Exception as exc:  # no answer
                        status, problem = "no answer", f"{name}: {type(exc).__name__}: {exc}"
                    with lock:
                        answers[str(status)] += 1
                        by_kind[name][str(status)] += 1
                        if problem:
                            problems.append(problem)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    with PeakRSS(pid) as mem:
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
    return {
        "clients": clients, "limit_bytes": limit, "requests": sum(answers.values()), "seconds": round(seconds, 1),
        "rss_before_mb": round(mem.before / 2**20, 1), "peak_rss_mb": round(mem.peak / 2**20, 1),
        "peak_method": mem.method, "answers": dict(sorted(answers.items())),
        "by_kind": {k: dict(sorted(v.items())) for k, v in by_kind.items()}, "errors": len(problems),
        "problems": problems[:10], "image_sizes": sizes,
    }


# --- 3. readers and writers ---------------------------------------------------------------------


def read_write(index: Path, workdir: Path, seconds: float, clients: int = 4, k: int = 5, workers: int = 2,
               service: Service | None = None) -> dict[str, Any]:
    """Searches from ``clients`` threads while the CLI adds and removes copies of catalog photos.

    ``index`` is changed (pass a copy). Every search must be 200 with k hits that agree with the
    generation the answer names; afterwards every worker must serve the latest generation.
    """
    import httpx
    from lookalike import VisualSearch

    rows = list(csv.DictReader(open(SAMPLE / "catalog.csv")))[:6]
    photos = {r["id"]: (SAMPLE / r["image"]).read_bytes() for r in rows}
    copy_of = {f"rw-copy-{r['id']}": r["id"] for r in rows}
    catalog = workdir / "rw-catalog.csv"
    with open(catalog, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "label"])
        for r in rows:
            w.writerow([f"rw-copy-{r['id']}", str(SAMPLE / r["image"]), r["label"]])

    def generation_now() -> tuple[int, set[str]]:
        with VisualSearch.open(index) as vs:
            return vs.generation, {c for c in copy_of if vs.get(c) is not None}

    present: dict[int, set[str]] = {}
    g, copies = generation_now()
    present[g] = copies
    own = service is None
    svc = service or Service(index, "--workers", str(workers), log_dir=workdir)
    stop = threading.Event()
    errors: list[str] = []
    searches = collections.Counter()
    seen: list[tuple[int, str, list[str]]] = []  # (generation named by the answer, query id, hit ids)
    lock = threading.Lock()

    def searcher(i: int) -> None:
        n = 0
        ids = list(photos)
        while not stop.is_set():
            with httpx.Client(base_url=svc.url, timeout=120, headers={"Connection": "close"} if i % 2 else {}) as c:
                for _ in range(5):
                    if stop.is_set():
                        break
                    qid = ids[(i + n) % len(ids)]
                    n += 1
                    try:
                        r = c.post("/search", params={"k": k}, files=[("file", (f"{qid}.jpg", photos[qid], "image/jpeg"))])
                        hits = [h["id"] for h in r.json()["results"][0]["hits"]] if r.status_code == 200 else []
                        gen = int(r.headers.get("x-index-generation", -1))
                        with lock:
                            searches[r.status_code] += 1
                            if r.status_code != 200 or len(hits) != k:
                                errors.append(f"search: {r.status_code} {len(hits)} hits {r.text[:200]}")
                            else:
                                seen.append((gen, qid, hits))
                    except Exception as exc:
                        with lock:
                            searches["no answer"] += 1
                            errors.append(f"search: {type(exc).__name__}: {exc}")

    changes = 0
    cli = [sys.executable, "-m", "lookalike.cli"]
    threads = [threading.Thread(target=searcher, args=(i,)) for i in range(clients)]
    start = time.monotonic()
    try:
        for t in threads:
            t.start()
        adding = True
        while time.monotonic() - start < seconds or changes == 0:
            if adding:
                p = subprocess.run([*cli, "add", str(index), str(catalog), "--quiet"], capture_output=True, text=True)
            else:
                p = subprocess.run([*cli, "remove", str(index), *copy_of], capture_output=True, text=True)
            if p.returncode != 0:
                errors.append(f"cli {'add' if adding else 'remove'}: exit {p.returncode}: {p.stderr[-300:]}")
                break
            g, copies = generation_now()
            present[g] = copies
            changes += 1
            adding = not adding
        rw_seconds = time.monotonic() - start
    finally:
        stop.set()
        for t in threads:
            t.join()
    # Both workers must come to serve the latest generation.
    latest = max(present)
    pids: dict[int, int] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with httpx.Client(base_url=svc.url, timeout=30) as c:  # a new connection: either worker may take it
            ready = c.get("/readyz", headers={"Connection": "close"}).json()
        pids[ready["pid"]] = ready["generation"]
        if len(pids) >= workers and all(gen == latest for gen in pids.values()):
            break
        time.sleep(0.05)
    else:
        errors.append(f"workers did not all reach generation {latest}: {pids}")
    # Each answer must match the generation it names: a copy is in the hits iff that generation holds it.
    mixed = 0
    for gen, qid, hits in seen:
        if gen not in present:
            mixed += 1
            errors.append(f"answer names generation {gen}, which no change produced ({sorted(present)})")
            continue
        copy = f"rw-copy-{qid}"
        extra = {h for h in hits if h.startswith("rw-copy-")} - present[gen]
        if extra or (copy in present[gen]) != (copy in hits[:2]):
            mixed += 1
            errors.append(f"generation {gen}: hits {hits} for {qid} disagree with its items {sorted(present[gen])}")
    traceback_in_log = "Traceback" in svc.output()
    if traceback_in_log:
        errors.append("traceback in the service log")
    if own:
        svc.stop()
    return {
        "seconds": round(rw_seconds, 1), "minutes": round(rw_seconds / 60, 2), "searches": sum(searches.values()),
        "statuses": {str(s): n for s, n in searches.items()}, "changes": changes, "generations": len(present),
        "latest_generation": latest, "workers_seen": {str(p): gen for p, gen in pids.items()}, "mixed": mixed,
        "errors": len(errors), "problems": errors[:10],
    }


# --- all of it -----------------------------------------------------------------------------------


def run(schemathesis_requests: int = 2400, rw_seconds: float = 60, upload_clients: int = 16, *,
        max_upload_mb: int = 8, seed: int = 1, detail: bool = False) -> dict[str, Any]:
    """Everything above on a fresh sample index; the summary (``detail``: with the parts' own reports)."""
    tmp = Path(tempfile.mkdtemp(prefix="lookalike-reliability-"))
    try:
        index = build_sample(tmp / "index")
        st = schemathesis_campaign(index, tmp, schemathesis_requests, seed=seed)
        limit = max_upload_mb * 2**20
        payloads = upload_payloads(limit)
        copy = tmp / "upload-index"
        shutil.copytree(index, copy)
        with Service(copy, "--max-upload-mb", str(max_upload_mb), log_dir=tmp) as svc:
            up = upload_load(svc.url, svc.pid, upload_clients, limit, payloads=payloads)
            if "Traceback" in svc.output():
                up["errors"] += 1
                up["problems"].append("traceback in the service log")
        rw_index = tmp / "rw-index"
        shutil.copytree(index, rw_index)
        rw = read_write(rw_index, tmp, rw_seconds)
        summary = {
            "schemathesis_requests": st["requests"],
            "schemathesis_5xx": st["5xx"],
            "schema_failures": st["schema_failures"],
            "rw_minutes": rw["minutes"],
            "rw_errors": rw["errors"],
            "upload_peak_rss_mb": up["peak_rss_mb"],
            "upload_answers": {code: up["answers"].get(code, 0) for code in ("200", "413", "429")},
            "upload_errors": up["errors"],
        }
        if detail:
            summary["detail"] = {"schemathesis": st, "uploads": up, "read_write": rw}
        return summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemathesis-requests", type=int, default=2400, help="at least this many (default 2400)")
    parser.add_argument("--rw-seconds", type=float, default=60, help="seconds of reading while writing (default 60)")
    parser.add_argument("--upload-clients", type=int, default=16, help="clients uploading at once (default 16)")
    parser.add_argument("--max-upload-mb", type=int, default=8, help="the service's body limit (default 8)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object (with details)")
    args = parser.parse_args(argv)
    result = run(args.schemathesis_requests, args.rw_seconds, args.upload_clients, max_upload_mb=args.max_upload_mb,
                 seed=args.seed, detail=True)
    detail = result["detail"]
    ok = not (result["schemathesis_5xx"] or result["schema_failures"] or result["rw_errors"] or result["upload_errors"]
              or detail["schemathesis"]["errors"])
    if args.json:
        print(json.dumps({**result, "ok": ok}, indent=2))
        return 0 if ok else 1
    st, up, rw = detail["schemathesis"], detail["uploads"], detail["read_write"]
    print("schemathesis (all phases, all checks) against /openapi.json")
    for s in st["setups"]:
        print(f"  {s['setup']:<32} {s['requests']:>6} requests in {s['runs']} runs  statuses {s['statuses']}")
        for f in s["failures"]:
            print(f"      {f['code']} {f['title']}: {f['count']} ({', '.join(f['operations'])})")
    print(f"  total: {result['schemathesis_requests']} requests, {result['schemathesis_5xx']} 5xx, "
          f"{result['schema_failures']} schema failures, {st['errors']} errors")
    for text in st.get("outputs", [])[:3]:
        print(text)
    print(f"\n{up['clients']} clients uploading at the {up['limit_bytes'] // 2**20} MiB limit "
          f"(JPEG {up['image_sizes'].get('jpeg')}, PNG {up['image_sizes'].get('png')} px), {up['requests']} requests "
          f"in {up['seconds']} s")
    print(f"  service RSS before {up['rss_before_mb']} MiB, peak {up['peak_rss_mb']} MiB ({up['peak_method']})")
    print(f"  answers {up['answers']}  by kind {up['by_kind']}  errors {up['errors']}")
    for p in up["problems"]:
        print(f"    {p}")
    print(f"\nreaders and writers (--workers 2, CLI add/remove): {rw['minutes']} min, {rw['searches']} searches "
          f"{rw['statuses']}, {rw['changes']} changes over {rw['generations']} generations")
    print(f"  workers at the end (pid: generation): {rw['workers_seen']}, latest {rw['latest_generation']}; "
          f"mixed answers {rw['mixed']}; errors {rw['errors']}")
    for p in rw["problems"]:
        print(f"    {p}")
    print(f"\n{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
