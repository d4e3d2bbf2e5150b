"""Synthetic camera photos: a catalog picture pasted into a real background photo, as a phone sees it.

``camera_photo`` draws, in this order, from one ``numpy.random.Generator``: the background (one of
``backgrounds``, scaled to cover FRAME_W x FRAME_H, aspect kept, then a random crop); the
item's share of the frame, ``U(0.10, 0.60)``; perspective (each corner moved by
``U(-0.15, 0.15)`` of the item's width and height); rotation ``U(-30, 30)`` degrees; the position
(the item kept inside the frame where it fits); glare (a white radial gradient, centre uniform,
radius ``U(0.15, 0.5)`` x FRAME_W, strength ``U(0, 180)``); Gaussian blur ``sigma U(0, 1.5)``;
contrast ``U(0.75, 1.25)``, brightness ``U(-30, 30)`` and a gain ``U(0.88, 1.12)`` per channel;
and, when ``turn``, 1 to 3 quarter turns of the whole frame. ``benchmarks/camera.py`` builds its
camera-sim protocol with it, and ``lookalike finetune --backgrounds`` its synthetic training views.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

FRAME_W, FRAME_H = 640, 480
BACKGROUND_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def backgrounds_in(folder: str | Path) -> list[Path]:
    """The background photos of a folder, sorted by name (what ``camera_photo`` draws from)."""
    from .errors import CatalogError

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise CatalogError(f"{root}: not a folder of background photos", subject=str(root))
    found = sorted(p for p in root.iterdir() if p.suffix.lower() in BACKGROUND_SUFFIXES and p.is_file())
    if not found:
        raise CatalogError(f"{root}: holds no background photos ({', '.join(BACKGROUND_SUFFIXES)})", subject=str(root))
    from PIL import Image, UnidentifiedImageError

    for path in found:  # the headers only: a file that is no image is named now, not deep in training
        try:
            Image.open(path).close()  # opening reads the header: enough to know it is a picture
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise CatalogError(f"{path}: not a readable background photo ({type(exc).__name__}); remove it from "
                               "the folder", subject=str(path)) from None
    return found


def cover_crop(background, rng: np.random.Generator) -> np.ndarray:
    """Scale a PIL image so it covers FRAME_W x FRAME_H (aspect kept), then a random crop of that size."""
    from PIL import Image

    w, h = background.size
    scale = max(FRAME_W / w, FRAME_H / h)
    size = (max(FRAME_W, round(w * scale)), max(FRAME_H, round(h * scale)))
    big = np.asarray(background.convert("RGB").resize(size, Image.BICUBIC))
    x = int(rng.integers(0, size[0] - FRAME_W + 1))
    y = int(rng.integers(0, size[1] - FRAME_H + 1))
    return big[y:y + FRAME_H, x:x + FRAME_W].astype(np.float32)


def quad_area(quad: np.ndarray) -> float:
    x, y = quad[:, 0], quad[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def camera_photo(item: np.ndarray, backgrounds: Sequence[Path], turn: bool, rng: np.random.Generator) -> tuple:
    """One synthetic camera photo of the picture ``item`` (RGB uint8 [h, w, 3]): the photo (RGB
    uint8 [FRAME_H, FRAME_W, 3], or turned) and the parameters drawn for it."""
    import cv2
    from PIL import Image

    # background
    b = int(rng.integers(len(backgrounds)))
    with Image.open(backgrounds[b]) as im:
        frame = cover_crop(im, rng)
    ih, iw = item.shape[:2]

    # size, perspective, rotation, position
    area = float(rng.uniform(0.10, 0.60)) * FRAME_W * FRAME_H
    s = np.sqrt(area / (iw * ih))
    pw, ph = iw * s, ih * s
    quad = np.array([[0, 0], [pw, 0], [pw, ph], [0, ph]], dtype=np.float64)
    quad += rng.uniform(-0.15, 0.15, size=(4, 2)) * np.array([pw, ph])
    angle = float(rng.uniform(-30, 30))
    quad -= quad.mean(axis=0)
    a = np.deg2rad(angle)
    quad = quad @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    quad *= np.sqrt(area / quad_area(quad))
    lo, hi = quad.min(axis=0), quad.max(axis=0)
    centre = []
    for axis, size in ((0, FRAME_W), (1, FRAME_H)):
        low, high = -lo[axis], size - hi[axis]
        u = float(rng.uniform())  # always drawn, so every photo draws the same count
        centre.append(low + u * (high - low) if high > low else size / 2 - (lo[axis] + hi[axis]) / 2)
    quad += np.array(centre)

    # warp and blend
    src = np.array([[0, 0], [iw, 0], [iw, ih], [0, ih]], dtype=np.float32)
    homography = cv2.getPerspectiveTransform(src, quad.astype(np.float32))
    warped = cv2.warpPerspective(item, homography, (FRAME_W, FRAME_H), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0).astype(np.float32)
    mask = cv2.warpPerspective(np.full((ih, iw), 255, np.uint8), homography, (FRAME_W, FRAME_H),
                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    alpha = (mask.astype(np.float32) / 255.0)[:, :, None]
    frame = frame * (1 - alpha) + warped * alpha

    # glare
    gx, gy = float(rng.uniform(0, FRAME_W)), float(rng.uniform(0, FRAME_H))
    radius = float(rng.uniform(0.15, 0.5)) * FRAME_W
    strength = float(rng.uniform(0, 180))
    yy, xx = np.mgrid[0:FRAME_H, 0:FRAME_W].astype(np.float32)
    d = np.sqrt((xx - gx) ** 2 + (yy - gy) ** 2)
    frame = frame + (strength * np.maximum(0.0, 1.0 - d / radius) ** 2)[:, :, None]
    frame = np.clip(frame, 0, 255)

    # blur
    sigma = float(rng.uniform(0, 1.5))
    if sigma >= 0.1:
        frame = cv2.GaussianBlur(frame, (0, 0), sigmaX=sigma)

    # brightness, contrast, colour
    contrast = float(rng.uniform(0.75, 1.25))
    brightness = float(rng.uniform(-30, 30))
    gains = rng.uniform(0.88, 1.12, size=3)
    frame = ((frame - 128.0) * contrast + 128.0 + brightness) * gains.astype(np.float32)
    photo = np.clip(np.rint(frame), 0, 255).astype(np.uint8)

    # a phone held sideways
    quarter_turns = int(rng.integers(1, 4)) if turn else 0
    if quarter_turns:
        photo = np.ascontiguousarray(np.rot90(photo, quarter_turns))

    params = {"background": backgrounds[b].name, "area": area / (FRAME_W * FRAME_H), "angle": angle,
              "sigma": sigma, "glare": strength, "contrast": contrast, "brightness": brightness,
              "turn": 90 * quarter_turns}
    return photo, params
