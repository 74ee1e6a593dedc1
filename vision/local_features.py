"""Local features for spatial verification, the second stage of instance retrieval.

A global descriptor proposes candidates; verification confirms that the query and a candidate show the same
scene: ORB keypoints matched by descriptor (Lowe's ratio test), then a similarity transform (rotation, scale,
shift: what crops, resizes and rotations do to a copy) fitted with RANSAC; the number of matches consistent with
it is the evidence. ORB is not mirror invariant, so an image's features are kept for it and for its mirror
(``views``): a mirrored copy matches the mirror's.

Wire format of one object's views (bounded: at most ``MAX_VIEWS`` x (2 + ``MAX_FEATURES`` x 36) + 3 bytes):
``b"O1"``, uint8 number of views, then per view uint16 count, per keypoint uint16 x, uint16 y (pixels of the
grayscale image the recipe describes), then the count's 32-byte descriptors.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import struct

import cv2
import numpy as np

from .models import PROMOTE_MATCHES

MAX_FEATURES = 500  # most keypoints a view may hold (a recipe keeps at most this many)
MAX_VIEWS = 2  # the image and its mirror
MAGIC = b"O1"
RATIO = 0.8  # Lowe's ratio test
log = logging.getLogger(__name__)
RANSAC_PX = 6.0  # reprojection error (pixels at SIDE) of a match consistent with the transform
# The scale a copy's transform may have, query to stored object: a 10 % crop enlarged (~0.3) to a 64-pixel
# thumbnail of a 512-pixel original (8); a transform outside shrinks or blows the query up to a degenerate point.
MIN_SCALE, MAX_SCALE = 1 / 16, 16.0
# Fewest consistent matches that move a candidate up a search and keep a duplicate pair. Counted one-to-one, an
# unrelated photo reached at most 7 among 54,000 candidates of the held-out photos (``bench.heldout``), and 99 % pair
# precision on the quality photos needed 6-8 (bench/README.md, "Held-out photos and edits"); the sweep of
# `make quality` gains the same from 10 to 25.
MIN_INLIERS = PROMOTE_MATCHES
# Saying "the same photo" (a search result's ``verified``, a duplicate group's default link) keeps a wider margin:
# different photos that share a logo, a sign or an app's window frame can agree on a part of their keypoints.
COPY_MATCHES = 20
# The matches counted for a byte-identical copy (equal etags; ``index_service.verify``): every keypoint a view may
# hold, so such a copy is the same photo whatever its keypoints (a smooth image has none to match).
IDENTICAL = MAX_FEATURES

cv2.setNumThreads(1)  # callers run many images in parallel; OpenCV's own pool would oversubscribe the cores


@dataclasses.dataclass(frozen=True)
class Features:
    points: np.ndarray  # (n, 2) float32
    descriptors: np.ndarray  # (n, 32) uint8

    def __len__(self) -> int:
        return len(self.points)


NONE = Features(np.empty((0, 2), np.float32), np.empty((0, 32), np.uint8))
MIN_SIDE = 48  # ORB's 31-pixel patches plus its border


@functools.cache
def _orb(count: int) -> cv2.ORB:
    return cv2.ORB_create(nfeatures=count, fastThreshold=10)  # type: ignore[attr-defined]


def extract(gray: np.ndarray, count: int = MAX_FEATURES) -> Features:
    """At most ``count`` ORB keypoints of a uint8 grayscale image (of at most 65535 px a side: the wire format)."""
    assert gray.ndim == 2 and gray.dtype == np.uint8 and max(gray.shape) < 65536, f"bad image {gray.shape}"
    assert 0 < count <= MAX_FEATURES, f"at most {MAX_FEATURES} features"
    if min(gray.shape) < MIN_SIDE:  # ORB's patches do not fit (and its pyramid fails on a 1-pixel side)
        return NONE
    try:
        keypoints, descriptors = _orb(count).detectAndCompute(np.ascontiguousarray(gray), None)
    except cv2.error as exc:  # an image ORB cannot handle is indexed without local features, not failed
        log.warning("no local features for a %dx%d image: %s", gray.shape[1], gray.shape[0], exc)
        return NONE
    if descriptors is None or not keypoints:
        return NONE
    points = np.array([kp.pt for kp in keypoints], dtype=np.float32)
    return Features(points, descriptors.astype(np.uint8))


def views(gray: np.ndarray, count: int = MAX_FEATURES) -> list[Features]:
    """An image's features and those of its mirror: the image's match an unmirrored copy, the mirror's a
    mirrored one."""
    return [extract(gray, count), extract(np.ascontiguousarray(gray[:, ::-1]), count)]


def encode(found: list[Features]) -> bytes:
    """One object's views (``views``) as bytes."""
    assert 0 < len(found) <= MAX_VIEWS, f"1 to {MAX_VIEWS} views"
    parts = [MAGIC, struct.pack("<B", len(found))]
    for features in found:
        n = min(len(features), MAX_FEATURES)
        points = np.clip(np.round(features.points[:n]), 0, 65535).astype("<u2")
        parts += [struct.pack("<H", n), points.tobytes(), features.descriptors[:n].tobytes()]
    return b"".join(parts)


def decode(data: bytes) -> list[Features]:
    """Raises ValueError on anything that is not this format (the bytes come from Redis: never trusted)."""
    if len(data) < 3 or data[:2] != MAGIC or not 0 < data[2] <= MAX_VIEWS:
        raise ValueError("not an ORB feature record")
    found, offset = [], 3
    for _ in range(data[2]):
        if offset + 2 > len(data):
            raise ValueError("truncated ORB feature record")
        (n,) = struct.unpack_from("<H", data, offset)
        end = offset + 2 + n * 36
        if n > MAX_FEATURES or end > len(data):
            raise ValueError(f"feature record of {len(data)} bytes does not hold {n} more features")
        points = np.frombuffer(data, dtype="<u2", count=2 * n, offset=offset + 2).reshape(n, 2).astype(np.float32)
        descriptors = np.frombuffer(data, dtype=np.uint8, count=32 * n, offset=offset + 2 + 4 * n).reshape(n, 32)
        found.append(Features(points, descriptors))
        offset = end
    if offset != len(data):
        raise ValueError(f"{len(data) - offset} bytes after the last view")
    return found


_matcher = cv2.BFMatcher(cv2.NORM_HAMMING)


def inliers(query: Features, candidate: Features) -> int:
    """Matches consistent with one similarity transform from ``query`` to ``candidate`` (0 when too few).

    Matches are one-to-one (a candidate keypoint keeps its best match only) and the transform must keep a
    plausible scale: a candidate with a handful of keypoints (a smooth sky, a gradient wallpaper) otherwise takes
    every query keypoint as a match, and a transform that shrinks the query to a point held them all, so such an
    image "matched" 60-200 times with unrelated photos (bench/README.md, "Held-out photos and edits")."""
    if len(query) < 3 or len(candidate) < 3:
        return 0
    pairs = _matcher.knnMatch(query.descriptors, candidate.descriptors, k=2)
    best: dict[int, cv2.DMatch] = {}
    for p in pairs:
        if len(p) == 2 and p[0].distance < RATIO * p[1].distance:
            kept = best.get(p[0].trainIdx)
            if kept is None or p[0].distance < kept.distance:
                best[p[0].trainIdx] = p[0]
    good = list(best.values())
    if len(good) < 3:
        return 0
    src = query.points[[m.queryIdx for m in good]]
    dst = candidate.points[[m.trainIdx for m in good]]
    transform, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PX,
                                                  maxIters=500, confidence=0.99)
    if transform is None or not MIN_SCALE <= math.hypot(transform[0, 0], transform[1, 0]) <= MAX_SCALE:
        # (None, with a mask of zeros, when every match starts at one point: it raised TypeError, failing the
        # search, and a round of the duplicate finder each time it was tried again)
        return 0
    return int(mask.sum())


def best_inliers(queries: list[Features], candidate: Features) -> int:
    """The best of several query views (the query and its mirror) against one candidate; a view that is clearly
    a match ends the search (most copies are not mirrored: the mirror view is then not matched at all)."""
    best = 0
    for query in queries:
        best = max(best, inliers(query, candidate))
        if best >= 3 * MIN_INLIERS:
            break
    return best
