"""Geometric verification: local features (SIFT) of an image, and the inliers two images share.

A catalog picture and a phone photo of the same printed product share many local features that
fit one perspective mapping (a homography); two different products share few. ``extract`` finds
at most MAX_POINTS SIFT keypoints in the image scaled to SIZE pixels on its long side and keeps
their positions (float32) and descriptors (uint8: SIFT values are 0..255 by construction);
``inliers`` matches two sets (nearest neighbours with Lowe's ratio test) and counts the matches
that RANSAC fits to one homography. A candidate with at least MIN_INLIERS is "verified".

Needs OpenCV (``opencv-python-headless``, a dependency of lookalike).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import LookalikeError

SIZE = 512  # long side, in pixels, the image is scaled to (up or down) before extraction
MAX_POINTS = 500  # keypoints kept per image: the strongest
RATIO = 0.8  # Lowe's ratio test: best match closer than RATIO x the second best
RANSAC_PX = 5.0  # reprojection error, in pixels at SIZE, that still counts as an inlier
RANSAC_ITERATIONS = 500  # at most (OpenCV's default is 2000): grocery-iconic recall@1 0.467 against 0.469, far faster
MAX_AREA_SCALE = 50.0  # a fit that shrinks or grows the area more than this is degenerate
MIN_INLIERS = 12  # inliers that make a candidate "verified"
LOCAL_ENTRY = {"kind": "sift", "size": SIZE, "max_points": MAX_POINTS}  # what the manifest records


@dataclass(frozen=True)
class LocalFeatures:
    """Keypoint positions float32 [n, 2] (at SIZE scale) and SIFT descriptors uint8 [n, 128]."""

    points: np.ndarray
    descriptors: np.ndarray

    def __len__(self) -> int:
        return len(self.points)

    def to_blobs(self) -> tuple[bytes, bytes]:
        return self.points.astype(np.float32).tobytes(), self.descriptors.astype(np.uint8).tobytes()

    @classmethod
    def from_blobs(cls, points: bytes, descriptors: bytes) -> "LocalFeatures":
        return cls(np.frombuffer(points, np.float32).reshape(-1, 2), np.frombuffer(descriptors, np.uint8).reshape(-1, 128))


_cv2 = None


def cv2():
    """OpenCV, imported once (a clear error if it is missing)."""
    global _cv2
    if _cv2 is None:
        try:
            import cv2 as module
        except ImportError as exc:  # pragma: no cover - a dependency
            raise LookalikeError("geometric verification needs OpenCV: pip install opencv-python-headless") from exc
        _cv2 = module
    return _cv2


def extract(image: Image.Image) -> LocalFeatures:
    """SIFT keypoints and descriptors of an RGB image scaled to SIZE on its long side."""
    cv = cv2()
    w, h = image.size
    scale = SIZE / max(w, h)
    gray = image.convert("L")
    if abs(scale - 1.0) > 1e-3:
        gray = gray.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    sift = cv.SIFT_create(nfeatures=MAX_POINTS)
    keypoints, descriptors = sift.detectAndCompute(np.asarray(gray), None)
    if descriptors is None or not keypoints:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8))
    keypoints, descriptors = keypoints[:MAX_POINTS], descriptors[:MAX_POINTS]
    points = np.array([k.pt for k in keypoints], np.float32)
    return LocalFeatures(points, np.clip(descriptors, 0, 255).astype(np.uint8))


def inliers(query: LocalFeatures, candidate: LocalFeatures) -> int:
    """How many ratio-test matches between the two fit one RANSAC homography, counted safely.

    Guards against degenerate fits, where many query points match a few catalog points and the
    homography squashes the photo onto one spot (measured: a leek photo got 56 raw "inliers" on a
    pomegranate from 4 catalog points): an inlier counts once per distinct query point, catalog
    point and catalog position (the smallest of the three counts), and a homography that scales
    area by more than MAX_AREA_SCALE either way counts nothing. 0 when there are fewer than
    MIN_INLIERS matches to begin with: no RANSAC is run then, as it could not verify anyway.
    """
    if len(query) < MIN_INLIERS or len(candidate) < MIN_INLIERS:
        return 0
    cv = cv2()
    pairs = cv.BFMatcher(cv.NORM_L2).knnMatch(
        np.asarray(query.descriptors, np.float32), np.asarray(candidate.descriptors, np.float32), k=2
    )
    good = [(m.queryIdx, m.trainIdx) for m, n in (p for p in pairs if len(p) == 2) if m.distance < RATIO * n.distance]
    if len({c for _, c in good}) < MIN_INLIERS:  # could not verify: spare the RANSAC (most candidates end here)
        return 0
    q, c = np.array(good).T
    homography, mask = cv.findHomography(
        query.points[q], candidate.points[c], cv.RANSAC, RANSAC_PX, maxIters=RANSAC_ITERATIONS, confidence=0.995
    )
    if homography is None or mask is None:
        return 0
    area = abs(float(np.linalg.det(homography[:2, :2])))
    if not 1.0 / MAX_AREA_SCALE < area < MAX_AREA_SCALE:
        return 0
    fit = mask.ravel().astype(bool)
    positions = np.round(candidate.points[c[fit]]).astype(np.int64)
    return int(min(len(np.unique(q[fit])), len(np.unique(c[fit])), len(np.unique(positions, axis=0))))
