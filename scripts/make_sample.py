"""Build the small built-in sample catalog for the demo.

Reads the 2,000-item ``fashion-products-2000`` evaluation set (see the project's shared data
README) and writes, under ``src/lookalike/data/sample/``:

* ``images/{id}.jpg``  -- 300 catalog thumbnails (original JPEG bytes, no re-encoding),
  stratified over ``label`` (article type): every label gets at least ``MIN_PER_LABEL`` items,
  the rest is shared out in proportion to the label's size beyond that (largest remainder);
* ``catalog.csv``      -- ``id,image,label,title,location,colour,gender``; ``location`` is an
  invented store location (one aisle per master category, one bay per article type);
* ``queries/``         -- 6 query images of common labels that are *not* in the catalog,
  named ``{label-slug}-{id}.jpg``, and ``queries/queries.csv`` (``id,image,label,title``);
* ``SOURCE.md``        -- where the data comes from.

Deterministic (numpy seed 7) and idempotent: it clears and rewrites only ``images/`` and
``queries/`` and overwrites its own three files.

Usage::

    .venv/bin/python scripts/make_sample.py [DATA_DIR]

``DATA_DIR`` defaults to ``../shared/data/fashion-products-2000`` relative to the repository root.
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

SEED = 7
N_CATALOG = 300
MIN_PER_LABEL = 4

# Query labels, in the order the query files are listed; each must keep at least one item
# outside the catalog.
QUERY_LABELS = ["Tshirts", "Watches", "Casual Shoes", "Handbags", "Sunglasses", "Jeans"]

# Store layout: one aisle per master category, in this walking order; within an aisle one bay per
# article type, ordered by sub-category, then label, so related products stand together.
AISLE_ORDER = ["Apparel", "Footwear", "Accessories", "Personal Care"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "fashion-products-2000"
OUT_DIR = REPO_ROOT / "src" / "lookalike" / "data" / "sample"

SOURCE_MD = """\
# Source of the sample catalog

The {n_catalog} catalog thumbnails in `images/` and the {n_queries} query images in `queries/`
come from the **"Fashion Product Images"** data set (P. Aggarwal, published on Kaggle): product
photos and catalog metadata of an Indian online fashion shop.

They were taken from the 2,000-item sample `fashion-products-2000` described in the project's
shared data README (`../shared/data/README.md`, relative to the repository root): images from
the public repository
[RuturajChitale/Fassion-Recommendation-System](https://github.com/RuturajChitale/Fassion-Recommendation-System),
metadata from
[animmala3942/FashionProductRecommendationSystem](https://github.com/animmala3942/FashionProductRecommendationSystem),
resized there to 120x160 JPEG. The files here are byte-for-byte copies of those thumbnails.

Selection: `scripts/make_sample.py`, numpy seed {seed}. The {n_catalog} catalog items are
stratified over the article type (`label`, {n_labels} kinds): each article type gets
{min_per_label} items, and the other {n_extra} are shared out in proportion to each type's size
beyond {min_per_label} (largest remainder). The queries are one item each of {n_queries} common
article types, none of them in the catalog:
{query_labels}.

Columns of `catalog.csv`: `label` is the `articleType`, `title` the `productDisplayName`,
`colour` the `baseColour`, `gender` as in the source. `location` (aisle and bay) is **invented
demo metadata**: one aisle per master category, one bay per article type.

The data is for demonstration only; all rights to the photos and product descriptions stay with
their owners.
"""


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def allocate(sizes: pd.Series, total: int, minimum: int, reserve: pd.Series) -> pd.Series:
    """Per-label quotas: ``minimum`` each, the rest in proportion to ``size - minimum``.

    Largest-remainder rounding, ties broken by label name. ``reserve`` items per label are kept
    out of the catalog (for the queries).
    """
    cap = sizes - reserve
    base = np.minimum(cap, minimum).astype(int)
    extra_weight = (sizes - base).astype(float)
    left = total - int(base.sum())
    share = extra_weight * left / extra_weight.sum()
    quota = base + np.minimum(np.floor(share).astype(int), cap - base)
    rem = share - np.floor(share)
    for label in sorted(rem.index, key=lambda k: (-rem[k], k)):
        if int(quota.sum()) >= total:
            break
        if quota[label] < cap[label]:
            quota[label] += 1
    if int(quota.sum()) != total:
        raise SystemExit(f"could not allocate {total} items (got {int(quota.sum())})")
    return quota


def layout(items: pd.DataFrame) -> dict[str, str]:
    """Location string per label: aisle by master category, bay by article type."""
    per_label = (
        items.groupby("label")
        .agg(master=("masterCategory", lambda s: s.mode().iloc[0]),
             sub=("subCategory", lambda s: s.mode().iloc[0]))
        .reset_index()
    )
    masters = AISLE_ORDER + sorted(set(per_label["master"]) - set(AISLE_ORDER))
    locations: dict[str, str] = {}
    for aisle, master in enumerate(masters, start=1):
        group = per_label[per_label["master"] == master].sort_values(["sub", "label"])
        for bay, label in enumerate(group["label"], start=1):
            locations[label] = f"Aisle {aisle}, Bay {bay}"
    return locations


def reset_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", nargs="?", type=Path, default=DEFAULT_DATA,
                    help=f"fashion-products-2000 folder (default: {DEFAULT_DATA})")
    args = ap.parse_args(argv)
    data_dir: Path = args.data_dir.resolve()

    items = pd.read_csv(data_dir / "items.csv", keep_default_na=False)
    items = items.sort_values("id", kind="stable").reset_index(drop=True)
    missing = [lab for lab in QUERY_LABELS if lab not in set(items["label"])]
    if missing:
        raise SystemExit(f"query labels not in the data: {missing}")

    sizes = items.groupby("label").size().sort_index()
    reserve = pd.Series(0, index=sizes.index)
    reserve[QUERY_LABELS] = 1
    quota = allocate(sizes, N_CATALOG, MIN_PER_LABEL, reserve)

    rng = np.random.default_rng(SEED)
    catalog_ids: list[int] = []
    query_ids: dict[str, int] = {}
    for label in sizes.index:  # sorted label order -> deterministic draws
        ids = items.loc[items["label"] == label, "id"].to_numpy()
        perm = rng.permutation(ids)
        k = int(quota[label])
        catalog_ids.extend(int(i) for i in perm[:k])
        if label in QUERY_LABELS:
            query_ids[label] = int(perm[k])

    catalog = items[items["id"].isin(catalog_ids)]
    catalog = catalog.sort_values(["label", "id"]).reset_index(drop=True)
    locations = layout(items)

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    img_dir = OUT_DIR / "images"
    q_dir = OUT_DIR / "queries"
    reset_dir(img_dir)
    reset_dir(q_dir)

    rows = []
    for r in catalog.itertuples(index=False):
        name = f"{r.id}.jpg"
        (img_dir / name).write_bytes((data_dir / r.image).read_bytes())
        rows.append([r.id, f"images/{name}", r.label, r.title, locations[r.label],
                     r.baseColour, r.gender])
    write_csv(OUT_DIR / "catalog.csv",
              ["id", "image", "label", "title", "location", "colour", "gender"], rows)

    qrows = []
    for label in QUERY_LABELS:
        r = items.loc[items["id"] == query_ids[label]].iloc[0]
        name = f"{slug(label)}-{r['id']}.jpg"
        (q_dir / name).write_bytes((data_dir / r["image"]).read_bytes())
        qrows.append([int(r["id"]), name, label, r["title"]])
    write_csv(q_dir / "queries.csv", ["id", "image", "label", "title"], qrows)

    (OUT_DIR / "SOURCE.md").write_text(
        SOURCE_MD.format(n_catalog=len(catalog), n_queries=len(qrows), seed=SEED,
                         n_labels=len(sizes), min_per_label=MIN_PER_LABEL,
                         n_extra=len(catalog) - MIN_PER_LABEL * len(sizes),
                         query_labels=", ".join(QUERY_LABELS)),
        encoding="utf-8",
    )

    print(f"wrote {len(catalog)} catalog items ({len(sizes)} labels) and {len(qrows)} queries "
          f"to {OUT_DIR.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
