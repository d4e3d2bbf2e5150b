"""Retrieval quality: every evaluation protocol of the shared data, for several feature configurations.

Each configuration is a set of ``VisualSearch.build`` options (test-time augmentation, pooling,
centre crop, whitening) plus ``VisualSearch.evaluate`` options (query expansion). For each one
the script builds one index per gallery of the protocols in ``../shared/data/README.md`` and prints
one table, configuration x protocol:

- coil-6view, coil-1view: gallery/query, recall@1, recall@5, mAP of ``label``;
- fashion-loo: fashion-products-2000 leave-one-out, precision@1, recall@5, mAP of ``label``;
- fashion-ft: the fine-tuning split (``np.random.default_rng(0).permutation(2000)`` over the rows
  of ``items.csv`` in file order: the first 1,400 are the gallery, the other 600 the queries);
- iconic-fine, iconic-coarse: grocery phone photos against the 81 catalog pictures, ``label``
  and ``coarse_label`` (one index for both);
- grocery-photos: leave-one-out over the 486 phone photos, precision@1, recall@5, mAP.

A figure lower than plain's on the same protocol and metric (at the printed precision) is marked
``-``. Per configuration it also prints featurize throughput (images indexed / build seconds,
summed over all its builds, each build timed by ``build_report.seconds``, so model loading and
writing the index are included) and query ms: the wall time of ``evaluate`` on the gallery/query
protocols divided by their queries (featurizing the query, flipped too with ``tta="flip"``,
searching, query expansion and scoring; leave-one-out queries are not featurized and not counted).

"plain" (no augmentation, average pooling, the model's own 0.875 centre crop, no whitening, fp32)
is always measured in the same run; the other rows change one thing from plain, except "default"
(whatever ``build`` does without options, read from ``vs.info()["features"]``, precision auto:
fp32, or bf16 where the CPU has it natively and measures it faster) and "int8"/"bf16" (the
defaults at that precision) and "finetuned" (the defaults, with a model that
``VisualSearch.finetune`` trains on the gallery first, as ``FINETUNE`` says; its time is not in
the featurize throughput). Rows that differ from another row only in evaluate options (query
expansion) reuse that row's index.

    .venv/bin/python benchmarks/retrieval.py [--quick] [--configs a,b] [--protocols p,q] [--json FILE] [--data DIR]

Indexes go to a temporary folder; nothing is written beside the data.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_usage import Timer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = "efficientnet-lite0"
KS = (1, 5)

# name -> gallery catalog (relative to the data folder, or a file written by the script),
# queries (None: leave-one-out), label column. Protocols with the same gallery share one index.
PROTOCOLS = {
    "coil-6view": ("coil-6view/gallery.csv", "coil-6view/queries.csv", "label"),
    "coil-1view": ("coil-1view/gallery.csv", "coil-1view/queries.csv", "label"),
    "fashion-loo": ("fashion-products-2000/items.csv", None, "label"),
    "fashion-ft": ("fashion-ft-gallery.csv", "fashion-ft-queries.csv", "label"),
    "iconic-fine": ("grocery/catalog.csv", "grocery/queries.csv", "label"),
    "iconic-coarse": ("grocery/catalog.csv", "grocery/queries.csv", "coarse_label"),
    "grocery-photos": ("grocery/photos.csv", None, "label"),
}
SPLIT_FILES = ("fashion-ft-gallery.csv", "fashion-ft-queries.csv")  # written into the temp folder

PLAIN = {"tta": "none", "pooling": "avg", "crop_pct": 0.875, "whiten": 0, "precision": "fp32"}
# name -> (build kwargs, evaluate kwargs)
CONFIGS = {
    "plain": (PLAIN, {}),
    "crop1.0": ({**PLAIN, "crop_pct": 1.0}, {}),
    "flip": ({**PLAIN, "tta": "flip"}, {}),
    "gem": ({**PLAIN, "pooling": "gem"}, {}),
    "whiten256": ({**PLAIN, "whiten": 256}, {}),
    "whiten128": ({**PLAIN, "whiten": 128}, {}),
    "qe": (PLAIN, {"expand": 2}),
    "orient": (PLAIN, {"orient": True}),
    "verify": ({"local_features": True}, {}),  # the defaults plus geometric verification (issue 7)
    "default": ({}, {}),
    "default+qe": ({}, {"expand": 2}),
    "int8": ({"precision": "int8"}, {}),  # the defaults at another precision (issue 10)
    "bf16": ({"precision": "bf16"}, {}),
    "finetuned": ({"finetune": True}, {}),  # the defaults with a model `lookalike finetune` made (FINETUNE)
}
# The "finetuned" row: gallery -> (the catalogs `VisualSearch.finetune` learns from, its label,
# epochs); its index is built with the model directory made. Galleries not here are not
# fine-tuned: leave-one-out over the data it would learn from measures nothing.
FINETUNE = {
    "fashion-ft-gallery.csv": (["fashion-ft-gallery.csv"], "label", 10),  # the split's 70 %; queries the 30 %
    # grocery-iconic as issue 6 defines it: the photos are the queries too, so not a zero-shot figure
    "grocery/catalog.csv": (["grocery/catalog.csv", "grocery/photos.csv"], "label", 10),
    "coil-6view/gallery.csv": (["coil-6view/gallery.csv"], "label", 10),
    # one picture per object: each object's last augmented view is held out to validate on
    "coil-1view/gallery.csv": (["coil-1view/gallery.csv"], "label", 10),
}
QUICK = ("plain", "default")


def data_root() -> Path:
    return Path(os.environ.get("LOOKALIKE_DATA", REPO.parent / "shared" / "data"))


def write_fashion_split(data: Path, work: Path) -> None:
    """The fine-tuning split: seed-0 permutation of the 2,000 rows, 1,400 gallery, 600 queries."""
    source = data / "fashion-products-2000" / "items.csv"
    with open(source, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    if len(rows) != 2000:
        raise SystemExit(f"error: {source} has {len(rows)} rows, the split expects 2000")
    for row in rows:
        row["image"] = str((source.parent / row["image"]).resolve())
    order = np.random.default_rng(0).permutation(2000)
    for name, part in zip(SPLIT_FILES, (order[:1400], order[1400:])):
        with open(work / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows[i] for i in part)


def run(configs: list[str], protocols: list[str], data: Path, work: Path, say) -> dict:
    from lookalike import LookalikeError, VisualSearch

    galleries = {}  # gallery file -> protocols on it, in order
    for p in protocols:
        galleries.setdefault(PROTOCOLS[p][0], []).append(p)
    groups = {}  # build kwargs (as a key) -> configurations sharing those builds
    for name in configs:
        build_kwargs, _ = CONFIGS[name]
        groups.setdefault(tuple(sorted(build_kwargs.items())), []).append(name)

    results = {name: {"build_kwargs": CONFIGS[name][0], "evaluate_kwargs": CONFIGS[name][1],
                      "protocols": {}, "errors": {}} for name in configs}
    warm_items = None
    for key, names in groups.items():
        build_kwargs = dict(key)
        label = " + ".join(names)
        say(f"{label}: build {dict(key) or '(no options)'}")
        # An untimed build of 8 items first, so an ONNX export for these settings is not timed.
        if warm_items is None:
            from lookalike.catalog import read_catalog
            warm_items = read_catalog(data / "coil-6view" / "gallery.csv")[:8]
        finetuning = build_kwargs.pop("finetune", False)
        try:
            VisualSearch.build(warm_items, work / "warm-up", model=MODEL, progress=False, force=True, **build_kwargs).close()
        except LookalikeError:
            pass  # the builds below fail the same way and say so

        images, build_seconds, others, features, build_warnings = 0, 0.0, [], None, {}
        query_time = {n: [0.0, 0] for n in names}  # evaluate seconds, queries (gallery/query protocols)
        query_others = {n: [] for n in names}
        for gallery, on_it in galleries.items():
            catalog = work / gallery if gallery in SPLIT_FILES else data / gallery
            index_dir = work / "index"
            model = MODEL
            if finetuning:
                if gallery not in FINETUNE:
                    for n in names:
                        for p in on_it:
                            results[n]["errors"][p] = "not fine-tuned (see FINETUNE)"
                    continue
                sources, column, epochs = FINETUNE[gallery]
                model = str(work / "model")
                started = time.perf_counter()
                tuned = VisualSearch.finetune([work / c if c in SPLIT_FILES else data / c for c in sources], model,
                                              label=column, epochs=epochs, force=True)
                for n in names:
                    results[n].setdefault("finetune", {})[gallery] = tuned.to_dict()
                say(f"  {gallery}: fine-tuned on {', '.join(sources)} in {time.perf_counter() - started:.0f} s, "
                    f"validation recall@1 {tuned.val_recall_at_1_before:.3f} -> {tuned.val_recall_at_1:.3f} "
                    f"(epoch {tuned.best_epoch})")
            try:
                with Timer() as t:
                    vs = VisualSearch.build(catalog, index_dir, model=model, progress=False, force=True, **build_kwargs)
            except LookalikeError as exc:
                say(f"  {gallery}: build failed: {exc}")
                for n in names:
                    for p in on_it:
                        results[n]["errors"][p] = f"build: {exc}"
                continue
            report = vs.build_report
            images += report.indexed
            build_seconds += report.seconds
            others.append(t.others)
            if features is None:
                info = vs.info()
                features = {**info.get("features", {}), "crop_pct": info["preprocessing"].get("crop_pct"),
                            "whiten": info["index_params"].get("whiten", 0)}
                say(f"  features (vs.info()): {features}")
            say(f"  {gallery}: {report.indexed} images in {report.seconds:.1f} s "
                f"({report.indexed / report.seconds:.1f} images/s, others {100 * t.others:.0f}%)")
            for w in report.warnings:
                say(f"  {gallery}: warning: {w}")
            if report.warnings:
                build_warnings[gallery] = list(report.warnings)
            for p in on_it:
                _, queries, column = PROTOCOLS[p]
                for n in names:
                    where = {"leave_one_out": True} if queries is None else {
                        "queries": work / queries if queries in SPLIT_FILES else data / queries}
                    try:
                        with Timer() as t:
                            r = vs.evaluate(**where, label=column, ks=KS, progress=False, **CONFIGS[n][1])
                        seconds = t.seconds
                    except LookalikeError as exc:
                        say(f"    {p} {n}: failed: {exc}")
                        results[n]["errors"][p] = str(exc)
                        continue
                    r["seconds"] = seconds
                    results[n]["protocols"][p] = r
                    r["others"] = t.others
                    if queries is not None:
                        query_time[n][0] += seconds
                        query_time[n][1] += r["queries"]
                        query_others[n].append(t.others)
                    first = "precision@1" if queries is None else "recall@1"
                    say(f"    {p:<15}{n:<12}{first} {r[first]:.3f}  recall@5 {r['recall@5']:.3f}  "
                        f"mAP {r['mAP']:.3f}  ({r['queries']} queries, {seconds:.1f} s, others {100 * t.others:.0f}%)")
            vs.close()
            del vs
            shutil.rmtree(index_dir, ignore_errors=True)

        for n in names:
            q_seconds, q_count = query_time[n]
            results[n].update({
                "features": features,
                "build_warnings": build_warnings,
                "index_of": names[0],
                "images": images, "build_seconds": build_seconds,
                "images_per_s": images / build_seconds if build_seconds else None,
                "build_others": others,
                "query_ms": 1000 * q_seconds / q_count if q_count else None,
                "queries_timed": q_count, "query_others": query_others[n],
            })
    return results


# --- reporting -----------------------------------------------------------------------------


def metric_names(protocol: str) -> list[tuple[str, str]]:
    first = ("precision@1", "P@1") if PROTOCOLS[protocol][1] is None else ("recall@1", "R@1")
    return [first, ("recall@5", "R@5"), ("mAP", "mAP")]


def print_table(results: dict, configs: list[str], protocols: list[str]) -> None:
    cell, name_w = 7, max(12, max(len(c) for c in configs) + 1)
    group_w = 3 * cell + 2
    print()
    print(" " * name_w + "".join(f"| {p:^{group_w - 2}} " for p in protocols))
    print(" " * name_w + "".join("| " + "".join(f"{short:>{cell}}" for _, short in metric_names(p)) + " "
                                 for p in protocols))
    print("-" * (name_w + len(protocols) * (group_w + 1)))
    plain = results["plain"]["protocols"]
    for c in configs:
        row = f"{c:<{name_w}}"
        for p in protocols:
            row += "| "
            r = results[c]["protocols"].get(p)
            for key, _ in metric_names(p):
                if r is None:
                    row += f"{'err':>{cell}}"
                    continue
                mark = "-" if c != "plain" and p in plain and round(r[key], 3) < round(plain[p][key], 3) else " "
                row += f"{r[key]:>{cell - 1}.3f}{mark}"
            row += " "
        print(row)
    print()
    print("- below plain on that protocol and metric.  R@k: recall@k, P@1: precision@1 (leave-one-out), "
          "mAP over the full ranking.")
    print()
    for c in configs:
        r = results[c]
        rate = f"{r['images_per_s']:6.1f} images/s" if r["images_per_s"] else "     - images/s"
        query = f"{r['query_ms']:6.2f} ms/query" if r["query_ms"] is not None else "     - ms/query"
        shared = f" (index of {r['index_of']})" if r["index_of"] != c else ""
        b_others = "/".join(f"{100 * o:.0f}%" for o in r["build_others"])
        q_others = "/".join(f"{100 * o:.0f}%" for o in r["query_others"])
        print(f"{c:<{name_w}} featurize {rate}{shared}, {r['images']} images in {r['build_seconds']:.1f} s; "
              f"query {query} over {r['queries_timed']} queries; others: builds {b_others}, queries {q_others}")
    for c in configs:
        r = results[c]
        print(f"{c:<{name_w}} build {r['build_kwargs'] or '(no options)'}, evaluate "
              f"{r['evaluate_kwargs'] or '(no options)'}; features {r['features']}")
        if r["index_of"] == c:
            for gallery, warnings in r["build_warnings"].items():
                for w in warnings:
                    print(f"{'':<{name_w}} {gallery}: warning: {w}")
        for p, err in r["errors"].items():
            print(f"{'':<{name_w}} {p}: error: {err}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=data_root(),
                    help="the shared data folder (default: $LOOKALIKE_DATA, else ../shared/data from the repository root)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--configs", default=None,
                       help=f"comma-separated rows (default: all of {','.join(CONFIGS)}); plain is always added")
    which.add_argument("--quick", action="store_true", help=f"only {' and '.join(QUICK)}")
    ap.add_argument("--protocols", default=",".join(PROTOCOLS),
                    help=f"comma-separated columns (default: all of {','.join(PROTOCOLS)})")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write every figure to FILE as JSON")
    args = ap.parse_args(argv)

    configs = list(QUICK) if args.quick else (args.configs.split(",") if args.configs else list(CONFIGS))
    protocols = args.protocols.split(",")
    for name in configs:
        if name not in CONFIGS:
            ap.error(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
    for name in protocols:
        if name not in PROTOCOLS:
            ap.error(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    configs = ["plain"] + [c for c in dict.fromkeys(configs) if c != "plain"]
    protocols = list(dict.fromkeys(protocols))
    for gallery, queries, _ in (PROTOCOLS[p] for p in protocols):
        for f in (gallery, queries):
            if f is not None and f not in SPLIT_FILES and not (args.data / f).is_file():
                print(f"error: {args.data / f} not found; pass --data DIR (the shared data folder)", file=sys.stderr)
                return 2

    say = lambda *a: print(*a, flush=True)  # noqa: E731
    from lookalike.featurizer import cpu_count

    say(f"lookalike retrieval benchmark: {len(configs)} configurations x {len(protocols)} protocols, "
        f"model {MODEL}, data {args.data}")
    say(f"machine: {cpu_count()} cores, {platform.machine()}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lookalike-retrieval-") as tmp:
        work = Path(tmp)
        write_fashion_split(args.data, work)
        results = run(configs, protocols, args.data, work, say)
    total = time.perf_counter() - start

    print_table(results, configs, protocols)
    print(f"\ntotal {total:.0f} s")
    if args.json:
        out = {"model": MODEL, "data": str(args.data), "cores": cpu_count(), "seconds": total,
               "protocols": {p: {"gallery": PROTOCOLS[p][0], "queries": PROTOCOLS[p][1], "label": PROTOCOLS[p][2]}
                             for p in protocols},
               "configs": results}
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
