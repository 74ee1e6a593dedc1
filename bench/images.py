"""The benchmark's image set: realistic 640x480 JPEGs derived from real photographs, generated once per seed.

Each image is a random view of one of scikit-image's bundled photographs (``infra/samples.py``): a random
crop (30-100 % of the area, varied aspect), a possible mirror, a small rotation, a scale to 640x480 and a
colour jitter (brightness, contrast, saturation), saved at JPEG quality 80-95. Image ``i`` depends only on
``(seed, i)``, so a larger set extends a smaller one and every run of a size sees the same bytes.
"""

from __future__ import annotations

import math
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps
from tqdm import tqdm

from infra.samples import PHOTOS, skimage_data

WIDTH, HEIGHT = 640, 480


def image_path(folder: Path, i: int) -> Path:
    return folder / f"img-{i:05d}.jpg"


def render(source: Image.Image, rng: random.Random) -> tuple[Image.Image, int]:
    """One random, realistic view of ``source`` (RGB) and the JPEG quality to save it at."""
    w, h = source.size
    area = rng.uniform(0.3, 1.0) * w * h
    aspect = rng.uniform(0.75, 1.6)
    cw = max(32, min(w, int((area * aspect) ** 0.5)))
    ch = max(32, min(h, int((area / aspect) ** 0.5)))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = source.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    angle = rng.uniform(-15, 15)
    if abs(angle) > 2:  # rotate, then keep the largest centred window of the same shape without black corners
        image = image.rotate(angle, Image.Resampling.BILINEAR, expand=False)
        theta = math.radians(abs(angle))
        shrink = 1 / (math.cos(theta) + math.sin(theta) * max(cw / ch, ch / cw))
        iw, ih = int(cw * shrink), int(ch * shrink)
        image = image.crop(((cw - iw) // 2, (ch - ih) // 2, (cw - iw) // 2 + iw, (ch - ih) // 2 + ih))
    image = image.resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.75, 1.25))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.75, 1.25))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
    return image, rng.randint(80, 95)


def _write_range(folder: Path, seed: int, indices: list[int]) -> int:
    sources = [Image.open(skimage_data() / name).convert("RGB") for name in PHOTOS]
    for i in indices:
        rng = random.Random(f"{seed}:{i}")
        image, quality = render(sources[rng.randrange(len(sources))], rng)
        tmp = image_path(folder, i).with_suffix(".tmp")
        image.save(tmp, "JPEG", quality=quality)
        tmp.replace(image_path(folder, i))
    return len(indices)


def ensure_images(cache: Path, count: int, seed: int = 0, workers: int = 2) -> list[Path]:
    """The first ``count`` images of the set ``seed`` under ``cache``, generating whatever is missing."""
    folder = cache / f"images-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(count) if not image_path(folder, i).exists()]
    if missing:
        chunks = [missing[start : start + 50] for start in range(0, len(missing), 50)]
        with ProcessPoolExecutor(max_workers=workers) as pool, tqdm(
            total=len(missing), unit="img", desc="generate images", leave=False
        ) as bar:
            for done in pool.map(_write_range, [folder] * len(chunks), [seed] * len(chunks), chunks):
                bar.update(done)
    return [image_path(folder, i) for i in range(count)]
