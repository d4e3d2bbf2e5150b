"""Build throughput: ``VisualSearch.build`` end to end vs a plain PyTorch eager baseline.

Featurizes the 1,200 COIL-100 images (``coil-100/items.csv``: the coil-6view gallery and
queries together) and prints, all measured in this one run:

- build: ``VisualSearch.build(items.csv, <temp dir>, tta="none", crop_pct=0.875, precision="fp32")``
  timed end to end (catalog read, weights hash, model load, decoding, inference, FAISS, writing the index
  directory): plain features, the same work as the eager baseline. The ONNX export cache is
  warm: a warm-up build of a few items runs first, so the export is not timed;
- build with the defaults (flip averaging, whole picture: two model runs per image; precision
  auto: fp32, or bf16 where the CPU has it natively and it measures faster), and its cost
  against the plain build;
- eager: the same model as a plain PyTorch module (``create_torch_model``, fp32,
  ``torch.inference_mode``, batch 32, torch threads = cores), the same images decoded one after
  another with the same ``Featurizer.load`` preprocessing; model creation included;
- the ratio build / eager and PASS/FAIL against the targets (>= 3x eager, >= 60 images/s);
- a breakdown: decoding + preprocessing alone (one thread, and in a thread pool the size the
  featurizer uses), and model-only throughput of the featurizer's ONNX session at the batch
  size a build uses.

Every timed phase also reports how busy the rest of the machine was while it ran ("others"):
on a shared machine, a figure taken while other processes used the CPU is low for that reason.
Throughput can only be lowered by noise, so PASS/FAIL is judged on the best of ``--repeat``.

    .venv/bin/python benchmarks/bench_build.py [--data DIR] [--repeat N] [--json] [--cache DIR]

The index goes to a temporary folder. The ONNX export cache (``LOOKALIKE_CACHE``) is a fresh
temporary folder too, so the run measures what the current code exports, unless ``--cache DIR``
names one to reuse (e.g. ``~/.cache/lookalike`` to skip the export).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lookalike.runtimes import cpu_name  # noqa: E402
from cpu_usage import Timer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 3.0
TARGET_RATE = 60.0
EAGER_BATCH = 32
MODEL = "efficientnet-lite0"

# --- how busy the rest of the machine was: benchmarks/cpu_usage.py --------------------------


def _settle() -> None:
    """Let the previous phase's spinning worker threads (ONNX Runtime, OpenMP) go to sleep."""
    gc.collect()
    time.sleep(0.5)


# --- the phases ----------------------------------------------------------------------------


def warm_up(items, workdir: Path) -> float:
    """A build of a few items: exports (or finds) the ONNX model in the cache, warms imports."""
    from lookalike import VisualSearch

    t0 = time.perf_counter()
    vs = VisualSearch.build(items[:8], workdir / "warm-up-index")
    vs.close()
    return time.perf_counter() - t0


PLAIN = {"tta": "none", "crop_pct": 0.875, "pooling": "avg", "precision": "fp32"}  # what the eager baseline computes


def time_build(catalog: Path, workdir: Path, run: int, features: dict) -> dict:
    from lookalike import VisualSearch

    with Timer() as t:
        vs = VisualSearch.build(catalog, workdir / f"index-{run}", force=True, **features)
    report = vs.build_report
    out = {
        "seconds": t.seconds, "others": t.others, "indexed": report.indexed, "skipped": len(report.skipped),
        "runtime": vs.manifest["model"].get("runtime"), "featurizer_threads": vs._featurizer.threads,
        "featurizer_batch": _model_batch(vs._featurizer),
    }
    vs.close()
    del vs
    return out


def time_eager(spec, weights, featurizer, paths: list[str]) -> dict:
    """Plain PyTorch eager, fp32, batch 32: decode (one thread, Featurizer.load) then forward."""
    import torch

    from lookalike.featurizer import cpu_count
    from lookalike.models import create_torch_model

    torch.set_num_threads(cpu_count())
    model_seconds = 0.0
    with Timer() as t:
        model = create_torch_model(spec, weights)
        rows = []
        with torch.inference_mode():
            for s in range(0, len(paths), EAGER_BATCH):
                x = torch.from_numpy(np.stack([featurizer.load(p) for p in paths[s:s + EAGER_BATCH]]))
                m0 = time.perf_counter()
                rows.append(model(x).numpy())
                model_seconds += time.perf_counter() - m0
        vectors = np.concatenate(rows)
    del model
    return {"seconds": t.seconds, "others": t.others, "model_seconds": model_seconds, "vectors": vectors}


def time_decode(featurizer, paths: list[str]) -> dict:
    with Timer() as one:
        pixels = [featurizer.load(p) for p in paths]
    _settle()
    with Timer() as pool_t, ThreadPoolExecutor(featurizer.threads) as pool:
        list(pool.map(featurizer.load, paths))
    return {
        "single_seconds": one.seconds, "single_others": one.others,
        "pool_seconds": pool_t.seconds, "pool_others": pool_t.others, "pool_threads": featurizer.threads,
        "pixels": pixels,
    }


def _model_batch(featurizer) -> int:
    """Inputs per model call in a build: ``CPU_CHUNK`` on CPU, the batch size on CUDA."""
    from lookalike.featurizer import CPU_CHUNK

    return CPU_CHUNK if featurizer.device == "cpu" else featurizer.batch_size


def time_model(featurizer, pixels: list[np.ndarray]) -> dict:
    """``Featurizer.run`` on batches the size a build uses, from as many threads as the featurizer uses.

    Whether the calls overlap is the featurizer's business: its runtime may take them one at a
    time (each using all cores) or several at once (one core each); either way this measures the
    model at its best in the featurizer's own configuration.
    """
    batch = _model_batch(featurizer)
    batches = [np.stack(pixels[s:s + batch]) for s in range(0, len(pixels), batch)]
    with ThreadPoolExecutor(featurizer.threads) as pool:
        list(pool.map(featurizer.run, batches[:featurizer.threads]))  # first runs allocate buffers
        with Timer() as t:
            rows = list(pool.map(featurizer.run, batches))
    return {"seconds": t.seconds, "others": t.others, "vectors": np.concatenate(rows)}


# --- reporting -----------------------------------------------------------------------------


def _rates(n: int, seconds: list[float]) -> dict:
    rates = [n / s for s in seconds]
    return {"best": max(rates), "median": statistics.median(rates), "all": rates}


def _fmt(r: dict) -> str:
    extra = f" (median {r['median']:.1f})" if len(r["all"]) > 1 else ""
    return f"{r['best']:7.1f} images/s{extra}"


def _others(values: list[float]) -> str:
    return "others " + "/".join(f"{100 * v:.0f}%" for v in values)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                    help="the shared data folder (default: ../shared/data from the repository root)")
    ap.add_argument("--repeat", type=int, default=1, help="time build and eager N times; report best and median")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    ap.add_argument("--cache", type=Path, default=None,
                    help="ONNX export cache to use (default: a fresh temporary folder)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    catalog = args.data / "coil-100" / "items.csv"
    if not catalog.is_file():
        print(f"error: {catalog} not found; pass --data DIR (the folder holding coil-100/)", file=sys.stderr)
        return 2

    say = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))
    with tempfile.TemporaryDirectory(prefix="lookalike-bench-") as tmp:
        work = Path(tmp)
        os.environ["LOOKALIKE_CACHE"] = str(args.cache.expanduser() if args.cache else work / "cache")

        import onnxruntime
        import torch

        from lookalike.catalog import read_catalog
        from lookalike.featurizer import Featurizer, cpu_count
        from lookalike.models import get_spec, resolve_weights

        items = read_catalog(catalog)
        paths = [str(it.image) for it in items]
        n = len(paths)
        for p in paths:  # the files into the OS cache, so no phase pays for the disk
            Path(p).read_bytes()

        say(f"lookalike build benchmark: {n} images from {catalog}")
        say(f"machine: {cpu_count()} cores, {cpu_name()}; "
            f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, model {MODEL}")
        say(f"ONNX export cache: {os.environ['LOOKALIKE_CACHE']}")
        warm = warm_up(items, work)
        say(f"warm-up build of 8 items (ONNX export cached from here on): {warm:.1f} s")

        spec = get_spec(MODEL)
        weights = resolve_weights(spec)
        builds, defaults, eagers = [], [], []
        for r in range(args.repeat):
            _settle()
            builds.append(time_build(catalog, work, r, PLAIN))
            say(f"  run {r + 1}: build {n / builds[-1]['seconds']:.1f} images/s "
                f"({builds[-1]['seconds']:.1f} s, others {100 * builds[-1]['others']:.0f}%)")
            _settle()
            defaults.append(time_build(catalog, work, r, {}))
            say(f"  run {r + 1}: build with default features {n / defaults[-1]['seconds']:.1f} images/s "
                f"({defaults[-1]['seconds']:.1f} s, others {100 * defaults[-1]['others']:.0f}%)")
            if r == 0:
                featurizer = Featurizer(spec, weights)  # for Featurizer.load in the baseline and breakdown
            _settle()
            eagers.append(time_eager(spec, weights, featurizer, paths))
            say(f"  run {r + 1}: eager {n / eagers[-1]['seconds']:.1f} images/s "
                f"({eagers[-1]['seconds']:.1f} s, others {100 * eagers[-1]['others']:.0f}%)")
        _settle()
        decode = time_decode(featurizer, paths)
        _settle()
        model = time_model(featurizer, decode["pixels"])

        build = _rates(n, [b["seconds"] for b in builds])
        default = _rates(n, [b["seconds"] for b in defaults])
        eager = _rates(n, [e["seconds"] for e in eagers])
        eager_model = _rates(n, [e["model_seconds"] for e in eagers])
        ratio, ratio_median = build["best"] / eager["best"], build["median"] / eager["median"]
        ok_ratio, ok_rate = ratio >= TARGET_RATIO, build["best"] >= TARGET_RATE
        dec1 = n / decode["single_seconds"]
        decp = n / decode["pool_seconds"]
        onnx_rate = n / model["seconds"]
        # If decoding and the model shared the cores perfectly: model time + decode CPU time / cores.
        bound = 1.0 / (1.0 / onnx_rate + 1.0 / (dec1 * cpu_count()))
        a, b = model["vectors"], eagers[0]["vectors"]
        cos = float(np.min((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))

        result = {
            "images": n, "cores": cpu_count(), "model": MODEL, "repeat": args.repeat,
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "build": {**build, "runtime": builds[0]["runtime"], "batch": builds[0]["featurizer_batch"],
                      "threads": builds[0]["featurizer_threads"], "indexed": builds[0]["indexed"],
                      "skipped": builds[0]["skipped"], "others": [x["others"] for x in builds]},
            "build_default_features": {**default, "cost_vs_plain": build["best"] / default["best"],
                                       "others": [x["others"] for x in defaults]},
            "eager": {**eager, "batch": EAGER_BATCH, "model_only": eager_model,
                      "others": [x["others"] for x in eagers]},
            "ratio": ratio, "ratio_median": ratio_median,
            "targets": {"ratio": TARGET_RATIO, "images_per_s": TARGET_RATE},
            "pass": {"ratio": ok_ratio, "images_per_s": ok_rate, "all": ok_ratio and ok_rate},
            "breakdown": {
                "decode_single_thread": dec1, "decode_pool": decp, "decode_pool_threads": decode["pool_threads"],
                "onnx_model_only": onnx_rate, "onnx_model_batch": builds[0]["featurizer_batch"], "overlap_bound": bound,
                "others": {"decode_single": decode["single_others"], "decode_pool": decode["pool_others"],
                           "onnx_model": model["others"]},
            },
            "onnx_vs_eager_min_cosine": cos,
            "warm_up_seconds": warm,
        }
        del featurizer

    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if result["pass"]["all"] else 1

    bo, eo = result["build"]["others"], result["eager"]["others"]
    print()
    print(f"build    {_fmt(build)}   VisualSearch.build end to end, plain features, {result['build']['runtime']}, "
          f"batch {result['build']['batch']}, {result['build']['threads']} threads; {_others(bo)}")
    print(f"default  {_fmt(default)}   the same with the defaults (flip + whole picture, precision auto): "
          f"{build['best'] / default['best']:.2f}x the plain build's time; {_others(result['build_default_features']['others'])}")
    print(f"eager    {_fmt(eager)}   PyTorch {torch.__version__} fp32 eager, batch {EAGER_BATCH}, "
          f"{cpu_count()} threads, decoding included; {_others(eo)}")
    print(f"         {_fmt(eager_model)}   (eager model forward alone)")
    print(f"ratio    {ratio:7.2f}x          build / eager (best / best; median / median {ratio_median:.2f}x)")
    print(f"target   {'PASS' if ok_ratio else 'FAIL'}  >= {TARGET_RATIO:.0f}x eager:   {ratio:.2f}x")
    print(f"target   {'PASS' if ok_rate else 'FAIL'}  >= {TARGET_RATE:.0f} images/s: {build['best']:.1f}")
    print()
    print("breakdown")
    print(f"  decode + preprocess, 1 thread         {dec1:7.1f} images/s  ({1000 / dec1:.2f} ms/image; "
          f"{_others([decode['single_others']])})")
    print(f"  decode + preprocess, pool of {decode['pool_threads']}        {decp:7.1f} images/s  "
          f"({_others([decode['pool_others']])})")
    mb = builds[0]["featurizer_batch"]
    print(f"  ONNX session alone, batch {mb:<2}          {onnx_rate:7.1f} images/s  ({_others([model['others']])})")
    print(f"  bound if both overlapped perfectly    {bound:7.1f} images/s  "
          f"(1 / (1/model + 1/(decode x {cpu_count()} cores)), model at batch {mb}); build reached {build['best'] / bound:.0%} of it")
    print(f"  ONNX vs eager vectors: min cosine {cos:.6f}")
    print(f"\n{'PASS' if ok_ratio and ok_rate else 'FAIL'}")
    return 0 if ok_ratio and ok_rate else 1


if __name__ == "__main__":
    sys.exit(main())
