"""Geometric verification: local features (SIFT) of an image, and the inliers two images share.

A catalog picture and a phone photo of the same printed product share many local features that
fit one perspective mapping (a homography); two different products share few. ``extract`` finds
at most MAX_POINTS SIFT keypoints in a catalog image scaled to SIZE pixels on its long side and
keeps their positions (float32) and descriptors (uint8: SIFT values are 0..255 by construction);
``extract_query`` keeps QUERY_POINTS of a query photo, since the item may fill only part of the
frame; ``inliers`` matches two sets (nearest neighbours with Lowe's ratio test) and counts the
matches that RANSAC fits to one homography. A candidate with at least MIN_INLIERS is "verified".
``DescriptorVote`` holds every catalog descriptor in a FAISS index, so that the items a query's
descriptors match most can join the candidates the global search found (the vote).

Needs OpenCV (``opencv-python-headless``, a dependency of lookalike).
"""

from __future__ import annotations

import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import LookalikeError

SIZE = 512  # long side, in pixels, the image is scaled to (up or down) before extraction
MAX_POINTS = 500  # keypoints kept per image: the strongest
# A query photo: the item is often a small part of a cluttered frame, whose strongest points are
# mostly elsewhere, so a query keeps more. Measured (one-off scan of benchmarks/camera.py's photos,
# regions and verification): 1000 points against 500 raised grocery-iconic recall@1 0.494 -> 0.512
# and camera-sim 0.897 -> 0.902; at 640 px (0.521 / 0.907) its SIFT took 40 % longer.
QUERY_POINTS = 1000
# A query photo is scaled to this long side (a catalog picture to SIZE): SIFT's cost grows with the
# area, and the matching tolerates the scale change. Measured on benchmarks/camera.py's photos
# (verification without regions, 2-core AMD EPYC): at 384 against 512, grocery-iconic recall@1
# 0.484 against 0.479 and camera-sim 0.838 against 0.838, median query 156 / 122 ms against
# 170 / 142 ms; not scaling small photos up at all (iconic's are 256 px) lost 0.008 (fewer verified).
QUERY_SIZE = 384
RATIO = 0.8  # Lowe's ratio test: best match closer than RATIO x the second best
RANSAC_PX = 5.0  # reprojection error, in pixels at SIZE, that still counts as an inlier
# At most (OpenCV's default is 2000). RANSAC is most of a verified query's cost: a shortlist is
# mostly wrong items whose few chance matches make it run every iteration. On 437 fits from
# benchmarks/camera.py's queries, 200 agreed with 500 on "verified" 99 % of the time at 3 ms a fit
# against 6 ms; 500 against 2000 had cost grocery-iconic recall@1 0.002.
RANSAC_ITERATIONS = 200
MAX_AREA_SCALE = 50.0  # a fit that shrinks or grows the area more than this is degenerate
MIN_INLIERS = 12  # inliers that make a candidate "verified"
# The vote: each query descriptor's nearest catalog descriptor (when it passes the ratio test
# against the second nearest) votes for its item; when none of the global shortlist verifies, the
# VOTED items with most votes (at least 2) join it. benchmarks/camera.py, camera-sim recall@1:
# verification alone 0.715 -> 0.840, with regions 0.902 -> 0.925, the camera default 0.953 ->
# 0.963 (what verifying every catalog item gave, in a scan of cached vectors, with 5, 10 or 20 voted
# items alike); grocery-iconic unchanged (its misses share no artwork with the right picture).
VOTED = 5
# The descriptors sit in an inverted file of about VOTE_LISTS_PER_ROOT x sqrt(n) lists (a power of
# two, at least VOTE_MIN_PER_LIST descriptors a list on average), VOTE_PROBES of them searched, its
# centroids learned from VOTE_TRAIN_PER_LIST descriptors a list. Fine lists and few probes: the
# second-nearest descriptor is then looked for among the near ones only, so the ratio test passes
# more true matches. Measured (one-off script, the 400 camera-sim photos' 1000 SIFT descriptors, the
# right item among the 5 voted): catalog of the 200 camera-sim pictures (43,047 descriptors)
# sqrt(n) lists and 8 probes 0.877 in 14.1 ms a query on one core, 1,024 lists and 4 probes 0.902
# in 5.4 ms; with 3,567 more pictures of ../shared/data as distractors (675,986 descriptors)
# 0.830 in 83 ms against 0.860 in 25 ms (4,096 lists), all on one thread.
VOTE_PROBES = 4
VOTE_LISTS_PER_ROOT = 4
VOTE_MIN_PER_LIST = 16
VOTE_TRAIN_PER_LIST = 10
# A catalog holding more than VOTE_MAX_DESCRIPTORS (2,000 pictures of MAX_POINTS; small ones have
# fewer) gets no vote: the index is made in memory on first use (10 s for a million descriptors,
# 7 s for 676,000) and a query's cost grows with it (34 and 32 ms there); bigger ones would need
# a coarser index (compressed codes, a graph quantizer) whose ratio test still holds.
# benchmarks/camera.py --distractors 1800 (camera-sim against 2,000 pictures, which had no vote
# at the earlier limit of 500 items): verification alone 0.575 -> 0.795, the camera default
# 0.895 -> 0.912 at the same median time (77 ms).
VOTE_MAX_DESCRIPTORS = 1_000_000
# A vote of at least VOTE_CACHE_MIN descriptors (about 0.7 s to make) is also written to the user
# cache once made, so that the next process opening the same generation of the index reads it:
# camera-sim with 1,800 distractors (364,370 descriptors) made in 5.0 s (its features read from
# SQLite included), read in 0.03 s, a 52 MB file (about 140 MB for a million).
VOTE_CACHE_MIN = 100_000
LOCAL_ENTRY = {"kind": "sift", "size": SIZE, "max_points": MAX_POINTS}  # what the manifest records


@dataclass(frozen=True)
class LocalFeatures:
    """Keypoint positions float32 [n, 2] (at the scale extracted at: SIZE, or QUERY_SIZE for a query) and SIFT
    descriptors uint8 [n, 128]."""

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
_blas = None


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


@contextmanager
def one_blas_thread():
    """numpy's BLAS on one thread meanwhile: for matching a shortlist on the engine's workers.

    The descriptor distances are small matrix products; with BLAS's own threads on top of the
    workers (and ONNX Runtime's and OpenCV's), its spinning threads took the cores from the rest
    of the query: a camera-sim query with verification took 236 ms against 165 ms (median).
    The limit is the BLAS library's, for the whole process, while the block runs.
    """
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController()
    with _blas.limit(limits=1, user_api="blas"):
        yield


def extract(image: Image.Image, size: int = SIZE, max_points: int = MAX_POINTS) -> LocalFeatures:
    """SIFT keypoints and descriptors of an RGB image scaled to ``size`` on its long side (a catalog picture)."""
    cv = cv2()
    w, h = image.size
    scale = size / max(w, h)
    gray = image.convert("L")
    if abs(scale - 1.0) > 1e-3:
        gray = gray.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    sift = cv.SIFT_create(nfeatures=max_points)
    keypoints, descriptors = sift.detectAndCompute(np.asarray(gray), None)
    if descriptors is None or not keypoints:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8))
    keypoints, descriptors = keypoints[:max_points], descriptors[:max_points]
    points = np.array([k.pt for k in keypoints], np.float32)
    return LocalFeatures(points, np.clip(descriptors, 0, 255).astype(np.uint8))


def extract_query(image: Image.Image) -> LocalFeatures:
    """SIFT keypoints and descriptors of a query photo scaled to QUERY_SIZE: QUERY_POINTS of them."""
    return extract(image, QUERY_SIZE, QUERY_POINTS)


class DescriptorVote:
    """The local descriptors of catalog items in one FAISS index, each under its item's int id
    (uint8 values kept exactly: 128 bytes each), asked which items a query's descriptors match most.

    An index change makes a changed copy (``changed``: searches still using this one go on
    safely); the inverted file keeps the lists it learned first, as the catalog's own IVF does.
    """

    def __init__(self, features: dict[int, LocalFeatures]):
        import faiss

        descriptors = _stacked(features)[1]
        lists = vote_lists(len(descriptors))
        if lists == 0:  # one picture's few hundred descriptors: exact search is as quick
            self.index = faiss.IndexIDMap2(faiss.IndexScalarQuantizer(128, faiss.ScalarQuantizer.QT_8bit_direct))
        else:
            self.index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(128), 128, lists,
                                                       faiss.ScalarQuantizer.QT_8bit_direct)
            self.index.cp.niter = 10
            self.index.cp.min_points_per_centroid = VOTE_TRAIN_PER_LIST // 2  # what it is given is enough
            learn = min(len(descriptors), VOTE_TRAIN_PER_LIST * lists)
            sample = np.random.default_rng(0).choice(len(descriptors), learn, replace=False)
            self.index.train(descriptors[np.sort(sample)])
            self.index.nprobe = VOTE_PROBES
        self.items: frozenset[int] = frozenset()
        self._add(features)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def save(self, path: Path) -> None:
        """Write the index to ``path`` whole or not at all (temporary file, then rename)."""
        import faiss

        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(handle)
        try:
            faiss.write_index(self.index, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: Path, items: frozenset[int]) -> "DescriptorVote":
        """The vote ``save`` wrote, over these items (the caller knows which it was made of)."""
        import faiss

        vote = object.__new__(cls)
        vote.index, vote.items = faiss.read_index(str(path)), frozenset(items)
        if isinstance(vote.index, faiss.IndexIVF):
            vote.index.nprobe = VOTE_PROBES
        return vote

    def changed(self, added: dict[int, LocalFeatures], removed: set[int]) -> "DescriptorVote":
        """A copy with these items' descriptors added and those of ``removed`` (int ids) gone;
        this one stays as it was, for searches still using it."""
        import faiss

        other = object.__new__(DescriptorVote)
        other.index, other.items = faiss.clone_index(self.index), self.items
        if isinstance(self.index, faiss.IndexIVF):
            other.index.nprobe = self.index.nprobe
        if removed:
            other.index.remove_ids(faiss.IDSelectorBatch(np.asarray(sorted(removed), np.int64)))
            other.items = other.items - removed
        other._add(added)
        return other

    def _add(self, features: dict[int, LocalFeatures]) -> None:
        owners, descriptors = _stacked(features)
        if len(owners):
            self.index.add_with_ids(descriptors, owners)
        self.items = self.items | frozenset(features)

    def top(self, query: LocalFeatures, n: int = VOTED) -> np.ndarray:
        """The int ids of the (at most) ``n`` items with most votes from ``query``'s descriptors,
        most first; an item needs at least two votes."""
        if len(query) == 0 or len(self) < 2:
            return np.zeros(0, np.int64)
        distances, owners = self.index.search(np.ascontiguousarray(query.descriptors, dtype=np.float32), 2)
        passed = (owners[:, 1] >= 0) & (distances[:, 0] < RATIO**2 * distances[:, 1])
        items, votes = np.unique(owners[passed, 0], return_counts=True)
        order = np.argsort(-votes, kind="stable")
        return items[order][votes[order] >= 2][:n]


def vote_lists(n: int) -> int:
    """The inverted lists of a vote over ``n`` descriptors: the power of two nearest above
    VOTE_LISTS_PER_ROOT x sqrt(n), at most n / VOTE_MIN_PER_LIST; 0 (exact search) when that leaves
    fewer than 8 x VOTE_PROBES."""
    lists = 1 << max(0, math.ceil(math.log2(max(1.0, VOTE_LISTS_PER_ROOT * math.sqrt(n)))))
    lists = min(lists, n // VOTE_MIN_PER_LIST)
    return lists if lists >= 8 * VOTE_PROBES else 0


def _stacked(features: dict[int, LocalFeatures]) -> tuple[np.ndarray, np.ndarray]:
    """(owner int id per descriptor int64 [m], descriptors float32 [m, 128]) of these items."""
    owned = [(int_id, f.descriptors) for int_id, f in features.items() if len(f)]
    if not owned:
        return np.zeros(0, np.int64), np.zeros((0, 128), np.float32)
    return (np.concatenate([np.full(len(d), int_id, np.int64) for int_id, d in owned]),
            np.concatenate([d for _, d in owned]).astype(np.float32))


def _ratio_matches(query: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query rows, candidate rows) of the nearest-neighbour matches that pass Lowe's ratio test.

    The same matches as OpenCV's brute-force 2-NN (checked on 400 camera-sim pairs), from one
    matrix product: about 3x as fast for 1000 x 500 descriptors (1.3 ms on one core). Call it within
    ``one_blas_thread`` where other threads are busy.
    """
    q = query.astype(np.float32)
    c = candidate.astype(np.float32)
    d2 = q @ c.T  # squared distances less |q|^2, in place: |c|^2 - 2 q.c
    d2 *= -2.0
    d2 += np.einsum("ij,ij->i", c, c)
    rows = np.arange(len(d2))
    nearest = d2.argmin(axis=1)
    first = d2[rows, nearest]
    d2[rows, nearest] = np.inf
    norms = np.einsum("ij,ij->i", q, q)
    first = np.maximum(first + norms, 0.0)
    second = np.maximum(d2.min(axis=1) + norms, 0.0)
    good = first < (RATIO * RATIO) * second
    return np.flatnonzero(good), nearest[good]


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
    q, c = _ratio_matches(query.descriptors, candidate.descriptors)
    if len(np.unique(c)) < MIN_INLIERS:  # could not verify: spare the RANSAC (most candidates end here)
        return 0
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
