"""Catalog readers: folder, CSV, JSONL, Parquet, 'title, url' text; ids, metadata and errors."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import COIL, FASHION, SAMPLE, write_csv
from lookalike import CatalogError
from lookalike.catalog import read_catalog


def test_folder_catalog_labels_from_subfolders_ids_from_files(tmp_path):
    for label, ids in {"mugs": ["obj1__0", "obj1__30"], "cars": ["obj3__0"]}.items():
        (tmp_path / label).mkdir()
        for i in ids:
            shutil.copy(COIL / f"{i}.png", tmp_path / label / f"{i}.png")
    shutil.copy(COIL / "obj5__0.png", tmp_path / "loose.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"")
    items = {it.id: it for it in read_catalog(tmp_path)}
    assert set(items) == {"cars/obj3__0", "mugs/obj1__0", "mugs/obj1__30", "loose"}
    assert items["mugs/obj1__0"].label == "mugs" and items["mugs/obj1__0"].metadata == {"label": "mugs"}
    assert items["loose"].label is None
    assert items["cars/obj3__0"].image == str((tmp_path / "cars" / "obj3__0.png").resolve())


def test_csv_keeps_every_column_as_metadata_and_resolves_paths():
    items = read_catalog(SAMPLE / "catalog.csv")
    assert len(items) == 300
    first = items[0]
    assert set(first.metadata) == {"label", "title", "location", "colour", "gender"}
    assert first.label == first.metadata["label"]
    assert first.image.startswith(str(SAMPLE.resolve())) and first.image.endswith(f"{first.id}.jpg")


def test_csv_without_id_derives_it_from_the_image_and_accepts_absolute_paths_and_urls(tmp_path):
    img = FASHION / "images" / "1563.jpg"
    path = write_csv(tmp_path / "c.csv", ["image", "title"], [[str(img), "a"], ["https://example.com/p/shoe-9.jpg?x=1", "b"]])
    items = read_catalog(path)
    assert [it.id for it in items] == ["1563", "shoe-9"]
    assert items[0].image == str(img) and items[1].image.startswith("https://")


def test_duplicate_id_names_both_rows(tmp_path):
    path = write_csv(tmp_path / "c.csv", ["id", "image"], [["a", "x.jpg"], ["b", "y.jpg"], ["a", "z.jpg"]])
    with pytest.raises(CatalogError) as err:
        read_catalog(path)
    assert "'a'" in str(err.value) and "c.csv:2" in str(err.value) and "c.csv:4" in str(err.value)


def test_missing_image_column_and_missing_catalog_and_empty_catalog(tmp_path):
    with pytest.raises(CatalogError, match="no 'image' column"):
        read_catalog(write_csv(tmp_path / "c.csv", ["id", "picture"], [["a", "x.jpg"]]))
    with pytest.raises(CatalogError, match="does not exist"):
        read_catalog(tmp_path / "nope.csv")
    with pytest.raises(CatalogError, match="no items"):
        read_catalog(write_csv(tmp_path / "e.csv", ["id", "image"], []))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogError, match="no items"):
        read_catalog(tmp_path / "empty")
    with pytest.raises(CatalogError, match="unknown catalog format"):
        read_catalog(write_csv(tmp_path / "c.xlsx", ["image"], [["x"]]))


def test_jsonl_and_parquet_keep_native_types(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"id": 7, "image": str(COIL / "obj1__0.png"), "label": "obj1", "price": 9.5, "tags": ["a", "b"]},
        {"image": str(COIL / "obj2__0.png"), "label": "obj2", "price": None},
    ]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    a = read_catalog(jsonl)
    assert [it.id for it in a] == ["7", "obj2__0"]
    assert a[0].metadata == {"label": "obj1", "price": 9.5, "tags": ["a", "b"]}

    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    b = read_catalog(parquet)
    assert [it.id for it in b] == ["7", "obj2__0"] and b[0].metadata["price"] == 9.5 and b[1].metadata["price"] is None


def test_bad_jsonl_and_parquet_are_catalog_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.jpg"}\n{not json\n')
    with pytest.raises(CatalogError, match="bad.jsonl:2"):
        read_catalog(bad)
    nop = tmp_path / "nop.jsonl"
    nop.write_text('{"picture": "a.jpg"}\n')
    with pytest.raises(CatalogError, match="no 'image'"):
        read_catalog(nop)
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"PAR1 garbage")
    with pytest.raises(CatalogError, match="not a readable Parquet"):
        read_catalog(fake)


def test_plain_text_title_url_format_splits_on_the_first_comma(tmp_path):
    txt = tmp_path / "old.txt"
    txt.write_text("# a comment\nRed mug, https://example.com/img/mug,red.jpg\n\nBlue cup,https://example.com/img/cup.png\n")
    # the title is everything before the first comma; the rest (commas and all) is the URL
    items = read_catalog(txt)
    assert items[0].metadata["title"] == "Red mug" and items[0].image == "https://example.com/img/mug,red.jpg"
    assert items[1].id == "cup" and items[1].metadata == {"title": "Blue cup"}
    bad = tmp_path / "bad.txt"
    bad.write_text("no comma here\n")
    with pytest.raises(CatalogError, match="bad.txt:1"):
        read_catalog(bad)
