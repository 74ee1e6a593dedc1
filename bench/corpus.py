"""The retrieval-quality benchmark's photo corpus, installed by the project itself on first use.

Sources: the real photographs bundled in the scikit-image wheel (read from its data folder, never fetched) and
the wallpapers of five Debian packages, downloaded with ``apt-get download`` and unpacked with ``dpkg -x`` into
the cache folder (nothing is installed system-wide). Each photo is normalised once (RGB on white, EXIF-oriented,
longer side <= 1600 px) into ``<folder>/gallery``; ``<folder>/corpus.json`` records the result, so a second
call reads that file and touches neither apt nor the images. ``python -m bench.corpus`` installs and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from infra.samples import skimage_data

log = logging.getLogger(__name__)

PACKAGES = ("gnome-backgrounds", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04",
            "plasma-workspace-wallpapers", "sway-backgrounds")
# scikit-image's real photographs: file -> family. Synthetic files (colour wheel, logo, chessboards, horse
# silhouette, phantom) are left out; the stereo pair is one family; data.cat() is chelsea.png, listed once.
SKIMAGE = {"astronaut.png": "astronaut", "brick.png": "brick", "camera.png": "camera", "cell.png": "cell",
           "chelsea.png": "chelsea", "clock_motion.png": "clock_motion", "coffee.png": "coffee",
           "coins.png": "coins", "grass.png": "grass", "gravel.png": "gravel",
           "hubble_deep_field.jpg": "hubble_deep_field", "ihc.png": "ihc", "microaneurysms.png": "microaneurysms",
           "moon.png": "moon", "motorcycle_left.png": "motorcycle", "motorcycle_right.png": "motorcycle",
           "page.png": "page", "retina.jpg": "retina", "rocket.jpg": "rocket", "text.png": "text"}
RASTER = {".jpg", ".jpeg", ".png", ".webp"}
MIN_SIDE = 256  # shorter side below this: too small to crop and still recognise
MAX_SIDE = 1600
# Measured on 64x64 thumbnails: gnome's symbolic (std 1.3-1.5, 5-6 colours) and vnc (std 0, 1-3 colours) are
# near-uniform; the darkest kept image, plasma Kay's dark variant, has std 4.7 and 40 colours.
FLAT_STD = 4.0
FLAT_COLOURS = 8
MANIFEST = "corpus.json"
VERSION = 1  # bump when the selection or normalisation changes, so old caches are rebuilt


@dataclasses.dataclass(frozen=True)
class Photo:
    name: str  # stable unique id, e.g. "plasma/Altai"
    family: str  # near-identical variants of one design share it, e.g. "gnome/adwaita"
    source: str  # "skimage" | "gnome" | "lomiri" | "plasma" | "sway"
    path: Path  # the normalised copy in the gallery folder


class Candidate(NamedTuple):
    name: str
    family: str
    source: str
    original: Path


class Skipped(NamedTuple):
    name: str
    reason: str


class Corpus(NamedTuple):
    photos: list[Photo]
    skipped: list[Skipped]


def flat_reason(image: Image.Image) -> str | None:
    """Why ``image`` is too uniform to be a photo (None if it is not): grey std or colours of a 64x64 thumbnail.

    ``image`` should be freshly opened: a JPEG is then decoded at a reduced scale (``draft``), which is enough.
    """
    image.draft("RGB", (256, 256))  # JPEG only: decode at reduced scale, the thumbnail does not need more
    thumb = image.convert("RGB").resize((64, 64), Image.Resampling.BOX)
    std = float(np.asarray(thumb.convert("L"), dtype=np.float64).std())
    colours = len(np.unique(np.asarray(thumb).reshape(-1, 3) // 8, axis=0))
    if std < FLAT_STD or colours < FLAT_COLOURS:
        return f"flat (grey std {std:.1f}, {colours} colours)"
    return None


def _check(name: str, path: Path, skipped: list[Skipped]) -> bool:
    """Whether the file at ``path`` is a usable photo; records the reason in ``skipped`` if not."""
    with Image.open(path) as image:
        reason = f"tiny ({image.width}x{image.height})" if min(image.size) < MIN_SIDE else flat_reason(image)
    if reason:
        skipped.append(Skipped(name, reason))
    return reason is None


def _resolve(path: Path, root: Path) -> Path:
    """``path`` with symlinks followed; absolute targets point into the unpacked tree, not this machine's /."""
    for _ in range(40):
        if not path.is_symlink():
            return path
        target = os.readlink(path)
        path = root / target.lstrip("/") if os.path.isabs(target) else path.parent / target
    raise OSError(f"symlink loop at {path}")


def _largest(files: list[Path], portrait: bool = False) -> Path | None:
    """The largest image (by pixels, read from the header) of the wanted orientation, else the largest of all."""
    sizes = {}
    for file in files:
        with Image.open(file) as image:
            sizes[file] = image.size
    wanted = [f for f, (w, h) in sizes.items() if (h > w) == portrait] or list(sizes)
    return max(sorted(wanted), key=lambda f: sizes[f][0] * sizes[f][1], default=None)


def _rasters(folder: Path, root: Path) -> list[Path]:
    """The distinct raster images in ``folder`` (symlinks resolved, dangling ones dropped), screenshots excluded."""
    files = {_resolve(p, root) for p in folder.iterdir() if p.suffix.lower() in RASTER and p.stem != "screenshot"}
    return sorted(f for f in files if f.is_file())


def select(root: Path) -> tuple[list[Candidate], list[Skipped]]:
    """The photos to keep from the unpacked Debian packages under ``root``, and what was skipped and why."""
    kept: list[Candidate] = []
    skipped: list[Skipped] = []

    def consider(name: str, family: str, source: str, path: Path) -> None:
        if path.suffix.lower() == ".svg":
            skipped.append(Skipped(name, "svg (vector art, not decoded)"))
        elif _check(name, path, skipped):
            kept.append(Candidate(name, family, source, path))

    backgrounds = root / "usr/share/backgrounds"
    for path in sorted(backgrounds.glob("*.jpg")):  # both lomiri packages put their photos here
        consider(f"lomiri/{path.stem}", f"lomiri/{path.stem}", "lomiri", _resolve(path, root))
    for path in sorted((backgrounds / "gnome").glob("*")):
        if path.suffix.lower() in RASTER | {".svg"}:
            consider(f"gnome/{path.stem}", "gnome/" + re.sub(r"-[ld]$", "", path.stem), "gnome", _resolve(path, root))
    # sway ships one design at many sizes: keep the largest landscape and the largest portrait version of it.
    designs: dict[str, list[Path]] = defaultdict(list)
    for path in _rasters(backgrounds / "sway", root) if (backgrounds / "sway").is_dir() else []:
        designs[re.sub(r"_\d+x\d+(_Portrait)?$", "", path.stem)].append(path)
    for design, files in sorted(designs.items()):
        chosen = {p for p in (_largest(files), _largest(files, portrait=True)) if p is not None}
        for path in sorted(chosen):
            consider(f"sway/{path.stem}", f"sway/{design}", "sway", path)
        skipped += [Skipped(f"sway/{p.stem}", "smaller copy of the same design") for p in files if p not in chosen]
    # plasma: per wallpaper, the largest landscape image, and that of the dark variant as a second family member.
    wallpapers = root / "usr/share/wallpapers"
    for folder in sorted(wallpapers.iterdir()) if wallpapers.is_dir() else []:
        for sub, suffix in (("images", ""), ("images_dark", "-dark")):
            images = folder / "contents" / sub
            best = _largest(_rasters(images, root)) if images.is_dir() else None
            if best is not None:
                consider(f"plasma/{folder.name}{suffix}", f"plasma/{folder.name}", "plasma", best)
    return kept, skipped


def select_skimage(data: Path) -> tuple[list[Candidate], list[Skipped]]:
    """scikit-image's bundled photographs found in ``data`` (its package data folder), checked like the rest."""
    kept: list[Candidate] = []
    skipped: list[Skipped] = []
    for file, family in sorted(SKIMAGE.items()):
        name = f"skimage/{Path(file).stem}"
        if not (data / file).is_file():
            skipped.append(Skipped(name, "not bundled in this scikit-image"))
        elif _check(name, data / file, skipped):
            kept.append(Candidate(name, f"skimage/{family}", "skimage", data / file))
    return kept, skipped


def normalise(path: Path) -> Image.Image:
    """The photo at ``path`` as the gallery holds it: EXIF-oriented, RGB on white, longer side <= MAX_SIDE."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        image = image.convert("RGB")
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)  # only ever shrinks
    return image


def _run(args: list[str], what: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a system tool; a clear error if it is missing (the corpus needs a Debian/Ubuntu machine)."""
    if shutil.which(args[0]) is None:
        raise RuntimeError(f"{args[0]} is not available: {what} needs a Debian/Ubuntu machine with {args[0]}")
    log.info("running %s", " ".join(args))
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)


def fetch_packages(folder: Path, packages: tuple[str, ...] = PACKAGES) -> Path:
    """Download the wallpaper packages into ``folder/debs`` and unpack them into ``folder/root``; returns the root."""
    debs, root = folder / "debs", folder / "root"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        what = "downloading the wallpaper packages"
        done = _run(["apt-get", "download", *missing], what, cwd=debs)
        if done.returncode != 0:  # usually missing or stale package lists: refresh them once and retry
            log.info("apt-get download failed (%s); refreshing the package lists", done.stderr.strip()[-300:])
            _run(["apt-get", "update", "-qq"], what)
            done = _run(["apt-get", "download", *missing], what, cwd=debs)
            if done.returncode != 0:
                raise RuntimeError(f"apt-get download {' '.join(missing)} failed: {done.stderr.strip()}")
    for package in packages:
        deb = sorted(debs.glob(f"{package}_*.deb"))[-1]
        done = _run(["dpkg", "-x", str(deb), str(root)], "unpacking the wallpaper packages")
        if done.returncode != 0:
            raise RuntimeError(f"dpkg -x {deb} failed: {done.stderr.strip()}")
    return root


def _build(folder: Path) -> Corpus:
    root = fetch_packages(folder)
    debian, skipped_debian = select(root)
    scikit, skipped_scikit = select_skimage(skimage_data())
    skipped = skipped_debian + skipped_scikit
    gallery = folder / "gallery"
    gallery.mkdir(parents=True, exist_ok=True)
    photos: list[Photo] = []
    seen: dict[str, str] = {}  # digest -> name of the first photo with those bytes
    for candidate in sorted(debian + scikit):
        path = gallery / (candidate.name.replace("/", "__") + ".jpg")  # names are "<source>/<stem>"
        if not path.exists():
            log.info("normalising %s", candidate.name)
            tmp = path.with_name(path.name + ".tmp")
            normalise(candidate.original).save(tmp, "JPEG", quality=95)
            tmp.replace(path)
        # The encoder is deterministic, so equal bytes mean equal normalised pixels and the reverse.
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            skipped.append(Skipped(candidate.name, f"same pixels as {seen[digest]}"))
            path.unlink()
            continue
        seen[digest] = candidate.name
        photos.append(Photo(candidate.name, candidate.family, candidate.source, path))
    return Corpus(sorted(photos, key=lambda p: p.name), skipped)


def install(folder: Path = Path(".bucketlens/photos")) -> Corpus:
    """The corpus in ``folder`` with what was skipped and why, building it on the first call only."""
    manifest = folder / MANIFEST
    if manifest.exists():
        data = json.loads(manifest.read_text())
        photos = [Photo(p["name"], p["family"], p["source"], folder / "gallery" / p["file"]) for p in data["photos"]]
        if data.get("version") == VERSION and all(p.path.exists() for p in photos):
            return Corpus(photos, [Skipped(*s) for s in data["skipped"]])
        log.info("%s is stale or incomplete: rebuilding the corpus", manifest)
    log.info("installing the photo corpus into %s", folder)
    corpus = _build(folder)
    rows = [{"name": p.name, "family": p.family, "source": p.source, "file": p.path.name} for p in corpus.photos]
    tmp = manifest.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"version": VERSION, "photos": rows, "skipped": corpus.skipped}, indent=1))
    tmp.replace(manifest)  # written last: its presence means the gallery is complete
    for skip in corpus.skipped:
        log.info("skipped %s: %s", skip.name, skip.reason)
    log.info("corpus ready: %d photos in %s", len(corpus.photos), folder / "gallery")
    return corpus


def ensure_photos(folder: Path = Path(".bucketlens/photos")) -> list[Photo]:
    """Install (once) and return the corpus, sorted by name."""
    return install(folder).photos


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.corpus", description=__doc__)
    parser.add_argument("--folder", type=Path, default=Path(".bucketlens/photos"), help="cache folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    photos, skipped = install(args.folder)
    counts = Counter(p.source for p in photos)
    families = {s: len({p.family for p in photos if p.source == s}) for s in counts}
    print(f"{'source':10s} {'photos':>6s} {'families':>8s}")
    for source in sorted(counts):
        print(f"{source:10s} {counts[source]:6d} {families[source]:8d}")
    print(f"{'total':10s} {len(photos):6d} {len({p.family for p in photos}):8d}")
    print(f"\nskipped ({len(skipped)}):")
    for skip in skipped:
        print(f"  {skip.name:45s} {skip.reason}")
    print(f"\nthe photos: {(args.folder / 'gallery').resolve()}")


if __name__ == "__main__":
    main()
