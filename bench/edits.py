"""Edited copies of corpus photos: the queries of the retrieval-quality benchmark (``bench/quality.py``).

An edited copy is never indexed: it is searched for, and its original should come back. Each edit is a small
function ``(image, rng) -> image``; the composite ones (``mild``, ``strong``) call the single ones in turn.
``edit(name, image, seed)`` applies one and encodes the result as an uploaded file would be (JPEG), with a random
generator seeded by ``(seed, crc32(name))``: the same inputs always give the same bytes.
"""

from __future__ import annotations

import io
import math
import zlib
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

Edit = Callable[[Image.Image, np.random.Generator], Image.Image]

QUALITY = 90  # the encoding of every edit whose definition names no other
LOW_QUALITY = 40  # jpeg420, hence mild
STRONG_QUALITY = (40, 80)
STRONG_AREA = (0.25, 0.70)  # fraction of the area the strong crop keeps
ASPECT_JITTER = 0.20  # the strong crop's aspect, relative to the original's
WORDS = ("summer", "holiday", "sale", "best", "view", "photo", "2024", "trip", "sunset", "home", "new", "wow")


def rng_for(name: str, seed: int) -> np.random.Generator:
    """The generator behind edit ``name`` at ``seed``; crc32, unlike ``hash()``, is the same in every process."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def crop(image: Image.Image, rng: np.random.Generator, area: float, aspect_jitter: float = 0.0) -> Image.Image:
    """A crop keeping ``area`` of the pixels at a random position; its aspect is the original's times a random
    factor within ``1 +- aspect_jitter`` (none: each side scaled by ``sqrt(area)``)."""
    w, h = image.size
    ratio = rng.uniform(1 - aspect_jitter, 1 + aspect_jitter) if aspect_jitter else 1.0
    cw = min(w, max(1, round(w * math.sqrt(area * ratio))))
    ch = min(h, max(1, round(h * math.sqrt(area / ratio))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return image.crop((x, y, x + cw, y + ch))


def downscale(image: Image.Image, longer: int) -> Image.Image:
    """``image`` shrunk (never enlarged) so its longer side is ``longer`` pixels."""
    scale = longer / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def mirror(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.mirror(image)


def crop80(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return crop(image, rng, 0.8)


def jpeg420(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return downscale(image, 420)  # the quality-40 encoding is in ``_quality``


def rotate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotated by 5-15 degrees either way, cropped to the largest centred window of the original's shape that
    holds no fill corners."""
    angle = float(rng.uniform(5, 15) * rng.choice([-1, 1]))
    w, h = image.size
    theta = math.radians(abs(angle))
    scale = 1 / (math.cos(theta) + math.sin(theta) * max(w / h, h / w))
    # Two pixels less than exact: bicubic blends the fill into the pixels next to the rotated edge.
    iw, ih = max(1, math.floor(w * scale) - 2), max(1, math.floor(h * scale) - 2)
    rotated = image.rotate(angle, Image.Resampling.BICUBIC, expand=False)
    left, top = (w - iw) // 2, (h - ih) // 2
    return rotated.crop((left, top, left + iw, top + ih))


def color(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation each times 0.7-1.3 (one at least 0.15 from 1), hue shifted <= 10 deg."""
    factors = rng.uniform(0.7, 1.3, size=3)
    if np.abs(factors - 1).max() < 0.15:  # too gentle to count as an edit: push one factor out
        factors[rng.integers(3)] = 1 + rng.choice([-1, 1]) * rng.uniform(0.15, 0.3)
    for enhancer, factor in zip((ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), factors):
        image = enhancer(image).enhance(float(factor))
    hsv = np.asarray(image.convert("HSV")).copy()
    shift = round(rng.uniform(-10, 10) / 360 * 256)  # PIL's hue runs 0-255 for 0-360 degrees
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
    return Image.merge("HSV", [Image.fromarray(hsv[..., i]) for i in range(3)]).convert("RGB")


def overlay(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A caption on a semi-opaque dark band at the top or bottom, or a logo (a letter on a coloured disc or
    rounded square) in a random corner."""
    w, h = image.size
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    if rng.random() < 0.5:
        words = " ".join(str(word) for word in rng.choice(WORDS, size=int(rng.integers(2, 5))))
        size = max(8, round(h * rng.uniform(0.06, 0.10)))
        font = ImageFont.load_default(size=size)
        band = round(size * 1.6)
        top = 0 if rng.random() < 0.5 else h - band
        draw.rectangle((0, top, w, top + band), fill=(0, 0, 0, int(rng.integers(140, 200))))
        draw.text((w / 2, top + band / 2), words, font=font, fill=(255, 255, 255, 255), anchor="mm")
    else:
        side = max(8, round(min(w, h) * rng.uniform(0.12, 0.20)))
        margin = round(min(w, h) * 0.03)
        x = margin if rng.random() < 0.5 else w - margin - side
        y = margin if rng.random() < 0.5 else h - margin - side
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3)) + (255,)
        if rng.random() < 0.5:
            draw.ellipse((x, y, x + side, y + side), fill=fill)
        else:
            draw.rounded_rectangle((x, y, x + side, y + side), radius=side // 5, fill=fill)
        letter = chr(ord("A") + int(rng.integers(26)))
        font = ImageFont.load_default(size=max(6, round(side * 0.6)))
        draw.text((x + side / 2, y + side / 2), letter, font=font, fill=(255, 255, 255, 255), anchor="mm")
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def border(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Padded on each side by 5-15 % of that dimension, in white, black or a random colour."""
    w, h = image.size
    left, right = (round(w * f) for f in rng.uniform(0.05, 0.15, size=2))
    top, bottom = (round(h * f) for f in rng.uniform(0.05, 0.15, size=2))
    kind = int(rng.integers(3))
    fill = [(255, 255, 255), (0, 0, 0), tuple(int(c) for c in rng.integers(0, 256, size=3))][kind]
    padded = Image.new("RGB", (w + left + right, h + top + bottom), fill)
    padded.paste(image, (left, top))
    return padded


def mild(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return jpeg420(mirror(crop80(image, rng), rng), rng)


def strong(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A 25-70 % crop (aspect within 20 %), rotation, colour jitter, a 300-600 px downscale and an overlay."""
    image = crop(image, rng, float(rng.uniform(*STRONG_AREA)), ASPECT_JITTER)
    image = color(rotate(image, rng), rng)
    return overlay(downscale(image, int(rng.integers(300, 601))), rng)


EDIT_FUNCTIONS: dict[str, Edit] = {"mirror": mirror, "crop80": crop80, "jpeg420": jpeg420, "rotate": rotate,
                                   "color": color, "overlay": overlay, "border": border, "mild": mild,
                                   "strong": strong}
EDITS: tuple[str, ...] = tuple(EDIT_FUNCTIONS)


def _quality(name: str, rng: np.random.Generator) -> int:
    if name == "strong":
        return int(rng.integers(STRONG_QUALITY[0], STRONG_QUALITY[1] + 1))
    return LOW_QUALITY if name in ("jpeg420", "mild") else QUALITY


def edit(name: str, image: Image.Image, seed: int) -> bytes:
    """The edited copy, encoded as an uploaded file would be (JPEG unless said otherwise); same inputs -> same bytes.

    ``image`` is RGB (it is converted if not); ``seed`` is a non-negative integer.
    """
    rng = rng_for(name, seed)
    edited = EDIT_FUNCTIONS[name](image.convert("RGB"), rng)
    quality = _quality(name, rng)  # drawn after the edit, so the edit's own draws do not depend on it
    buffer = io.BytesIO()
    edited.save(buffer, "JPEG", quality=quality, subsampling="4:2:0")
    return buffer.getvalue()
