"""Fuzzing: a short seeded run of benchmarks/fuzz.py, and one regression test per bug it found.

The full run (100,000+ cases) is ``benchmarks/fuzz.py``; here every target gets a few hundred
cases with a fixed seed (the same cases every time), plus a check that the runner really does
catch crashes, hangs and memory blow-ups.
"""

from __future__ import annotations

import importlib.util
import io
import json
import multiprocessing as mp
import os
import resource
import signal
import struct
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from lookalike import CatalogError, ImageCorruptError, ImageError, ImageTooLargeError, QueryError
from lookalike.catalog import read_catalog
from lookalike.images import load_image, to_rgb
from lookalike.server.sagemaker import parse_request

_spec = importlib.util.spec_from_file_location("lookalike_fuzz", ROOT / "benchmarks" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
sys.modules["lookalike_fuzz"] = fuzz
_spec.loader.exec_module(fuzz)

SEED = 20261127


# --- the seeded run ----------------------------------------------------------------------------


def test_short_seeded_fuzz_run_has_no_crash_hang_or_memory_blowup(tmp_path):
    result = fuzz.run(1500, None, SEED, case_timeout=10.0, max_growth_mb=2048, crash_dir=tmp_path)
    assert {n: st["cases"] for n, st in result["by_target"].items()} == {n: 1500 for n in fuzz.TARGETS}
    assert (result["crashes"], result["hangs"], result["memory_blowups"]) == (0, 0, 0), fuzz.report(result)
    images = result["by_target"]["images"]["outcomes"]
    assert images.get("ok", 0) > 50 and images.get("ImageTooLargeError", 0) > 0  # it reaches both ends


def test_the_same_seed_gives_the_same_cases():
    targets = fuzz.make_targets()
    for name in fuzz.TARGETS:
        a = fuzz.rebuild_case(name, SEED, 17, targets)
        b = fuzz.rebuild_case(name, SEED, 17, targets)
        assert a == b, name
    assert fuzz.rebuild_case("images", SEED, 1, targets) != fuzz.rebuild_case("images", SEED + 1, 1, targets)


class _Canary:
    """A target that misbehaves on purpose on some cases, to show the runner catches each kind."""

    name = "canary"

    def setup(self):
        pass

    def generate(self, rng):
        return {"x": rng.randrange(1000)}

    def execute(self, case, workdir):
        if case.get("index") == 3:
            raise ValueError("an untyped error")
        if case.get("index") == 5:
            time.sleep(60)  # a hang
        if case.get("index") == 7:
            ballast = bytearray(600 * 2**20)  # a memory blow-up (the limit below is 400 MB)
            ballast[::4096] = b"x" * len(ballast[::4096])
        if case.get("index") == 9:
            os.kill(os.getpid(), signal.SIGKILL)  # a dead worker (as a crash in C code would leave it)
        if case.get("index") == 11:
            try:
                raise CatalogError("two\nlines", subject="x")
            except CatalogError as exc:
                fuzz._check_message(exc, None)  # a typed error, but not on one line
        return "ok"

    def save(self, case, stem):
        path = stem.with_suffix(".case")
        path.write_text(json.dumps(case))
        return [path]

    def replay(self, case):
        return "canary"


class _IndexedCanary(_Canary):
    def generate(self, rng):
        # the runner seeds each case's rng from (seed, target, index): recover the index from it
        r = rng.random()
        return {"index": next((i for i in range(50) if fuzz.case_rng(1, self.name, i).random() == r), -1)}


def test_the_runner_catches_crashes_hangs_blowups_and_dead_workers(tmp_path):
    result = fuzz.run(
        14, None, 1, extra_targets={"canary": _IndexedCanary()}, workers=1, case_timeout=1.0, max_growth_mb=400, crash_dir=tmp_path
    )
    st = result["by_target"]["canary"]
    assert st["cases"] == 14
    assert (result["crashes"], result["hangs"], result["memory_blowups"]) == (3, 1, 1), fuzz.report(result)
    kinds = {key.split(":")[0] for key in st["failures"]}
    assert kinds == {"exception", "hang", "memory", "died", "invalid"}
    assert sorted(p.name for p in tmp_path.glob("canary-1-*.case")) == [f"canary-1-{i}.case" for i in (11, 3, 5, 7, 9)]
    notes = [json.loads(p.read_text()) for p in tmp_path.glob("canary-1-*.json")]
    assert sorted(n["kind"] for n in notes) == ["died", "exception", "hang", "invalid", "memory"]
    hang = next(n for n in notes if n["kind"] == "hang")  # where it hung: the worker's stack, by faulthandler
    assert hang["message"].startswith("case still running after 1 s; in test_fuzz.py:"), hang["message"]
    assert hang["message"].endswith(" execute") and "time.sleep(60)" not in hang["message"]
    assert "in execute" in hang["traceback"]


# --- helpers for the regression tests -----------------------------------------------------------


def _in_child(fn, *, memory_mb: int = 1500, timeout: float = 60.0):
    """Run ``fn()`` in a forked child with at most ``memory_mb`` more address space; (outcome, seconds)."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()

    def target():
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + memory_mb * 2**20, resource.RLIM_INFINITY))
        start = time.perf_counter()
        try:
            fn()
            child.send(("returned", time.perf_counter() - start))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            child.send((f"{type(exc).__name__}: {exc}", time.perf_counter() - start))

    proc = ctx.Process(target=target)
    proc.start()
    try:
        if not parent.poll(timeout):
            pytest.fail(f"still running after {timeout} s")
        return parent.recv()
    finally:
        proc.kill()
        proc.join()


def _tiff(img: Image.Image, **kw) -> bytearray:
    buf = io.BytesIO()
    img.save(buf, "TIFF", **kw)
    return bytearray(buf.getvalue())


def _set_tiff_entry(data: bytearray, tag: int, *, new_tag: int | None = None, typ: int | None = None, value: bytes | None = None) -> bytes:
    (ifd,) = struct.unpack("<I", data[4:8])
    (n,) = struct.unpack("<H", data[ifd : ifd + 2])
    for i in range(n):
        pos = ifd + 2 + 12 * i
        if struct.unpack("<H", data[pos : pos + 2])[0] == tag:
            if new_tag is not None:
                data[pos : pos + 2] = struct.pack("<H", new_tag)
            if typ is not None:
                data[pos + 2 : pos + 4] = struct.pack("<H", typ)
            if value is not None:
                data[pos + 4 : pos + 12] = value
            return bytes(data)
    raise AssertionError(f"no tag {tag}")


TINY = Image.new("RGB", (8, 6), (10, 200, 30))


# --- images ---------------------------------------------------------------------------------------


def test_avif_decoder_runtime_error_is_an_image_error():
    # RuntimeError("Failed to decode image: Missing or empty image item") from Pillow's AVIF plugin
    buf = io.BytesIO()
    TINY.save(buf, "AVIF")
    data = bytearray(buf.getvalue())
    data[data.find(b"pitm")] = 0
    with pytest.raises(ImageError, match=f"<{len(data)} bytes>"):
        load_image(bytes(data))


def test_dds_with_unknown_pixel_format_flags_is_an_image_error():
    # NotImplementedError("Unknown pixel format flags 1090519040") from Image.open
    buf = io.BytesIO()
    Image.new("RGBA", (8, 8)).save(buf, "DDS")
    data = bytearray(buf.getvalue())
    data[80:84] = struct.pack("<I", 0x41000000)  # DDS_PIXELFORMAT.dwFlags
    with pytest.raises(ImageError, match=f"<{len(data)} bytes>"):
        load_image(bytes(data))


@pytest.mark.parametrize(
    "typ, error",
    [(7, "'bytes' object cannot be interpreted"), (5, "'IFDRational' object cannot be interpreted"), (16, "too large to convert")],
    ids=["undefined-TypeError", "rational-TypeError", "long8-OverflowError"],
)
def test_tiff_strip_offsets_of_the_wrong_type_are_image_errors(typ, error):
    data = _set_tiff_entry(_tiff(TINY), 273, typ=typ)  # StripOffsets
    with pytest.raises(ImageCorruptError, match=error):
        load_image(data)


def test_tiff_xmp_tag_holding_a_number_is_an_image_error():
    # TypeError("expected string or bytes-like object, got 'int'") from Image.getexif while loading
    data = _set_tiff_entry(_tiff(TINY, tiffinfo={305: "fuzz"}), 305, new_tag=700, typ=3, value=struct.pack("<IHH", 1, 7, 0))
    with pytest.raises(ImageCorruptError, match="expected string"):
        load_image(data)


def _gif_with_frame(width: int, height: int) -> bytes:
    """A 1x1 GIF whose only frame claims width x height and is disposed to the background."""
    return (
        b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
        + b"\x21\xf9\x04\x08\x00\x00\x00\x00"  # graphic control: disposal 2 (restore to background)
        + b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
        + b"\x02\x02\x4c\x01\x00\x3b"
    )


def test_gif_frame_over_the_pixel_limit_is_refused_before_pillow_fills_it():
    # Was: Image.MAX_IMAGE_PIXELS = None turned off Pillow's own check, so Image.open filled the
    # 65535x65535 disposal area (4.3 GB, 12 s) before our header check could run.
    data = _gif_with_frame(65535, 65535)
    assert len(data) < 50

    def load():
        with pytest.raises(ImageTooLargeError, match=f"<{len(data)} bytes>"):
            load_image(data)

    outcome, seconds = _in_child(load, memory_mb=1500)
    assert outcome == "returned" and seconds < 2


def _rle8_bmp(width: int, height: int, rle: bytes) -> bytes:
    palette = bytes(range(4)) * 256
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rle), 0, 0, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(rle), 0, 0, offset) + info + palette + rle


def test_large_rle_bmp_is_refused_at_once_and_small_ones_load():
    # 10,000,000 x 3 pixels (inside the pixel limit) from 60 bytes: Pillow's pure-Python RLE decoder
    # pads each end-of-line escape one byte per loop turn (7 s for the 5,177,360-wide fuzz case).
    data = _rle8_bmp(10_000_000, 3, b"\x01\x00\x00\x00" * 2)  # one pixel, end of line; twice
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="run-length-compressed BMP"):
        load_image(data)
    assert time.perf_counter() - start < 1.0
    small = _rle8_bmp(4, 2, b"\x04\x01\x00\x00\x04\x02\x00\x01")  # two rows of 4 pixels, end of bitmap
    assert load_image(small).size == (4, 2)


def test_wide_animated_webp_decodes_in_linear_time():
    # A 214-byte animated WebP of 16,000,000 x 4 pixels took 70 s: Pillow fed its decoder 64 KB at
    # a time and re-copied the unused rest, quadratic in the row width. 6,000,000 x 4 took ~5 s.
    frames = [Image.new("RGB", (24, 4), (10, 20, 30)), Image.new("RGB", (24, 4), (200, 0, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], duration=100)
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"VP8X"
    data[24:27] = struct.pack("<I", 6_000_000 - 1)[:3]  # canvas width - 1
    start = time.perf_counter()
    img = load_image(bytes(data))
    assert img.size == (6_000_000, 4)
    assert time.perf_counter() - start < 2.5


def test_16bit_image_conversion_needs_a_few_bytes_per_pixel():
    # float64 temporaries made a 64-megapixel 16-bit image need ~1.6 GB and 5 s: now float32, in place
    img = Image.fromarray((np.arange(1000 * 1000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(1000, 1000))
    tracemalloc.start()
    try:
        out = to_rgb(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / 1e6 < 8  # bytes per pixel: was 24
    row = np.asarray(out)[0, :6, 0]
    assert row.tolist() == [0, 0, 0, 0, 0, 0] and np.asarray(out)[-1, -1, 0] == round((999_999 % 65536) / 257)


# --- catalogs -------------------------------------------------------------------------------------


def _catalog(tmp_path: Path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return read_catalog(path)


def test_text_catalog_that_is_not_utf8_is_a_catalog_error(tmp_path):
    with pytest.raises(CatalogError, match=r"c\.txt: not UTF-8"):  # was UnicodeDecodeError
        _catalog(tmp_path, "c.txt", b"caf\xe9 mug, mug.jpg\n")


@pytest.mark.parametrize("name, data", [
    ("c.csv", b"image\nhttp://[abc/x.jpg\n"),
    ("c.jsonl", b'{"image": "https://[::1/x.jpg"}\n'),
    ("c.txt", b"a mug, http://[abc/x.jpg\n"),
])
def test_malformed_url_is_a_catalog_error(tmp_path, name, data):
    with pytest.raises(CatalogError, match=r"not a valid URL \(Invalid IPv6 URL\)"):  # was ValueError
        _catalog(tmp_path, name, data)


@pytest.mark.parametrize("name, data", [
    ("c.csv", b"id,image\na,x\x00y.jpg\n"),
    ("c.jsonl", b'{"image": "x\\u0000y.jpg"}\n'),
    ("c.txt", b"a mug, x\x00y.jpg\n"),
])
def test_nul_in_image_path_is_a_catalog_error(tmp_path, name, data):
    with pytest.raises(CatalogError, match="NUL"):  # was ValueError: embedded null byte
        _catalog(tmp_path, name, data)


@pytest.mark.parametrize("value, match", [
    (b"1" * 5000, "4300 digits"),  # was ValueError
    (b"[" * 100_000 + b"]" * 100_000, "recursion"),  # was RecursionError from json.loads
])
def test_jsonl_numbers_too_long_or_nesting_too_deep_is_a_catalog_error(tmp_path, value, match):
    with pytest.raises(CatalogError, match=rf"c\.jsonl:2: not valid JSON \(.*{match}"):
        _catalog(tmp_path, "c.jsonl", b'{"image": "a.jpg"}\n{"image": "b.jpg", "n": ' + value + b"}\n")


@pytest.mark.parametrize("limit", [1000, 20_000])
def test_jsonl_nesting_that_json_reads_is_refused_whatever_the_recursion_limit(tmp_path, limit):
    # 600 levels: deep enough for _clean's recursion (two frames a level), not for json.loads (one).
    # It was a RecursionError, then a CatalogError or not depending on the recursion limit and the
    # caller's stack depth (seed 20261127 hung three forked fuzz workers in CI on such rows).
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(limit)
    try:
        for row in (
            b'{"image": "a.jpg", "n": ' + b"[" * 600 + b"]" * 600 + b"}",
            b'{"image": "a.jpg", "label": ' + b'{"a":' * 600 + b"1" + b"}" * 600 + b"}",
            b'{"image": "a.jpg", "n": ' + b"[" * 33 + b"]" * 33 + b"}",
        ):
            with pytest.raises(CatalogError, match=r"c\.jsonl:1: values nested more than 32 levels deep"):
                _catalog(tmp_path, "c.jsonl", row + b"\n")
        deep_enough = _catalog(tmp_path, "c.jsonl", b'{"image": "a.jpg", "n": ' + b"[" * 32 + b"]" * 32 + b"}\n")
        assert len(deep_enough) == 1
        with pytest.raises(CatalogError, match=r"c\.jsonl:1: 'image' must be a path or URL, not a dict"):
            _catalog(tmp_path, "c.jsonl", b'{"image": ' + b'{"a":' * 600 + b"1" + b"}" * 600 + b"}\n")
    finally:
        sys.setrecursionlimit(old)


@pytest.mark.parametrize("line", [
    b'{"image": "a.jpg", "title": "\\ud800"}',
    b'{"image": "a\\udfff.jpg"}',
    b'{"image": "a.jpg", "\\udc80": 1}',
])
def test_jsonl_lone_surrogate_is_a_catalog_error(tmp_path, line):
    # valid JSON, but not text: the index store's UTF-8 encode failed later (UnicodeEncodeError)
    with pytest.raises(CatalogError, match="unpaired surrogate"):
        _catalog(tmp_path, "c.jsonl", line + b"\n")


def test_jsonl_surrogate_pair_is_fine(tmp_path):
    (item,) = _catalog(tmp_path, "c.jsonl", b'{"image": "a.jpg", "title": "\\ud83d\\ude00"}\n')
    assert item.metadata["title"] == "\U0001f600"


def _parquet(table, **kw) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("column", ["date32", "timestamp", "duration"])
def test_parquet_value_python_cannot_hold_is_a_catalog_error(tmp_path, column):
    import pyarrow as pa

    values = {
        "date32": pa.array([2**31 - 1], pa.date32()),  # was OverflowError: days=2147483647
        "timestamp": pa.array([2**62], pa.timestamp("ms")),  # was OverflowError
        "duration": pa.array([2**62], pa.duration("ms")),  # was OverflowError
    }
    data = _parquet(pa.table({"image": ["a.jpg"], "when": values[column]}))
    with pytest.raises(CatalogError, match=r"c\.parquet: holds a value that cannot be read"):
        _catalog(tmp_path, "c.parquet", data)


def test_parquet_with_invalid_utf8_is_a_catalog_error(tmp_path):
    import pyarrow as pa

    name = _parquet(pa.table({"image": ["a.jpg"], "zz": ["b"]}), store_schema=False).replace(b"zz", b"\xff\xfe")
    with pytest.raises(CatalogError, match="not a readable Parquet file.*can't decode"):  # was UnicodeDecodeError
        _catalog(tmp_path, "c.parquet", name)
    value = _parquet(pa.table({"image": ["a.jpg"]}), compression="none", use_dictionary=False, write_statistics=False)
    with pytest.raises(CatalogError, match="cannot be read.*can't decode"):  # was UnicodeDecodeError
        _catalog(tmp_path, "d.parquet", value.replace(b"a.jpg", b"\xff\xfe.jp"))


def test_catalog_error_messages_stay_on_one_line(tmp_path):
    import pyarrow as pa

    data = bytearray(_parquet(pa.table({"image": ["a.jpg"]})))
    (footer,) = struct.unpack("<I", data[-8:-4])
    data[len(data) - 8 - footer] = 0  # pyarrow's message then ends in a line break
    with pytest.raises(CatalogError) as err:
        _catalog(tmp_path, "c.parquet", bytes(data))
    assert "\n" not in str(err.value) and "not a readable Parquet file" in str(err.value)
    with pytest.raises(CatalogError, match="no 'image' column") as err:  # a header with a quoted line break
        _catalog(tmp_path, "c.csv", b'"image\n0",id\nx.jpg,a\n')
    assert len(str(err.value).splitlines()) == 1 and r"image\n0" in str(err.value)


# --- /invocations ---------------------------------------------------------------------------------


@pytest.mark.parametrize("charset", ["undefined", "idna"])
def test_charset_whose_codec_raises_unicode_error_is_a_query_error(charset):
    # b"".decode("undefined") raises UnicodeError, not UnicodeDecodeError
    body = b"1,2\n" if charset == "undefined" else b"xn--\n"  # idna: "label empty or too long"
    with pytest.raises(QueryError, match=f"not {charset} text"):
        parse_request(body, f"text/csv; charset={charset}")


def test_codec_error_quoting_a_line_break_stays_on_one_line():
    # the punycode codec's message quotes the bad character: a raw line break in the QueryError
    with pytest.raises(QueryError, match="not punycode text") as err:
        parse_request(b"1-\n1", "text/csv; charset=punycode")
    assert len(str(err.value).splitlines()) == 1 and "'\\n'" in str(err.value)


@pytest.mark.parametrize("body", [
    b'{"instances": [{"features": [1' + b"0" * 400 + b"]}]}",  # was OverflowError: int too large to convert to float
    b'{"instances": [{"data": {"features": {"values": [-1' + b"0" * 309 + b"]}}}]}",
])
def test_integer_beyond_float_range_is_a_query_error(body):
    with pytest.raises(QueryError, match="instance 1: features must be finite"):
        parse_request(body, "application/json")


def test_integer_over_python_digit_limit_is_a_query_error():
    body = b'{"instances": [{"features": [' + b"1" * 5000 + b"]}]}"  # was ValueError (4300 digits)
    with pytest.raises(QueryError, match="not valid JSON"):
        parse_request(body, "application/json")
    with pytest.raises(QueryError, match="line 1: not valid JSON"):
        parse_request(b'{"features": [' + b"1" * 5000 + b"]}", "application/jsonlines")


@pytest.mark.parametrize("body, content_type", [
    (b'{"instances": [{"features": [1e39, 0]}]}', "application/json"),
    (b'{"features": [-3.5e38]}', "application/jsonlines"),
    (b"0,1e39\n", "text/csv"),
])
def test_feature_beyond_float32_range_is_a_query_error_not_infinity(body, content_type):
    # was: accepted, and became inf in the float32 array handed to the index
    with pytest.raises(QueryError, match="finite float32"):
        parse_request(body, content_type)


def test_largest_float32_feature_is_still_accepted():
    out = parse_request(b"3.4028234e38,-3.4028234e38\n", "text/csv")
    assert out.dtype == np.float32 and np.isfinite(out).all()


def test_a_record_of_the_wrong_length_is_refused_before_room_is_made_for_all():
    # was: 5,000,000 one-number lines made room for 5,000,000 x 1280 floats (MemoryError, a 500)
    with pytest.raises(QueryError, match="line 1: a vector of dimension 1, but the index's vectors have dimension 1280"):
        parse_request(b"1\n" * 900, "text/csv", dim=1280)
    with pytest.raises(QueryError, match="line 3: a vector of dimension 2, but the request's first vector has dimension 3"):
        parse_request(b"1,2,3\n4,5,6\n7,8\n", "text/csv")
    with pytest.raises(QueryError, match="instance 2: a vector of dimension 1"):
        parse_request(b'{"instances": [{"features": [1, 2]}, {"features": [1]}]}', "application/json", dim=2)


def test_a_request_of_more_records_than_the_limit_is_refused():
    with pytest.raises(QueryError, match="holds more than 1000 feature vectors; send at most 1000"):
        parse_request(b"1,2\n" * 1001, "text/csv")
    with pytest.raises(QueryError, match="holds more than 1000"):
        parse_request(b'{"instances": [' + b", ".join([b'{"features": [1]}'] * 1001) + b"]}", "application/json")
    assert parse_request(b"1,2\n" * 1000, "text/csv").shape == (1000, 2)


def test_spreadsheet_csv_a_byte_order_mark_and_quoted_cells_read_as_numbers():
    out = parse_request('\ufeff"0.5", 1.5\n2,"-3e-1"\n'.encode(), "text/csv")
    assert out.tolist() == [[0.5, 1.5], [2.0, pytest.approx(-0.3)]]
    with pytest.raises(QueryError, match="line 1: '1_0' is not a number"):  # float() would read it as 10
        parse_request(b"1_0,2\n", "text/csv")
