"""Fuzzing: the image loader, the catalog readers and the ``/invocations`` parsers, for a fixed budget.

Targets (each case is one call on real code, no mocks):

- ``images``: ``load_image(data, policy=ImagePolicy(), draft_size=...)`` on mutations of real
  photos (``../shared/data``: COIL-100 PNGs, fashion JPEGs) saved by Pillow in every allowed
  format and variant (JPEG baseline/progressive/EXIF orientation/CMYK/grey, PNG 8/16-bit, palette,
  alpha, interlaced, APNG, WebP lossy/lossless/alpha/animated, BMP incl. RLE and bit fields,
  GIF animated, TIFF raw/LZW/deflate/JPEG/CMYK/16-bit/float/multi-page, MPO) and in formats not
  on the allow-list, plus random bytes. Mutations: bit flips, interesting values, truncations,
  insertions, deletions, splices, and format-aware ones (width/height fields set huge, PNG chunk
  CRCs fixed after a change, JPEG/TIFF/GIF/BMP/WebP header fields). Allowed: an RGB image, or an
  ImageError.
- ``catalog.csv`` / ``catalog.jsonl`` / ``catalog.parquet`` / ``catalog.txt``: ``read_catalog(path)``
  on generated manifests (odd encodings, BOMs, NUL bytes, quotes, long fields, missing or duplicate
  columns, non-string and nested JSON values, huge numbers, deep nesting, lone surrogates, invalid
  UTF-8, Parquet of every Arrow type with out-of-range values, truncated or bit-flipped Parquet),
  written to a temporary folder. Allowed: a non-empty list of Items whose strings are valid
  Unicode and whose metadata is JSON, or a CatalogError.
- ``invocations``: ``parse_request(body, content_type)`` on generated CSV, JSON and JSON-lines
  bodies (huge numbers, 1e400, NaN literals, deep nesting, values beyond float32, odd charsets).
  Allowed: a float32 array [n, d] of finite values, or a QueryError.
- ``accept``: ``response_type(accept)`` and ``MediaType.parse`` on generated header values.
  Allowed: a MediaType we can answer in, or UnsupportedMediaType (406).

Every error must also have a one-line message (and, for images and catalogs, name the input).

Each case is generated from (seed, target, case number) alone, so any case can be rebuilt. The
cases run in worker processes (``--workers``, default: the number of cores, at most 2); the parent
watches each one: a case running past ``--case-timeout`` seconds (default 5) is a hang, and a case
that grows its worker's resident memory by more than ``--max-growth-mb`` (default 2048; the peak
is getrusage's maxrss, reset before each case) is a memory blow-up: either way the worker is killed
and a fresh one goes on with the next case. A worker that dies (a signal) is a crash. The default
limits leave room for what the default ImagePolicy allows: a 64-megapixel RGBA PNG takes ~1.5 s and
~1.2 GB on one idle core. The first few inputs
of each kind of failure are saved to a folder (printed) with a .json note of what happened.

    .venv/bin/python benchmarks/fuzz.py                      # 300 s; about 5 min on 2 cores
    .venv/bin/python benchmarks/fuzz.py --budget-seconds 60  # the quick run
    .venv/bin/python benchmarks/fuzz.py --cases 20000        # a fixed number of cases per target
    .venv/bin/python benchmarks/fuzz.py --json               # one JSON object; exit status 1 on FAIL

Target: at least 100,000 cases in all, 0 crashes, 0 hangs, 0 memory blow-ups.

Importable: ``run(cases_per_target, seconds, seed)`` returns the summary as a dict.
"""

from __future__ import annotations

import argparse
import csv
import faulthandler
import io
import json
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import random
import re
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO / "src"))

from lookalike.catalog import read_catalog  # noqa: E402
from lookalike.errors import CatalogError, ImageError, LookalikeError, QueryError  # noqa: E402
from lookalike.images import ImagePolicy, describe, load_image  # noqa: E402
from lookalike.server.sagemaker import (  # noqa: E402
    RESPONSE_TYPES,
    MediaType,
    UnsupportedMediaType,
    parse_request,
    response_type,
)
from lookalike.types import Item  # noqa: E402

DATA = Path(os.environ.get("LOOKALIKE_DATA", REPO.parent / "shared" / "data"))
TARGET_CASES = 100_000
TARGETS = ("images", "catalog.csv", "catalog.jsonl", "catalog.parquet", "catalog.txt", "invocations", "accept")
# Share of the time budget per target (images are the slowest and the largest attack surface).
WEIGHTS = {
    "images": 4.0,
    "catalog.csv": 1.0,
    "catalog.jsonl": 1.0,
    "catalog.parquet": 1.0,
    "catalog.txt": 0.6,
    "invocations": 1.0,
    "accept": 0.4,
}
POLICY = ImagePolicy()  # the default limits: what a deployed service uses
MAX_SAVED_PER_KIND = 3  # reproducers saved per (target, failure kind, where)
MAX_SAVED = 40


# ============================================================================================
# generic byte mutations
# ============================================================================================

INTERESTING8 = (0, 1, 0x7F, 0x80, 0xFF, 0x10, 0x20, 0x40, 0xFE)
INTERESTING16 = (0, 1, 0x7FFF, 0x8000, 0xFFFF, 0x100, 0x3FFF, 0x4000, 0xFFFE, 8000, 0x1000)
INTERESTING32 = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x10000, 0x40000000, 65535, 65536, 8000, 0xFFFFFF)
HUGE_DIMS = (0, 1, 2, 7999, 8000, 8001, 9000, 16383, 16384, 65535, 65536, 1 << 24, (1 << 31) - 1, 1 << 31, (1 << 32) - 1)


def _int_at(rng: random.Random, b: bytearray, width: int, value: int) -> None:
    if len(b) < width:
        return
    pos = rng.randrange(len(b) - width + 1)
    order = rng.choice("<>")
    fmt = {1: "B", 2: "H", 4: "I"}[width]
    b[pos : pos + width] = struct.pack(order + fmt, value & ((1 << (8 * width)) - 1))


def mutate_bytes(rng: random.Random, data: bytes, others: list[bytes] = (), rounds: int | None = None) -> bytes:
    """``data`` with 1-8 random byte-level changes."""
    b = bytearray(data)
    for _ in range(rounds or rng.choice((1, 1, 1, 2, 2, 3, 4, 8))):
        op = rng.randrange(13)
        n = len(b)
        if op == 0 and n:  # bit flips
            for _ in range(rng.choice((1, 1, 2, 4))):
                pos = rng.randrange(n)
                b[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # random bytes
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(n)] = rng.randrange(256)
        elif op == 2 and n:
            b[rng.randrange(n)] = rng.choice(INTERESTING8)
        elif op == 3:
            _int_at(rng, b, 2, rng.choice(INTERESTING16))
        elif op == 4:
            _int_at(rng, b, 4, rng.choice(INTERESTING32))
        elif op == 5 and n:  # truncate (usually keep most of it)
            cut = rng.randrange(n) if rng.random() < 0.5 else n - rng.randint(1, min(n, 64))
            del b[cut:]
        elif op == 6:  # insert random bytes or a run
            pos = rng.randrange(n + 1)
            if rng.random() < 0.5:
                b[pos:pos] = rng.randbytes(rng.randint(1, 64))
            else:
                b[pos:pos] = bytes([rng.randrange(256)]) * rng.choice((2, 16, 255, 4096))
        elif op == 7 and n:  # delete a range
            pos = rng.randrange(n)
            del b[pos : pos + rng.randint(1, 256)]
        elif op == 8 and n:  # duplicate a range somewhere else
            pos = rng.randrange(n)
            piece = b[pos : pos + rng.randint(1, 512)]
            at = rng.randrange(n + 1)
            b[at:at] = piece
        elif op == 9 and others:  # splice with another input
            other = rng.choice(others)
            if other:
                cut = rng.randrange(len(b) + 1)
                b = b[:cut] + bytearray(other[rng.randrange(len(other)) :])
        elif op == 10 and n:  # small arithmetic on a byte
            pos = rng.randrange(n)
            b[pos] = (b[pos] + rng.choice((-2, -1, 1, 2, 16, -16))) & 0xFF
        elif op == 11 and n:  # overwrite a range with a copy of another range
            src, dst = rng.randrange(n), rng.randrange(n)
            size = rng.randint(1, 64)
            piece = b[src : src + size]
            b[dst : dst + len(piece)] = piece
        elif op == 12 and n:  # zero or 0xff a range
            pos = rng.randrange(n)
            size = rng.randint(1, 64)
            b[pos : pos + size] = bytes([rng.choice((0, 0xFF))]) * len(b[pos : pos + size])
    return bytes(b)


# ============================================================================================
# target 1: images
# ============================================================================================


def _png_chunk(typ: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + typ + data + struct.pack(">I", zlib.crc32(typ + data) & 0xFFFFFFFF)


def _png(arr: np.ndarray, bit_depth: int, color_type: int, interlace: bool = False, extra: list[bytes] = ()) -> bytes:
    """A PNG written by hand: 16-bit colour and Adam7 interlacing, which Pillow does not write."""
    h, w = arr.shape[:2]
    if bit_depth == 16:
        arr = arr.astype(">u2")
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)] if interlace else [(0, 0, 1, 1)]
    raw = bytearray()
    for xs, ys, xstep, ystep in passes:
        sub = arr[ys::ystep, xs::xstep]
        if sub.size == 0:
            continue
        for row in sub:
            raw += b"\x00" + row.tobytes()
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 1 if interlace else 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + b"".join(extra) + _png_chunk(b"IDAT", zlib.compress(bytes(raw))) + _png_chunk(b"IEND", b"")


def _bmp(width: int, height: int, bpp: int, compression: int, pixels: bytes, palette: bytes = b"", header: int = 40, masks: bytes = b"") -> bytes:
    """A BMP written by hand (RLE and bit-field variants Pillow does not write)."""
    info = struct.pack("<IiiHHIIiiII", header, width, height, 1, bpp, compression, len(pixels), 2835, 2835, len(palette) // 4, 0)
    if header > 40:
        info += masks.ljust(16, b"\x00") + b"sRGB" + b"\x00" * (header - 40 - 16 - 4)
        masks = b""
    offset = 14 + len(info) + len(masks) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + masks + palette + pixels


def _rle8(idx: np.ndarray) -> bytes:
    out = bytearray()
    for row in idx[::-1]:  # bottom-up
        x = 0
        while x < len(row):
            run = 1
            while x + run < len(row) and run < 255 and row[x + run] == row[x]:
                run += 1
            out += bytes([run, int(row[x])])
            x += run
        out += b"\x00\x00"
    out[-2:] = b"\x00\x01"
    return bytes(out)


def _rle4(idx: np.ndarray) -> bytes:
    out = bytearray()
    for row in idx[::-1]:
        for x in range(0, len(row), 2):
            a, b = int(row[x]) & 15, int(row[x + 1]) & 15 if x + 1 < len(row) else 0
            out += bytes([2 if x + 1 < len(row) else 1, (a << 4) | b])
        out += b"\x00\x00"
    out += b"\x00\x02\x01\x01"  # a delta escape, then the end of the bitmap
    out += b"\x00\x01"
    return bytes(out)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif(orientation: int, extra: bool = False) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    if extra:
        exif[0x010F] = "lookalike"  # Make
        exif[0x0131] = "fuzz"  # Software
        exif.get_ifd(0x8769)[0x9003] = "2024:01:01 00:00:00"  # Exif IFD: DateTimeOriginal
    return exif


def _photos() -> list[Image.Image]:
    coil = sorted((DATA / "coil-100").glob("obj*__0.png"))
    fashion = sorted((DATA / "fashion-products-2000" / "images").glob("*.jpg"))
    if not coil or not fashion:
        raise SystemExit(f"fuzz: real photos not found under {DATA} (set LOOKALIKE_DATA)")
    picks = [coil[5], coil[42], fashion[0], fashion[7]]
    return [Image.open(p).convert("RGB") for p in picks]


def build_image_seeds() -> list[tuple[str, bytes]]:
    """Valid images of every allowed format and variant (and some others), from real photos."""
    a, b, c, d = _photos()
    small = a.resize((24, 24))
    tiny = b.resize((8, 6))
    pic = c.resize((30, 40))  # a fashion photo, portrait
    wide = d.resize((40, 24))
    rgba = small.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(small.size))
    pal = pic.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal16 = small.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    grey = pic.convert("L")
    arr16 = (np.asarray(small, dtype=np.uint16) * 257)
    seeds: list[tuple[str, bytes]] = []

    def add(name: str, fn: Callable[[], bytes]) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "IM image format is deprecated"
                seeds.append((name, fn()))
        except Exception as exc:  # a codec this Pillow lacks: skip that seed
            print(f"fuzz: no seed {name} ({exc})", file=sys.stderr)

    # JPEG and MPO
    add("jpeg", lambda: _save(pic, "JPEG", quality=75))
    add("jpeg-progressive", lambda: _save(wide, "JPEG", quality=60, progressive=True, optimize=True))
    add("jpeg-exif6", lambda: _save(pic, "JPEG", exif=_exif(6, extra=True)))
    add("jpeg-exif3", lambda: _save(tiny, "JPEG", exif=_exif(3)))
    add("jpeg-grey", lambda: _save(grey, "JPEG"))
    add("jpeg-cmyk", lambda: _save(small.convert("CMYK"), "JPEG"))
    add("jpeg-444-restart", lambda: _save(small, "JPEG", subsampling=0, restart_marker_blocks=1, icc_profile=b"fake-icc" * 4, comment=b"fuzz"))
    add("jpeg-draft", lambda: _save(a.resize((96, 80)), "JPEG", quality=50))  # draft scaling at draft_size 16-32
    add("mpo", lambda: _save(small, "MPO", save_all=True, append_images=[tiny.resize((24, 24))]))
    # PNG
    add("png-rgb", lambda: _save(small, "PNG"))
    add("png-rgba", lambda: _save(rgba, "PNG"))
    add("png-palette-trns", lambda: _save(pal16, "PNG", transparency=3))
    add("png-palette", lambda: _save(pal, "PNG", bits=8))
    add("png-grey", lambda: _save(grey, "PNG"))
    add("png-la", lambda: _save(small.convert("LA"), "PNG"))
    add("png-1bit", lambda: _save(small.convert("1"), "PNG"))
    add("png-rgb-colorkey", lambda: _save(small, "PNG", transparency=(0, 0, 0)))
    add("png-i16", lambda: _save(Image.fromarray(arr16[:, :, 0]), "PNG"))
    add("png-rgb16", lambda: _png(arr16, 16, 2))
    add("png-rgba16", lambda: _png(np.dstack([arr16, arr16[:, :, :1]]), 16, 6))
    add("png-interlaced", lambda: _png(np.asarray(small), 8, 2, interlace=True))
    add("png-exif", lambda: _save(small, "PNG", exif=_exif(8)))
    add("png-text", lambda: _png(np.asarray(tiny), 8, 2, extra=[_png_chunk(b"tEXt", b"k\x00v"), _png_chunk(b"zTXt", b"z\x00\x00" + zlib.compress(b"x" * 100)), _png_chunk(b"gAMA", struct.pack(">I", 45455)), _png_chunk(b"pHYs", struct.pack(">IIB", 2835, 2835, 1))]))
    add("apng", lambda: _save(small, "PNG", save_all=True, append_images=[small.rotate(90)], duration=100, loop=0))
    # WebP
    add("webp", lambda: _save(pic, "WEBP", quality=50))
    add("webp-lossless", lambda: _save(small, "WEBP", lossless=True))
    add("webp-alpha", lambda: _save(rgba, "WEBP"))
    add("webp-exif", lambda: _save(small, "WEBP", exif=_exif(6)))
    add("webp-animated", lambda: _save(small, "WEBP", save_all=True, append_images=[small.rotate(90)], duration=100))
    # BMP
    add("bmp", lambda: _save(tiny, "BMP"))
    add("bmp-palette", lambda: _save(pal16.resize((12, 10)), "BMP"))
    add("bmp-1bit", lambda: _save(tiny.convert("1"), "BMP"))
    add("bmp-rgba", lambda: _save(rgba.resize((8, 8)), "BMP"))
    idx8 = np.asarray(pal.resize((16, 12)))
    palette8 = bytes(x for rgb in np.asarray(pal.getpalette()[: 3 * 256]).reshape(-1, 3) for x in (rgb[2], rgb[1], rgb[0], 0)).ljust(1024, b"\x00")
    add("bmp-rle8", lambda: _bmp(16, 12, 8, 1, _rle8(idx8), palette8))
    idx4 = np.asarray(pal16.resize((10, 6)))
    palette4 = bytes(x for rgb in np.asarray(pal16.getpalette()[:48]).reshape(-1, 3) for x in (rgb[2], rgb[1], rgb[0], 0))
    add("bmp-rle4", lambda: _bmp(10, 6, 4, 2, _rle4(idx4), palette4))
    px565 = np.asarray(tiny, dtype=np.uint16)
    v565 = ((px565[:, :, 0] >> 3) << 11) | ((px565[:, :, 1] >> 2) << 5) | (px565[:, :, 2] >> 3)
    rows565 = b"".join(r.astype("<u2").tobytes().ljust(16, b"\x00") for r in v565[::-1])
    add("bmp-565", lambda: _bmp(8, 6, 16, 3, rows565, masks=struct.pack("<III", 0xF800, 0x07E0, 0x001F)))
    argb = np.asarray(rgba.resize((6, 4)), dtype=np.uint32)
    v32 = (argb[:, :, 3] << 24) | (argb[:, :, 0] << 16) | (argb[:, :, 1] << 8) | argb[:, :, 2]
    add("bmp-v5-argb", lambda: _bmp(6, -4, 32, 3, v32.astype("<u4").tobytes(), header=124, masks=struct.pack("<IIII", 0xFF0000, 0xFF00, 0xFF, 0xFF000000)))
    # GIF
    add("gif", lambda: _save(pal, "GIF"))
    add("gif-animated", lambda: _save(pal16, "GIF", save_all=True, append_images=[pal16.rotate(90), pal16.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], duration=50, loop=0, disposal=2, transparency=0))
    add("gif-interlaced", lambda: _save(pal, "GIF", interlace=True, comment=b"fuzz"))
    # TIFF
    add("tiff", lambda: _save(tiny, "TIFF"))
    add("tiff-lzw", lambda: _save(small, "TIFF", compression="tiff_lzw"))
    add("tiff-deflate", lambda: _save(small, "TIFF", compression="tiff_adobe_deflate"))
    add("tiff-jpeg", lambda: _save(small, "TIFF", compression="jpeg"))
    add("tiff-packbits", lambda: _save(small, "TIFF", compression="packbits"))
    add("tiff-cmyk", lambda: _save(tiny.convert("CMYK"), "TIFF"))
    add("tiff-i16", lambda: _save(Image.fromarray(arr16[:8, :8, 0]), "TIFF"))
    add("tiff-float", lambda: _save(Image.fromarray((np.asarray(tiny.convert("L")) / 255.0).astype(np.float32)), "TIFF"))
    add("tiff-rgba", lambda: _save(rgba.resize((8, 8)), "TIFF"))
    add("tiff-group4", lambda: _save(small.convert("1"), "TIFF", compression="group4"))
    add("tiff-lab", lambda: _save(tiny.convert("LAB"), "TIFF"))
    add("tiff-ycbcr", lambda: _save(tiny.convert("YCbCr"), "TIFF"))
    add("tiff-exif8", lambda: _save(tiny, "TIFF", tiffinfo={274: 8}))
    add("tiff-multipage", lambda: _save(tiny, "TIFF", save_all=True, append_images=[tiny.rotate(90)]))
    # not on the allow-list: Image.open still parses their headers before the format is refused
    add("ppm", lambda: _save(tiny, "PPM"))
    add("pgm16", lambda: _save(Image.fromarray(arr16[:6, :6, 0]), "PPM"))
    add("ico", lambda: _save(small, "ICO", sizes=[(16, 16)]))
    add("tga-rle", lambda: _save(tiny, "TGA", compression="tga_rle"))
    add("pcx", lambda: _save(tiny, "PCX"))
    add("sgi", lambda: _save(tiny, "SGI"))
    add("dds", lambda: _save(rgba.resize((8, 8)), "DDS"))
    add("qoi", lambda: _save(tiny, "QOI"))
    add("im", lambda: _save(tiny, "IM"))
    add("jpeg2000", lambda: _save(tiny, "JPEG2000"))
    add("avif", lambda: _save(tiny, "AVIF"))
    add("eps", lambda: _save(tiny, "EPS"))
    add("xbm", lambda: _save(tiny.convert("1"), "XBM"))
    return seeds


def _png_fix_crcs(data: bytes) -> bytes:
    """Recompute every chunk's CRC so a mutation gets past the CRC check into the decoder."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    out, pos = bytearray(data[:8]), 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 12 + length
        if end > len(data):
            break
        typ, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        out += data[pos : pos + 8] + body + struct.pack(">I", zlib.crc32(typ + body) & 0xFFFFFFFF)
        pos = end
    return bytes(out + data[pos:])


def _png_chunks(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of each complete chunk."""
    chunks, pos = [], 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if pos + 12 + length > len(data):
            break
        chunks.append((pos, length))
        pos += 12 + length
    return chunks


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(offset of the marker, marker, segment length) up to the first SOS."""
    segs, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        segs.append((pos, marker, length))
        if marker == 0xDA:
            break
        pos += 2 + length
    return segs


def _tiff_entries(data: bytes) -> list[tuple[int, str]]:
    """(offset, byte order) of each entry of the first IFD."""
    if len(data) < 8 or data[:2] not in (b"II", b"MM"):
        return []
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    if ifd + 2 > len(data):
        return []
    (n,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    return [(ifd + 2 + 12 * i, order) for i in range(n) if ifd + 14 + 12 * i <= len(data)]


def mutate_image(rng: random.Random, name: str, data: bytes, others: list[bytes]) -> bytes:
    """A format-aware change (header fields: sizes, counts, offsets), then maybe byte-level ones."""
    b = bytearray(data)
    kind = name.split("-")[0]
    dim = lambda: rng.choice(HUGE_DIMS) if rng.random() < 0.8 else rng.randrange(1 << 32)  # noqa: E731
    if kind in ("png", "apng"):
        chunks = _png_chunks(data)
        op = rng.randrange(6)
        if op == 0 and chunks:  # IHDR width/height
            off = 16 if rng.random() < 0.5 else 20
            b[off : off + 4] = struct.pack(">I", dim() & 0xFFFFFFFF)
            if rng.random() < 0.5:
                off = 36 - off
                b[off : off + 4] = struct.pack(">I", dim() & 0xFFFFFFFF)
        elif op == 1:  # bit depth, colour type, compression, filter, interlace
            b[24 + rng.randrange(5)] = rng.choice((0, 1, 2, 3, 4, 6, 8, 16, 255))
        elif op == 2 and chunks:  # drop, duplicate or swap whole chunks
            pos, length = rng.choice(chunks)
            chunk = bytes(b[pos : pos + 12 + length])
            what = rng.randrange(3)
            if what == 0:
                del b[pos : pos + 12 + length]
            elif what == 1:
                b[pos:pos] = chunk
            else:
                pos2, length2 = rng.choice(chunks)
                b.extend(bytes(b[pos2 : pos2 + 12 + length2]))
        elif op == 3:  # insert an ancillary or animation chunk with odd contents
            typ = rng.choice((b"tRNS", b"eXIf", b"iCCP", b"zTXt", b"iTXt", b"acTL", b"fcTL", b"fdAT", b"PLTE", b"sBIT", b"cHRM"))
            body = rng.randbytes(rng.choice((0, 1, 4, 8, 26, 64)))
            if typ == b"zTXt":
                body = b"k\x00\x00" + zlib.compress(b"\x00" * rng.choice((10, 10_000_000)))
            elif typ == b"eXIf":
                body = _exif(rng.randint(0, 9)).tobytes()[6:] if rng.random() < 0.5 else b"MM\x00*" + rng.randbytes(20)
            at = chunks[0][0] + 25 if chunks else 33
            b[at:at] = _png_chunk(typ, body)
        elif op == 4 and chunks:  # change a chunk's data (the CRC is fixed below)
            pos, length = rng.choice(chunks)
            if length:
                body = mutate_bytes(rng, bytes(b[pos + 8 : pos + 8 + length]), rounds=rng.randint(1, 3))
                b[pos : pos + 12 + length] = _png_chunk(bytes(b[pos + 4 : pos + 8]), body)
        else:  # a chunk's length field
            if chunks:
                pos, _ = rng.choice(chunks)
                b[pos : pos + 4] = struct.pack(">I", rng.choice(INTERESTING32))
        if rng.random() < 0.4:
            b = bytearray(mutate_bytes(rng, bytes(b), others))
        return _png_fix_crcs(bytes(b)) if rng.random() < 0.85 else bytes(b)
    if kind in ("jpeg", "mpo"):
        segs = _jpeg_segments(data)
        sofs = [s for s in segs if s[1] in (0xC0, 0xC1, 0xC2)]
        op = rng.randrange(5)
        if op == 0 and sofs:  # SOF height/width
            pos = sofs[0][0]
            off = pos + (5 if rng.random() < 0.5 else 7)
            b[off : off + 2] = struct.pack(">H", dim() & 0xFFFF)
        elif op == 1 and sofs:  # SOF precision, component count, sampling factors, table ids
            pos, _, length = sofs[0]
            off = pos + 4 + rng.choice((0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14))
            if off < len(b):
                b[off] = rng.choice(INTERESTING8 + (2, 3, 4, 0x11, 0x22, 0x44))
        elif op == 2 and segs:  # a segment's length or contents (APP1 EXIF, APP2 MPF, DQT, DHT...)
            pos, marker, length = rng.choice(segs)
            if rng.random() < 0.3:
                b[pos + 2 : pos + 4] = struct.pack(">H", rng.choice(INTERESTING16) & 0xFFFF)
            else:
                body = mutate_bytes(rng, bytes(b[pos + 4 : pos + 2 + length]), rounds=rng.randint(1, 4))
                b[pos : pos + 2 + length] = bytes(b[pos : pos + 2]) + struct.pack(">H", (len(body) + 2) & 0xFFFF) + body
        elif op == 3 and segs:  # drop or duplicate a segment
            pos, marker, length = rng.choice(segs)
            seg = bytes(b[pos : pos + 2 + length])
            if rng.random() < 0.5:
                del b[pos : pos + 2 + length]
            else:
                b[pos:pos] = seg
        else:  # entropy-coded data
            return mutate_bytes(rng, data, others)
        if rng.random() < 0.3:
            return mutate_bytes(rng, bytes(b), others)
        return bytes(b)
    if kind == "gif" and len(b) > 13:
        op = rng.randrange(4)
        desc = data.find(b"\x2c", 13)
        if op == 0:  # logical screen size
            off = 6 if rng.random() < 0.5 else 8
            b[off : off + 2] = struct.pack("<H", dim() & 0xFFFF)
        elif op == 1 and desc > 0 and desc + 10 < len(b):  # image descriptor: left, top, width, height, flags
            off = desc + rng.choice((1, 3, 5, 7))
            b[off : off + 2] = struct.pack("<H", dim() & 0xFFFF)
        elif op == 2 and desc > 0 and desc + 10 < len(b):  # flags, LZW minimum code size
            b[desc + rng.choice((9, 10))] = rng.randrange(256)
        else:
            b[10] = rng.randrange(256)  # global colour table flags
        return mutate_bytes(rng, bytes(b), others) if rng.random() < 0.3 else bytes(b)
    if kind == "bmp" and len(b) > 54:
        field = rng.choice(((2, 4), (10, 4), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2), (30, 4), (34, 4), (46, 4)))
        value = dim() if field[0] in (18, 22) else rng.choice(INTERESTING32 + (1, 2, 3, 4, 8, 16, 24, 32, 6, 40, 108, 124))
        if field[0] in (18, 22) and rng.random() < 0.3:
            value = -value
        b[field[0] : field[0] + field[1]] = struct.pack("<" + ("I" if field[1] == 4 else "H"), value & ((1 << (8 * field[1])) - 1))
        return mutate_bytes(rng, bytes(b), others) if rng.random() < 0.3 else bytes(b)
    if kind == "webp" and len(b) > 30:
        op = rng.randrange(4)
        if op == 0:  # RIFF size
            b[4:8] = struct.pack("<I", rng.choice(INTERESTING32))
        elif op == 1 and b[12:16] == b"VP8X":  # canvas size (24-bit, minus one)
            off = rng.choice((24, 27))
            b[off : off + 3] = struct.pack("<I", dim() & 0xFFFFFF)[:3]
        elif op == 2:  # VP8 / VP8L frame size, wherever the chunk is
            for tag, skip in ((b"VP8 ", 14), (b"VP8L", 9)):
                at = data.find(tag)
                if at >= 0 and at + skip + 4 <= len(b):
                    b[at + skip : at + skip + 4] = struct.pack("<I", rng.randrange(1 << 32))
        else:  # a chunk size
            at = max(data.find(rng.choice((b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANMF", b"EXIF", b"ANIM"))), 12)
            b[at + 4 : at + 8] = struct.pack("<I", rng.choice(INTERESTING32))
        return mutate_bytes(rng, bytes(b), others) if rng.random() < 0.3 else bytes(b)
    if kind == "tiff":
        entries = _tiff_entries(data)
        if entries:
            pos, order = rng.choice(entries)
            (tag,) = struct.unpack(order + "H", data[pos : pos + 2])
            op = rng.randrange(4)
            if op == 0 or tag in (256, 257):  # the value, e.g. width/length huge
                value = dim() if tag in (256, 257) else rng.choice(INTERESTING32 + (1, 2, 3, 4, 5, 7, 8, 16, 32, 32773, 34712))
                typ = struct.unpack(order + "H", data[pos + 2 : pos + 4])[0]
                b[pos + 8 : pos + 12] = struct.pack(order + ("H" if typ == 3 else "I"), value & (0xFFFF if typ == 3 else 0xFFFFFFFF)).ljust(4, b"\x00")
            elif op == 1:  # the type
                b[pos + 2 : pos + 4] = struct.pack(order + "H", rng.choice((0, 1, 2, 3, 4, 5, 7, 10, 11, 12, 13, 16, 17, 18, 99)))
            elif op == 2:  # the count
                b[pos + 4 : pos + 8] = struct.pack(order + "I", rng.choice(INTERESTING32 + (2, 3, 4, 100)))
            else:  # the tag
                b[pos : pos + 2] = struct.pack(order + "H", rng.choice((254, 256, 257, 258, 259, 262, 273, 274, 277, 278, 279, 284, 317, 320, 322, 323, 324, 325, 330, 338, 339, 347, 530, 532, 700, 34665, 34675, 65535)))
        elif len(b) > 8:  # the first IFD's offset
            b[4:8] = struct.pack("<I", rng.choice(INTERESTING32))
        return mutate_bytes(rng, bytes(b), others) if rng.random() < 0.3 else bytes(b)
    return mutate_bytes(rng, data, others)


class ImagesTarget:
    name = "images"
    allowed = ImageError

    def setup(self) -> None:
        self.seeds = build_image_seeds()
        self.blobs = [data for _, data in self.seeds]

    def generate(self, rng: random.Random) -> dict:
        r = rng.random()
        draft = rng.choice((None, 256, 256, 32, 16))
        if r < 0.03:  # random bytes
            data = rng.randbytes(rng.choice((0, 1, 4, 16, 100, 2000)))
        elif r < 0.06:  # an allowed or other format's magic, then random bytes
            magic = rng.choice((b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"P6\n", b"\x00\x00\x01\x00", b"8BPS", b"\xff\x4f\xff\x51"))
            data = magic + rng.randbytes(rng.choice((0, 8, 30, 200)))
        elif r < 0.08:  # unchanged seed (every variant must load, or be refused as a format)
            data = rng.choice(self.blobs)
        else:
            name, seed = rng.choice(self.seeds)
            data = mutate_image(rng, name, seed, self.blobs) if rng.random() < 0.7 else mutate_bytes(rng, seed, self.blobs)
            if rng.random() < 0.1:
                data = mutate_bytes(rng, data, self.blobs)
        return {"data": data, "draft_size": draft}

    def execute(self, case: dict, workdir: Path) -> str:
        data = case["data"]
        name = describe(data)
        try:
            img = load_image(data, policy=POLICY, draft_size=case["draft_size"])
        except ImageError as exc:
            _check_message(exc, name)
            return type(exc).__name__
        if not isinstance(img, Image.Image) or img.mode != "RGB":
            raise Invalid(f"load_image returned {img!r}, not an RGB image")
        if img.width < 1 or img.height < 1 or img.width * img.height > POLICY.max_pixels:
            raise Invalid(f"load_image returned a {img.width}x{img.height} image")
        img.getpixel((img.width - 1, img.height - 1))  # the pixels are really there
        return "ok"

    def save(self, case: dict, stem: Path) -> list[Path]:
        path = stem.with_suffix(".bin")
        path.write_bytes(case["data"])
        return [path]

    def replay(self, case: dict) -> str:
        return f"load_image(open({{path}}, 'rb').read(), draft_size={case['draft_size']})"


# ============================================================================================
# target 2: catalogs
# ============================================================================================

NASTY = (
    "", " ", "x.jpg", "a/b.jpg", "../x.jpg", "/abs/x.jpg", "./a b.png", "http://example.com/a.jpg",
    "https://example.com/p/shoe%20x.jpg?q=1#f", "http://[abc/x.jpg", "http://[::1]:99999/x.jpg", "https://",
    "http://x:port/a.jpg", "https://example.com/%ff%fe.jpg", "file:///etc/passwd", "C:\\x\\y.jpg",
    "x\x00y.jpg", "\x00", "\ufeffx.jpg", "\U0001f600.jpg", "x" * 300, "a/" * 200 + "b.jpg", "nan", "NaN", "inf",
    "-0", "1e400", "null", "None", "true", '"quoted"', 'a"b', "a,b", "a\nb", "a\r\nb", "\r", "\t", "#comment",
    "\u2028", "\x85", "%00", "%2e%2e/x.jpg", "http://example.com/", "http://example.com/.jpg", "  padded.jpg  ",
    "x.JPG", "~/x.jpg", ".", "..", "/", "\u0130", "\x1b[31m", "'", ",", ";", "id", "image", "label",
)
HEADER_NAMES = ("id", "image", "label", "title", "price", "image", "Image", " image", "", "id", "\ufeffimage", "image\x00", "url")


def _text(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.55:
        return rng.choice(NASTY)
    if r < 0.7:
        return "".join(chr(rng.choice((rng.randrange(32, 127), rng.randrange(0x80, 0x800), rng.randrange(0x800, 0xD800), rng.randrange(0xE000, 0x110000), rng.randrange(0, 32)))) for _ in range(rng.randint(0, 20)))
    if r < 0.85:
        return f"item-{rng.randrange(1000)}.jpg"
    if r < 0.95:
        return str(rng.choice((0, -1, 2**63, 10**30, 1.5, float("inf"))))
    return rng.choice(("y" * rng.choice((1000, 200_000)), "é" * 5000))


def _encode(rng: random.Random, text: str) -> bytes:
    enc = rng.choice(("utf-8",) * 16 + ("utf-8-sig", "utf-8-sig", "utf-16", "utf-32", "latin-1", "cp1252", "invalid"))
    if enc == "invalid":
        raw = text.encode("utf-8", "surrogatepass")
        pos = rng.randrange(len(raw) + 1)
        return raw[:pos] + rng.choice((b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xf4\x90\x80\x80")) + raw[pos:]
    return text.encode(enc, "replace" if enc not in ("utf-8", "utf-8-sig", "utf-16", "utf-32") else "surrogatepass")


def _rand_json(rng: random.Random, depth: int = 0, surrogates: bool = False) -> Any:
    r = rng.random()
    if depth > 3 or r < 0.6:
        if surrogates and rng.random() < 0.1:
            return rng.choice(("\ud800", "a\udfffb"))  # lone surrogates: valid JSON escapes, not valid text
        return rng.choice((
            None, True, False, 0, -1, 2**63, -(2**64), 10 ** rng.randrange(400), 1.5, -0.0, 1e308, 5e-324,
            float("nan"), float("inf"), float("-inf"), _text(rng), _text(rng),
        ))
    if r < 0.8:
        return [_rand_json(rng, depth + 1, surrogates) for _ in range(rng.randint(0, 4))]
    return {_text(rng): _rand_json(rng, depth + 1, surrogates) for _ in range(rng.randint(0, 4))}


RAW_JSON_VALUES = (
    "NaN", "-Infinity", "Infinity", "1e400", "-1e400", "1" * 4299, "1" * 5000, "-" + "9" * 4400, "0." + "0" * 5000 + "1",
    '"\\ud800"', '"\\udfff\\ud800"', '"\\u0000"', "[" * 5000 + "]" * 5000, "[" * 995 + "]" * 995, '{"a":' * 600 + "1" + "}" * 600,
    "[" * 100_000, '"' + "x" * 100_000 + '"', "true", "null", "{}", "[]", '{"image": "dup.jpg", "image": 5}',
)


def _jsonl(rng: random.Random) -> bytes:
    lines = []
    odd = rng.random() < 0.1  # lone surrogates in this file
    for i in range(rng.choice((0, 1, 1, 2, 3, 5, 20))):
        r = rng.random()
        if r < 0.12:  # not an object, or not JSON
            lines.append(rng.choice(("[]", "1", '"s"', "null", "{", "}", "", "   ", '{"image": "a.jpg"}{"image": "b.jpg"}', "{'image': 'x.jpg'}", "\x00")))
            continue
        row: dict[str, Any] = {}
        if rng.random() < 0.9:
            row["image"] = _rand_json(rng, 0, odd) if rng.random() < 0.3 else _text(rng)
        if rng.random() < 0.7:
            row["id"] = f"id{i}" if rng.random() < 0.6 else _rand_json(rng, 0, odd)
        for _ in range(rng.randint(0, 3)):
            row[_text(rng)] = _rand_json(rng, 0, odd)
        try:
            text = json.dumps(row, ensure_ascii=rng.random() < 0.5)
        except ValueError:  # a value json cannot write
            text = '{"image": "x.jpg"}'
        if r < 0.35:  # a raw value json.dumps would not write (or writes differently)
            key = rng.choice(("image", "id", "label", "extra"))
            text = text[:-1] + (", " if len(text) > 2 else "") + f'"{key}": {rng.choice(RAW_JSON_VALUES)}' + "}"
        lines.append(text)
    sep = rng.choice(("\n", "\n", "\r\n", "\r", "\n\n"))
    data = _encode(rng, sep.join(lines) + (sep if rng.random() < 0.7 else ""))
    return data


def _csv(rng: random.Random) -> bytes:
    ncols = rng.randint(1, 5)
    cols = [rng.choice(HEADER_NAMES) for _ in range(ncols)]
    if rng.random() < 0.8 and "image" not in cols:
        cols[rng.randrange(ncols)] = "image"
    rows = []
    for i in range(rng.choice((0, 1, 1, 2, 3, 5, 20))):
        row = []
        for col in cols:
            if col == "id" and rng.random() < 0.7:
                row.append(f"id{i}")
            else:
                row.append(_text(rng))
        if rng.random() < 0.1:  # too many or too few fields
            row = row + [_text(rng)] if rng.random() < 0.5 else row[:-1]
        rows.append(row)
    buf = io.StringIO()
    if rng.random() < 0.8:
        quoting = rng.choice((csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC))
        writer = csv.writer(buf, quoting=quoting, lineterminator=rng.choice(("\n", "\r\n", "\r")))
        for row in [cols] + rows:
            try:
                writer.writerow(row)
            except csv.Error:
                pass
    else:  # joined by hand: unbalanced quotes, stray separators
        for row in [cols] + rows:
            buf.write(rng.choice((",", ";", "\t", ", ")).join(row) + rng.choice(("\n", "\r\n", '"\n')))
    return _encode(rng, buf.getvalue())


def _txt(rng: random.Random) -> bytes:
    lines = []
    for _ in range(rng.choice((0, 1, 1, 2, 3, 5, 20))):
        r = rng.random()
        if r < 0.1:
            lines.append(rng.choice(("", "# a comment", "no comma here", ",", " , ", "title,", ",url.jpg", "\x00,\x00")))
        else:
            lines.append(f"{_text(rng)}{rng.choice((', ', ',', ' , '))}{_text(rng)}")
    sep = rng.choice(("\n", "\r\n", "\r"))
    return _encode(rng, sep.join(lines))


def _arrow_column(rng: random.Random, n: int, name: str):
    import pyarrow as pa

    kind = rng.randrange(22)
    ints = lambda lo, hi: [rng.choice((lo, hi, 0, -1, 1, rng.randint(lo, hi))) if rng.random() < 0.9 else None for _ in range(n)]  # noqa: E731
    i64 = (-(2**63), 2**63 - 1)
    if kind == 0:
        return pa.array([_text(rng) for _ in range(n)], pa.string())
    if kind == 1:
        return pa.array([_text(rng) if rng.random() < 0.8 else None for _ in range(n)], pa.large_string())
    if kind == 2:
        return pa.array([rng.randbytes(rng.randint(0, 8)) for _ in range(n)], pa.binary())
    if kind == 3:
        return pa.array(ints(*i64), pa.int64())
    if kind == 4:
        return pa.array(ints(0, 2**64 - 1), pa.uint64())
    if kind == 5:
        return pa.array([rng.choice((1.5, float("nan"), float("inf"), -0.0, 1e308)) for _ in range(n)], pa.float64())
    if kind == 6:
        return pa.array(np.array([rng.choice((1.5, 65504.0, np.inf, np.nan)) for _ in range(n)], dtype=np.float16), pa.float16())
    if kind == 7:
        return pa.array([rng.random() < 0.5 for _ in range(n)], pa.bool_())
    if kind == 8:
        return pa.array(ints(*i64), pa.timestamp(rng.choice(("s", "ms", "us", "ns")), tz=rng.choice((None, "UTC", "Europe/Paris"))))
    if kind == 9:
        return pa.array(ints(-(2**31), 2**31 - 1), pa.date32())
    if kind == 10:
        return pa.array(ints(*i64), pa.date64())
    if kind == 11:
        return pa.array(ints(0, 2**63 - 1), pa.time64(rng.choice(("us", "ns"))))
    if kind == 12:
        return pa.array(ints(*i64), pa.duration(rng.choice(("s", "ms", "us", "ns"))))
    if kind == 13:
        from decimal import Decimal

        return pa.array([Decimal(rng.choice(("1.5", "-99999999999999999999999999999999999999", "0"))) for _ in range(n)], pa.decimal128(38, 0 if rng.random() < 0.5 else 1)) if rng.random() < 0.5 else pa.array([Decimal("1.5")] * n, pa.decimal128(5, 2))
    if kind == 14:
        return pa.array([[_text(rng) for _ in range(rng.randint(0, 3))] for _ in range(n)], pa.list_(pa.string()))
    if kind == 15:
        return pa.array([{"a": rng.randint(0, 9), "b": _text(rng)} for _ in range(n)], pa.struct([("a", pa.int8()), ("b", pa.string())]))
    if kind == 16:
        return pa.array([[(_text(rng), rng.randint(0, 9))] for _ in range(n)], pa.map_(pa.string(), pa.int32()))
    if kind == 17:
        return pa.array([rng.choice(("a.jpg", "b.jpg", _text(rng))) for _ in range(n)], pa.string()).dictionary_encode()
    if kind == 18:
        return pa.nulls(n)
    if kind == 19:
        return pa.array([rng.randbytes(4) for _ in range(n)], pa.binary(4))
    if kind == 20:
        return pa.array([f"id{i}" for i in range(n)], pa.string())
    return pa.array([[rng.random()] * 2 for _ in range(n)], pa.list_(pa.float32(), 2))


def _parquet(rng: random.Random) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = rng.choice((0, 1, 1, 2, 3, 10, 50))
    names = [rng.choice(HEADER_NAMES) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.85:
        names[0] = "image"
    cols, used = [], []
    for name in names:
        if name in used:  # Parquet keeps duplicate names, but they make the mutations below less useful
            name = name + "_"
        used.append(name)
        if name == "image" and rng.random() < 0.6:
            col = pa.array([_text(rng) if rng.random() < 0.5 else f"img{i}.jpg" for i in range(n)], pa.string())
        elif name == "id" and rng.random() < 0.6:
            col = pa.array([f"id{i}" for i in range(n)], pa.string())
        else:
            try:
                col = _arrow_column(rng, n, name)
            except (pa.ArrowException, OverflowError, ValueError, TypeError):
                col = pa.array([None] * n, pa.string())
        cols.append(col)
    table = pa.table(cols, names=used)
    buf = io.BytesIO()
    try:
        pq.write_table(
            table, buf,
            compression=rng.choice(("snappy", "gzip", "zstd", "none", "brotli", "lz4")),
            use_dictionary=rng.random() < 0.5,
            data_page_version=rng.choice(("1.0", "2.0")),
            write_statistics=rng.random() < 0.5,
            row_group_size=rng.choice((None, 1, 7)),
        )
    except (pa.ArrowException, OverflowError, ValueError, TypeError):
        buf = io.BytesIO()
        pq.write_table(pa.table({"image": pa.array(["x.jpg"])}), buf)
    data = buf.getvalue()
    r = rng.random()
    if r < 0.6:
        return data
    if r < 0.8:  # the footer (Thrift metadata) is the interesting part
        size = min(len(data), 8 + struct.unpack("<I", data[-8:-4])[0] if len(data) >= 8 else len(data))
        head, tail = data[: len(data) - size], data[len(data) - size :]
        return head + mutate_bytes(rng, tail[:-8], rounds=rng.randint(1, 3)) + tail[-8:] if size > 8 else mutate_bytes(rng, data)
    return mutate_bytes(rng, data)


class CatalogTarget:
    allowed = CatalogError
    makers = {".csv": _csv, ".jsonl": _jsonl, ".parquet": _parquet, ".txt": _txt}

    def __init__(self, suffix: str):
        self.suffix = suffix
        self.name = "catalog" + suffix
        self.make = self.makers[suffix]

    def setup(self) -> None:
        pass

    def generate(self, rng: random.Random) -> dict:
        data = self.make(rng)
        if rng.random() < (0.05 if self.suffix == ".parquet" else 0.15):
            data = mutate_bytes(rng, data)
        suffix = self.suffix.upper() if rng.random() < 0.05 else self.suffix
        return {"data": data, "suffix": suffix}

    def execute(self, case: dict, workdir: Path) -> str:
        # a new file each time: truncating one that holds data makes ext4 flush it (2.5 ms a case)
        self.serial = getattr(self, "serial", 0) + 1
        path = workdir / f"manifest{self.serial}{case['suffix']}"
        path.write_bytes(case["data"])
        try:
            items = read_catalog(path)
            if not isinstance(items, list):
                items = list(items)
        except CatalogError as exc:
            _check_message(exc, path.name)
            return "CatalogError"
        finally:
            path.unlink()
        if not items:
            raise Invalid("read_catalog returned no items without a CatalogError")
        ids = set()
        for item in items:
            if not isinstance(item, Item) or not isinstance(item.id, str) or not isinstance(item.image, str):
                raise Invalid(f"read_catalog returned {item!r}")
            if item.label is not None and not isinstance(item.label, str):
                raise Invalid(f"item {item.id!r}: label {item.label!r} is not a string")
            if not isinstance(item.metadata, dict):
                raise Invalid(f"item {item.id!r}: metadata {item.metadata!r} is not a dict")
            # what the index store does with an item: UTF-8 strings and JSON metadata (no NaN)
            try:
                for text in (item.id, item.image, item.label or "", item.row):
                    text.encode("utf-8")
                json.dumps(item.metadata, ensure_ascii=False, default=str, allow_nan=False).encode("utf-8")
            except (UnicodeEncodeError, ValueError) as exc:
                raise Invalid(f"item {item.id!r} cannot be stored: {type(exc).__name__}: {exc}") from None
            if item.id in ids:
                raise Invalid(f"duplicate id {item.id!r} without a CatalogError")
            ids.add(item.id)
        return "ok"

    def save(self, case: dict, stem: Path) -> list[Path]:
        path = stem.with_suffix(case["suffix"])
        path.write_bytes(case["data"])
        return [path]

    def replay(self, case: dict) -> str:
        return "read_catalog({path})"


# ============================================================================================
# target 3: /invocations
# ============================================================================================

CHARSETS = (
    "utf-8", "UTF-8", "utf8", "latin-1", "iso-8859-1", "ascii", "utf-16", "utf-16-le", "utf-32", "cp1252", "utf-7",
    "idna", "punycode", "undefined", "rot13", "base64", "hex", "zlib", "uu", "bogus", "", "unicode_escape",
    "raw_unicode_escape", "mbcs", "charmap", "koi8-r", "shift_jis", "big5", "utf-8-sig", '"utf-8"', "utf_8 ", "x" * 300,
)
REQUEST_MEDIA = ("text/csv", "application/json", "application/jsonlines", "TEXT/CSV", "Application/JSON", "application/x-npy", "text/plain", "*/*", "", "application/jsonlines+json", "multipart/form-data")
NUMBERS = (
    "1", "-1", "0", "1.5", "-0.0", "1e38", "3.4028234e38", "3.4028236e38", "1e39", "-1e39", "1e308", "1.8e308", "1e400",
    "5e-324", "1e-50", "nan", "NaN", "inf", "-inf", "Infinity", "1_000", " 2 ", "0x10", "", " ", "١٢", "1e", "--1",
    "9" * 400, "9" * 4400, "1" * 5000, "true", "null", '"1"', "[1]", "{}",
)


def _json_number(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.5:
        return rng.uniform(-10, 10)
    return rng.choice((0, 1, -1, True, False, None, "1", 1e38, 3.4028234e38, 3.5e38, 1e39, -1e300, 1e308, 5e-324,
                       float("nan"), float("inf"), 10**39, 10**308, 10**400, -(10**400), 2**63, [1.0], {"v": 1}))


def _record(rng: random.Random, d: int) -> Any:
    values = [_json_number(rng) if rng.random() < 0.15 else rng.uniform(-1, 1) for _ in range(d)]
    r = rng.random()
    if r < 0.5:
        return {"features": values}
    if r < 0.8:
        return {"data": {"features": {"values": values}}}
    return rng.choice(({"features": []}, {"features": "1,2"}, {"data": {"features": values}}, {"data": None}, values, None, 5, "x", {"features": {"values": values}}, _rand_json(rng)))


def _body(rng: random.Random, media: str) -> str:
    d = rng.choice((1, 2, 3, 8, 64))
    n = rng.choice((0, 1, 1, 2, 2, 5, 10))
    if "csv" in media.lower():
        lines = []
        for _ in range(n):
            cells = [rng.choice(NUMBERS) if rng.random() < 0.2 else repr(rng.uniform(-1, 1)) for _ in range(d if rng.random() < 0.9 else d + 1)]
            lines.append(rng.choice((",", ", ", ";", " ,")).join(cells))
        return rng.choice(("\n", "\r\n", "\r", "\u2028", "\x0b", "\n\n")).join(lines)
    if "jsonlines" in media.lower():
        lines = []
        for _ in range(n):
            if rng.random() < 0.15:
                lines.append(rng.choice(RAW_JSON_VALUES + ('{"features": [' + ", ".join(rng.choice(NUMBERS) for _ in range(d)) + "]}",)))
            else:
                lines.append(json.dumps(_record(rng, d)))
        return "\n".join(lines)
    r = rng.random()
    if r < 0.15:  # raw tricks json.dumps would not write
        feats = ", ".join(rng.choice(NUMBERS[:20] + ("9" * 400, "1" * 5000)) for _ in range(d))
        return rng.choice((
            '{"instances": [{"features": [' + feats + "]}]}",
            '{"instances": ' + rng.choice(RAW_JSON_VALUES) + "}",
            rng.choice(RAW_JSON_VALUES),
            '{"instances": [' + "[" * 2000 + "]" * 2000 + "]}",
        ))
    doc: Any = {"instances": [_record(rng, d) for _ in range(n)]}
    if r < 0.25:
        doc = rng.choice(([doc], {"instances": {"features": [1.0]}}, {"instances": None}, {}, _rand_json(rng), {"Instances": doc["instances"]}))
    try:
        return json.dumps(doc)
    except ValueError:
        return "{}"


class InvocationsTarget:
    name = "invocations"
    allowed = QueryError

    def setup(self) -> None:
        pass

    def generate(self, rng: random.Random) -> dict:
        r = rng.random()
        media = rng.choice(REQUEST_MEDIA[:3] * 10 + REQUEST_MEDIA[3:])
        if r < 0.5:
            content_type = media
        elif r < 0.8:
            content_type = f"{media}; charset={rng.choice(CHARSETS)}"
        elif r < 0.9:
            param = rng.choice(("verbose=true", " charset = utf-8 ", ";;", "=", "a=b=c", 'charset="utf-16"', "charset"))
            content_type = f"{media};{param}"
        else:
            content_type = rng.choice((None, "", ";", "; charset=utf-8", _text(rng), "\x00", "text/csv\r\nX-Evil: 1"))
        text = _body(rng, media)
        charset = ""
        if content_type and "charset=" in content_type:
            charset = content_type.split("charset=", 1)[1].split(";")[0].strip().strip('"')
        try:
            body = text.encode(charset or "utf-8", "surrogatepass" if (charset or "utf-8").lower().startswith("utf") else "replace")
        except (LookupError, UnicodeError, ValueError, TypeError):
            body = text.encode("utf-8", "surrogatepass")
        if rng.random() < 0.15:
            body = mutate_bytes(rng, body)
        return {"body": body, "content_type": content_type}

    def execute(self, case: dict, workdir: Path) -> str:
        try:
            out = parse_request(case["body"], case["content_type"])
        except QueryError as exc:
            _check_message(exc, None)
            if isinstance(exc, UnsupportedMediaType) and exc.status != 415:
                raise Invalid(f"parse_request: UnsupportedMediaType with status {exc.status}, not 415") from None
            return type(exc).__name__
        if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.ndim != 2 or 0 in out.shape:
            raise Invalid(f"parse_request returned {type(out).__name__} {getattr(out, 'dtype', '')} {getattr(out, 'shape', '')}, not float32 [n, d]")
        if not np.isfinite(out).all():
            raise Invalid("parse_request returned values that are not finite in float32")
        return "ok"

    def save(self, case: dict, stem: Path) -> list[Path]:
        path = stem.with_suffix(".body")
        path.write_bytes(case["body"])
        return [path]

    def replay(self, case: dict) -> str:
        return f"parse_request(open({{path}}, 'rb').read(), {case['content_type']!r})"


ACCEPT_TOKENS = (
    "application/json", "application/jsonlines", "text/csv", "*/*", "application/*", "text/*", "", " ", "image/png",
    "application/json; verbose=true", "application/jsonlines;verbose=1", "APPLICATION/JSON", "application/json;q=0.5",
    "application/json; q=0", ";", "=", "a=b", "application/json; verbose", "*/*; verbose=yes", '"application/json"',
    "text/html,application/xhtml+xml", "application/json\x00", "\u2028", "application/ json",
)


class AcceptTarget:
    name = "accept"
    allowed = QueryError

    def setup(self) -> None:
        pass

    def generate(self, rng: random.Random) -> dict:
        r = rng.random()
        if r < 0.7:
            value = rng.choice((",", ", ", " ,")).join(rng.choice(ACCEPT_TOKENS) for _ in range(rng.randint(1, 4)))
        elif r < 0.8:
            value = rng.choice((None, "", ",", ",,,", "x" * 10_000, ("application/json;" * 1000)))
        else:
            value = _text(rng)
        if value and rng.random() < 0.2:
            value = mutate_bytes(rng, value.encode("utf-8", "surrogatepass")).decode("utf-8", "surrogateescape")
        return {"accept": value}

    def execute(self, case: dict, workdir: Path) -> str:
        value = case["accept"]
        for default in ("application/json", "text/csv"):
            media = MediaType.parse(value, default)
            if not isinstance(media.type, str) or not all(isinstance(k, str) and isinstance(v, str) for k, v in media.params.items()):
                raise Invalid(f"MediaType.parse returned {media!r}")
            if media.type == "" and (value or "").strip() == "":
                raise Invalid("MediaType.parse gave an empty type for an empty header (the default was not used)")
        try:
            media = response_type(value)
        except UnsupportedMediaType as exc:
            _check_message(exc, None)
            if exc.status != 406:
                raise Invalid(f"response_type: UnsupportedMediaType with status {exc.status}, not 406") from None
            return "UnsupportedMediaType"
        if not isinstance(media, MediaType) or media.type not in RESPONSE_TYPES:
            raise Invalid(f"response_type returned {media!r}")
        return "ok"

    def save(self, case: dict, stem: Path) -> list[Path]:
        path = stem.with_suffix(".accept")
        path.write_text(json.dumps(case["accept"]))
        return [path]

    def replay(self, case: dict) -> str:
        return "response_type(json.load(open({path})))"


def make_targets() -> dict[str, Any]:
    return {
        "images": ImagesTarget(),
        "catalog.csv": CatalogTarget(".csv"),
        "catalog.jsonl": CatalogTarget(".jsonl"),
        "catalog.parquet": CatalogTarget(".parquet"),
        "catalog.txt": CatalogTarget(".txt"),
        "invocations": InvocationsTarget(),
        "accept": AcceptTarget(),
    }


class Invalid(Exception):
    """A call that returned something it must not (or an error message that breaks the rules)."""


def _check_message(exc: LookalikeError, name: str | None) -> None:
    message = str(exc)
    if len(message.splitlines()) > 1 or message.endswith(("\n", "\r")):
        raise Invalid(f"{type(exc).__name__} message is not one line: {message[:200]!r}")
    if name is not None and name not in message:
        raise Invalid(f"{type(exc).__name__} message does not name the input {name!r}: {message[:200]!r}")


def case_rng(seed: int, target: str, index: int) -> random.Random:
    return random.Random(f"{seed}/{target}/{index}")


def rebuild_case(target: str, seed: int, index: int, targets: dict | None = None) -> dict:
    """The input of case ``index`` of ``target`` (after ``setup()``)."""
    targets = targets or make_targets()
    t = targets[target]
    if not hasattr(t, "seeds") and hasattr(t, "setup"):
        t.setup()
    return t.generate(case_rng(seed, target, index))


# ============================================================================================
# the runner: worker processes watched by the parent
# ============================================================================================


def _where(tb) -> str:
    """The innermost frame in lookalike (or else the innermost), as file:line function."""
    frames = traceback.extract_tb(tb)
    own = [f for f in frames if "lookalike" in f.filename and "benchmarks" not in f.filename]
    f = (own or frames or [None])[-1]
    return f"{Path(f.filename).name}:{f.lineno} {f.name}" if f else "?"


def _gist(message: str) -> str:
    """What kind of wrong result a message describes: its first clause, quotes and numbers left out."""
    return re.sub(r"'[^']*'|\"[^\"]*\"|\d+", "_", message.split(":")[0])[:80]


class _Memory:
    """This process's resident memory now, and its peak since the last ``reset()``, in MB.

    The peak is getrusage's maxrss; writing 5 to /proc/self/clear_refs (Linux 4.0+) resets it to
    the current RSS, so each case's own peak is seen, whatever came before it (a worker forked from
    a big process, e.g. a test run, starts with pages of its parent that count once touched).
    """

    def __init__(self):
        self.page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        self.statm = os.open("/proc/self/statm", os.O_RDONLY)
        try:
            self.clear = os.open("/proc/self/clear_refs", os.O_WRONLY)
            os.write(self.clear, b"5")
        except OSError:  # not Linux 4.0+, or not allowed: peaks are then since the worker started
            self.clear = None

    def now(self) -> float:
        return int(os.pread(self.statm, 64, 0).split()[1]) * self.page_mb

    def peak(self) -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def reset(self) -> None:
        if self.clear is not None:
            os.write(self.clear, b"5")


def _worker(conn, progress, targets: dict, seed: int, workdir: str, max_growth_mb: float, stack_after: float) -> None:
    """Run the chunks the parent sends; report each failure at once and a summary per chunk."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.makedirs(workdir, exist_ok=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)  # libtiff and libjpeg print their complaints to fd 2: thousands of lines
    work = Path(workdir)
    # A case still running after stack_after seconds has its Python stack written (by faulthandler's
    # watchdog thread) to a file the parent reads if it kills the case as a hang. (A SIGUSR1 from the
    # parent was tried first: in a worker forked from a test run that had used the engine, the dump
    # sometimes never came.)
    stacks = open(work / "stack.txt", "w")  # noqa: SIM115 - open for the worker's whole life
    warned: dict[str, int] = {}

    def count_warning(message, category, filename, lineno, file=None, line=None):
        key = f"{category.__name__}: {str(message)[:80]}"
        warned[key] = warned.get(key, 0) + 1

    warnings.simplefilter("always")
    warnings.showwarning = count_warning
    names = list(targets)
    memory = _Memory()
    start_rss = memory.now()
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        _, tname, start, count, seconds = msg
        target = targets[tname]
        outcomes: dict[str, int] = {}
        warned.clear()
        t0 = time.monotonic()
        deadline = t0 + seconds if seconds else math.inf
        slowest, slowest_case = 0.0, -1
        peak_rss = peak_growth = 0.0
        done = 0
        index = start
        for index in range(start, start + count):
            now = time.monotonic()
            if now > deadline:
                break
            memory.reset()
            before = memory.now() if memory.clear is not None else start_rss
            progress[1], progress[2], progress[3] = now, names.index(tname), before  # the start time first: the
            progress[0] = index  # parent reads these without a lock, and an old time with a new index is a hang
            if os.fstat(stacks.fileno()).st_size:  # a slow case's stack, not a hang's: start afresh
                os.ftruncate(stacks.fileno(), 0)
                os.lseek(stacks.fileno(), 0, os.SEEK_SET)
            faulthandler.dump_traceback_later(stack_after, file=stacks)
            try:
                case = target.generate(case_rng(seed, tname, index))
                c0 = time.monotonic()
                outcome = target.execute(case, work)
                took = time.monotonic() - c0
                if took > slowest:
                    slowest, slowest_case = took, index
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - anything else is what we are looking for
                kind = "invalid" if isinstance(exc, Invalid) else "exception"
                outcome = "CRASH"
                conn.send(("fail", tname, index, {
                    "kind": kind,
                    "type": type(exc).__name__,
                    "message": str(exc)[:500],
                    "where": _gist(str(exc)) if kind == "invalid" else _where(exc.__traceback__),
                    "traceback": "".join(traceback.format_exception(exc))[-4000:],
                }))
            faulthandler.cancel_dump_traceback_later()
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            done += 1
            peak = memory.peak()
            peak_rss, peak_growth = max(peak_rss, peak), max(peak_growth, peak - before)
            if peak - before > max_growth_mb:
                # a spike between the parent's looks: exit with the case still in ``progress``, and
                # the parent counts a memory blow-up and goes on after it in a fresh worker
                os._exit(EXIT_MEMORY)
        progress[0] = -1
        conn.send(("done", tname, start, done, {
            "outcomes": outcomes, "slowest": slowest, "slowest_case": slowest_case, "peak_rss_mb": peak_rss,
            "peak_growth_mb": peak_growth, "seconds": time.monotonic() - t0, "warnings": dict(warned),
        }))


EXIT_MEMORY = 3  # a worker's exit status after a case grew its memory past the limit


def _hung_in(stack: str) -> str:
    """The innermost frame of a faulthandler dump, as 'file:line in function'."""
    frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', stack)
    if not frames:
        return "an unknown place (no Python stack came back)"
    path, line, func = frames[0]  # faulthandler prints the innermost frame first
    return f"{Path(path).name}:{line} {func}"


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class _Slot:
    """One worker process and the chunk it is running."""

    def __init__(self, ctx, targets, seed, workdir, max_growth_mb, stack_after):
        self.progress = ctx.RawArray("d", 4)  # case number (-1: none), its start time, target, RSS before it
        self.progress[0] = -1
        parent, child = ctx.Pipe()
        self.conn = parent
        self.workdir = workdir
        self.proc = ctx.Process(target=_worker, args=(child, self.progress, targets, seed, workdir, max_growth_mb, stack_after), daemon=True)
        self.proc.start()
        child.close()
        self.chunk: tuple | None = None  # (target, start, count, seconds, started)
        self.peak_rss = 0.0

    def stack(self) -> str:
        """The stuck worker's Python stack, as its faulthandler watchdog wrote it, or ""."""
        path = Path(self.workdir) / "stack.txt"
        for _ in range(10):  # written before the case timed out; wait a little if it is still coming
            text = path.read_text(errors="replace") if path.exists() else ""
            if text:
                return text
            time.sleep(0.05)
        return ""

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(5)
        self.conn.close()


def run(
    cases_per_target: int | None = None,
    seconds: float | None = 300.0,
    seed: int = 0,
    *,
    targets: list[str] | None = None,
    workers: int | None = None,
    case_timeout: float = 5.0,
    max_growth_mb: float = 2048.0,
    crash_dir: str | os.PathLike | None = None,
    progress: bool = False,
    extra_targets: dict[str, Any] | None = None,
) -> dict:
    """Fuzz every target for ``cases_per_target`` cases each and/or ``seconds`` in all; return the summary.

    ``seconds`` is shared between the targets by WEIGHTS; with both given, whichever comes first ends
    a target. Failures are counted by kind (crashes: an unexpected exception, a wrong result or
    error message, a worker that died; hangs: a case over ``case_timeout`` seconds; memory blow-ups:
    a case that grew its worker's resident memory by more than ``max_growth_mb``) and the first inputs of each are
    saved under ``crash_dir`` (default: a new temporary folder). ``extra_targets``: more targets
    (objects with setup/generate/execute/save/replay, like the ones here), e.g. to test this runner.
    """
    if cases_per_target is None and seconds is None:
        raise ValueError("give cases_per_target, seconds, or both")
    all_targets = {**make_targets(), **(extra_targets or {})}
    names = list(targets or (list(TARGETS) if extra_targets is None else list(extra_targets)))
    unknown = set(names) - set(all_targets)
    if unknown:
        raise ValueError(f"unknown targets: {', '.join(sorted(unknown))}")
    weights = {n: WEIGHTS.get(n, 1.0) for n in names}
    nworkers = workers or max(1, min(2, os.cpu_count() or 1))
    tmap = {n: all_targets[n] for n in names}
    t_setup = time.monotonic()
    for t in tmap.values():
        t.setup()
    setup_s = time.monotonic() - t_setup
    run_dir = Path(tempfile.mkdtemp(prefix="lookalike-fuzz-"))
    crash_path = Path(crash_dir) if crash_dir else run_dir / "crashes"
    crash_path.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("fork")

    weight_sum = sum(weights.values())
    time_share = {n: (seconds * nworkers * weights[n] / weight_sum if seconds is not None else math.inf) for n in names}
    stats = {
        n: {"cases": 0, "crashes": 0, "hangs": 0, "memory": 0, "seconds": 0.0, "slowest_case_s": 0.0, "slowest_case": None,
            "peak_rss_mb": 0.0, "peak_growth_mb": 0.0, "outcomes": {}, "warnings": {}, "failures": {}}
        for n in names
    }
    next_index = {n: 0 for n in names}
    rate = {n: None for n in names}
    running = {n: 0 for n in names}
    saved: list[dict] = []
    saved_per_sig: dict[tuple, int] = {}
    peak_seen = [0.0]  # of workers that were replaced
    t_start = time.monotonic()
    last_report = t_start

    def record_failure(tname: str, index: int, info: dict) -> None:
        kind = info["kind"]
        st = stats[tname]
        if kind == "hang":
            st["hangs"] += 1
        elif kind == "memory":
            st["memory"] += 1
        else:
            st["crashes"] += 1
        sig = (tname, kind, info.get("type"), info.get("where"))
        key = f"{kind}: {info.get('type')} at {info.get('where')}"
        entry = st["failures"].setdefault(key, {"count": 0, "first_case": index, "message": info.get("message", "")[:300], "reproducers": []})
        entry["count"] += 1
        if saved_per_sig.get(sig, 0) < MAX_SAVED_PER_KIND and len(saved) < MAX_SAVED:
            saved_per_sig[sig] = saved_per_sig.get(sig, 0) + 1
            case = tmap[tname].generate(case_rng(seed, tname, index))
            stem = crash_path / f"{tname.replace('.', '-')}-{seed}-{index}"
            paths = tmap[tname].save(case, stem)
            note = {"target": tname, "seed": seed, "case": index, **info, "replay": tmap[tname].replay(case).replace("{path}", repr(str(paths[0])))}
            if "content_type" in case:
                note["content_type"] = case["content_type"]
            if "draft_size" in case:
                note["draft_size"] = case["draft_size"]
            stem.with_suffix(".json").write_text(json.dumps(note, indent=2, default=str))
            entry["reproducers"].append(str(paths[0]))
            saved.append({"target": tname, "case": index, "path": str(paths[0]), "kind": kind})

    def next_chunk(slot: _Slot) -> bool:
        """Give the slot the target furthest behind its share; False when all are done."""
        now = time.monotonic()
        todo = []
        for n in names:
            used = stats[n]["seconds"] + sum(now - s.chunk[4] for s in slots if s.chunk and s.chunk[0] == n)
            left_time = time_share[n] - used
            left_cases = (cases_per_target - next_index[n]) if cases_per_target is not None else math.inf
            if left_time > 0.05 and left_cases > 0:
                todo.append((used / weights[n] + running[n] * 1000, n, left_time, left_cases))
        if not todo:
            return False
        _, n, left_time, left_cases = min(todo)
        per_chunk = 50 if rate[n] is None else max(20, int(rate[n] * 2.0))
        count = int(min(per_chunk, left_cases))
        chunk_seconds = min(left_time, 10.0) if seconds is not None else 0.0
        slot.chunk = (n, next_index[n], count, chunk_seconds, now)
        next_index[n] += count
        running[n] += 1
        slot.conn.send(("chunk", n, slot.chunk[1], count, chunk_seconds))
        return True

    def finish_chunk(slot: _Slot, done: int, info: dict | None) -> None:
        n, start, count, _, started = slot.chunk
        st = stats[n]
        elapsed = time.monotonic() - started
        st["cases"] += done
        st["seconds"] += elapsed
        running[n] -= 1
        if info:
            for k, v in info["outcomes"].items():
                st["outcomes"][k] = st["outcomes"].get(k, 0) + v
            for k, v in info["warnings"].items():
                st["warnings"][k] = st["warnings"].get(k, 0) + v
            if info["slowest"] > st["slowest_case_s"]:
                st["slowest_case_s"], st["slowest_case"] = info["slowest"], info["slowest_case"]
            st["peak_rss_mb"] = max(st["peak_rss_mb"], info["peak_rss_mb"])
            st["peak_growth_mb"] = max(st["peak_growth_mb"], info["peak_growth_mb"])
            if done and info["seconds"] > 0:
                rate[n] = done / info["seconds"]
        slot.chunk = None

    def restart(slot: _Slot, kind: str, message: str) -> _Slot:
        """Kill a worker stuck in (or killed by) a case; a fresh one goes on after that case."""
        index = int(slot.progress[0])
        peak_seen[0] = max(peak_seen[0], slot.peak_rss)
        stack = slot.stack() if kind == "hang" else ""
        slot.kill()
        fresh = _Slot(ctx, tmap, seed, str(run_dir / f"w{time.monotonic_ns()}"), max_growth_mb, 0.8 * case_timeout)
        if slot.chunk is None:
            return fresh
        n, start, count, chunk_seconds, started = slot.chunk
        if index < start:  # died between cases: nothing to blame
            index = start - 1
        else:
            info = {"kind": kind, "type": kind, "message": message, "where": kind}
            if stack:
                info["traceback"] = stack[:4000]  # innermost frame first
                info["message"] = f"{message}; in {_hung_in(stack)}"
            record_failure(n, index, info)
        done = index - start + 1
        if index >= start:
            stats[n]["outcomes"][kind.upper()] = stats[n]["outcomes"].get(kind.upper(), 0) + 1
        finish_chunk(slot, done, None)
        if count - done > 0 and (chunk_seconds == 0 or time.monotonic() - started < chunk_seconds):
            fresh.chunk = (n, index + 1, count - done, chunk_seconds, time.monotonic())
            running[n] += 1
            fresh.conn.send(("chunk", n, index + 1, count - done, max(chunk_seconds - (time.monotonic() - started), 0.05) if chunk_seconds else 0.0))
        return fresh

    slots = [_Slot(ctx, tmap, seed, str(run_dir / f"w{i}"), max_growth_mb, 0.8 * case_timeout) for i in range(nworkers)]
    try:
        active = [s for s in slots if next_chunk(s)]
        idle = [s for s in slots if s not in active]
        while active:
            ready = mp.connection.wait([s.conn for s in active] + [s.proc.sentinel for s in active], timeout=0.05)
            for i, slot in enumerate(list(active)):
                if slot.conn in ready or slot.conn.poll():
                    try:
                        while slot.conn.poll():
                            msg = slot.conn.recv()
                            if msg[0] == "fail":
                                record_failure(msg[1], msg[2], msg[3])
                            elif msg[0] == "done":
                                finish_chunk(slot, msg[3], msg[4])
                                slot.peak_rss = max(slot.peak_rss, msg[4]["peak_rss_mb"])
                    except (EOFError, OSError):
                        pass
                    if slot.chunk is None and slot.proc.is_alive():
                        if not next_chunk(slot):
                            active.remove(slot)
                            idle.append(slot)
                        continue
                now = time.monotonic()
                if not slot.proc.is_alive():
                    code = slot.proc.exitcode
                    if code == EXIT_MEMORY:
                        fresh = restart(slot, "memory", f"the case grew the worker's peak RSS by over {max_growth_mb:g} MB")
                    else:
                        fresh = restart(slot, "died", f"worker exited with {'signal ' + signal.Signals(-code).name if code and code < 0 else f'status {code}'}")
                    active[active.index(slot)] = fresh
                    slots[slots.index(slot)] = fresh
                    if fresh.chunk is None and not next_chunk(fresh):
                        active.remove(fresh)
                        idle.append(fresh)
                    continue
                index, started, before = slot.progress[0], slot.progress[1], slot.progress[3]
                rss = _rss_mb(slot.proc.pid)
                slot.peak_rss = max(slot.peak_rss, rss)
                if slot.chunk is not None:
                    stats[slot.chunk[0]]["peak_rss_mb"] = max(stats[slot.chunk[0]]["peak_rss_mb"], rss)
                if index >= 0 and now - started > case_timeout:
                    fresh = restart(slot, "hang", f"case still running after {case_timeout:g} s")
                elif index >= 0 and rss - before > max_growth_mb:
                    fresh = restart(slot, "memory", f"the case grew the worker's RSS from {before:.0f} to {rss:.0f} MB")
                else:
                    continue
                active[active.index(slot)] = fresh
                slots[slots.index(slot)] = fresh
                if fresh.chunk is None and not next_chunk(fresh):
                    active.remove(fresh)
                    idle.append(fresh)
            if progress and time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                total = sum(st["cases"] for st in stats.values())
                bad = sum(st["crashes"] + st["hangs"] + st["memory"] for st in stats.values())
                print(f"  ... {time.monotonic() - t_start:5.0f} s: {total:,} cases, {bad} failures", file=sys.stderr, flush=True)
    finally:
        for s in slots:
            try:
                if s.proc.is_alive():
                    s.conn.send(("stop",))
            except (OSError, BrokenPipeError):
                pass
        for s in slots:
            s.proc.join(2)
            if s.proc.is_alive():
                s.kill()
        for d in run_dir.glob("w*"):
            shutil.rmtree(d, ignore_errors=True)

    wall = time.monotonic() - t_start
    total = sum(st["cases"] for st in stats.values())
    crashes = sum(st["crashes"] for st in stats.values())
    hangs = sum(st["hangs"] for st in stats.values())
    memory = sum(st["memory"] for st in stats.values())
    peak = max([s.peak_rss for s in slots] + [st["peak_rss_mb"] for st in stats.values()] + peak_seen)
    for st in stats.values():
        st["seconds"] = round(st["seconds"], 2)
        st["slowest_case_s"] = round(st["slowest_case_s"], 3)
        st["peak_rss_mb"] = round(st["peak_rss_mb"], 1)
        st["peak_growth_mb"] = round(st["peak_growth_mb"], 1)
        st["cases_per_s"] = round(st["cases"] / st["seconds"], 1) if st["seconds"] else 0.0
    if not saved and not crash_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "cases": total,
        "crashes": crashes,
        "hangs": hangs,
        "memory_blowups": memory,
        "peak_rss_mb": round(peak, 1),
        "pass": total >= TARGET_CASES and crashes == 0 and hangs == 0 and memory == 0,
        "target_cases": TARGET_CASES,
        "seed": seed,
        "workers": nworkers,
        "wall_s": round(wall, 1),
        "setup_s": round(setup_s, 1),
        "case_timeout_s": case_timeout,
        "max_growth_mb": max_growth_mb,
        "crash_dir": str(crash_path) if saved else None,
        "reproducers": saved,
        "by_target": stats,
    }


def report(result: dict) -> str:
    lines = [
        f"fuzz: seed {result['seed']}, {result['workers']} workers, {result['wall_s']:.0f} s "
        f"(+{result['setup_s']:.1f} s building seed inputs), case timeout {result['case_timeout_s']:g} s, "
        f"memory limit {result['max_growth_mb']:g} MB of growth per case",
        "",
        f"{'target':<17}{'cases':>10}{'cases/s':>9}{'crashes':>9}{'hangs':>7}{'memory':>8}{'slowest':>9}"
        f"{'peak RSS':>10}{'growth':>8}  outcomes",
    ]
    for name, st in result["by_target"].items():
        top = sorted(st["outcomes"].items(), key=lambda kv: -kv[1])[:4]
        outcomes = ", ".join(f"{k} {100 * v / max(st['cases'], 1):.0f}%" for k, v in top)
        lines.append(
            f"{name:<17}{st['cases']:>10,}{st['cases_per_s']:>9,.0f}{st['crashes']:>9}{st['hangs']:>7}{st['memory']:>8}"
            f"{st['slowest_case_s']:>8.2f}s{st['peak_rss_mb']:>8.0f}MB{st['peak_growth_mb']:>6.0f}MB  {outcomes}"
        )
    lines.append(
        f"{'total':<17}{result['cases']:>10,}{'':>9}{result['crashes']:>9}{result['hangs']:>7}{result['memory_blowups']:>8}"
        f"{'':>9}{result['peak_rss_mb']:>8.0f}MB"
    )
    lines.append("(slowest: the longest case; peak RSS: the most a worker held in that target's cases; growth: the "
                 "most one case added to its worker)")
    slow = [f"{name} #{st['slowest_case']} ({st['slowest_case_s']:.2f} s)" for name, st in result["by_target"].items() if st["slowest_case_s"] > 1]
    if slow:
        lines.append(f"slowest cases (rebuild one with rebuild_case(target, {result['seed']}, N)): " + ", ".join(slow))
    failures = [(name, key, f) for name, st in result["by_target"].items() for key, f in st["failures"].items()]
    if failures:
        lines += ["", "failures (kind: exception at where; count; first case; reproducers):"]
        for name, key, f in failures:
            lines.append(f"  {name}: {key}  x{f['count']}  case {f['first_case']}: {f['message'][:160]}")
            for path in f["reproducers"]:
                lines.append(f"      {path}  (+ .json: traceback and how to replay)")
    verdict = "PASS" if result["pass"] else "FAIL"
    lines += ["", f"{verdict}: {result['cases']:,} cases (target >= {result['target_cases']:,}), {result['crashes']} crashes, "
              f"{result['hangs']} hangs, {result['memory_blowups']} memory blow-ups (target 0 each)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-seconds", type=float, default=None, help="time for the whole run, shared by the targets (default 300, or none with --cases)")
    ap.add_argument("--cases", type=int, default=None, help="cases per target (with --budget-seconds, whichever comes first)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: cores, at most 2)")
    ap.add_argument("--case-timeout", type=float, default=5.0, help="seconds one case may take before it counts as a hang (default 5)")
    ap.add_argument("--max-growth-mb", type=float, default=2048.0, help="a case growing its worker's resident memory by more is a blow-up (default 2048)")
    ap.add_argument("--crash-dir", default=None, help="where reproducers go (default: a new temporary folder)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    args = ap.parse_args(argv)
    seconds = args.budget_seconds if args.budget_seconds is not None else (None if args.cases else 300.0)
    result = run(
        args.cases, seconds, args.seed,
        targets=[t.strip() for t in args.targets.split(",") if t.strip()],
        workers=args.workers, case_timeout=args.case_timeout, max_growth_mb=args.max_growth_mb,
        crash_dir=args.crash_dir, progress=not args.json,
    )
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(report(result))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
