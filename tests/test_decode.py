"""Decoding: modes, EXIF orientation, animations, bombs, truncation, non-images."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from vision.decode import MAX_JPEG_SCANS, decode, decode_for, decode_image, preview_jpeg
from vision.models import DEFAULT_MODEL, recipe
from workers.errors import PermanentError

LIMIT = 10_000_000


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def half_red_half_blue(width: int = 64, height: int = 32) -> Image.Image:
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    return image


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK", "RGBA", "LA", "I;16", "1", "I", "F"])
def test_any_mode_becomes_224_rgb(mode: str) -> None:
    image = half_red_half_blue().convert(mode) if mode not in ("I;16", "I", "F") else Image.new(mode, (40, 30))
    fmt = "TIFF" if mode in ("CMYK", "I;16", "I", "F") else "PNG"
    pixels = decode(encode(image, fmt), LIMIT)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    image = Image.fromarray(np.full((20, 20), 30000, dtype=np.uint16))
    pixels = decode(encode(image, "PNG"), LIMIT)
    assert 100 < pixels.mean() < 140  # 30000/65535 of full scale, not saturated white


@pytest.mark.parametrize(("bits", "mode"), [(8, "I;16"), (10, "I;16"), (12, "I;16"), (12, "I"), (14, "I;16")])
def test_a_sixteen_bit_file_of_fewer_bits_decodes_as_its_picture(bits: int, mode: str) -> None:
    """A 16-bit PNG or TIFF holding a 12-bit sensor's values (0..4095) was scaled by 65535: a black picture, found
    by nothing that shows it, and unrelated ones alike (review 61). Scaled by the peak of the bits they use."""
    gray = half_red_half_blue().convert("L")
    gray.paste(255, (0, 0, 16, 16))
    expected = decode(encode(gray, "PNG"), LIMIT).astype(int)
    values = np.asarray(gray, np.uint32) * ((2**bits - 1) / 255)
    image = (Image.fromarray(values.round().astype(np.uint16)) if mode == "I;16"
             else Image.fromarray(values.round().astype(np.int32), "I"))
    assert image.mode == mode
    pixels = decode(encode(image, "PNG" if mode == "I;16" else "TIFF"), LIMIT).astype(int)
    assert np.abs(pixels - expected).max() <= 2, (bits, mode, pixels.max())


@pytest.mark.parametrize("low, high", [(100_000, 1_000_000), (-500, 500)])
def test_thirty_two_bit_beyond_sixteen_is_scaled_by_its_own_range(low: int, high: int) -> None:
    """Scaled by 16 bits' peak, a 32-bit image's values past 65535 were all white and negative ones all black (an
    independent review): its halves could not be told apart."""
    values = np.full((32, 64), low, dtype=np.int32)
    values[:, 32:] = high
    pixels = decode(encode(Image.fromarray(values, "I"), "TIFF"), LIMIT).astype(int)
    assert pixels[:, :100].mean() < 30 and pixels[:, 124:].mean() > 225


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_a_float_image_of_a_photo_decodes_as_the_photo_does(scale: float) -> None:
    """A float TIFF with values 0..1 (the usual convention) was clipped to 0..255, that is to 0 and 1: an all-black
    image, indexed without a word (an independent check). Both conventions now decode as the 8-bit photo does."""
    gray = half_red_half_blue().convert("L")
    gray.paste(255, (0, 0, 16, 16))
    values = np.asarray(gray, np.float32) / 255.0 * np.float32(scale)
    expected = decode(encode(gray, "PNG"), LIMIT).astype(int)
    pixels = decode(encode(Image.fromarray(values, "F"), "TIFF"), LIMIT).astype(int)
    assert np.abs(pixels - expected).max() <= 1
    if scale == 1.0:  # processing leaves some overshoot: one value past 1 read the rest as 0..255, all black
        values[0, 0] = 1.05
        pixels = decode(encode(Image.fromarray(values, "F"), "TIFF"), LIMIT).astype(int)
        assert np.abs(pixels - expected).max() <= 2


def test_a_float_image_with_nan_and_a_range_of_its_own_keeps_its_picture() -> None:
    values = np.full((32, 64), -3.0, np.float32)
    values[:, 32:] = 5.0
    values[0, 0] = np.nan
    pixels = decode(encode(Image.fromarray(values, "F"), "TIFF"), LIMIT).astype(int)
    assert pixels[:, :100].mean() < 30 and pixels[:, 124:].mean() > 225


@pytest.mark.parametrize("fmt", ["JPEG", "HEIF"])  # HEIF: a phone's photo; pillow-heif stores the turn as its own
def test_exif_orientation_is_applied_once(fmt: str) -> None:
    image = half_red_half_blue(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW when displayed
    pixels = decode(encode(image, fmt, exif=exif.tobytes()), LIMIT)
    top, bottom = pixels[:50].mean(axis=(0, 1)), pixels[-50:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60  # displayed upright: red on top, blue at the bottom
    assert bottom[2] > 200 and bottom[0] < 60


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in ((0, 255, 0), (255, 0, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode(data, LIMIT)[..., 1].mean() > 200


def test_transparent_png_is_composited_on_white() -> None:
    pixels = decode(encode(Image.new("RGBA", (10, 10), (0, 0, 0, 0)), "PNG"), LIMIT)
    assert pixels.min() > 250


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"hello, I am text with a .jpg name", "not_an_image"),
        (encode(half_red_half_blue(400, 400), "JPEG")[:600], "corrupt"),
        (encode(half_red_half_blue(400, 400), "PNG")[:200], "corrupt"),
        (encode(half_red_half_blue(400, 400), "HEIF")[:300], "corrupt"),
    ],
)
def test_bad_objects_raise_permanent_errors(data: bytes, reason: str) -> None:
    with pytest.raises(PermanentError) as info:
        decode(data, LIMIT)
    assert info.value.reason == reason


def float_rgb_tiff(width: int = 8, height: int = 4) -> bytes:
    """A valid TIFF of 3 channels of 32-bit floats (as tifffile writes one), which Pillow does not read."""
    pixels = np.random.default_rng(0).random((height, width, 3), np.float32).tobytes()
    after = 8 + 2 + 12 * 10 + 4  # header, the directory's 10 entries, the next directory's offset
    entries = [(256, 3, 1, width), (257, 3, 1, height), (258, 3, 3, after), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, after + 12), (277, 3, 1, 3), (278, 3, 1, height), (279, 4, 1, len(pixels)),
               (339, 3, 3, after + 6)]  # bits per sample and sample format (3: float) point past the directory
    data = b"II*\x00" + struct.pack("<IH", 8, len(entries)) + b"".join(
        struct.pack("<HHII", tag, kind, count, value) if kind == 4 or count > 1
        else struct.pack("<HHIHH", tag, kind, count, value, 0) for tag, kind, count, value in entries)
    return data + struct.pack("<I3H3H", 0, 32, 32, 32, 3, 3, 3) + pixels


def test_a_tiff_of_samples_not_read_says_so_and_not_that_it_is_no_image() -> None:
    """A valid float RGB TIFF was "not_an_image: not a recognised image format" (review 61)."""
    with pytest.raises(PermanentError) as info:
        decode(float_rgb_tiff(), LIMIT)
    assert info.value.reason == "corrupt" and "TIFF that cannot be read" in str(info.value), str(info.value)
    assert "8- or 16-bit samples" in str(info.value)


def test_a_preview_is_a_small_upright_jpeg_of_any_format_and_keeps_the_limits() -> None:
    upright = half_red_half_blue(400, 200)  # red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    turned = encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif)  # as a camera stores it
    for fmt, data in (("TIFF", encode(upright, "TIFF")), ("HEIF", encode(upright, "HEIF")), ("JPEG", turned)):
        preview = Image.open(io.BytesIO(preview_jpeg(data, LIMIT)))
        assert preview.format == "JPEG" and preview.size == (320, 160), (fmt, preview.size)
        left, right = np.asarray(preview)[:, :100].mean(axis=(0, 1)), np.asarray(preview)[:, -100:].mean(axis=(0, 1))
        assert left[0] > 200 > left[2] and right[2] > 200 > right[0], (fmt, left, right)
    with pytest.raises(PermanentError) as failure:
        preview_jpeg(encode(upright, "PNG"), 1000)
    assert failure.value.reason == "too_many_pixels"


def test_a_preview_keeps_an_rgb_colour_profile_and_drops_one_of_other_data() -> None:
    """A phone's Display P3 photo untagged reads as sRGB in a browser, its colours washed out; a CMYK profile
    described the pixels before they were made RGB."""
    rgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()  # (any profile: its header is read)
    rgb = rgb[:16] + b"RGB " + rgb[20:]
    cmyk = rgb[:16] + b"CMYK" + rgb[20:]
    for fmt in ("HEIF", "TIFF", "JPEG"):
        data = encode(half_red_half_blue(400, 200), fmt, icc_profile=rgb)
        assert Image.open(io.BytesIO(preview_jpeg(data, LIMIT))).info.get("icc_profile") == rgb, fmt
    data = encode(Image.new("CMYK", (40, 30)), "JPEG", icc_profile=cmyk)
    assert "icc_profile" not in Image.open(io.BytesIO(preview_jpeg(data, LIMIT))).info


def test_postscript_is_not_an_image_and_never_reaches_ghostscript() -> None:
    """Pillow hands an EPS file to Ghostscript where it is installed; here (none) it was a `corrupt` failure
    ("Unable to locate Ghostscript"), which the file is not (an independent check)."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"
    for data in (eps, b"\xc5\xd0\xd3\xc6" + bytes(26) + eps):
        with pytest.raises(PermanentError) as failure:
            decode(data, LIMIT)
        assert failure.value.reason == "not_an_image" and "PostScript (EPS)" in str(failure.value)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = encode(Image.new("L", (12_000, 12_000)), "PNG")  # ~100 KB on disk, 144 MP
    assert len(bomb) < 1_000_000
    with pytest.raises(PermanentError) as info:
        decode(bomb, LIMIT)
    assert info.value.reason == "too_many_pixels"


def test_an_image_inside_a_container_is_held_to_the_pixel_limit_before_it_is_decoded() -> None:
    """An ICNS entry is 1024x1024 by its type, and its header says so; the PNG inside may be any size, and Pillow
    decoded it whole before checking (review 70: 1.6 GB from a 1.6 MB file). Pillow's own check, which sees the
    inner image, now runs at bucketlens's limit."""
    png = encode(Image.new("L", (12_000, 12_000)), "PNG")  # 144 MP, ~100 KB
    entry = b"ic10" + struct.pack(">I", 8 + len(png)) + png
    icns = b"icns" + struct.pack(">I", 8 + len(entry)) + entry
    assert Image.open(io.BytesIO(icns)).size == (1024, 1024)
    for call in (decode, preview_jpeg):
        with pytest.raises(PermanentError) as info:
            call(icns, LIMIT)
        assert info.value.reason == "too_many_pixels", info.value
        assert f"144000000 pixels exceed {LIMIT} (BUCKETLENS_MAX_PIXELS)" in str(info.value)


STUFFED_OR_RESTART = {0x00, *range(0xD0, 0xD8)}  # what may follow 0xFF inside a JPEG scan's data


def with_repeated_scan(jpeg: bytes, times: int) -> bytes:
    """A progressive JPEG with its shortest scan given ``times`` more times before the end: a scan bomb (a security
    check's file of 10,000 scans took 34-46 s to decode), which Pillow decodes as a valid image."""
    scans, start = [], jpeg.find(b"\xff\xda")
    while start != -1:
        end = start + 2 + int.from_bytes(jpeg[start + 2 : start + 4], "big")  # past the SOS header
        while jpeg[(end := jpeg.index(b"\xff", end)) + 1] in STUFFED_OR_RESTART:  # to the next marker
            end += 2
        scans.append(jpeg[start:end])
        start = jpeg.find(b"\xff\xda", end)
    end_of_image = jpeg.rindex(b"\xff\xd9")
    return jpeg[:end_of_image] + min(scans, key=len) * times + jpeg[end_of_image:]


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding() -> None:
    progressive = encode(half_red_half_blue(1024, 768), "JPEG", quality=90, progressive=True)
    assert decode(progressive, LIMIT).shape == (224, 224, 3)  # ~10 scans
    bomb = with_repeated_scan(progressive, MAX_JPEG_SCANS)
    Image.open(io.BytesIO(bomb)).load()  # a valid image: the limit is what refuses it
    with pytest.raises(PermanentError) as refused:
        decode(bomb, LIMIT)
    assert refused.value.reason == "corrupt" and f"at most {MAX_JPEG_SCANS}" in str(refused.value)


def test_a_heic_photo_decodes_as_its_png_does() -> None:
    photo = Image.open(io.BytesIO(encode(half_red_half_blue(640, 480), "PNG")))
    from_heic, from_png = (decode(encode(photo, fmt, quality=90), LIMIT) for fmt in ("HEIF", "PNG"))
    assert np.abs(from_heic.astype(int) - from_png).mean() < 3


def test_large_jpeg_uses_draft_mode_and_keeps_content() -> None:
    pixels = decode(encode(half_red_half_blue(4000, 3000), "JPEG", quality=90), 20_000_000)
    assert pixels[:, :100, 0].mean() > 200 and pixels[:, -100:, 2].mean() > 200


@pytest.mark.parametrize("fill", [(255, 255, 255), (0, 0, 0), (40, 160, 90)])
def test_solid_borders_are_trimmed_and_photos_are_left_alone(fill: tuple[int, int, int]) -> None:
    from infra.samples import skimage_data
    from vision.decode import trim_borders

    photo = Image.open(skimage_data() / "chelsea.png").convert("RGB")  # 451 x 300
    padded = Image.new("RGB", (451 + 40 + 70, 300 + 30 + 20), fill)
    padded.paste(photo, (40, 30))
    trimmed = trim_borders(Image.open(io.BytesIO(encode(padded, "JPEG", quality=60))))
    assert abs(trimmed.width - 451) <= 6 and abs(trimmed.height - 300) <= 6, trimmed.size
    for name in ("astronaut.png", "coffee.png", "rocket.jpg"):  # no borders: nothing is cut
        image = Image.open(skimage_data() / name).convert("RGB")
        assert trim_borders(image).size == image.size, name
    # Decoded for a recipe that trims, the padded copy looks like its source; without trimming it does not.
    source = decode_image(encode(photo, "PNG"), LIMIT).pixels.astype(np.float32)
    with_trim = decode_image(encode(padded, "PNG"), LIMIT, trim=True).pixels.astype(np.float32)
    without = decode_image(encode(padded, "PNG"), LIMIT).pixels.astype(np.float32)
    assert np.abs(with_trim - source).mean() < np.abs(without - source).mean() / 3


def test_a_letterboxed_copy_counts_the_pixels_of_its_picture_not_of_its_borders() -> None:
    """Duplicate groups are led by the copy with the most pixels: a letterboxed copy of a photo led its group,
    its black bars counted (an independent check). Pixels are counted after trimming, at full scale also where
    a large JPEG is decoded at a reduced one."""
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1500, 2000, 3), dtype=np.uint8))
    boxed = Image.new("RGB", (2000, 1500 + 2 * 250), (0, 0, 0))
    boxed.paste(picture, (0, 250))
    for image, fmt in ((picture, "JPEG"), (boxed, "JPEG"), (boxed, "PNG")):
        decoded = decode_image(encode(image, fmt, quality=90), LIMIT, trim=True)
        assert abs(decoded.width - 2000) <= 16 and abs(decoded.height - 1500) <= 16, (image.size, fmt, decoded.width,
                                                                                      decoded.height)
    untrimmed = decode_image(encode(boxed, "PNG"), LIMIT)
    assert (untrimmed.width, untrimmed.height) == (2000, 2000)  # (a recipe that keeps borders counts them)


def test_a_codec_that_fails_otherwise_makes_the_object_corrupt_not_the_batch() -> None:
    """Pillow's AVIF plugin raises RuntimeError on this mutated file (an independent check's fuzzing): it failed
    every object of its batch as `internal`, again after each reconcile, and /search answered 500."""
    data = (Path(__file__).parent / "fixtures" / "images" / "corrupt-yuv.avif").read_bytes()
    with pytest.raises(PermanentError) as refused:
        decode(data, 64_000_000)
    assert refused.value.reason == "corrupt" and "RuntimeError" in str(refused.value)


def test_the_model_input_of_a_large_jpeg_is_the_same_with_local_features_or_without() -> None:
    """A search with ``rerank=false`` decoded a large JPEG at the model's reduced scale, where the worker decodes at
    the local features' scale: the stored file's own copy scored 0.993-0.999, not 1.0 (review 76), and a
    ``min_score`` cut depended on the flag."""
    from infra.samples import skimage_data

    photo = Image.open(skimage_data() / "chelsea.png").convert("RGB").resize((2400, 1800))
    data = encode(photo, "JPEG", quality=90)
    chosen = recipe(DEFAULT_MODEL)
    worker, query = (decode_for(chosen, data, LIMIT, local=local) for local in (True, False))
    assert query.gray is None and worker.gray is not None
    np.testing.assert_array_equal(query.pixels, worker.pixels)
