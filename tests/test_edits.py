"""bench/edits.py: the benchmark's query edits are deterministic, decodable and do what their names say."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bench.edits import ASPECT_JITTER, EDITS, STRONG_AREA, crop, edit, rng_for, rotate

RANDOM_EDITS = [name for name in EDITS if name not in ("mirror", "jpeg420")]


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A smooth, asymmetric, photo-like RGB image: gradients and a few shapes (JPEG-friendly, unlike noise)."""
    y, x = np.mgrid[0:480, 0:640].astype(np.float64)
    pixels = np.stack([x / 640 * 255, y / 480 * 255, 128 + 100 * np.sin(x / 50) * np.cos(y / 70)], axis=-1)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    image.paste((250, 30, 30), (60, 50, 220, 170))  # a red block near the top left breaks the symmetry
    return image


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    image.load()
    return image


@pytest.mark.parametrize("name", EDITS)
def test_every_edit_is_a_decodable_deterministic_jpeg(photo: Image.Image, name: str) -> None:
    data = edit(name, photo, seed=7)
    assert data == edit(name, photo, seed=7)
    image = decode(data)
    assert image.mode == "RGB" and min(image.size) > 50


@pytest.mark.parametrize("name", RANDOM_EDITS)
def test_random_edits_depend_on_the_seed(photo: Image.Image, name: str) -> None:
    assert edit(name, photo, seed=1) != edit(name, photo, seed=2)


def test_the_generator_is_stable_across_processes() -> None:
    # crc32 of the name, not the salted hash(): this value must never change between runs or machines.
    assert rng_for("strong", 0).integers(1 << 30) == np.random.default_rng([0, 2587086363]).integers(1 << 30)


def test_mirror_is_the_flipped_image(photo: Image.Image) -> None:
    mirrored = np.asarray(decode(edit("mirror", photo, 0)), dtype=np.float64)
    expected = np.asarray(photo, dtype=np.float64)[:, ::-1]
    assert np.abs(mirrored - expected).mean() < 3  # JPEG at quality 90 changes little
    assert np.abs(mirrored - np.asarray(photo, dtype=np.float64)).mean() > 20  # and it is not the original


@pytest.mark.parametrize("seed", range(5))
def test_crop80_keeps_80_percent_of_the_area(photo: Image.Image, seed: int) -> None:
    w, h = decode(edit("crop80", photo, seed)).size
    assert w * h / (640 * 480) == pytest.approx(0.8, abs=0.01)
    assert w / h == pytest.approx(640 / 480, rel=0.01)


def test_jpeg420_has_a_longer_side_of_420(photo: Image.Image) -> None:
    assert decode(edit("jpeg420", photo, 0)).size == (420, 315)
    assert decode(edit("jpeg420", photo.rotate(90, expand=True), 0)).size == (315, 420)


def test_rotate_leaves_no_fill_corners() -> None:
    white = Image.new("RGB", (640, 480), "white")
    for seed in range(10):
        rotated = np.asarray(rotate(white, rng_for("rotate", seed)).convert("L"))
        assert rotated.min() >= 250  # a black fill corner would show here
        assert 0.5 < rotated.size / (640 * 480) < 0.95
        assert rotated.shape[1] / rotated.shape[0] == pytest.approx(640 / 480, rel=0.02)


def test_border_pads_each_side_with_one_colour(photo: Image.Image) -> None:
    for seed in range(5):
        bordered = decode(edit("border", photo, seed))
        w, h = bordered.size
        assert 640 * 1.1 - 2 <= w <= 640 * 1.3 + 2 and 480 * 1.1 - 2 <= h <= 480 * 1.3 + 2
        pixels = np.asarray(bordered, dtype=np.float64)
        for edge in (pixels[:, :8], pixels[:, -8:], pixels[:8], pixels[-8:]):
            assert edge.reshape(-1, 3).std(axis=0).max() < 4  # solid, up to JPEG noise
        assert np.abs(pixels[:8].mean(axis=(0, 1)) - pixels[-8:].mean(axis=(0, 1))).max() < 4  # one colour


def test_strong_crop_keeps_25_to_70_percent_with_a_close_aspect(photo: Image.Image) -> None:
    for seed in range(50):
        rng = rng_for("strong", seed)
        cropped = crop(photo, rng, float(rng.uniform(*STRONG_AREA)), ASPECT_JITTER)
        w, h = cropped.size
        assert STRONG_AREA[0] - 0.01 <= w * h / (640 * 480) <= STRONG_AREA[1] + 0.01
        assert abs((w / h) / (640 / 480) - 1) <= ASPECT_JITTER + 0.01


def test_strong_shrinks_a_large_photo_to_300_600_pixels() -> None:
    large = Image.new("RGB", (1600, 1000), (90, 140, 200))
    for seed in range(5):
        assert 300 <= max(decode(edit("strong", large, seed)).size) <= 600


def test_color_and_overlay_change_the_pixels_but_not_the_size(photo: Image.Image) -> None:
    original = np.asarray(photo, dtype=np.float64)
    for name in ("color", "overlay"):
        edited = np.asarray(decode(edit(name, photo, 3)), dtype=np.float64)
        assert edited.shape == original.shape
        assert np.abs(edited - original).mean() > 2
