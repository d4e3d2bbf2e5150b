"""Load any image input (path, URL, bytes, PIL image, array) as an RGB PIL image, safely.

Safety rules, all in this one place:
- formats on an allow-list only (checked from the file's content, not its name);
- a pixel-count limit checked from the header before decoding (decompression bombs are an
  error, not a hang or an out-of-memory);
- URLs: http(s) only, a timeout, a byte cap, and private, loopback, link-local and reserved
  addresses refused unless explicitly allowed (redirects are checked the same way);
- EXIF orientation applied; grayscale, palette, RGBA, CMYK and 16-bit inputs made RGB
  (transparency is composited on white, 16-bit values are scaled, not clipped).
"""

from __future__ import annotations

import http.client
import io
import math
import ipaddress
import os
import socket
import struct
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import (
    ImageCorruptError,
    ImageError,
    ImageFetchError,
    ImageFormatError,
    ImageNotFoundError,
    ImageTooLargeError,
)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class ImagePolicy:
    """Limits applied to every image that is loaded."""

    max_pixels: int = 64_000_000  # e.g. 8000 x 8000
    max_bytes: int = 50 * 1024 * 1024
    url_timeout: float = 10.0
    allow_urls: bool = True
    allow_private_urls: bool = False


DEFAULT_POLICY = ImagePolicy()

# Our own pixel limit (ImagePolicy.max_pixels) is checked from the header before any decoding.
# Pillow's global limit stays on too: its plugins check it themselves before allocating inside
# Image.open (e.g. a GIF frame's disposal area, which can claim 65535x65535 pixels in a 1 KB file),
# before our check can run. It is raised to the largest policy in use (see _decode), never lowered.
Image.MAX_IMAGE_PIXELS = DEFAULT_POLICY.max_pixels
ImageFile.LOAD_TRUNCATED_IMAGES = False


# Pillow decodes RLE-compressed BMP in pure Python, one escape code per loop turn: a tiny file that
# claims millions of pixels (inside the pixel limit) takes seconds (found by benchmarks/fuzz.py).
# Such files are refused above this size; real RLE bitmaps are small.
RLE_BMP_MAX_PIXELS = 4_000_000


def describe(source: object) -> str:
    """A short human name for an image input, for messages and query labels."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.width}x{source.height} {source.mode}>"
    if isinstance(source, np.ndarray):
        return f"<array {'x'.join(map(str, source.shape))} {source.dtype}>"
    return f"<{type(source).__name__}>"


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def load_image(
    source: ImageSource,
    *,
    policy: ImagePolicy = DEFAULT_POLICY,
    draft_size: int | None = None,
    name: str | None = None,
) -> Image.Image:
    """Return ``source`` as an RGB PIL image, or raise an ImageError naming it.

    ``draft_size``: the smallest short side the caller needs; a JPEG much larger than that is
    decoded at a reduced scale (libjpeg DCT scaling), which is several times faster.
    ``name``: what error messages call the input (e.g. an upload's file name); default: describe(source).
    """
    name = name or describe(source)
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, name, policy)
        return to_rgb(source, name)
    if isinstance(source, np.ndarray):
        return _from_array(source, name, policy)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > policy.max_bytes:
            raise ImageTooLargeError(f"{name}: {len(data)} bytes is over the {policy.max_bytes}-byte limit", subject=name)
        return _decode(io.BytesIO(data), name, policy, draft_size)
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, str) and is_url(text):
            data = fetch_url(text, policy)
            return _decode(io.BytesIO(data), name, policy, draft_size)
        if not text:  # Path("") is the current folder: say what was really given
            raise ImageNotFoundError("an empty path was given where an image was expected", subject=text)
        path = Path(text)
        if not os.path.isfile(path):
            what = "is a directory, not an image file" if os.path.isdir(path) else "does not exist or is not a file"
            raise ImageNotFoundError(f"{name}: {what}", subject=name)
        try:
            size = path.stat().st_size
            if size > policy.max_bytes:
                raise ImageTooLargeError(f"{name}: {size} bytes is over the {policy.max_bytes}-byte limit", subject=name)
            with open(path, "rb") as f:
                return _decode(f, name, policy, draft_size)
        except OSError as exc:
            raise ImageNotFoundError(f"{name}: cannot be read ({exc.strerror or exc})", subject=name) from exc
    raise ImageFormatError(f"{name}: not an image input (expected a path, URL, bytes, PIL image or array)", subject=name)


def _check_pixels(width: int, height: int, name: str, policy: ImagePolicy) -> None:
    if width < 1 or height < 1:
        raise ImageCorruptError(f"{name}: empty image ({width}x{height})", subject=name)
    if width * height > policy.max_pixels:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} is {width * height} pixels, over the {policy.max_pixels}-pixel limit",
            subject=name,
        )


def _decode(fp, name: str, policy: ImagePolicy, draft_size: int | None) -> Image.Image:
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < policy.max_pixels:
        Image.MAX_IMAGE_PIXELS = policy.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            if img.format not in ALLOWED_FORMATS:
                raise ImageFormatError(f"{name}: format {img.format} is not allowed", subject=name)
            _check_pixels(img.width, img.height, name, policy)
            if img.format == "BMP" and img.info.get("compression") in (1, 2) and img.width * img.height > RLE_BMP_MAX_PIXELS:
                raise ImageTooLargeError(
                    f"{name}: run-length-compressed BMP of {img.width}x{img.height} is over the "
                    f"{RLE_BMP_MAX_PIXELS}-pixel limit for that encoding", subject=name)
            if draft_size and img.format == "JPEG":
                short = min(img.size)
                if short >= 2 * draft_size:
                    scale = short / draft_size
                    img.draft("RGB", (math.ceil(img.width / scale), math.ceil(img.height / scale)))
            # Pillow gives a decoder 64 KB more per call and copies what it has not used yet each
            # time, so a row wider than that costs time quadratic in the width: a 214-byte animated
            # WebP of 16,000,000 x 4 pixels took 70 s (found by benchmarks/fuzz.py). Whole rows: linear.
            img.decodermaxblock = max(img.decodermaxblock, 16 * img.width)
            img.load()
            return to_rgb(_apply_orientation(img), name)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow refuses at open, before our own check, and names its own threshold (twice its
        # limit for the error): the limit that applies is the policy's, which it is raised to
        raise ImageTooLargeError(f"{name}: too many pixels, over the {policy.max_pixels}-pixel limit", subject=name) from exc
    except UnidentifiedImageError as exc:
        raise ImageFormatError(f"{name}: not a recognised image", subject=name) from exc
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise ImageCorruptError(f"{name}: corrupt or truncated image ({exc})", subject=name) from exc
    # Pillow's plugins and codecs raise these too on damaged data (found by benchmarks/fuzz.py): e.g.
    # RuntimeError from the AVIF decoder, NotImplementedError from DDS, TypeError or OverflowError
    # from a TIFF whose strip offsets have the wrong type or size.
    except (RuntimeError, TypeError, OverflowError) as exc:
        raise ImageCorruptError(f"{name}: corrupt or truncated image ({exc})", subject=name) from exc


def _apply_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip by the EXIF orientation tag; a malformed EXIF block is ignored, not fatal."""
    try:
        return ImageOps.exif_transpose(img)
    except (struct.error, SyntaxError, ValueError, TypeError, KeyError, IndexError, OSError):
        return img


def to_rgb(img: Image.Image, name: str = "<image>") -> Image.Image:
    """Convert any PIL mode to RGB: alpha on white, CMYK by Pillow, 16-bit scaled to 8-bit."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # float32, in place: ~6 bytes a pixel, not ~24 (64 megapixels: 0.4 GB, not 1.5 GB, and 0.8 s, not 5.5 s)
        arr = np.array(img, dtype=np.float32)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        arr /= top
        arr *= 255.0
        arr += 0.5
        np.fmin(np.fmax(arr, 0, out=arr), 255, out=arr)  # fmax/fmin also turn NaN (a float TIFF) into 0
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    try:
        if mode == "La":
            img, mode = img.convert("LA"), "LA"
        if "transparency" in img.info and mode in ("P", "L", "RGB", "1"):  # palette or colour-key
            img, mode = img.convert("RGBA"), "RGBA"
        if mode in ("RGBA", "LA", "PA", "RGBa"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageFormatError(f"{name}: image mode {mode} cannot be converted to RGB", subject=name) from exc


def _from_array(arr: np.ndarray, name: str, policy: ImagePolicy) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageFormatError(f"{name}: an image array must be HxW, HxWx3 or HxWx4", subject=name)
    _check_pixels(arr.shape[1], arr.shape[0], name, policy)
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
            raise ImageFormatError(f"{name}: array holds non-numeric or non-finite values", subject=name)
        if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        elif arr.dtype == np.uint16:
            arr = arr / 257.0
        arr = np.clip(arr + 0.5, 0, 255).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(arr))
    return to_rgb(img, name)


# --- URLs ---------------------------------------------------------------------------------


def _check_host(url: str, policy: ImagePolicy) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImageFetchError(f"{url}: only http(s) URLs can be fetched", subject=url)
    if policy.allow_private_urls:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except socket.gaierror as exc:
        raise ImageFetchError(f"{url}: host {parts.hostname} cannot be resolved", subject=url) from exc
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if not addr.is_global or addr.is_multicast:
            raise ImageFetchError(
                f"{url}: refusing to fetch from private or local address {addr} "
                "(allow_private_urls=True allows it)",
                subject=url,
            )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: ImagePolicy):
        self.policy = policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _check_host(newurl, self.policy)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(url: str, policy: ImagePolicy = DEFAULT_POLICY) -> bytes:
    """Fetch an image URL under the policy's limits; raise ImageFetchError otherwise."""
    if not policy.allow_urls:
        raise ImageFetchError(f"{url}: fetching URLs is turned off", subject=url)
    _check_host(url, policy)
    opener = urllib.request.build_opener(_CheckedRedirects(policy))
    request = urllib.request.Request(url, headers={"User-Agent": "lookalike"})
    try:
        with opener.open(request, timeout=policy.url_timeout) as response:
            data = response.read(policy.max_bytes + 1)
    except ImageError:
        raise
    except urllib.error.HTTPError as exc:
        exc.close()
        raise ImageFetchError(f"{url}: server answered {exc.code} {exc.reason}", subject=url) from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImageFetchError(f"{url}: cannot be fetched ({reason})", subject=url) from exc
    if len(data) > policy.max_bytes:
        raise ImageTooLargeError(f"{url}: more than the {policy.max_bytes}-byte limit", subject=url)
    return data
