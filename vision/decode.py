"""Bytes -> the model's square RGB input (and, for spatial verification, a small grayscale image): EXIF
orientation applied, any mode converted, bombs refused. Any format Pillow reads, and HEIC/HEIF (phone cameras'
photos) through pillow-heif, which applies a HEIF's own rotation and mirroring and clears the EXIF orientation it
stood for."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import re
import warnings
from collections.abc import Iterator

import numpy as np
import pillow_heif
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import PermanentError
from .models import Recipe

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a failure, not a grey half-image
pillow_heif.register_heif_opener()
Image.init()
# Every format Pillow reads but EPS, which it hands to Ghostscript where that is installed (a program with a long
# list of code-execution flaws, run on an untrusted upload or bucket object: an independent check).
FORMATS = tuple(sorted(set(Image.OPEN) - {"EPS"}))
TIFF = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, either byte order
POSTSCRIPT = (b"%!PS", b"\xc5\xd0\xd3\xc6")  # EPS, and EPS with a DOS binary header
MAX_JPEG_SCANS = 100  # a progressive photo has about 10; each scan is another pass over the whole image
HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}


@dataclasses.dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # size x size x 3 uint8 RGB, the model's input
    gray: np.ndarray | None  # uint8, longer side at most ``gray_side``, aspect kept (None unless asked for)
    width: int  # of the picture, after EXIF orientation and (with ``trim``) without its borders: how many pixels
    height: int  # a copy has (a letterboxed copy is no bigger than its source: it was the group's "best copy")


def decode(data: bytes, max_pixels: int, size: int = 224) -> np.ndarray:
    """Decode one image (first frame of an animation) into a ``size x size x 3`` uint8 array."""
    return decode_image(data, max_pixels, size).pixels


def decode_for(recipe: Recipe, data: bytes, max_pixels: int, local: bool = False) -> Decoded:
    """Decode as ``recipe`` describes images: its input size, its border trimming and, with ``local`` when the
    recipe keeps local features, the grayscale image they are extracted from. The model's input is the same either
    way: a large JPEG is decoded at the reduced scale the local features need whether or not they are wanted (a
    search with ``rerank=false`` decoded at the model's scale and scored the stored file's own copy 0.993-0.999
    where the worker's decode gave 1.0: review 76)."""
    side = recipe.local_side if recipe.local_features else 0
    return decode_image(data, max_pixels, recipe.input_size, side if local else 0, recipe.trim_borders, draft=side)


def decode_image(data: bytes, max_pixels: int, size: int = 224, gray_side: int = 0, trim: bool = False,
                 draft: int = 0) -> Decoded:
    """Decode one image (first frame of an animation): the model input, and a grayscale copy whose longer side is
    at most ``gray_side`` when that is not 0. ``trim``: solid-colour borders (padding, letterboxing) are cut off
    first, so a padded copy is described like its source. ``draft``: a large JPEG is decoded at a reduced scale no
    smaller than this (nor than ``size`` and ``gray_side``)."""
    with _decoding(data):
        image, width, height = _open_rgb(data, max_pixels, max(size, gray_side, draft))
        if trim:
            untrimmed = image.size  # (after draft: a reduced scale of ``width`` x ``height``)
            image = trim_borders(image)
            width = round(width * image.width / untrimmed[0])
            height = round(height * image.height / untrimmed[1])
        gray = None
        if gray_side:
            scale = min(1.0, gray_side / max(image.size))
            target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            gray = np.asarray(image.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0).convert("L"))
        square = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return Decoded(np.asarray(square, dtype=np.uint8), gray, width, height)


def preview_jpeg(data: bytes, max_pixels: int, side: int = 320) -> bytes:
    """A JPEG of the image (first frame) whose longer side is at most ``side``, for a browser that cannot show the
    file itself (HEIC, TIFF, ...): oriented, in RGB, decoded as the model's input is, with the same limits. An RGB
    colour profile goes with it (a phone's Display P3 HEIC looked washed out as untagged sRGB); another kind (CMYK,
    grey) described pixels that are RGB no longer, and is left out."""
    with _decoding(data):
        image, _, _ = _open_rgb(data, max_pixels, side)
        image.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
        profile = image.info.get("icc_profile")
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85, icc_profile=profile if _rgb_profile(profile) else None)
        return out.getvalue()


def _rgb_profile(profile: object) -> bool:
    """Whether ``profile`` is an ICC profile of RGB data (its header's colour space field, bytes 16-19)."""
    return isinstance(profile, bytes) and profile[16:20] == b"RGB "


def _open_rgb(data: bytes, max_pixels: int, side: int) -> tuple[Image.Image, int, int]:
    """The image oriented and in RGB (a large JPEG decoded at a reduced scale still above ``side``), and its
    width and height before that scale."""
    if not data:
        raise PermanentError("empty", "the file is empty (zero bytes)")
    # Pillow's own check, at bucketlens's limit (every caller in a process passes the same setting): it sees the
    # header's size as the file is opened, and the image inside a container where that is read at load. An ICNS
    # entry that claims 1024x1024 and holds a 20000x20000 PNG passed a check of the header alone and decoded
    # 1.6 GB from a 1.6 MB file (review 70).
    Image.MAX_IMAGE_PIXELS = max_pixels
    image: Image.Image = Image.open(io.BytesIO(data), formats=FORMATS)
    width, height = image.size
    if width * height > max_pixels:  # (Pillow's is a warning below 2x, made an error by a filter other threads share)
        raise PermanentError("too_many_pixels", f"{width}x{height} exceeds {max_pixels} pixels (BUCKETLENS_MAX_PIXELS)")
    if image.format == "JPEG":
        # A scan bomb: libjpeg has no limit of its own, and 10,000 repeated scans took 34-46 s to decode.
        # Every scan starts with an SOS marker, which entropy-coded data never holds (0xFF is stuffed).
        if (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
            raise PermanentError("corrupt", f"JPEG of {scans} scans: at most {MAX_JPEG_SCANS} are decoded")
        image.draft("RGB", (side, side))  # decoded at a reduced scale (1/2, 1/4, 1/8) where it is much larger
    image.load()
    image = _to_rgb(_orient(image))
    if (image.width > image.height) != (width > height):  # EXIF turned it (the header size is pre-draft)
        width, height = height, width
    return image, width, height


@contextlib.contextmanager
def _decoding(data: bytes) -> Iterator[None]:
    """Decoding ``data``'s failures as PermanentErrors: untrusted bytes, whatever the codec raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except PermanentError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:  # (a warning: made an error above)
        pixels = re.search(r"\((\d+) pixels\)", str(exc))  # "Image size (N pixels) exceeds limit of M pixels, ..."
        raise PermanentError("too_many_pixels", f"{pixels[1] if pixels else 'more'} pixels exceed "
                             f"{Image.MAX_IMAGE_PIXELS} (BUCKETLENS_MAX_PIXELS)") from exc
    except UnidentifiedImageError as exc:
        if data[4:8] == b"ftyp" and data[8:12] in HEIF_BRANDS:  # a phone photo cut short: its boxes do not parse
            raise PermanentError("corrupt", f"HEIF/AVIF ({data[8:12].decode()}) that cannot be read") from exc
        if data[:4] in TIFF:  # (a float RGB TIFF, a valid file, was "not a recognised image format": review 61)
            raise PermanentError("corrupt", "TIFF that cannot be read: damaged, or of samples not read here (e.g. "
                                 "3 or 4 channels of floats): save it with 8- or 16-bit samples") from exc
        if data.startswith(POSTSCRIPT):
            raise PermanentError("not_an_image", "PostScript (EPS) is not read: it would need Ghostscript") from exc
        raise PermanentError("not_an_image", "not a recognised image format") from exc
    except Exception as exc:  # any codec's failure on untrusted bytes (Pillow's AVIF plugin raises RuntimeError)
        raise PermanentError("corrupt", f"image cannot be decoded: {type(exc).__name__}: {exc}") from exc


BORDER_TOLERANCE = 12  # per channel: JPEG noise on a solid band stays within it
BORDER_SHARE = 0.97  # of a line's pixels within tolerance of the band's colour for the line to be border
MAX_TRIM = 0.3  # of each dimension per side: never more (a uniform sky must not eat the photo)


def trim_borders(image: Image.Image) -> Image.Image:
    """``image`` without solid-colour bands along its edges, judged on a small copy (fast for any size)."""
    scale = min(1.0, 256 / max(image.size))
    small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.BILINEAR) if scale < 1 else image
    pixels = np.asarray(small, dtype=np.int16)
    h, w = pixels.shape[:2]
    top = _band(pixels, int(h * MAX_TRIM))
    bottom = _band(pixels[::-1], int(h * MAX_TRIM))
    left = _band(pixels.transpose(1, 0, 2), int(w * MAX_TRIM))
    right = _band(pixels.transpose(1, 0, 2)[::-1], int(w * MAX_TRIM))
    if not (top or bottom or left or right):
        return image
    return image.crop((round(left / scale), round(top / scale), round(image.width - right / scale),
                       round(image.height - bottom / scale)))


def _band(rows: np.ndarray, limit: int) -> int:
    """How many leading rows of ``rows`` (lines x pixels x 3) are one solid colour, that of the first row; a band
    of a single line is not counted (an edge of the picture itself)."""
    colour = np.median(rows[0], axis=0)
    count = 0
    while count < limit:
        close = (np.abs(rows[count] - colour).max(axis=1) <= BORDER_TOLERANCE).mean()
        if close < BORDER_SHARE:
            break
        count += 1
    return count + 1 if count >= 2 else 0  # +1: the resampled line where band and picture blend


def _orient(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # a corrupt EXIF block must not make a readable photo fail
        return image


ROWS = 256  # rows of a 16- or 32-bit image scaled to 8 bits at a time


# The bit depths integer samples are stored at: a 16-bit file of a 10-, 12- or 14-bit sensor (microscopes,
# telescopes, machine-vision cameras) was scaled by 65535 and indexed as a black picture (review 61).
DEPTHS = (255, 1023, 4095, 16383, 65535)


def _to_8_bits(pixels: np.ndarray, mode: str) -> np.ndarray:
    """One band of 16- or 32-bit integers or of floats scaled to 0..255. Integers by the peak of the fewest bits
    that hold them (8, 10, 12, 14 or 16), or by their own range past 16 bits (it was all white or black). Floats: 0..1,
    the usual convention, up to 2 (clipped to 0..255, a float TIFF of a photo became an all-black image, indexed
    without a word: an independent check), 0..255, or their own range; NaN is black. A band of rows at a time:
    float64 copies of the whole image took 2.6 GB for one 64 MP 16-bit PNG."""
    low, high = float(pixels.min()), float(pixels.max())
    if not (math.isfinite(low) and math.isfinite(high)):  # a float image with NaN or infinities
        finite = pixels[np.isfinite(pixels)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode == "F":  # (0..1 with some overshoot, as processing leaves it, is still 0..1: it was read as 0..255)
        floor, peak = (0.0, 1.0) if 0 <= low and high <= 2 else (0.0, 255.0) if 0 <= low and high <= 255 else (
            low, max(high - low, 1e-6))
    else:
        floor, peak = 0.0, float(next((depth for depth in DEPTHS if high <= depth), DEPTHS[-1]))
        if low < 0 or high > DEPTHS[-1]:
            floor, peak = low, max(high - low, 1.0)
    scaled = np.empty(pixels.shape, np.uint8)
    for top in range(0, len(pixels), ROWS):
        band = (pixels[top : top + ROWS].astype(np.float32) - np.float32(floor)) * np.float32(255.0 / peak)
        scaled[top : top + ROWS] = np.clip(np.nan_to_num(band, nan=0.0, posinf=255.0, neginf=0.0), 0, 255)
    return scaled


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = Image.fromarray(_to_8_bits(np.asarray(image), image.mode), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")  # no copy of a 64 MP RGBA image
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
