"""``python -m bench.colour_profiles``: what ignoring colour profiles costs retrieval.

Phones write Display P3 photos (pixels in P3's wider gamut, tagged with its ICC profile); a browser or a social
network that shares one converts it to sRGB, and a tool that drops the profile (Pillow, by default) keeps P3's
values untagged. bucketlens reads pixels as they are encoded and applies no profile, so the first kind of copy
differs from its original by the gamut conversion (converting to sRGB on decode would move the second kind by the
same amount instead). This step makes a P3 original of each corpus photo (its sRGB pixels converted to P3 and
tagged, JPEG 92) and an sRGB copy of it (JPEG 92, untagged), embeds both in process with the shipped model and
reports their cosine and whether each copy's nearest original is its own. Writes
``bench/results/colour-profiles.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms
from tqdm import tqdm

from bucketlens.settings import Settings
from vision.decode import decode_for
from vision.embedders import load_embedder
from vision.models import DEFAULT_MODEL

from . import RESULTS
from .corpus import ensure_photos


def display_p3_profile() -> bytes:
    """An ICC v2 profile of Display P3 (its D50-adapted colorants, a 2.2 tone curve close to sRGB's): Pillow builds
    only sRGB, LAB and XYZ ones."""

    def s15(x: float) -> bytes:
        return struct.pack(">i", round(x * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(2.2 * 256)) + bytes(2)
    name = b"Display P3\0"
    tags = [(b"desc", b"desc" + bytes(4) + struct.pack(">I", len(name)) + name + bytes(4 + 4 + 2 + 1 + 67)),
            (b"cprt", b"text" + bytes(4) + b"none\0"), (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
            (b"rXYZ", xyz(0.5151, 0.2412, -0.0011)), (b"gXYZ", xyz(0.2920, 0.6922, 0.0419)),
            (b"bXYZ", xyz(0.1571, 0.0666, 0.7841)), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    start = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        body += bytes(-len(body) % 4)
        table += signature + struct.pack(">II", start + len(data), len(body))
        data += body
    header = (struct.pack(">I", start + len(data)) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + bytes(12)
              + b"acsp" + bytes(28) + s15(0.9642) + s15(1.0) + s15(0.8249) + b"lcms" + bytes(44))
    return header + struct.pack(">I", len(tags)) + table + data


def _jpeg(image: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92, **options)
    return out.getvalue()


def measure(photos: Path, model: str) -> dict[str, object]:
    profile = display_p3_profile()
    to_p3 = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.ImageCmsProfile(io.BytesIO(profile)),
                                    "RGB", "RGB")
    embedder = load_embedder(Settings.from_env(home=Path(".bucketlens"), runtime="onnx", worker_concurrency=1), model)

    def embed(data: bytes) -> np.ndarray:
        return embedder.embed(decode_for(embedder.recipe, data, 10**8).pixels[None])[0]

    originals, copies = [], []
    for photo in tqdm(ensure_photos(photos), desc="P3 originals and sRGB copies"):
        with Image.open(photo.path) as image:
            srgb = image.convert("RGB")
        originals.append(embed(_jpeg(ImageCms.applyTransform(srgb, to_p3), icc_profile=profile)))
        copies.append(embed(_jpeg(srgb)))
    o, c = (np.stack(v) / np.linalg.norm(np.stack(v), axis=1, keepdims=True) for v in (originals, copies))
    scores = c @ o.T
    own = np.diag(scores)
    others = scores - 2 * np.eye(len(own))
    return {"model": model, "photos": len(own), "cosine_min": round(float(own.min()), 4),
            "cosine_p5": round(float(np.percentile(own, 5)), 4), "cosine_median": round(float(np.median(own)), 4),
            "source@1": round(float((scores.argmax(axis=1) == np.arange(len(own))).mean()), 3),
            "best_other_median": round(float(np.median(others.max(axis=1))), 4)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.colour_profiles", description=__doc__)
    parser.add_argument("--photos", type=Path, default=Path(".bucketlens/photos"), help="the corpus's cache folder")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    result = measure(args.photos, args.model)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "colour-profiles.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
