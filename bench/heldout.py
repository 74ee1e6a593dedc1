"""``python -m bench.heldout``: retrieval quality on photos and edits that nothing in bucketlens was fitted or
chosen on.

``make quality`` measures the edits its descriptor was designed against, on the photos its centring mean was
fitted on. This step asks what a user with other photos and other edits gets. Photos: two Debian wallpaper
packages the quality corpus does not use (``HELD_PACKAGES``), installed like it (``apt-get download`` + ``dpkg -x``,
nothing system-wide); the quality corpus joins the gallery as distractors, and is also queried. Edits
(``EDITS``): none of ``bench/edits.py``'s: quarter turns and flips, greyscale, blur, noise, crops to 50 % and 25 %
of the area, a 1.5x stretch, 160 and 64 pixel thumbnails, a dark exposure, a filter, a perspective tilt, the photo
inside a screenshot, a large watermark, WebP at quality 15.

In process, with the shipped model (``--model`` for another): decode, embed, exact search, and spatial
verification of the global top 20 as the service does (``bench.quality``). Reported per edit: source@1 in the
order the service answers (``promote_matches``), source@10, how often the source is marked "the same photo"
(``verified``: >= ``COPY_MATCHES`` matches), and how many *unrelated* candidates reached ``COPY_MATCHES`` and
``MIN_INLIERS`` (false "same photo" marks and false duplicate links). Writes ``bench/results/quality-heldout.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from bucketlens.settings import Settings
from vision import local_features
from vision.embedders import load_embedder
from vision.models import DEFAULT_MODEL, recipe

from . import RESULTS
from .corpus import RASTER, Photo, Skipped, _check, ensure_photos, fetch_packages, flat_reason, normalise
from .edits import Edit, crop, rng_for
from .quality import Decoded, embed_all, make_queries, verified_order, verify_top

log = logging.getLogger(__name__)
HELD_PACKAGES = ("mate-backgrounds", "ukui-wallpapers")


def family(stem: str) -> str:
    """One design's variants are one family: sizes of a design, the colour variants of Ubuntu MATE's logo
    wallpaper and of MATE's stripes (they share their shapes, so finding another variant is a hit)."""
    stem = re.sub(r"_\d+x\d+$", "", stem)
    if stem.startswith("Ubuntu-Mate-"):
        return "held/ubuntu-mate"
    return "held/stripes" if "Stripes" in stem else f"held/{stem}"


def held_photos(folder: Path) -> list[Photo]:
    """The held-out photos, normalised once into ``folder/gallery`` (as the quality corpus is)."""
    root = fetch_packages(folder, HELD_PACKAGES)
    gallery = folder / "gallery"
    gallery.mkdir(parents=True, exist_ok=True)
    photos, skipped, seen = [], [], set()
    for path in sorted((root / "usr/share/backgrounds").rglob("*")):
        if path.suffix.lower() not in RASTER or path.is_symlink() or not _check(path.stem, path, skipped):
            continue
        out = gallery / f"{path.parent.name}__{path.stem}.jpg"
        if not out.exists():
            image = normalise(path)
            if reason := flat_reason(image):  # a transparent overlay is blank once laid on white
                skipped.append(Skipped(path.stem, f"{reason} on white"))
                continue
            image.save(out, "JPEG", quality=95)
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            photos.append(Photo(f"held/{path.parent.name}/{path.stem}", family(path.stem), "held", out))
    for skip in skipped:
        log.info("skipped %s: %s", skip.name, skip.reason)
    return photos


def _thumbnail(image: Image.Image, side: int) -> Image.Image:
    image = image.copy()
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    return image


def _noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 20, (image.height, image.width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _filter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A phone app's filter: contrast x1.5, warmer (red x1.15, blue x0.8), a vignette."""
    pixels = np.asarray(ImageEnhance.Contrast(image).enhance(1.5), dtype=np.float32) * [1.15, 1.0, 0.8]
    h, w = pixels.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    distance = np.hypot((x - w / 2) / (w / 2), (y - h / 2) / (h / 2))
    pixels *= np.clip(1.2 - 0.5 * distance, 0.3, 1)[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _perspective(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Photographed from off-centre: the top edge pulled in by 15 % and down, white where the photo is not."""
    w, h = image.size
    corners = [(0, 0), (w, 0), (w, h), (0, h)]
    moved = [(w * 0.15, h * 0.075), (w * 0.85, 0), (w, h), (0, h * 0.925)]
    rows = []
    for (x, y), (u, v) in zip(corners, moved):  # the output -> input map PIL wants, solved from 4 point pairs
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
    coeffs = np.linalg.solve(np.array(rows, float), np.array(moved, float).reshape(8))
    return image.transform((w, h), Image.Transform.PERSPECTIVE, coeffs.tolist(), Image.Resampling.BICUBIC,
                           fillcolor=(255, 255, 255))


def _screenshot(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The photo at 55 % of an app window's width, with a title bar and a side panel of text."""
    w, h = image.size
    width = int(w / 0.55)
    window = Image.new("RGB", (width, max(int(h / 0.55 * 0.8), h + 120)), (236, 236, 236))
    draw = ImageDraw.Draw(window)
    draw.rectangle((0, 0, width, 50), fill=(60, 60, 70))
    draw.rectangle((0, 50, int(width * 0.2), window.height), fill=(250, 250, 250))
    for i in range(8):
        draw.text((10, 70 + 30 * i), f"item {i}", fill=(30, 30, 30))
    window.paste(image, (int(width * 0.3), 80))
    return window


def _watermark(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    font = ImageFont.load_default(size=max(12, image.width // 8))
    ImageDraw.Draw(layer).text((image.width / 2, image.height / 2), "SAMPLE", font=font,
                               fill=(255, 255, 255, 110), anchor="mm")
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


EDITS: dict[str, Edit] = {
    "rot90": lambda image, rng: image.transpose(Image.Transpose.ROTATE_90),
    "rot180": lambda image, rng: image.transpose(Image.Transpose.ROTATE_180),
    "vflip": lambda image, rng: image.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
    "gray": lambda image, rng: ImageOps.grayscale(image).convert("RGB"),
    "blur": lambda image, rng: image.filter(ImageFilter.GaussianBlur(max(image.size) / 300)),
    "noise": _noise,
    "crop50": lambda image, rng: crop(image, rng, 0.5),
    "crop25": lambda image, rng: crop(image, rng, 0.25),
    "stretch": lambda image, rng: image.resize((int(image.width * 1.5), image.height), Image.Resampling.BICUBIC),
    "thumb160": lambda image, rng: _thumbnail(image, 160),
    "thumb64": lambda image, rng: _thumbnail(image, 64),
    "dark": lambda image, rng: ImageEnhance.Brightness(image).enhance(0.35),
    "filter": _filter,
    "perspective": _perspective,
    "screenshot": _screenshot,
    "watermark": _watermark,
    "webp15": lambda image, rng: image,  # the edit is the encoding
}


def edited(name: str, image: Image.Image, seed: int) -> bytes:
    out = io.BytesIO()
    image = EDITS[name](image, rng_for(name, seed))
    image.save(out, "WEBP", quality=15) if name == "webp15" else image.save(out, "JPEG", quality=85)
    return out.getvalue()


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    corpus, held = ensure_photos(args.photos), held_photos(args.held)
    gallery = corpus + held
    queries = [*make_queries(held, args.seeds, args.held / "queries", EDITS, edited),
               *make_queries(corpus, 1, args.held / "queries", EDITS, edited)]
    model = recipe(args.model)
    settings = Settings.from_env(home=Path(".bucketlens"), runtime="onnx", worker_concurrency=1)
    embedder = load_embedder(settings, args.model)
    decoded = Decoded()
    g = embed_all(embedder, decoded, [p.path for p in gallery], "gallery")
    q = embed_all(embedder, decoded, [query.path for query in queries], "queries")
    scores = q @ g.T
    families = np.array([p.family for p in gallery])
    if model.local_features:
        counts = verify_top(scores, [query.path for query in queries], [p.path for p in gallery], decoded, model)
        order = (verified_order(scores, counts, model.promote_matches) if model.promote_matches is not None
                 else np.argsort(-scores, axis=1))
    else:
        counts, order = np.full(scores.shape, -1), np.argsort(-scores, axis=1)
    rows: dict[str, dict[str, Any]] = {}
    for i, query in enumerate(queries):
        photo = query.photo
        row = rows.setdefault(f"{photo.source if photo.source == 'held' else 'corpus'}/{query.edit}",
                              {"queries": 0, "source@1": 0, "source@10": 0, "verified": 0, "unrelated_copy": 0,
                               "unrelated_link": 0})
        source = families == photo.family
        row["queries"] += 1
        row["source@1"] += int(source[order[i, 0]])
        row["source@10"] += int(source[order[i, :10]].any())
        row["verified"] += int(counts[i][source].max() >= local_features.COPY_MATCHES)
        row["unrelated_copy"] += int((counts[i][~source] >= local_features.COPY_MATCHES).sum())
        row["unrelated_link"] += int((counts[i][~source] >= local_features.MIN_INLIERS).sum())
    for row in rows.values():
        for key in ("source@1", "source@10", "verified"):
            row[key] = round(row[key] / row["queries"], 3)
    return {"model": args.model, "gallery": len(gallery), "held_out_photos": len(held),
            "held_out_families": len({p.family for p in held}), "seeds": args.seeds,
            "copy_matches": local_features.COPY_MATCHES, "min_inliers": local_features.MIN_INLIERS, "rows": rows}


def print_table(result: dict[str, Any]) -> None:
    print(f"model {result['model']}: gallery {result['gallery']} photos ({result['held_out_photos']} held out, "
          f"{result['held_out_families']} families); unrelated candidates at >= {result['copy_matches']} / "
          f">= {result['min_inliers']} matches are false 'same photo' marks / duplicate links")
    print(f"{'photos/edit':22} {'queries':>7} {'source@1':>8} {'source@10':>9} {'verified':>8} {'false marks':>11}"
          f" {'false links':>11}")
    for name, row in sorted(result["rows"].items()):
        print(f"{name:22} {row['queries']:7d} {row['source@1']:8.3f} {row['source@10']:9.3f} {row['verified']:8.3f}"
              f" {row['unrelated_copy']:11d} {row['unrelated_link']:11d}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.heldout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--seeds", type=int, default=2, help="edited copies per held-out photo and edit")
    parser.add_argument("--photos", type=Path, default=Path(".bucketlens/photos"), help="the quality corpus")
    parser.add_argument("--held", type=Path, default=Path(".bucketlens/photos-held-out"))
    parser.add_argument("--out", type=Path, default=RESULTS / "quality-heldout.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = evaluate(args)
    print_table(result)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
