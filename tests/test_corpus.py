"""bench/corpus.py: which files become photos, in which family, and what is skipped; on synthetic trees only
(no apt, no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import corpus
from bench.corpus import Candidate, Skipped, normalise, select, select_skimage


def noise(path: Path, w: int, h: int, seed: int = 0) -> Path:
    """A busy image (never flat) of ``w`` x ``h`` at ``path``, in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A small unpacked tree with the layout of the five Debian packages."""
    root = tmp_path / "root"
    bg = root / "usr/share/backgrounds"
    noise(bg / "Bridge_by_Someone.jpg", 400, 300)
    noise(bg / "gnome/adwaita-l.webp", 300, 300, seed=1)
    noise(bg / "gnome/adwaita-d.webp", 300, 300, seed=2)
    (bg / "gnome/blobs-l.svg").write_text("<svg/>")
    noise(bg / "gnome/vnc-l.webp", 100, 300)  # tiny
    Image.new("RGB", (400, 300), (40, 120, 60)).save(bg / "gnome/symbolic-l.webp")  # flat
    for w, h in ((400, 300), (480, 320), (300, 480), (320, 260)):
        noise(bg / f"sway/Sway_Wallpaper_Blue_{w}x{h}.png", w, h)
    images = root / "usr/share/wallpapers/Altai/contents/images"
    noise(images / "400x300.jpg", 400, 300)
    noise(images / "300x600.png", 300, 600)  # larger, but portrait
    link(images / "5120x2880.jpg", "400x300.jpg")  # the name lies: it is the 400x300 file
    noise(images.parent / "screenshot.png", 800, 600)
    noise(images.parent / "images_dark/320x256.jpg", 320, 256, seed=3)
    shared = noise(root / "usr/share/wallpapers/Shared/real/500x300.png", 500, 300)
    link(root / "usr/share/wallpapers/Kite/contents/images/1920x1080.png", "/" + str(shared.relative_to(root)))
    return root


def by_name(candidates: list[Candidate]) -> dict[str, Candidate]:
    return {c.name: c for c in candidates}


def test_select_pairs_gnome_light_and_dark_and_skips_svg_tiny_and_flat(root: Path) -> None:
    kept, skipped = select(root)
    names = by_name(kept)
    assert names["gnome/adwaita-l"].family == names["gnome/adwaita-d"].family == "gnome/adwaita"
    reasons = dict(skipped)
    assert reasons["gnome/blobs-l"].startswith("svg")
    assert reasons["gnome/vnc-l"] == "tiny (100x300)"
    assert reasons["gnome/symbolic-l"].startswith("flat")
    assert not {"gnome/blobs-l", "gnome/vnc-l", "gnome/symbolic-l"} & set(names)
    assert names["lomiri/Bridge_by_Someone"] == Candidate(
        "lomiri/Bridge_by_Someone", "lomiri/Bridge_by_Someone", "lomiri",
        root / "usr/share/backgrounds/Bridge_by_Someone.jpg")


def test_select_plasma_takes_the_largest_landscape_of_each_folder_resolving_symlinks(root: Path) -> None:
    names = by_name(select(root)[0])
    images = root / "usr/share/wallpapers/Altai/contents"
    assert names["plasma/Altai"].original == images / "images/400x300.jpg"  # not the portrait, nor the link
    assert names["plasma/Altai-dark"] == Candidate("plasma/Altai-dark", "plasma/Altai", "plasma",
                                                   images / "images_dark/320x256.jpg")
    # An absolute link means the unpacked tree, not this machine's /usr.
    assert names["plasma/Kite"].original == root / "usr/share/wallpapers/Shared/real/500x300.png"
    assert not any("screenshot" in str(c.original) for c in names.values())


def test_select_keeps_one_landscape_and_one_portrait_sway_wallpaper(root: Path) -> None:
    kept, skipped = select(root)
    sway = {c.name: c.family for c in kept if c.source == "sway"}
    assert sway == {"sway/Sway_Wallpaper_Blue_480x320": "sway/Sway_Wallpaper_Blue",
                    "sway/Sway_Wallpaper_Blue_300x480": "sway/Sway_Wallpaper_Blue"}
    assert {s.name for s in skipped if s.name.startswith("sway/")} == {
        "sway/Sway_Wallpaper_Blue_400x300", "sway/Sway_Wallpaper_Blue_320x260"}


def test_select_skimage_uses_the_bundled_files_and_families(tmp_path: Path) -> None:
    noise(tmp_path / "motorcycle_left.png", 400, 300)
    noise(tmp_path / "motorcycle_right.png", 400, 300, seed=1)
    noise(tmp_path / "page.png", 384, 191)
    kept, skipped = select_skimage(tmp_path)
    assert [(c.name, c.family) for c in kept] == [("skimage/motorcycle_left", "skimage/motorcycle"),
                                                  ("skimage/motorcycle_right", "skimage/motorcycle")]
    reasons = dict(skipped)
    assert reasons["skimage/page"] == "tiny (384x191)"
    assert reasons["skimage/astronaut"] == "not bundled in this scikit-image"


def test_normalise_composites_alpha_on_white_and_caps_the_longer_side(tmp_path: Path) -> None:
    path = tmp_path / "clear.png"
    Image.new("RGBA", (2000, 1000), (255, 0, 0, 0)).save(path)
    image = normalise(path)
    assert image.mode == "RGB" and image.size == (1600, 800)
    assert image.getpixel((10, 10)) == (255, 255, 255)


def test_ensure_photos_builds_once_dedupes_and_then_reads_the_manifest(
        tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    noise(tmp_path / "data/astronaut.png", 300, 300, seed=9)
    noise(tmp_path / "data/camera.png", 300, 300, seed=9)  # the same pixels: kept once
    fetched: list[Path] = []

    def fetch_packages(folder: Path) -> Path:
        fetched.append(folder)
        return root

    monkeypatch.setattr(corpus, "fetch_packages", fetch_packages)
    monkeypatch.setattr(corpus, "skimage_data", lambda: tmp_path / "data")
    folder = tmp_path / "photos"
    photos = corpus.ensure_photos(folder)
    assert fetched == [folder]
    assert [p.name for p in photos] == sorted(p.name for p in photos)
    names = {p.name for p in photos}
    assert "skimage/astronaut" in names and "skimage/camera" not in names
    assert all(p.path.parent == folder / "gallery" and p.path.exists() for p in photos)
    assert (folder / "gallery/plasma__Altai-dark.jpg").exists()
    skipped = json.loads((folder / "corpus.json").read_text())["skipped"]
    assert ["skimage/camera", "same pixels as skimage/astronaut"] in skipped
    assert corpus.ensure_photos(folder) == photos  # from the manifest: nothing fetched again
    assert fetched == [folder]
    assert Skipped("gnome/vnc-l", "tiny (100x300)") in corpus.install(folder).skipped


def test_fetch_packages_says_when_apt_get_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get is not available"):
        corpus.fetch_packages(tmp_path)
