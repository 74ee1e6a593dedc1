"""The demo's sample set: real photographs bundled in the scikit-image wheel, plus augmented copies
(flipped, cropped, brightened) so near-duplicate search has something to find."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
          "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "page.png",
          "retina.jpg", "rocket.jpg", "clock_motion.png", "text.png", "horse.png", "cell.png", "color.png")
AUGMENTED = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")


def skimage_data() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def augment(image: Image.Image) -> Image.Image:
    """A near-duplicate: mirrored, cropped by 6% on each side, 10% brighter."""
    image = ImageOps.mirror(image.convert("RGB"))
    w, h = image.size
    image = image.crop((w * 6 // 100, h * 6 // 100, w - w * 6 // 100, h - h * 6 // 100))
    return ImageEnhance.Brightness(image).enhance(1.10)


def write_samples(folder: Path) -> list[Path]:
    """Write the sample set as JPEGs into ``folder``; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PHOTOS:
        image = Image.open(skimage_data() / name).convert("RGB")
        path = folder / (Path(name).stem + ".jpg")
        image.save(path, quality=92)
        written.append(path)
        if name in AUGMENTED:
            copy = folder / "augmented" / (Path(name).stem + "-flipped-crop.jpg")
            copy.parent.mkdir(exist_ok=True)
            augment(image).save(copy, quality=90)
            written.append(copy)
    return written
