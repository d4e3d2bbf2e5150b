"""Camera photos against a clean catalog: recall and single-query time with orientation and geometric verification.

Three protocols, each with one gallery of clean catalog pictures and photos of those things as
queries, and these rows, all measured in the same run:

- grocery-iconic: gallery ``grocery/catalog.csv`` (81 catalog pictures), queries
  ``grocery/queries.csv`` (486 phone photos taken in shops); recall@1 and recall@5 of the fine
  ``label`` and of ``coarse_label`` (see ``../shared/data/README.md``).
- camera-sim: synthetic camera photos, built in the temporary folder with one
  ``np.random.default_rng(SEED)`` (SEED = 0), drawn in this order:

  1. gallery (200 pictures): the 81 grocery iconic pictures (``grocery/catalog.csv`` order, id
     ``grocery-<id>``), then 119 of ``fashion-products-2000/items.csv`` (row numbers
     ``rng.choice(2000, 119, replace=False)``, sorted, id ``fashion-<id>``). Each item's label is
     its own id, so each query has exactly one correct item.
  2. the turned queries: ``rng.permutation(400)[:100]`` are the 100 of the 400 queries (1 in 4)
     whose whole frame is turned at the end, as by a phone held sideways.
  3. for each gallery picture in gallery order, two queries (``<id>-a``, ``<id>-b``; query number
     2 * gallery position + 0 or 1), each drawing in this order:

     - background: one of the photos in ``backgrounds/`` (sorted file names), scaled so it covers
       640x480 (aspect kept), then a random 640x480 crop (offsets uniform);
     - size: the item's quadrilateral covers ``U(0.10, 0.60)`` of the 640x480 frame area (measured
       before clipping at the frame edges);
     - perspective: the item rectangle (aspect kept) has its four corners moved independently by
       ``U(-0.15, 0.15)`` of its width in x and of its height in y;
     - rotation: ``U(-30, 30)`` degrees about the quadrilateral's centroid, after which the
       quadrilateral is scaled about its centroid to the drawn area exactly;
     - position: the centroid is uniform over the positions that keep the quadrilateral's
       bounding box inside the frame (centred on an axis where the box is larger than the frame,
       so big tilted items are cut off at both sides);
     - the picture is warped onto the quadrilateral with ``cv2.warpPerspective`` (bilinear) and
       blended over the background through an equally warped mask (soft edges);
     - glare: centre uniform over the frame, radius ``U(0.15, 0.5)`` x 640, strength ``U(0, 180)``;
       adds ``strength * max(0, 1 - d / radius) ** 2`` to every channel (white radial gradient);
     - blur: Gaussian, sigma ``U(0, 1.5)`` (``cv2.GaussianBlur``; none below 0.1);
     - photometric: contrast ``U(0.75, 1.25)`` about 128, brightness ``U(-30, 30)``, then a gain of
       ``U(0.88, 1.12)`` per RGB channel (a colour cast); clipped to 0..255;
     - turn: for the turned queries, ``rng.integers(1, 4)`` quarter turns (90/180/270 degrees,
       ``np.rot90``) of the whole frame, so those photos are 480x640;
     - saved as JPEG quality 85 (Pillow).

- grocery-heldout (only when named in ``--protocols``): grocery-iconic after fine-tuning, with
  photos the model never learned from. The 486 photos are split into FOLDS = 3 folds by their
  place among their label's photos in ``queries.csv`` order (the 1st and 4th of each label in
  fold 0, the 2nd and 5th in fold 1, the 3rd and 6th in fold 2). For each fold,
  ``VisualSearch.finetune([catalog, the other folds' photos], label="label", epochs=10)`` makes a
  model, every index below is built with it, and the fold's own 162 photos are the queries;
  recall and times are pooled over the folds (each photo a query once). Photos of one label were
  often taken on one visit to the shop, so a held-out photo may still resemble a trained one.

Rows (public API only; one index per gallery per build, built fresh in the same run):

- plain: ``VisualSearch.build(..., tta="none", crop_pct=0.875)``, ``search(photo, k=5)``;
- default: ``VisualSearch.build(...)`` (no options), ``search(photo, k=5)``;
- default+orient: the same index, ``search(photo, k=5, orient=True)``;
- default+regions: the same index, ``search(photo, k=5, regions=True)`` (the photo's corners and
  centre searched too, each item scored by its best region);
- default+verify: ``VisualSearch.build(..., local_features=True)``, ``search(photo, k=5)``
  (an index with local features verifies by default);
- default+verify+orient: the same index, ``search(photo, k=5, orient=True)``;
- default+verify+regions: the same index, ``search(photo, k=5, regions=True)``;
- default+verify+regions+auto: the same index, ``search(photo, k=5, regions=True,
  orient="auto")`` (a photo whose upright hits are unsure is tried turned too);
- default+verify+auto+grid: the same index, ``search(photo, k=5, regions="auto",
  orient="auto")`` (a photo whose hits are still unsure after its best turn also searches a 3x3
  grid of smaller squares at that turn), with no time limit;
- camera: the same with ``budget_ms=CAMERA_BUDGET_MS`` (150): each second look only when it is
  expected to fit in the frame budget. The camera default: what the web page's camera mode and
  ``lookalike camera`` do with such an index.

Query ms is the wall time of one ``vs.search(photo_path, k=5, ...)`` call per photo (decoding,
featurizing, turning, searching and verification included); the table gives the median over the
protocol's queries, one untimed search per row first. For the verify rows it also prints the
share of queries whose top hit is verified and how often a verified top hit is correct. The
targets (PASS/FAIL) are for the camera default: grocery-iconic fine recall@1 >= 0.50,
camera-sim recall@1 >= 0.95, grocery-heldout recall@1 >= 0.80 fine and >= 0.90 coarse, median
query time <= 150 ms over the measured protocols' queries.

    .venv/bin/python benchmarks/camera.py [--protocols grocery-iconic,camera-sim,grocery-heldout] [--max-queries N]
                                          [--rows plain,default+verify+auto+grid] [--save-photos DIR]
                                          [--distractors N] [--epochs N] [--json FILE] [--data DIR]

(``--rows``: only those rows, and only the indexes they use; the targets are checked only when the
camera default is one of them. ``--distractors N``: camera-sim's gallery also holds N pictures that
no photo shows, drawn after the photos so these stay the same: the fashion items not in it, then
coil-100's, in file order; the targets were set without them.)

Indexes and synthetic photos go to a temporary folder; nothing is written beside the data.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lookalike.engine import CAMERA_BUDGET_MS
from lookalike.synthetic import camera_photo

REPO = Path(__file__).resolve().parents[1]
SEED = 0
FASHION_ITEMS = 119
TURNED_QUERIES = 100  # of 400
JPEG_QUALITY = 85
PROTOCOLS = ("grocery-iconic", "camera-sim", "grocery-heldout")
DEFAULT_PROTOCOLS = ("grocery-iconic", "camera-sim")  # grocery-heldout fine-tunes FOLDS models: asked for by name
FOLDS = 3
FINETUNE_EPOCHS = 10
DISTRACTORS_HELP = ("camera-sim: add N pictures no photo shows to its gallery (the fashion items not in it, "
                    "then coil-100, in file order; each its own label), to measure a bigger catalog")
# row -> (index: "plain" / "default" / "verified", search options)
ROWS = {
    "plain": ("plain", {}),
    "default": ("default", {}),
    "default+orient": ("default", {"orient": True}),
    "default+regions": ("default", {"regions": True}),
    "default+verify": ("verified", {}),
    "default+verify+orient": ("verified", {"orient": True}),
    "default+verify+regions": ("verified", {"regions": True}),
    "default+verify+regions+auto": ("verified", {"regions": True, "orient": "auto"}),
    "default+verify+auto+grid": ("verified", {"regions": "auto", "orient": "auto"}),
    "camera": ("verified", {"regions": "auto", "orient": "auto", "budget_ms": CAMERA_BUDGET_MS}),
}
CAMERA_DEFAULT = "camera"
TARGET_GROCERY_R1 = 0.50
TARGET_SIM_R1 = 0.95
TARGET_MS = 150.0
TARGET_TUNED_R1 = 0.80  # grocery-heldout, after fine-tuning
TARGET_TUNED_COARSE_R1 = 0.90


def data_root() -> Path:
    return Path(os.environ.get("LOOKALIKE_DATA", REPO.parent / "shared" / "data"))


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# --- the protocols: gallery CSV and queries ------------------------------------------------------


def grocery_iconic(data: Path, work: Path) -> tuple[Path, list[dict]]:
    """The gallery CSV (absolute image paths) and the queries: dicts with image, label, coarse_label."""
    catalog = read_rows(data / "grocery" / "catalog.csv")
    for row in catalog:
        row["image"] = str((data / "grocery" / row["image"]).resolve())
    gallery = work / "grocery-gallery.csv"
    write_csv(gallery, ["id", "image", "label", "coarse_label", "title"], catalog)
    queries = read_rows(data / "grocery" / "queries.csv")
    for row in queries:
        row["image"] = str((data / "grocery" / row["image"]).resolve())
    return gallery, queries


def camera_sim(data: Path, work: Path, distractors: int = 0) -> tuple[Path, list[dict]]:
    """Write the 200-picture gallery CSV and the 400 synthetic photos into ``work``; the gallery
    also holds ``distractors`` pictures no photo shows (``DISTRACTORS_HELP``)."""
    from PIL import Image

    rng = np.random.default_rng(SEED)
    gallery = []
    for row in read_rows(data / "grocery" / "catalog.csv"):
        gallery.append({"id": f"grocery-{row['id']}", "image": str((data / "grocery" / row["image"]).resolve())})
    fashion = read_rows(data / "fashion-products-2000" / "items.csv")
    for i in sorted(rng.choice(len(fashion), FASHION_ITEMS, replace=False)):
        row = fashion[int(i)]
        gallery.append({"id": f"fashion-{row['id']}",
                        "image": str((data / "fashion-products-2000" / row["image"]).resolve())})
    for row in gallery:
        row["label"] = row["id"]
    gallery_csv = work / "camera-sim-gallery.csv"

    backgrounds = sorted(p for p in (data / "backgrounds").iterdir() if p.suffix.lower() == ".jpg")
    turned = set(int(i) for i in rng.permutation(2 * len(gallery))[:TURNED_QUERIES])
    photos = work / "camera-sim"
    photos.mkdir()
    queries = []
    for g, row in enumerate(gallery):
        for j, suffix in enumerate("ab"):
            with Image.open(row["image"]) as im:
                picture = np.asarray(im.convert("RGB"))
            photo, params = camera_photo(picture, backgrounds, 2 * g + j in turned, rng)
            path = photos / f"{row['id']}-{suffix}.jpg"
            Image.fromarray(photo).save(path, quality=JPEG_QUALITY)
            queries.append({"id": f"{row['id']}-{suffix}", "image": str(path), "label": row["id"], **params})
    shown = {row["id"] for row in gallery}
    others = [{"id": f"fashion-{row['id']}", "image": str((data / "fashion-products-2000" / row["image"]).resolve())}
              for row in fashion if f"fashion-{row['id']}" not in shown]
    others += [{"id": f"coil-{row['id']}", "image": str((data / "coil-100" / row["image"]).resolve())}
               for row in read_rows(data / "coil-100" / "items.csv")]
    if distractors > len(others):
        raise SystemExit(f"error: --distractors {distractors}: the data has {len(others)} pictures to add")
    gallery += [{**row, "label": row["id"]} for row in others[:distractors]]
    write_csv(gallery_csv, ["id", "image", "label"], gallery)
    return gallery_csv, queries


# --- measuring -----------------------------------------------------------------------------------


def evenly(queries: list[dict], limit: int | None) -> list[dict]:
    if limit is None or limit >= len(queries):
        return queries
    return [queries[int(i)] for i in np.linspace(0, len(queries) - 1, limit).round()]


def measure(vs, queries: list[dict], columns: list[str], options: dict) -> dict:
    """Search every query once with k=5 and ``options``; recall@1/@5 per label column, times, verified top hits."""
    vs.search(queries[0]["image"], k=5, **options)  # untimed: thread pools, caches
    hits1 = {c: 0 for c in columns}
    hits5 = {c: 0 for c in columns}
    ms = []
    top_verified = 0
    verified_correct = {c: 0 for c in columns}
    for q in queries:
        start = time.perf_counter()
        result = vs.search(q["image"], k=5, **options)
        ms.append(1000 * (time.perf_counter() - start))
        hits = result.hits
        for c in columns:
            found = [h.metadata.get(c) == q[c] for h in hits]
            hits1[c] += bool(found[:1] and found[0])
            hits5[c] += any(found[:5])
            if hits and hits[0].verified and found[0]:
                verified_correct[c] += 1
        if hits and hits[0].verified:
            top_verified += 1
    n = len(queries)
    return {
        "queries": n,
        **{f"recall@1[{c}]": hits1[c] / n for c in columns},
        **{f"recall@5[{c}]": hits5[c] / n for c in columns},
        "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "ms": ms,
        "top_verified": top_verified,
        **{f"verified_correct[{c}]": verified_correct[c] for c in columns},
    }


def run(protocols: list[str], rows: list[str], data: Path, work: Path, limit: int | None, save_photos: Path | None,
        say, distractors: int = 0, epochs: int = FINETUNE_EPOCHS) -> dict:
    results = {}
    for p in protocols:
        if p == "grocery-heldout":
            results[p] = grocery_heldout(data, work, rows, limit, say, epochs)
            continue
        if p == "grocery-iconic":
            gallery, queries = grocery_iconic(data, work)
            columns = ["label", "coarse_label"]
        else:
            made_at = time.perf_counter()
            gallery, queries = camera_sim(data, work, distractors)
            columns = ["label"]
            turned = sum(1 for q in queries if q["turn"])
            say(f"{p}: wrote {len(queries)} synthetic photos ({turned} turned) in {time.perf_counter() - made_at:.1f} s")
            if save_photos is not None:
                import shutil
                save_photos.mkdir(parents=True, exist_ok=True)
                for q in queries:
                    shutil.copy(q["image"], save_photos / Path(q["image"]).name)
                say(f"{p}: copied the photos to {save_photos}")
        results[p] = measure_rows(p, gallery, evenly(queries, limit), columns, rows, work, say)
    return results


def measure_rows(p: str, gallery: Path, queries: list[dict], columns: list[str], rows: list[str], work: Path, say,
                 model: str | None = None) -> dict:
    """Build the indexes ``rows`` use (with ``model``, a model directory, if given) and measure each row."""
    from lookalike import VisualSearch

    builds = {
        "plain": {"tta": "none", "crop_pct": 0.875},
        "default": {},
        "verified": {"local_features": True},
    }
    out = {"gallery": str(gallery), "columns": columns, "rows": {}, "builds": {}}
    for index_name, build_kwargs in builds.items():
        if not any(ROWS[row][0] == index_name for row in rows):
            continue
        start = time.perf_counter()
        vs = VisualSearch.build(gallery, work / f"{p}-{index_name}", progress=False, force=True,
                                **build_kwargs, **({"model": model} if model else {}))
        seconds = time.perf_counter() - start
        report = vs.build_report
        features = vs.info().get("features", {})
        say(f"{p}: index {index_name} {build_kwargs or '(no options)'}: {report.indexed} images in "
            f"{seconds:.1f} s; features {features}, local features {vs.has_local_features}")
        for w in report.warnings:
            say(f"{p}: index {index_name}: warning: {w}")
        out["builds"][index_name] = {"kwargs": build_kwargs, "indexed": report.indexed, "seconds": seconds,
                                     "features": features, "warnings": list(report.warnings)}
        for row in rows:
            uses, options = ROWS[row]
            if uses != index_name:
                continue
            start = time.perf_counter()
            r = measure(vs, queries, columns, options)
            r["search_options"] = options
            out["rows"][row] = r
            say(f"  {p:<18}{row:<30}" + "  ".join(
                f"R@1 {r[f'recall@1[{c}]']:.3f} R@5 {r[f'recall@5[{c}]']:.3f} ({c})" for c in columns)
                + f"  median {r['median_ms']:.0f} ms  ({r['queries']} queries, {time.perf_counter() - start:.0f} s)")
        vs.close()
    return out


def grocery_heldout(data: Path, work: Path, rows: list[str], limit: int | None, say, epochs: int) -> dict:
    """grocery-heldout: FOLDS folds; each fine-tunes on the catalog and the photos of the other folds,
    then measures every row with that model on its own held-out photos. Pooled over the folds, each
    of the 486 photos is a query once, for a model that never saw it."""
    from lookalike import VisualSearch

    gallery, photos = grocery_iconic(data, work)
    columns = ["label", "coarse_label"]
    seen: dict[str, int] = {}
    for q in photos:  # the photo's place among its label's photos, in file order
        q["fold"] = seen.get(q["label"], 0) % FOLDS
        seen[q["label"]] = seen.get(q["label"], 0) + 1
    folds = []
    for fold in range(FOLDS):
        train = work / f"grocery-train-{fold}.csv"
        write_csv(train, ["id", "image", "label", "coarse_label"], [q for q in photos if q["fold"] != fold])
        model = work / f"grocery-model-{fold}"
        start = time.perf_counter()
        tuned = VisualSearch.finetune([gallery, train], model, label="label", epochs=epochs, force=True)
        say(f"grocery-heldout: fold {fold + 1}/{FOLDS}: fine-tuned on the catalog and "
            f"{sum(q['fold'] != fold for q in photos)} photos in {time.perf_counter() - start:.0f} s, validation "
            f"recall@1 {tuned.val_recall_at_1_before:.3f} -> {tuned.val_recall_at_1:.3f} (epoch {tuned.best_epoch})")
        queries = evenly([q for q in photos if q["fold"] == fold], limit and -(-limit // FOLDS))
        folds.append(measure_rows(f"grocery-heldout-{fold}", gallery, queries, columns, rows, work, say, model=str(model)))
        folds[-1]["finetune"] = tuned.to_dict()
    pooled = {"gallery": str(gallery), "columns": columns, "rows": {}, "folds": folds}
    for row in folds[0]["rows"]:
        parts = [f["rows"][row] for f in folds]
        n = sum(r["queries"] for r in parts)
        ms = [t for r in parts for t in r["ms"]]
        pooled["rows"][row] = {
            "queries": n,
            **{key: sum(r[key] * r["queries"] for r in parts) / n
               for key in parts[0] if key.startswith("recall@")},
            **{key: sum(r[key] for r in parts) for key in parts[0] if key.startswith("verified_correct")},
            "top_verified": sum(r["top_verified"] for r in parts),
            "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "ms": ms,
        }
        say(f"  grocery-heldout {row:<30}" + "  ".join(
            f"R@1 {pooled['rows'][row][f'recall@1[{c}]']:.3f} ({c})" for c in columns) + f"  ({n} queries, pooled)")
    return pooled


# --- reporting -----------------------------------------------------------------------------------


def print_table(results: dict, protocols: list[str], rows: list[str]) -> None:
    name_w, cell = 30, 7
    groups = []  # (protocol, column or None for ms)
    for p in protocols:
        for c in results[p]["columns"]:
            groups.append((p, c))
        groups.append((p, None))
    head1 = " " * name_w
    head2 = " " * name_w
    widths = []
    for p, c in groups:
        title = f"{p} {'fine' if c == 'label' else 'coarse'}" if c else "ms"
        cells = f"{'R@1':>{cell}}{'R@5':>{cell}}" if c else f"{'median':>{cell}}"
        width = max(len(title), len(cells))
        widths.append(width)
        head1 += f"| {title:^{width}} "
        head2 += f"| {cells:>{width}} "
    print()
    print(head1)
    print(head2)
    print("-" * len(head2))
    for row in rows:
        line = f"{row:<{name_w}}"
        for (p, c), width in zip(groups, widths):
            r = results[p]["rows"][row]
            if c:
                cells = f"{r[f'recall@1[{c}]']:>{cell}.3f}{r[f'recall@5[{c}]']:>{cell}.3f}"
            else:
                cells = f"{r['median_ms']:>{cell}.0f}"
            line += f"| {cells:>{width}} "
        print(line)
    print()
    print("R@k: recall@k (share of queries with a correct item in the top k); fine = label, coarse = "
          "coarse_label (grocery); camera-sim labels are the item ids. ms: median wall time of one "
          "vs.search(photo, k=5, ...) call.")
    print()
    for p in protocols:
        for row in rows:
            r = results[p]["rows"][row]
            line = f"{p:<16}{row:<30}median {r['median_ms']:5.0f} ms, p90 {r['p90_ms']:5.0f} ms"
            if ROWS[row][0] == "verified":
                n, v = r["queries"], r["top_verified"]
                line += f"; top hit verified {v}/{n} ({v / n:.3f})"
                for c in results[p]["columns"]:
                    ok = r[f"verified_correct[{c}]"]
                    line += f", verified top hit correct ({c}) {ok}/{v}" + (f" ({ok / v:.3f})" if v else "")
            print(line)


def print_targets(results: dict, protocols: list[str], row: str = CAMERA_DEFAULT) -> None:
    print()
    print(f"targets ({row}" + (", the camera default):" if row == CAMERA_DEFAULT else ", no frame budget):"))
    checks = []
    if "grocery-iconic" in results:
        r1 = results["grocery-iconic"]["rows"][row]["recall@1[label]"]
        checks.append((f"grocery-iconic recall@1 (fine) {r1:.3f} >= {TARGET_GROCERY_R1:.2f}", r1 >= TARGET_GROCERY_R1))
    if "camera-sim" in results:
        r1 = results["camera-sim"]["rows"][row]["recall@1[label]"]
        checks.append((f"camera-sim recall@1 {r1:.3f} >= {TARGET_SIM_R1:.2f}", r1 >= TARGET_SIM_R1))
    if "grocery-heldout" in results:
        r = results["grocery-heldout"]["rows"][row]
        for c, target in (("label", TARGET_TUNED_R1), ("coarse_label", TARGET_TUNED_COARSE_R1)):
            checks.append((f"grocery-heldout recall@1 ({'fine' if c == 'label' else 'coarse'}) "
                           f"{r[f'recall@1[{c}]']:.3f} >= {target:.2f}", r[f"recall@1[{c}]"] >= target))
    ms = [t for p in protocols for t in results[p]["rows"][row]["ms"]]
    median = float(np.median(ms))
    checks.append((f"median query time {median:.0f} ms over {len(ms)} queries <= {TARGET_MS:.0f} ms "
                   f"(p90 {np.percentile(ms, 90):.0f} ms)", median <= TARGET_MS))
    for text, ok in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=data_root(),
                    help="the shared data folder (default: $LOOKALIKE_DATA, else ../shared/data from the repository root)")
    ap.add_argument("--protocols", default=",".join(DEFAULT_PROTOCOLS),
                    help=f"comma-separated, of {', '.join(PROTOCOLS)} (default: {','.join(DEFAULT_PROTOCOLS)})")
    ap.add_argument("--epochs", type=int, default=FINETUNE_EPOCHS, metavar="N",
                    help=f"grocery-heldout: epochs of each fold's fine-tuning (default {FINETUNE_EPOCHS})")
    ap.add_argument("--max-queries", type=int, default=None, metavar="N",
                    help="at most N queries per protocol, evenly spaced in query order (default: all)")
    ap.add_argument("--save-photos", type=Path, default=None, metavar="DIR",
                    help="also copy the synthetic camera-sim photos to DIR, to look at")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (default: all)")
    ap.add_argument("--distractors", type=int, default=0, metavar="N", help=DISTRACTORS_HELP)
    ap.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write every figure to FILE as JSON")
    args = ap.parse_args(argv)
    rows = list(dict.fromkeys(args.rows.split(",")))
    for row in rows:
        if row not in ROWS:
            ap.error(f"unknown row {row!r}; choose from {', '.join(ROWS)}")

    protocols = list(dict.fromkeys(args.protocols.split(",")))
    for name in protocols:
        if name not in PROTOCOLS:
            ap.error(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    if args.max_queries is not None and args.max_queries < 1:
        ap.error("--max-queries must be at least 1")
    needed = ["grocery/catalog.csv", "grocery/queries.csv"]
    if args.epochs < 1:
        ap.error("--epochs must be at least 1")
    if "camera-sim" in protocols:
        needed += ["fashion-products-2000/items.csv", "backgrounds"]
    for f in needed:
        if not (args.data / f).exists():
            print(f"error: {args.data / f} not found; pass --data DIR (the shared data folder)", file=sys.stderr)
            return 2

    say = lambda *a: print(*a, flush=True)  # noqa: E731
    from lookalike.featurizer import cpu_count

    say(f"lookalike camera benchmark: {len(rows)} rows x {len(protocols)} protocols, data {args.data}"
        + (f", at most {args.max_queries} queries per protocol" if args.max_queries else ""))
    say(f"machine: {cpu_count()} cores, {platform.machine()}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lookalike-camera-") as tmp:
        results = run(protocols, rows, args.data, Path(tmp), args.max_queries, args.save_photos, say,
                      args.distractors, args.epochs)
    total = time.perf_counter() - start

    print_table(results, protocols, rows)
    for row in (CAMERA_DEFAULT, "default+verify+auto+grid"):
        if row in rows:
            print_targets(results, protocols, row)
    print(f"\ntotal {total:.0f} s")
    if args.json:
        out = {"data": str(args.data), "cores": cpu_count(), "seed": SEED, "seconds": total,
               "max_queries": args.max_queries, "protocols": results}
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
