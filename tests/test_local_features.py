"""Local features: ORB on real photos confirms a copy (mirror included) and not another photo; the wire format is
bounded and refuses what is not its own."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from infra.samples import skimage_data
from vision import local_features, models


def gray(name: str, mirror: bool = False, crop: float = 1.0) -> np.ndarray:
    image = Image.open(skimage_data() / name).convert("L")
    w, h = image.size
    image = image.crop((int(w * (1 - crop)), 0, w, int(h * crop)))
    if mirror:
        image = ImageOps.mirror(image)
    image.thumbnail((512, 512))
    return np.asarray(image)


def views(array: np.ndarray) -> list[local_features.Features]:
    return [local_features.extract(array), local_features.extract(np.ascontiguousarray(array[:, ::-1]))]


def test_a_mirrored_crop_is_verified_and_another_photo_is_not() -> None:
    astronaut = local_features.extract(gray("astronaut.png"))
    copy = views(gray("astronaut.png", mirror=True, crop=0.8))
    other = views(gray("coffee.png"))
    assert local_features.best_inliers(copy, astronaut) >= 5 * local_features.MIN_INLIERS
    assert local_features.best_inliers(other, astronaut) < local_features.MIN_INLIERS
    # Without the query's mirror view, the mirrored copy is not recognised: ORB is not mirror invariant.
    assert local_features.inliers(copy[0], astronaut) < local_features.MIN_INLIERS


def test_a_candidate_with_a_handful_of_keypoints_does_not_match_everything() -> None:
    """A smooth image (a sky, a gradient) keeps a few keypoints; every keypoint of an unrelated query can be nearest
    to one of them. Those many-to-one matches, and a transform that shrinks the query to a point, once counted as
    60 consistent matches ("the same photo")."""
    rng = np.random.default_rng(5)
    few = rng.integers(0, 256, (3, 32), dtype=np.uint8)
    candidate = local_features.Features(np.array([[200, 150], [260, 150], [230, 190]], np.float32), few)
    near_first = np.repeat(few[:1], 60, axis=0)
    near_first[:, 0] ^= rng.integers(0, 2, 60, dtype=np.uint8)  # one bit apart at most: always nearest to it
    query = local_features.Features(rng.uniform(0, 512, (60, 2)).astype(np.float32), near_first)
    assert local_features.inliers(query, candidate) < local_features.MIN_INLIERS


def test_matches_that_all_start_at_one_point_are_no_evidence_and_no_error() -> None:
    """OpenCV gives no transform for matches from a single point (keypoints of several pyramid levels on one pixel,
    as stored): ``inliers`` raised TypeError on it."""
    rng = np.random.default_rng(1)
    descriptors = rng.integers(0, 256, (6, 32), dtype=np.uint8)
    spread = local_features.Features(rng.integers(0, 300, (6, 2)).astype(np.float32), descriptors)
    one_point = local_features.Features(np.full((6, 2), 10, np.float32), descriptors)
    assert local_features.inliers(one_point, spread) == 0 and local_features.inliers(one_point, one_point) == 0


def test_wire_format_round_trip_is_bounded() -> None:
    found = local_features.views(gray("chelsea.png"))
    data = local_features.encode(found)
    assert len(data) <= 3 + local_features.MAX_VIEWS * (2 + local_features.MAX_FEATURES * 36)
    back = local_features.decode(data)
    assert len(back) == 2
    for before, after in zip(found, back):
        assert np.array_equal(after.descriptors, before.descriptors)
        assert np.abs(after.points - before.points).max() <= 0.5
    assert len(local_features.decode(local_features.encode([local_features.NONE]))[0]) == 0


@pytest.mark.parametrize("data", [b"", b"O1", b"XX\x01\x01\x00" + b"\x00" * 36, b"O1\x01\x02\x00" + b"\x00" * 36,
                                  b"O1\x03\x00\x00", b"O1\x00", b"O1\x01\x00\x00junk",
                                  b"O1\x01\xff\xff" + b"\x00" * 36])
def test_foreign_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        local_features.decode(data)


def test_a_flat_image_has_no_features_and_verifies_nothing() -> None:
    flat = local_features.extract(np.full((300, 400), 128, np.uint8))
    assert len(flat) == 0
    assert local_features.best_inliers([flat], local_features.extract(gray("astronaut.png"))) == 0


def test_images_too_thin_for_orb_have_no_features() -> None:
    assert len(local_features.extract(np.full((1, 512), 90, np.uint8))) == 0
    assert len(local_features.extract(np.full((512, 20), 90, np.uint8))) == 0


def test_the_recipes_promote_from_the_matches_that_keep_a_pair() -> None:
    assert models.PROMOTE_MATCHES == local_features.MIN_INLIERS
    assert models.RECIPES[models.DEFAULT_MODEL].promote_matches == local_features.MIN_INLIERS
