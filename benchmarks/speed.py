"""Speed: build, query and HTTP figures for each runtime x precision, next to PyTorch eager, in one run.

For each row (runtime, precision) the script, on this machine:

(a) builds the 1,200 coil-100 images and the 2,000 fashion-products-2000 images with
    ``VisualSearch.build(runtime=, precision=)`` and the default features, end to end (reading the
    catalog, decoding, the model, the index written; an int8 row includes its calibration on 64
    catalog images): images/s. PyTorch eager (``runtime="torch"``, the same features) is the
    baseline; being about 8x slower it builds only the first ``--eager-images`` of each set.
(b) times one query, a real 640x480 JPEG (a catalog photo pasted on a real surface photo, as
    ``bench_serve.py`` makes it), ``vs.search(jpeg_bytes, k=5)`` in this process for
    ``--seconds``: p50/p99; then, for every row but eager, the real service (``lookalike serve
    INDEX --runtime R``) on the coil-100 index, ``POST /search`` multipart: p50/p99 at 1 client and
    requests/s (and errors) at 16 clients, ``--seconds`` each.
(c) recall@1 (precision@1 for leave-one-out) on every protocol of ``../shared/data/README.md`` per
    precision, next to fp32, with ``benchmarks/retrieval.py``'s code: a precision may be a default
    only if every protocol stays within 0.005 of fp32. Runtimes at fp32 compute the same vectors
    (cosine > 0.9999, ``tests/test_runtimes.py``), so quality is measured per precision, with the
    runtime ``auto`` picks (at int8, ONNX Runtime and OpenVINO differ a little: cosine >= 0.999).

Before its timed builds each row builds 8 images untimed, so that neither the ONNX export nor
``auto``'s one-time measurement of the runtimes (remembered in the user cache) is timed.

Targets with the defaults (runtime and precision auto: the fastest runtime, fp32 or, where the
CPU has it natively and it measures faster, bf16): build >= 300 images/s on
coil-100 and >= 10x eager; query p50 <= 8 ms in process, <= 15 ms over HTTP at 1 client;
>= 100 requests/s at 16 clients with no errors; recall@1 within 0.005 of fp32 everywhere.

The machine is shared: each phase prints the share of the CPUs other processes used meanwhile
("others"); read figures taken while others were busy as low.

    .venv/bin/python benchmarks/speed.py                    # everything: about 15 min on 2 cores
    .venv/bin/python benchmarks/speed.py --skip-quality     # (a) and (b) only: about 6 min
    .venv/bin/python benchmarks/speed.py --rows auto/fp32,openvino/int8 --seconds 5
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import retrieval  # noqa: E402
from bench_serve import in_process, load, multipart, query_jpeg  # noqa: E402
from cpu_usage import Timer  # noqa: E402
from live_service import Service  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETS = {"coil-100": "coil-100/items.csv", "fashion": "fashion-products-2000/items.csv"}
TARGET_BUILD, TARGET_RATIO = 300.0, 10.0
TARGET_P50, TARGET_HTTP_P50, TARGET_RPS = 8.0, 15.0, 100.0
TARGET_RECALL_DROP = 0.005
DEFAULT = ("auto", "auto")  # what `lookalike build` does unless told


def rows_here() -> list[tuple[str, str]]:
    """Eager first, then every runtime x precision this machine runs, then the default."""
    from lookalike.runtimes import SUPPORTS, available, int8_saturates, native_bf16

    runs = {"bf16": native_bf16(), "int8": not int8_saturates()}  # refused where the CPU lacks them
    rows = [("torch", "fp32")]
    for runtime in ("onnxruntime", "openvino"):
        if available(runtime):
            rows += [(runtime, p) for p in SUPPORTS[runtime] if runs.get(p, True)]
    return rows + [DEFAULT]


def _settle() -> None:
    gc.collect()
    time.sleep(0.5)


def build_phase(row, data: Path, work: Path, eager_images: int, say) -> dict:
    from lookalike import VisualSearch
    from lookalike.catalog import read_catalog

    runtime, precision = row
    out = {}
    warm = read_catalog(data / SETS["coil-100"])[:8]
    VisualSearch.build(warm, work / "warm-up", runtime=runtime, precision=precision, force=True, progress=False).close()
    for name, rel in SETS.items():
        items = read_catalog(data / rel)
        if runtime == "torch":
            items = items[:eager_images]
        _settle()
        with Timer() as t:
            vs = VisualSearch.build(items, work / f"{name}-{runtime}-{precision}", runtime=runtime,
                                    precision=precision, force=True, progress=False)
        rep = vs.build_report
        out[name] = {"images": rep.indexed, "seconds": rep.seconds, "images_per_s": rep.indexed / rep.seconds,
                     "others": t.others, "runtime": vs.featurizer.runtime, "precision": vs.info()["precision"],
                     "index": str(vs.path)}
        vs.close()
        say(f"  build {name:<9}{out[name]['images_per_s']:7.1f} images/s ({rep.indexed} in {rep.seconds:.1f} s, "
            f"ran {out[name]['runtime']} {out[name]['precision']}, others {100 * t.others:.0f}%)")
    return out


def query_phase(row, index: str, jpeg: bytes, seconds: float, http: bool, say) -> dict:
    from lookalike import VisualSearch

    runtime, _ = row
    with VisualSearch.open(index, runtime=runtime) as vs:
        _settle()
        out = {"in_process": in_process(vs, jpeg, seconds)}
    r = out["in_process"]
    say(f"  query in process   p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  ({r['runs']} runs, "
        f"others {100 * r['others']:.0f}%)")
    if not http:
        return out
    body, headers = multipart(jpeg)
    service = Service(index, "--runtime", runtime)
    try:
        for clients in (1, 16):
            _settle()
            h = load(service.url, body, headers, clients, seconds, service.pid)
            out[f"http_{clients}"] = h
            say(f"  HTTP {clients:>2} client{'s' if clients > 1 else ' '}    p50 {h['p50_ms']:6.2f} ms  p99 {h['p99_ms']:6.2f} ms  "
                f"{h['requests_per_s']:6.1f} requests/s  errors {h['errors']}  (others {100 * h['others']:.0f}%)")
    finally:
        service.stop()
    return out


def quality_phase(precisions: list[str], data: Path, work: Path, say) -> dict:
    """Recall@1 (or P@1) per protocol for each precision, default features, runtime auto."""
    first = {p: ("recall@1" if retrieval.PROTOCOLS[p][1] else "precision@1") for p in retrieval.PROTOCOLS}
    retrieval.write_fashion_split(data, work)
    out = {}
    for precision in precisions:
        retrieval.CONFIGS[precision] = ({"precision": precision}, {})
        _settle()
        res = retrieval.run([precision], list(retrieval.PROTOCOLS), data, work, lambda *a: None)[precision]
        out[precision] = {p: res["protocols"][p][first[p]] for p in retrieval.PROTOCOLS if p in res["protocols"]}
        say(f"  {precision}: " + ", ".join(f"{p} {v:.4f}" for p, v in out[precision].items()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=retrieval.data_root(), help="the shared data folder")
    ap.add_argument("--rows", default=None, help="comma-separated RUNTIME/PRECISION rows (default: all this machine runs)")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per latency phase (default 10)")
    ap.add_argument("--eager-images", type=int, default=200, help="images of each set the eager baseline builds (default 200)")
    ap.add_argument("--skip-quality", action="store_true", help="skip (c), the recall of each precision")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write every figure to FILE as JSON")
    args = ap.parse_args(argv)

    from lookalike.featurizer import cpu_count
    from lookalike.runtimes import cpu_name, int8_saturates, native_bf16

    rows = [tuple(r.split("/")) for r in args.rows.split(",")] if args.rows else rows_here()
    if ("torch", "fp32") not in rows:
        rows.insert(0, ("torch", "fp32"))  # the baseline is always measured in the same run
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    import onnxruntime
    import openvino
    import torch

    say(f"lookalike speed benchmark: {len(rows)} rows; {cpu_count()} cores, {cpu_name()}, {platform.machine()}, "
        f"native bf16 {'yes' if native_bf16() else 'no'}, int8 {'refused (no VNNI)' if int8_saturates() else 'yes'}")
    say(f"onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}, torch {torch.__version__}; "
        f"data {args.data}")
    start = time.perf_counter()
    results = {"rows": {}, "cores": cpu_count(), "cpu": cpu_name()}
    with tempfile.TemporaryDirectory(prefix="lookalike-speed-") as tmp:
        work = Path(tmp)
        jpeg = query_jpeg(args.data)
        for row in rows:
            name = "/".join(row)
            say(f"{name}:")
            r = results["rows"][name] = {"build": build_phase(row, args.data, work, args.eager_images, say)}
            r["query"] = query_phase(row, r["build"]["coil-100"]["index"], jpeg, args.seconds, row[0] != "torch", say)
        if not args.skip_quality:
            say("recall@1 per precision (default features, runtime auto):")
            precisions = ["fp32"] + sorted({p for _, p in rows if p not in ("fp32", "auto")})
            results["quality"] = quality_phase(precisions, args.data, work, say)
    results["seconds"] = time.perf_counter() - start
    ok = report(results, rows)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0 if ok else 1


def report(results: dict, rows: list) -> bool:
    eager = results["rows"]["torch/fp32"]["build"]
    print()
    print(f"{'row':<18}{'coil-100 img/s':>15}{'x eager':>9}{'fashion img/s':>15}{'x eager':>9}"
          f"{'query p50':>11}{'p99':>8}{'HTTP1 p50':>11}{'16 clients':>12}{'errors':>8}")
    for row in rows:
        name = "/".join(row)
        r = results["rows"][name]
        b, q = r["build"], r["query"]
        cells = f"{name:<18}"
        for s in SETS:
            rate = b[s]["images_per_s"]
            cells += f"{rate:15.1f}{rate / eager[s]['images_per_s']:8.1f}x"
        cells += f"{q['in_process']['p50_ms']:9.2f}ms{q['in_process']['p99_ms']:6.1f}ms"
        if "http_1" in q:  # eager gets no HTTP phases
            cells += f"{q['http_1']['p50_ms']:9.2f}ms{q['http_16']['requests_per_s']:8.1f} r/s{q['http_16']['errors']:8d}"
        print(cells)
    default = results["rows"]["/".join(DEFAULT)]
    db, dq = default["build"]["coil-100"], default["query"]
    default_precision = db["precision"]
    ratio = db["images_per_s"] / eager["coil-100"]["images_per_s"]
    checks = [
        (f"build coil-100 >= {TARGET_BUILD:.0f} images/s", db["images_per_s"] >= TARGET_BUILD, f"{db['images_per_s']:.1f}"),
        (f"build >= {TARGET_RATIO:.0f}x eager", ratio >= TARGET_RATIO, f"{ratio:.1f}x"),
        (f"query p50 <= {TARGET_P50:.0f} ms in process", dq["in_process"]["p50_ms"] <= TARGET_P50, f"{dq['in_process']['p50_ms']:.2f} ms"),
        (f"HTTP p50 <= {TARGET_HTTP_P50:.0f} ms at 1 client", dq["http_1"]["p50_ms"] <= TARGET_HTTP_P50, f"{dq['http_1']['p50_ms']:.2f} ms"),
        (f">= {TARGET_RPS:.0f} requests/s at 16 clients, no errors",
         dq["http_16"]["requests_per_s"] >= TARGET_RPS and dq["http_16"]["errors"] == 0,
         f"{dq['http_16']['requests_per_s']:.1f} r/s, {dq['http_16']['errors']} errors"),
    ]
    quality = results.get("quality")
    if quality:
        print()
        protocols = list(quality["fp32"])
        print(f"{'precision':<11}" + "".join(f"{p:>16}" for p in protocols) + f"{'worst drop':>12}  allowed as default")
        for precision, values in quality.items():
            drops = [quality["fp32"][p] - values[p] for p in protocols]
            worst = max(drops)
            allowed = worst <= TARGET_RECALL_DROP + 1e-9
            print(f"{precision:<11}" + "".join(f"{values[p]:10.4f} ({-d:+.3f})" for p, d in zip(protocols, drops))
                  + f"{worst:12.4f}  {'yes' if allowed else 'NO'}")
            if precision == default_precision:
                checks.append((f"default precision {precision}: recall@1 within {TARGET_RECALL_DROP} of fp32",
                               allowed, f"worst drop {worst:.4f}"))
    print()
    print(f"defaults: runtime auto, precision auto (coil-100 ran {db['runtime']} {default_precision})")
    for label, ok, value in checks:
        print(f"target {'PASS' if ok else 'FAIL'}  {label}: {value}")
    print(f"\ntotal {results['seconds']:.0f} s")
    return all(ok for _, ok, _ in checks)


if __name__ == "__main__":
    sys.exit(main())
