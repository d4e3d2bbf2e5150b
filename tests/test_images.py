"""lookalike.images: load_image and fetch_url on real images, real files and a real local server.

Nothing of lookalike is mocked. Inputs are real photos (skimage.data, ../shared/data) or images
built here with Pillow/numpy and written under tmp_path. URL tests talk only to servers started
here on 127.0.0.1; a guard fails any test whose code tries to connect anywhere else.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import io
import ipaddress
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from skimage import data as skdata

from lookalike.errors import (
    ImageError,
    ImageFetchError,
    ImageFormatError,
    ImageNotFoundError,
    ImageTooLargeError,
    LookalikeError,
)
from lookalike.images import ImagePolicy, fetch_url, load_image

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FASHION_IMAGES = DATA / "fashion-products-2000" / "images"
COIL = DATA / "coil-100"

ORIENTATION = 0x0112
PRIVATE = ImagePolicy(allow_private_urls=True)


# --- helpers --------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def write(path: Path, img: Image.Image, fmt: str, **kw) -> Path:
    path.write_bytes(encode(img, fmt, **kw))
    return path


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int32)


def mad(a, b) -> float:
    """Mean absolute difference of two images or arrays of the same shape."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).mean())


def assert_rgb(img, size) -> None:
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    assert img.size == tuple(size)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def crafted_png(width: int, height: int, *, bit_depth: int = 1, color_type: int = 0, idat: bytes | None = None) -> bytes:
    """A PNG whose IHDR claims width x height; the data is whatever `idat` is (default: almost none)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = zlib.compress(b"\0" * 16) if idat is None else idat
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


def raw_png(rows: list[bytes], width: int, height: int, bit_depth: int, color_type: int) -> bytes:
    """A valid PNG from raw scanlines (filter byte 0 added here)."""
    raw = b"".join(b"\0" + r for r in rows)
    return crafted_png(width, height, bit_depth=bit_depth, color_type=color_type, idat=zlib.compress(raw))


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its SOF0 header patched to claim width x height."""
    i = jpeg.index(b"\xff\xc0")
    # SOF0: marker(2) length(2) precision(1) height(2) width(2)
    return jpeg[: i + 5] + struct.pack(">HH", height, width) + jpeg[i + 9 :]


def with_app1(jpeg: bytes, payload: bytes, at: int = 2) -> bytes:
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:at] + segment + jpeg[at:]


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


# Expected display transform of each EXIF orientation, written with numpy (independent of Pillow).
ORIENTED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # rotate 90 degrees clockwise to display
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),  # rotate 90 degrees counter-clockwise to display
}


# --- real photos ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return skdata.chelsea()  # 300 x 451 x 3


@pytest.fixture(scope="module")
def chelsea_jpeg(chelsea) -> bytes:
    return encode(Image.fromarray(chelsea), "JPEG", quality=90)


@pytest.fixture(scope="module")
def chelsea_png(chelsea) -> bytes:
    return encode(Image.fromarray(chelsea), "PNG")


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    return skdata.coffee()  # 400 x 600 x 3


@pytest.fixture(scope="module")
def big_astronaut_jpeg() -> bytes:
    big = Image.fromarray(skdata.astronaut()).resize((2048, 2048), Image.BICUBIC)
    return encode(big, "JPEG", quality=92)


def _sample(folder: Path, pattern: str, n: int) -> list[Path]:
    files = sorted(folder.glob(pattern))
    assert files, f"no {pattern} in {folder}"
    step = max(1, len(files) // n)
    return files[::step][:n]


FASHION_SAMPLE = _sample(FASHION_IMAGES, "*.jpg", 12)
COIL_SAMPLE = _sample(COIL, "*.png", 12)


# --- every input kind ------------------------------------------------------------------------


@pytest.mark.parametrize("path", FASHION_SAMPLE + COIL_SAMPLE, ids=lambda p: p.name)
def test_real_dataset_files_load_as_str_and_path(path):
    reference = Image.open(path)
    reference.load()
    expected = arr(ImageOps.exif_transpose(reference).convert("RGB"))
    for source in (str(path), path):
        img = load_image(source)
        assert_rgb(img, (expected.shape[1], expected.shape[0]))
        assert np.array_equal(arr(img), expected)


def test_coil_object_1_is_a_tiny_32x32_image():
    img = load_image(COIL / "obj1__0.png")
    assert_rgb(img, (32, 32))


def test_fashion_file_as_bytes_bytearray_memoryview_match_path():
    path = FASHION_SAMPLE[0]
    raw = path.read_bytes()
    expected = arr(load_image(path))
    for source in (raw, bytearray(raw), memoryview(raw)):
        img = load_image(source)
        assert_rgb(img, (expected.shape[1], expected.shape[0]))
        assert np.array_equal(arr(img), expected)


def test_jpeg_bytes_are_close_to_the_photo(chelsea, chelsea_jpeg):
    img = load_image(chelsea_jpeg)
    assert_rgb(img, (451, 300))
    assert mad(img, chelsea) < 4


def test_png_path_is_exactly_the_photo(tmp_path, coffee):
    path = write(tmp_path / "coffee.png", Image.fromarray(coffee), "PNG")
    img = load_image(str(path))
    assert_rgb(img, (600, 400))
    assert np.array_equal(arr(img), coffee)


def test_rgb_pil_image(chelsea):
    src = Image.fromarray(chelsea)
    img = load_image(src)
    assert_rgb(img, (451, 300))
    assert np.array_equal(arr(img), chelsea)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "I", "I;16", "F", "RGBa", "HSV"])
def test_pil_image_in_any_mode_becomes_rgb(chelsea, mode):
    src = Image.fromarray(chelsea).convert(mode) if mode not in ("I;16", "PA", "HSV") else None
    if mode == "I;16":
        src = Image.fromarray((chelsea[:, :, 0].astype(np.uint16) * 257))
        assert src.mode == "I;16"
    elif mode == "PA":
        src = Image.fromarray(chelsea).convert("P").convert("PA")
    elif mode == "HSV":
        src = Image.fromarray(chelsea).convert("HSV")
    img = load_image(src)
    assert_rgb(img, (451, 300))
    assert src.mode == mode  # the caller's image is not changed


def test_premultiplied_la_pil_image_becomes_rgb():
    src = Image.new("LA", (4, 4), (100, 128)).convert("La")
    img = load_image(src)
    assert_rgb(img, (4, 4))
    assert abs(arr(img)[0, 0, 0] - (100 * 128 / 255 + 255 * 127 / 255)) <= 2


def test_pil_image_in_i16_mode_is_scaled(chelsea):
    gray = chelsea[:, :, 1]
    img = load_image(Image.fromarray(gray.astype(np.uint16) * 257))
    assert np.abs(arr(img)[:, :, 0] - gray).max() <= 1


def test_rgba_pil_image_is_not_modified(chelsea):
    rgba = np.dstack([chelsea, np.zeros(chelsea.shape[:2], np.uint8)])
    src = Image.fromarray(rgba)
    before = np.asarray(src).copy()
    img = load_image(src)
    assert np.all(arr(img) == 255)
    assert src.mode == "RGBA" and np.array_equal(np.asarray(src), before)


def test_numpy_rgb_uint8(chelsea):
    img = load_image(chelsea)
    assert_rgb(img, (451, 300))
    assert np.array_equal(arr(img), chelsea)


def test_numpy_non_contiguous_views(chelsea):
    for view in (chelsea[:, ::-1], chelsea[::2, ::3], chelsea.transpose(1, 0, 2)):
        img = load_image(view)
        assert_rgb(img, (view.shape[1], view.shape[0]))
        assert np.array_equal(arr(img), view)


def test_numpy_grayscale_hxw_and_hxwx1():
    camera = skdata.camera()  # 512 x 512 uint8
    for source in (camera, camera[:, :, None]):
        img = load_image(source)
        assert_rgb(img, (512, 512))
        a = arr(img)
        for c in range(3):
            assert np.array_equal(a[:, :, c], camera)


def test_numpy_rgba_composites_on_white(chelsea):
    alpha = np.zeros(chelsea.shape[:2], np.uint8)
    alpha[:100] = 255  # top: opaque
    alpha[100:200] = 0  # middle: transparent
    alpha[200:] = 128  # bottom: half
    img = load_image(np.dstack([chelsea, alpha]))
    assert_rgb(img, (451, 300))
    a = arr(img)
    assert np.array_equal(a[:100], chelsea[:100])
    assert np.all(a[100:200] == 255)
    expected = chelsea[200:].astype(np.float64) * 128 / 255 + 255 * (127 / 255)
    assert np.abs(a[200:] - expected).max() <= 2


def test_numpy_float_in_unit_range(chelsea):
    f = chelsea.astype(np.float32) / 255.0
    for source in (f, f.astype(np.float64)):
        img = load_image(source)
        assert_rgb(img, (451, 300))
        assert np.abs(arr(img) - chelsea).max() <= 1
    gray = load_image(np.linspace(0, 1, 256 * 8).reshape(8, 256))
    assert arr(gray)[0, 0, 0] == 0 and arr(gray)[-1, -1, 0] == 255


def test_numpy_float_rgba_in_unit_range(chelsea):
    rgba = np.dstack([chelsea / 255.0, np.zeros(chelsea.shape[:2])])
    img = load_image(rgba)
    assert_rgb(img, (451, 300))
    assert np.all(arr(img) == 255)


def test_numpy_float_in_0_255_range_is_taken_as_is(chelsea):
    img = load_image(chelsea.astype(np.float64))
    assert np.abs(arr(img) - chelsea).max() <= 1


def test_numpy_uint16_is_scaled_not_clipped(chelsea):
    wide = chelsea.astype(np.uint16) * 257  # 0..65535
    img = load_image(wide)
    assert_rgb(img, (451, 300))
    assert np.abs(arr(img) - chelsea).max() <= 1
    gray = load_image(np.array([[0, 257 * 100, 32896, 65535]], np.uint16))
    assert list(arr(gray)[0, :, 0]) == [0, 100, 128, 255]


def test_numpy_other_integer_dtypes(chelsea):
    for dtype in (np.int32, np.int64, np.uint32):
        img = load_image(chelsea.astype(dtype))
        assert np.array_equal(arr(img), chelsea)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10,), np.uint8),
        np.zeros((4, 4, 2), np.uint8),
        np.zeros((4, 4, 5), np.uint8),
        np.zeros((2, 4, 4, 3), np.uint8),
        np.zeros((0, 0, 3), np.uint8),
        np.zeros((0, 5), np.uint8),
        np.full((4, 4, 3), np.nan),
        np.full((4, 4), np.inf, np.float32),
        np.array([[object(), object()]], dtype=object),
        np.array([["a", "b"]]),
    ],
    ids=["1d", "hxwx2", "hxwx5", "4d", "empty", "zero-height", "nan", "inf", "object", "str"],
)
def test_bad_arrays_raise_format_error(bad):
    with pytest.raises(ImageFormatError) as err:
        load_image(bad)
    assert "<array" in str(err.value)


@pytest.mark.parametrize("bad", [None, 123, 1.5, ["a.jpg"], {"path": "a.jpg"}, object()])
def test_other_types_raise_format_error(bad):
    with pytest.raises(ImageFormatError, match="not an image input"):
        load_image(bad)


def test_empty_pil_image_raises_format_error():
    with pytest.raises(ImageFormatError, match="empty"):
        load_image(Image.new("RGB", (0, 0)))


# --- EXIF orientation -------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [6, 8])
def test_jpeg_exif_orientation_is_applied(tmp_path, orientation):
    photo = skdata.astronaut()[:200, :320]  # 320 wide, 200 high
    path = write(tmp_path / f"o{orientation}.jpg", Image.fromarray(photo), "JPEG", quality=95, exif=exif_bytes(orientation))
    stored = Image.open(path)
    assert stored.getexif()[ORIENTATION] == orientation and stored.size == (320, 200)
    raw = np.asarray(stored.convert("RGB"))  # the stored pixels, not rotated
    img = load_image(path)
    assert_rgb(img, (200, 320))  # rotated: width and height swapped
    assert np.array_equal(arr(img), ORIENTED[orientation](raw))
    assert mad(img, ORIENTED[orientation](photo)) < 4
    assert img.getexif().get(ORIENTATION, 1) == 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_png_every_exif_orientation_is_applied_exactly(orientation, coffee):
    photo = coffee[:120, :200]
    data = encode(Image.fromarray(photo), "PNG", exif=exif_bytes(orientation))
    img = load_image(data)
    expected = ORIENTED[orientation](photo)
    assert_rgb(img, (expected.shape[1], expected.shape[0]))
    assert np.array_equal(arr(img), expected)


def test_webp_exif_orientation_is_applied(coffee):
    photo = coffee[:120, :200]
    data = encode(Image.fromarray(photo), "WEBP", lossless=True, exif=exif_bytes(6))
    img = load_image(data)
    assert_rgb(img, (120, 200))
    assert np.array_equal(arr(img), ORIENTED[6](photo))


def test_exif_orientation_with_draft_size(tmp_path, big_astronaut_jpeg):
    base = Image.open(io.BytesIO(big_astronaut_jpeg)).crop((0, 0, 2048, 1536))
    path = write(tmp_path / "big6.jpg", base, "JPEG", quality=90, exif=exif_bytes(6))
    full = load_image(path)
    assert_rgb(full, (1536, 2048))
    small = load_image(path, draft_size=256)
    w, h = small.size
    assert h > w and 256 <= w < 1536
    assert mad(small, full.resize(small.size, Image.BOX)) < 3


# --- modes from files ---------------------------------------------------------------------------


def test_grayscale_png_and_jpeg():
    camera = skdata.camera()
    png = load_image(encode(Image.fromarray(camera), "PNG"))
    assert_rgb(png, (512, 512))
    assert np.array_equal(arr(png)[:, :, 2], camera)
    jpg = load_image(encode(Image.fromarray(camera), "JPEG", quality=95))
    assert_rgb(jpg, (512, 512))
    a = arr(jpg)
    assert np.array_equal(a[:, :, 0], a[:, :, 1]) and mad(a[:, :, 0], camera) < 3


def test_palette_png_without_transparency(chelsea):
    pal = Image.fromarray(chelsea).quantize(64)
    assert pal.mode == "P"
    img = load_image(encode(pal, "PNG"))
    assert_rgb(img, (451, 300))
    assert np.array_equal(arr(img), arr(pal.convert("RGB")))
    assert mad(img, chelsea) < 12


def test_palette_png_with_transparency_is_white_where_transparent(chelsea):
    pal = Image.fromarray(chelsea).quantize(64)
    a = np.asarray(pal).copy()
    a[:50] = 0  # top rows use palette index 0, which is made transparent
    pal2 = Image.fromarray(a, "P")
    pal2.putpalette(pal.getpalette())
    data = encode(pal2, "PNG", transparency=0)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    img = arr(load_image(data))
    assert np.all(img[:50] == 255)
    opaque = np.asarray(pal2) != 0
    assert np.array_equal(img[opaque], arr(pal2.convert("RGB"))[opaque])


def test_gif_with_transparency_is_white_where_transparent(tmp_path):
    a = np.zeros((40, 60), np.uint8)
    a[:, 30:] = 1
    gif = Image.fromarray(a, "P")
    gif.putpalette([0, 0, 255] + [255, 0, 0] + [0, 0, 0] * 254)
    path = write(tmp_path / "t.gif", gif, "GIF", transparency=0)
    img = load_image(path)
    assert_rgb(img, (60, 40))
    out = arr(img)
    assert np.all(out[:, :30] == 255)
    assert np.all(out[:, 30:] == [255, 0, 0])


def test_rgba_png_is_composited_on_white(chelsea):
    alpha = np.full(chelsea.shape[:2], 255, np.uint8)
    alpha[:, :100] = 0
    data = encode(Image.fromarray(np.dstack([chelsea, alpha])), "PNG")
    img = arr(load_image(data))
    assert np.all(img[:, :100] == 255)
    assert np.array_equal(img[:, 100:], chelsea[:, 100:])


def test_rgba_webp_is_composited_on_white(chelsea):
    alpha = np.full(chelsea.shape[:2], 255, np.uint8)
    alpha[:, :100] = 0
    data = encode(Image.fromarray(np.dstack([chelsea, alpha])), "WEBP", lossless=True)
    img = arr(load_image(data))
    assert np.all(img[:, :100] == 255)
    assert np.array_equal(img[:, 100:], chelsea[:, 100:])


def test_la_png_is_composited_on_white():
    camera = skdata.camera()
    alpha = np.full(camera.shape, 255, np.uint8)
    alpha[256:] = 0
    data = encode(Image.fromarray(np.dstack([camera, alpha]), "LA"), "PNG")
    img = arr(load_image(data))
    assert_rgb(load_image(data), (512, 512))
    assert np.all(img[256:] == 255)
    assert np.array_equal(img[:256, :, 1], camera[:256])


def test_cmyk_jpeg(chelsea, tmp_path):
    path = write(tmp_path / "cmyk.jpg", Image.fromarray(chelsea).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(path).mode == "CMYK"
    img = load_image(path)
    assert_rgb(img, (451, 300))
    assert mad(img, chelsea) < 4
    white = load_image(encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"))
    assert np.all(arr(white) >= 250)


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    ramp = np.array([[0, 257, 257 * 100, 32768, 32896, 65280, 65535]], np.uint16)
    path = write(tmp_path / "ramp16.png", Image.fromarray(ramp), "PNG")
    assert Image.open(path).mode.startswith("I")
    img = load_image(path)
    assert_rgb(img, (7, 1))
    row = arr(img)[0, :, 0]
    assert row[0] == 0 and row[1] == 1 and row[2] == 100
    assert 127 <= row[3] <= 128 and row[4] == 128
    assert row[5] == 254 and row[6] == 255
    assert np.all(arr(img)[0, :, 0] == arr(img)[0, :, 2])


def test_16bit_grayscale_photo_png_and_tiff():
    camera = skdata.camera()
    wide = Image.fromarray(camera.astype(np.uint16) * 257)
    for fmt in ("PNG", "TIFF"):
        img = load_image(encode(wide, fmt))
        assert_rgb(img, (512, 512))
        assert np.abs(arr(img)[:, :, 0] - camera).max() <= 1, fmt


def test_dark_16bit_png_stays_dark():
    # every value is <= 255 out of 65535: almost black, must not be read as 8-bit
    dark = np.full((4, 4), 200, np.uint16)
    img = load_image(encode(Image.fromarray(dark), "PNG"))
    assert np.all(arr(img) <= 1)


def test_16bit_rgb_png_is_scaled():
    px = struct.pack(">HHH", 65535, 0x8080, 0) + struct.pack(">HHH", 0, 0, 65535)
    data = raw_png([px], 2, 1, bit_depth=16, color_type=2)
    img = load_image(data)
    assert_rgb(img, (2, 1))
    assert arr(img).tolist() == [[[255, 128, 0], [0, 0, 255]]]


def test_float_tiff_in_unit_range():
    f = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    img = load_image(encode(Image.fromarray(f, "F"), "TIFF"))
    assert_rgb(img, (8, 8))
    assert arr(img)[0, 0, 0] == 0 and arr(img)[-1, -1, 0] == 255


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF"])
def test_one_bit_images(fmt):
    a = np.zeros((30, 40), bool)
    a[:, 20:] = True
    img = load_image(encode(Image.fromarray(a).convert("1"), fmt))
    assert_rgb(img, (40, 30))
    out = arr(img)
    assert np.all(out[:, :20] == 0) and np.all(out[:, 20:] == 255)


@pytest.mark.parametrize("mode,key", [("RGB", (0, 255, 0)), ("L", 7)])
def test_color_key_transparency_is_composited_on_white(mode, key):
    im = Image.new(mode, (4, 4), key)
    im.paste((255, 0, 0) if mode == "RGB" else 90, (0, 0, 2, 4))
    data = encode(im, "PNG", transparency=key)
    out = arr(load_image(data))
    assert np.all(out[:, 2:] == 255)  # the key colour is transparent: white


# --- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,ext,kw,tol",
    [
        ("PNG", ".png", {}, 0),
        ("JPEG", ".jpg", {"quality": 92}, 4),
        ("WEBP", ".webp", {"quality": 90}, 5),
        ("WEBP", ".webp", {"lossless": True}, 0),
        ("BMP", ".bmp", {}, 0),
        ("GIF", ".gif", {}, 6),
        ("TIFF", ".tif", {}, 0),
        ("TIFF", ".tiff", {"compression": "tiff_lzw"}, 0),
        ("TIFF", ".tif", {"compression": "tiff_deflate"}, 0),
        ("TIFF", ".tif", {"compression": "jpeg"}, 5),
    ],
)
def test_allowed_formats_load(tmp_path, chelsea, fmt, ext, kw, tol):
    path = write(tmp_path / f"chelsea{ext}", Image.fromarray(chelsea), fmt, **kw)
    for source in (path, str(path), path.read_bytes()):
        img = load_image(source)
        assert_rgb(img, (451, 300))
        if tol == 0:
            assert np.array_equal(arr(img), chelsea)
        else:
            assert mad(img, chelsea) < tol


def test_format_is_taken_from_content_not_name(tmp_path, chelsea, chelsea_png, chelsea_jpeg):
    png_as_jpg = tmp_path / "really_a_png.jpg"
    png_as_jpg.write_bytes(chelsea_png)
    assert np.array_equal(arr(load_image(png_as_jpg)), chelsea)
    jpg_no_ext = tmp_path / "noextension"
    jpg_no_ext.write_bytes(chelsea_jpeg)
    assert_rgb(load_image(jpg_no_ext), (451, 300))


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 10), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:])
    img = load_image(path)
    assert_rgb(img, (20, 10))
    assert np.all(arr(img) == [255, 0, 0])


@pytest.mark.parametrize(
    "fmt,ext,mode",
    [
        ("ICO", ".ico", "RGB"),
        ("PCX", ".pcx", "RGB"),
        ("TGA", ".tga", "RGB"),
        ("PPM", ".ppm", "RGB"),
        ("SGI", ".sgi", "RGB"),
        ("EPS", ".eps", "RGB"),
        ("QOI", ".qoi", "RGB"),
        ("DDS", ".dds", "RGB"),
        ("IM", ".im", "RGB"),
        ("XBM", ".xbm", "1"),
        ("JPEG2000", ".jp2", "RGB"),
        ("PDF", ".pdf", "RGB"),
        ("PALM", ".palm", "1"),
    ],
)
def test_formats_not_on_the_allow_list_raise_format_error(tmp_path, chelsea, fmt, ext, mode):
    img = Image.fromarray(chelsea[:64, :64]).convert(mode)
    try:
        path = write(tmp_path / f"x{ext}", img, fmt)
    except (KeyError, OSError, ValueError) as exc:  # this Pillow cannot write it
        pytest.skip(f"Pillow cannot write {fmt}: {exc}")
    with pytest.raises(ImageFormatError) as err:
        load_image(path)
    assert str(path) in str(err.value)
    with pytest.raises(ImageFormatError):
        load_image(path.read_bytes())
    renamed = tmp_path / "disguised.png"  # a disallowed format with an allowed name
    renamed.write_bytes(path.read_bytes())
    with pytest.raises(ImageFormatError):
        load_image(renamed)


def test_disallowed_format_message_names_the_format(tmp_path, chelsea):
    path = write(tmp_path / "x.pcx", Image.fromarray(chelsea), "PCX")
    with pytest.raises(ImageFormatError, match="PCX"):
        load_image(path)


# --- hostile and broken input -----------------------------------------------------------------


@pytest.fixture(scope="module")
def one_bit_bomb() -> bytes:
    """A valid 20000 x 20000 one-bit PNG (400 million pixels) in a few tens of kilobytes."""
    w = h = 20000
    row = b"\0" + b"\0" * ((w + 7) // 8)
    co = zlib.compressobj(9)
    idat = co.compress(row * h) + co.flush()
    return crafted_png(w, h, idat=idat)


def test_decompression_bomb_file_is_refused_quickly(tmp_path, one_bit_bomb):
    assert len(one_bit_bomb) < 200_000
    path = tmp_path / "bomb.png"
    path.write_bytes(one_bit_bomb)
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as err:
        load_image(path)
    assert time.perf_counter() - start < 2
    assert str(path) in str(err.value) and "over the 64000000-pixel limit" in str(err.value)  # the limit that applies
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError):
        load_image(one_bit_bomb)
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("size", [(9000, 9000), (8001, 8000), (65500, 65500), (1, 2**31 - 1)])
def test_crafted_png_header_over_the_pixel_limit(size):
    data = crafted_png(*size, bit_depth=8, color_type=2)
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError):
        load_image(data)
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize("size", [(9000, 9000), (65500, 65500)])
def test_crafted_jpeg_header_over_the_pixel_limit(chelsea_jpeg, size):
    data = jpeg_with_size(chelsea_jpeg, *size)
    if Image.MAX_IMAGE_PIXELS is None or size[0] * size[1] <= Image.MAX_IMAGE_PIXELS:
        assert Image.open(io.BytesIO(data)).size == size  # the header really claims it
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError):
        load_image(data)
    assert time.perf_counter() - start < 2


def test_custom_max_pixels_is_honoured_for_every_input_kind(tmp_path, chelsea, chelsea_jpeg):
    n = 451 * 300
    tight = ImagePolicy(max_pixels=n - 1)
    exact = ImagePolicy(max_pixels=n)
    path = tmp_path / "c.jpg"
    path.write_bytes(chelsea_jpeg)
    for source in (path, str(path), chelsea_jpeg, Image.fromarray(chelsea), chelsea):
        with pytest.raises(ImageTooLargeError, match="pixel"):
            load_image(source, policy=tight)
        assert_rgb(load_image(source, policy=exact), (451, 300))


def test_custom_max_pixels_below_default_stops_a_moderate_image(one_bit_bomb):
    data = crafted_png(3000, 3000)  # 9 megapixels: fine by default
    with pytest.raises(ImageFormatError):  # passes the pixel check, then its data is short
        load_image(data)
    with pytest.raises(ImageTooLargeError, match="9000000"):
        load_image(data, policy=ImagePolicy(max_pixels=1_000_000))


def test_custom_max_pixels_above_pillow_limit_is_honoured():
    data = crafted_png(9500, 9500)  # 90.25 megapixels, data short: allowed -> corrupt, not too large
    with pytest.raises(ImageFormatError):
        load_image(data, policy=ImagePolicy(max_pixels=200_000_000))


def test_truncated_jpeg_raises_format_error(tmp_path, chelsea_jpeg):
    for cut in (len(chelsea_jpeg) // 2, 600, 4):
        part = chelsea_jpeg[:cut]
        with pytest.raises(ImageFormatError):
            load_image(part)
        path = tmp_path / f"cut{cut}.jpg"
        path.write_bytes(part)
        with pytest.raises(ImageFormatError) as err:
            load_image(path)
        assert str(path) in str(err.value)


def test_truncated_real_fashion_jpeg_raises_format_error():
    raw = FASHION_SAMPLE[1].read_bytes()
    with pytest.raises(ImageFormatError, match="truncated|corrupt|not a recognised"):
        load_image(raw[: len(raw) * 2 // 3])


def test_truncated_png_raises_format_error(tmp_path, chelsea_png):
    for cut in (len(chelsea_png) // 2, 40, 8):
        part = chelsea_png[:cut]
        path = tmp_path / f"cut{cut}.png"
        path.write_bytes(part)
        with pytest.raises(ImageFormatError):
            load_image(path)
        with pytest.raises(ImageFormatError):
            load_image(part)


def test_png_with_bad_crc_raises_format_error(chelsea_png):
    broken = bytearray(chelsea_png)
    idat = broken.index(b"IDAT")
    broken[idat + 20] ^= 0xFF
    with pytest.raises(ImageFormatError):
        load_image(bytes(broken))


@pytest.mark.parametrize(
    "content",
    [
        b"",
        np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        b"hello, this is a text file and not a picture\n" * 20,
        b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'></svg>",
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff",
        b"GIF89a",
        b"BM",
    ],
    ids=["empty", "random", "text", "svg", "png-signature-only", "jpeg-soi-only", "gif-magic-only", "bmp-magic-only"],
)
def test_non_images_raise_format_error(tmp_path, content):
    path = tmp_path / "photo.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageFormatError) as err:
        load_image(path)
    assert str(path) in str(err.value)
    with pytest.raises(ImageFormatError) as err:
        load_image(content)
    assert f"<{len(content)} bytes>" in str(err.value)
    with pytest.raises(ImageFormatError):
        load_image(bytearray(content))


def test_missing_path_raises_not_found(tmp_path):
    missing = tmp_path / "nope" / "missing.jpg"
    for source in (missing, str(missing)):
        with pytest.raises(ImageNotFoundError) as err:
            load_image(source)
        assert str(missing) in str(err.value)
        assert err.value.subject == str(missing)
        assert "does not exist" in str(err.value)


def test_empty_path_is_named_as_such():
    with pytest.raises(ImageNotFoundError, match="an empty path was given"):
        load_image("")


def test_directory_raises_not_found(tmp_path):
    with pytest.raises(ImageNotFoundError, match="directory") as err:
        load_image(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ImageNotFoundError):
        load_image(str(FASHION_IMAGES))


def test_special_files_are_not_read():
    with pytest.raises(ImageError):
        load_image("/dev/null")


def test_overlong_path_raises_image_error():
    with pytest.raises(ImageNotFoundError):
        load_image("x" * 5000 + ".jpg")


def test_path_with_nul_raises_not_found():
    with pytest.raises(ImageNotFoundError):
        load_image("bad\0name.jpg")


def test_max_bytes_is_honoured_for_files_and_bytes(tmp_path, chelsea_jpeg):
    path = tmp_path / "c.jpg"
    path.write_bytes(chelsea_jpeg)
    n = len(chelsea_jpeg)
    small = ImagePolicy(max_bytes=n - 1)
    for source in (path, str(path), chelsea_jpeg, bytearray(chelsea_jpeg), memoryview(chelsea_jpeg)):
        with pytest.raises(ImageTooLargeError, match=str(n - 1)):
            load_image(source, policy=small)
        assert_rgb(load_image(source, policy=ImagePolicy(max_bytes=n)), (451, 300))


def _collect_errors(tmp_path, chelsea_jpeg) -> list[tuple[ImageError, str]]:
    path = tmp_path / "c.jpg"
    path.write_bytes(chelsea_jpeg)
    text = tmp_path / "t.jpg"
    text.write_text("not an image")
    cases = [
        (lambda: load_image(tmp_path / "missing.jpg"), str(tmp_path / "missing.jpg")),
        (lambda: load_image(str(tmp_path)), str(tmp_path)),
        (lambda: load_image(text), str(text)),
        (lambda: load_image(path, policy=ImagePolicy(max_bytes=10)), str(path)),
        (lambda: load_image(path, policy=ImagePolicy(max_pixels=10)), str(path)),
        (lambda: load_image(b"junk"), "<4 bytes>"),
        (lambda: load_image(np.zeros((3, 3, 7), np.uint8)), "<array 3x3x7 uint8>"),
        (lambda: load_image("http://127.0.0.1:9/x.jpg"), "http://127.0.0.1:9/x.jpg"),
        (lambda: fetch_url("ftp://127.0.0.1/x.jpg"), "ftp://127.0.0.1/x.jpg"),
        (lambda: fetch_url("http://127.0.0.1:9/x.jpg", ImagePolicy(allow_urls=False)), "http://127.0.0.1:9/x.jpg"),
    ]
    out = []
    for call, name in cases:
        with pytest.raises(ImageError) as err:
            call()
        out.append((err.value, name))
    return out


def test_every_error_is_an_image_error_naming_its_input(tmp_path, chelsea_jpeg):
    kinds = set()
    for exc, name in _collect_errors(tmp_path, chelsea_jpeg):
        assert isinstance(exc, ImageError) and isinstance(exc, LookalikeError)
        assert name in str(exc), (name, str(exc))
        assert exc.subject == name
        assert "\n" not in str(exc)
        kinds.add(type(exc))
    assert kinds == {ImageNotFoundError, ImageFormatError, ImageTooLargeError, ImageFetchError}


def test_error_classes_hierarchy():
    for cls in (ImageNotFoundError, ImageFormatError, ImageTooLargeError, ImageFetchError):
        assert issubclass(cls, ImageError) and issubclass(cls, LookalikeError)
    assert issubclass(ImageError, LookalikeError) and issubclass(LookalikeError, Exception)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_malformed_exif_gives_image_or_image_error(fmt, chelsea):
    img = Image.fromarray(chelsea)
    bad_exif = b"MM\x00*"  # a TIFF header with no IFD offset
    if fmt == "JPEG":  # JFIF with a density, so Pillow does not parse the EXIF while opening
        data = with_app1(encode(img, "JPEG", dpi=(300, 300)), b"Exif\x00\x00" + bad_exif, at=20)
    else:
        data = encode(img, fmt, exif=bad_exif, **({"lossless": True} if fmt == "WEBP" else {}))
    try:
        out = load_image(data)
    except ImageError:
        return
    assert_rgb(out, (451, 300))


def test_malformed_exif_that_pillow_tolerates_still_loads(chelsea):
    img = Image.fromarray(chelsea)
    data = with_app1(encode(img, "JPEG"), b"Exif\x00\x00II*\x00\xff\xff\xff\x7f")
    assert_rgb(load_image(data), (451, 300))


# --- draft_size -------------------------------------------------------------------------------


def test_draft_size_decodes_a_large_jpeg_smaller(tmp_path, big_astronaut_jpeg):
    path = tmp_path / "big.jpg"
    path.write_bytes(big_astronaut_jpeg)
    full = load_image(path)
    assert_rgb(full, (2048, 2048))
    small = load_image(path, draft_size=256)
    assert small.mode == "RGB"
    assert 256 <= min(small.size) < 2048
    assert small.width == small.height
    reference = full.resize(small.size, Image.BOX)
    assert mad(small, reference) < 3
    assert mad(small, reference.resize(small.size)) < 3


@pytest.mark.parametrize("draft", [32, 64, 128, 256, 600, 1000, 1024, 1500, 4096])
def test_draft_size_never_goes_below_the_request(big_astronaut_jpeg, draft):
    img = load_image(big_astronaut_jpeg, draft_size=draft)
    assert img.mode == "RGB"
    assert min(img.size) >= min(draft, 2048)
    assert img.width == img.height and img.width <= 2048


def test_draft_size_keeps_aspect_ratio(big_astronaut_jpeg):
    wide = Image.open(io.BytesIO(big_astronaut_jpeg)).crop((0, 0, 2048, 1024))
    img = load_image(encode(wide, "JPEG"), draft_size=200)
    assert 200 <= img.height < 1024
    assert img.width == 2 * img.height


def test_draft_size_on_grayscale_and_cmyk_jpeg(big_astronaut_jpeg):
    base = Image.open(io.BytesIO(big_astronaut_jpeg))
    for mode in ("L", "CMYK"):
        data = encode(base.convert(mode), "JPEG", quality=90)
        full = load_image(data)
        small = load_image(data, draft_size=256)
        assert small.mode == "RGB" and 256 <= min(small.size) < 2048
        assert mad(small, full.resize(small.size, Image.BOX)) < 4, mode


def test_draft_size_does_not_change_other_formats(coffee):
    png = encode(Image.fromarray(coffee), "PNG")
    img = load_image(png, draft_size=50)
    assert_rgb(img, (600, 400))
    assert np.array_equal(arr(img), coffee)


def test_draft_size_on_real_small_jpeg_is_full_size():
    path = FASHION_SAMPLE[2]
    assert np.array_equal(arr(load_image(path, draft_size=224)), arr(load_image(path)))


# --- URLs: a real server on 127.0.0.1 ---------------------------------------------------------

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """Fail any test whose code tries to connect to anything but loopback; ignore proxy settings."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        host = address[0]
        if host not in LOOPBACK_HOSTS:
            try:
                ok = ipaddress.ip_address(host).is_loopback
            except ValueError:
                ok = False
            if not ok:
                raise AssertionError(f"test tried to connect to non-loopback {address!r}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, format, *args):  # quiet
        pass

    def do_GET(self):
        self.requests.append(self.path)
        if self.path == "/redirect-photo":
            return self._redirect("/photo.jpg")
        if self.path == "/redirect-file":
            return self._redirect("file:///etc/passwd")
        if self.path == "/redirect-ftp":
            return self._redirect("ftp://127.0.0.1/photo.jpg")
        if self.path == "/redirect-loop":
            return self._redirect("/redirect-loop")
        if self.path == "/status-500":
            self.send_error(500, "Broken")
            return None
        return super().do_GET()

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def server(tmp_path_factory, chelsea_jpeg, big_astronaut_jpeg):
    root = tmp_path_factory.mktemp("www")
    (root / "photo.jpg").write_bytes(chelsea_jpeg)
    (root / "big.jpg").write_bytes(big_astronaut_jpeg)
    (root / "page.html").write_text("<html><body>not an image</body></html>")
    (root / "fashion.jpg").write_bytes(FASHION_SAMPLE[3].read_bytes())
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})

    def factory(*args, **kwargs):
        return handler(*args, directory=str(root), **kwargs)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), factory)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"base": f"http://127.0.0.1:{httpd.server_address[1]}", "root": root, "requests": requests}
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@contextlib.contextmanager
def raw_server(response: bytes | None):
    """A one-connection TCP server on 127.0.0.1 that answers `response` (None: never answers)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    sock.settimeout(5)
    done = threading.Event()

    def serve():
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(65536)
                if response is None:
                    done.wait(5)
                else:
                    conn.sendall(response)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        done.set()
        thread.join(6)
        sock.close()


def test_loopback_url_is_refused_by_default(server):
    url = server["base"] + "/photo.jpg"
    before = len(server["requests"])
    for call in (lambda: fetch_url(url), lambda: load_image(url)):
        with pytest.raises(ImageFetchError, match="private or local") as err:
            call()
        assert url in str(err.value)
        assert "allow_private_urls" in str(err.value)
    assert len(server["requests"]) == before  # nothing was sent


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "[::1]",
        "127.1.2.3",
        "0.0.0.0",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "[::ffff:127.0.0.1]",
        "[fe80::1]",
        "[fc00::1]",
        "224.0.0.1",
        "240.0.0.1",
        "user:pw@127.0.0.1",
    ],
)
def test_private_and_reserved_addresses_are_refused(host):
    url = f"http://{host}:9/x.jpg"
    with pytest.raises(ImageFetchError) as err:
        fetch_url(url)
    assert "private or local" in str(err.value) or "resolved" in str(err.value)
    with pytest.raises(ImageFetchError):
        load_image(url)
    with pytest.raises(ImageFetchError):
        fetch_url(url.replace("http://", "https://"))


def test_allowed_private_url_fetches_the_real_bytes(server, chelsea_jpeg, chelsea):
    url = server["base"] + "/photo.jpg"
    assert fetch_url(url, PRIVATE) == chelsea_jpeg
    img = load_image(url, policy=PRIVATE)
    assert_rgb(img, (451, 300))
    assert np.array_equal(arr(img), arr(load_image(chelsea_jpeg)))
    assert mad(img, chelsea) < 4
    assert "/photo.jpg" in server["requests"]


def test_allowed_private_url_with_localhost_name(server):
    url = server["base"].replace("127.0.0.1", "localhost") + "/fashion.jpg"
    img = load_image(url, policy=PRIVATE)
    assert np.array_equal(arr(img), arr(load_image(FASHION_SAMPLE[3])))


def test_url_with_draft_size(server):
    img = load_image(server["base"] + "/big.jpg", policy=PRIVATE, draft_size=256)
    assert img.mode == "RGB" and 256 <= min(img.size) < 2048


def test_url_404_and_500_raise_fetch_error(server):
    for path, code in (("/missing.jpg", "404"), ("/status-500", "500")):
        url = server["base"] + path
        with pytest.raises(ImageFetchError, match=code) as err:
            fetch_url(url, PRIVATE)
        assert url in str(err.value)
        with pytest.raises(ImageFetchError):
            load_image(url, policy=PRIVATE)


def test_url_that_is_not_an_image_raises_format_error(server):
    url = server["base"] + "/page.html"
    with pytest.raises(ImageFormatError) as err:
        load_image(url, policy=PRIVATE)
    assert url in str(err.value)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/x.jpg",
        "gopher://127.0.0.1/",
        "data:image/png;base64,AAAA",
        "javascript:alert(1)",
        "http:///x.jpg",
        "//127.0.0.1/x.jpg",
        "x.jpg",
    ],
)
def test_non_http_urls_are_refused_by_fetch_url(url):
    for policy in (ImagePolicy(), PRIVATE):
        with pytest.raises(ImageFetchError, match="only http"):
            fetch_url(url, policy)


def test_file_url_through_load_image_does_not_read_the_file():
    with pytest.raises(ImageError):
        load_image("file:///etc/passwd", policy=PRIVATE)


def test_redirect_within_the_allowed_server_is_followed(server, chelsea_jpeg):
    assert fetch_url(server["base"] + "/redirect-photo", PRIVATE) == chelsea_jpeg


@pytest.mark.parametrize("path", ["/redirect-file", "/redirect-ftp", "/redirect-loop"])
def test_bad_redirects_raise_fetch_error(server, path):
    with pytest.raises(ImageFetchError):
        fetch_url(server["base"] + path, PRIVATE)
    with pytest.raises(ImageFetchError):
        load_image(server["base"] + path, policy=PRIVATE)


def test_url_body_over_max_bytes_raises_too_large(server, chelsea_jpeg):
    url = server["base"] + "/photo.jpg"
    n = len(chelsea_jpeg)
    tight = ImagePolicy(allow_private_urls=True, max_bytes=n - 1)
    with pytest.raises(ImageTooLargeError) as err:
        fetch_url(url, tight)
    assert url in str(err.value)
    with pytest.raises(ImageTooLargeError):
        load_image(url, policy=tight)
    with pytest.raises(ImageTooLargeError):
        load_image(server["base"] + "/big.jpg", policy=ImagePolicy(allow_private_urls=True, max_bytes=1000))
    assert fetch_url(url, ImagePolicy(allow_private_urls=True, max_bytes=n)) == chelsea_jpeg


def test_allow_urls_false_refuses_without_a_request(server):
    url = server["base"] + "/photo.jpg"
    policy = ImagePolicy(allow_urls=False, allow_private_urls=True)
    before = len(server["requests"])
    for call in (lambda: fetch_url(url, policy), lambda: load_image(url, policy=policy)):
        with pytest.raises(ImageFetchError, match="turned off"):
            call()
    assert len(server["requests"]) == before


def test_connection_refused_raises_fetch_error():
    with socket.socket() as s:  # find a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ImageFetchError, match="cannot be fetched"):
        fetch_url(f"http://127.0.0.1:{port}/x.jpg", PRIVATE)


def test_silent_server_times_out():
    with raw_server(None) as base:
        start = time.perf_counter()
        with pytest.raises(ImageFetchError):
            fetch_url(base + "/x.jpg", ImagePolicy(allow_private_urls=True, url_timeout=0.3))
        assert time.perf_counter() - start < 3


def test_short_body_against_content_length_is_an_image_error(chelsea_jpeg):
    head = f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {len(chelsea_jpeg)}\r\n\r\n".encode()
    with raw_server(head + chelsea_jpeg[: len(chelsea_jpeg) // 2]) as base:
        with pytest.raises(ImageError):
            load_image(base + "/x.jpg", policy=PRIVATE)


@pytest.mark.parametrize(
    "response",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-Junk: y\r\n" * 150 + b"\r\n",
    ],
    ids=["bad-status-line", "bad-chunk", "too-many-headers"],
)
def test_malformed_http_responses_raise_fetch_error(response):
    with raw_server(response) as base:
        with pytest.raises(ImageFetchError):
            fetch_url(base + "/x.jpg", PRIVATE)
