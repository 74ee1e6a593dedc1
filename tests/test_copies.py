"""Copies on the real stack: the worker sends local features with the vector, the index service verifies the top
candidates (results say ``verified``), and near-duplicate groups are maintained for ``GET /duplicates``."""

from __future__ import annotations

import io
from typing import Any

import httpx
import numpy as np
import pytest
from boto3.s3.transfer import TransferConfig
from PIL import Image, ImageOps

from infra.samples import skimage_data
from infra.stack import Stack

from .helpers import wait_for
from .test_pipeline import put, search_image, wait_indexed

pytestmark = pytest.mark.slow


def jpeg(name: str, mirror: bool = False, crop: float = 1.0, longer: int = 0, quality: int = 90) -> bytes:
    image = Image.open(skimage_data() / name).convert("RGB")
    w, h = image.size
    image = image.crop((int(w * (1 - crop) / 2), int(h * (1 - crop) / 2), int(w * (1 + crop) / 2),
                        int(h * (1 + crop) / 2)))
    image = ImageOps.mirror(image) if mirror else image
    if longer:
        image.thumbnail((longer, longer))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def test_copies_are_verified_first_and_grouped(stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str) -> None:
    uploads = {
        "astronaut.jpg": jpeg("astronaut.png"),
        "astronaut-copy.jpg": jpeg("astronaut.png", mirror=True, crop=0.8, longer=300, quality=50),
        "chelsea.jpg": jpeg("chelsea.png"),
        "coffee.jpg": jpeg("coffee.png"),
        "rocket.jpg": jpeg("rocket.jpg"),
    }
    etags = {name: put(s3, stack, unique_prefix + name, body) for name, body in uploads.items()}
    for name, etag in etags.items():
        wait_indexed(api, stack, unique_prefix + name, etag)

    # A query that is a mild copy (mirror, crop, small, JPEG 40): its source and the other copy are verified.
    results = search_image(api, jpeg("astronaut.png", mirror=True, crop=0.85, longer=420, quality=40),
                           prefix=unique_prefix)  # (the whole bucket's top 10 can be other tests' astronauts)
    assert {r["key"] for r in results[:2]} == {unique_prefix + "astronaut.jpg", unique_prefix + "astronaut-copy.jpg"}
    assert all(r["verified"] and r["matches"] >= 30 for r in results[:2]), results[:2]
    assert not any(r["verified"] for r in results[2:]), results[2:]

    # By key: the stored object's features verify its copy; a vector query cannot rerank.
    by_key = api.post("/search", json={"key": unique_prefix + "astronaut.jpg", "k": 5, "prefix": unique_prefix}
                      ).json()["results"]  # (other tests upload the same photo)
    assert by_key[0]["key"] == unique_prefix + "astronaut-copy.jpg"
    unverified = api.post("/search", json={"key": unique_prefix + "astronaut.jpg", "rerank": False}).json()
    assert all(r["matches"] is None for r in unverified["results"])
    vector = api.post("/search", json={"vector": [1.0] * 1280, "rerank": True})
    assert vector.status_code == 400 and "rerank" in vector.json()["error"]["message"]

    # The duplicate finder confirms the pair (the copy is mirrored: its stored mirror view matches).
    def grouped() -> dict[str, Any] | None:
        report = api.get("/duplicates", params={"prefix": unique_prefix}).json()
        return report if report["total"] == 1 and not report["pending"] else None

    report = wait_for(grouped, 60, what="the copies grouped")
    (group,) = report["groups"]
    assert [m["key"] for m in group["members"]] == [unique_prefix + n for n in ("astronaut.jpg", "astronaut-copy.jpg")]
    assert group["members"][0]["pixels"] == 512 * 512  # the best copy has the most pixels
    finder = api.get("/stats").json()["duplicates"]
    assert finder["checked"] >= 2 and finder["cpu_s"] > 0, finder  # verifying the pair took CPU, and it is told
    beyond = api.get("/duplicates", params={"prefix": unique_prefix, "min_matches": 10**20})  # past SQLite's 64 bits
    assert beyond.status_code == 200 and beyond.json()["total"] == 0, beyond.text
    typo = api.get("/duplicates", params={"prefx": unique_prefix})  # answered unfiltered before
    assert typo.status_code == 400 and typo.json()["error"]["code"] == "unknown_field", typo.text

    # Deleting the copy dissolves the group.
    s3.delete_object(Bucket=stack.settings.bucket, Key=unique_prefix + "astronaut-copy.jpg")
    wait_for(lambda: api.get("/duplicates", params={"prefix": unique_prefix}).json()["total"] == 0 or None, 60,
             what="the group gone after the delete")


def test_exact_copies_of_a_smooth_image_are_the_same_photo(stack: Stack, s3: Any, api: httpx.Client,
                                                           unique_prefix: str) -> None:
    """A gradient (a clear sky, a wallpaper) has no keypoints, so local features cannot confirm anything; its
    byte-identical copies are still the same photo, in searches and duplicate groups (an independent check found
    them all unconfirmed). The same picture stored as other bytes stays a look-alike: nothing proves it a copy."""
    sky = Image.fromarray(np.tile(np.linspace(60, 220, 640)[:, None, None], (1, 480, 3)).astype(np.uint8))
    original, reencoded = io.BytesIO(), io.BytesIO()
    sky.save(original, "JPEG", quality=92)
    sky.save(reencoded, "JPEG", quality=70)
    uploads = {"sky.jpg": original.getvalue(), "sky-copy.jpg": original.getvalue(), "sky-70.jpg": reencoded.getvalue()}
    for name, body in uploads.items():
        wait_indexed(api, stack, unique_prefix + name, put(s3, stack, unique_prefix + name, body))

    found = api.post("/search", files={"image": ("q.jpg", original.getvalue(), "image/jpeg")},
                     data={"prefix": unique_prefix}).json()["results"]
    same = {r["key"]: (r["verified"], r["identical"]) for r in found}
    assert same == {unique_prefix + "sky.jpg": (True, True), unique_prefix + "sky-copy.jpg": (True, True),
                    unique_prefix + "sky-70.jpg": (False, False)}, found
    assert {r["key"] for r in found[:2]} == {unique_prefix + "sky.jpg", unique_prefix + "sky-copy.jpg"}
    assert all(-1 <= r["score"] <= 1 for r in found), found  # a cosine (float32 sums of the same vector reach 1.0001)
    by_key = api.post("/search", json={"key": unique_prefix + "sky.jpg", "prefix": unique_prefix}).json()["results"]
    assert [(r["key"], r["identical"]) for r in by_key][0] == (unique_prefix + "sky-copy.jpg", True), by_key
    # Without rerank the same bytes are still said (they were not: every result said false), and nothing verified.
    plain = api.post("/search", files={"image": ("q.jpg", original.getvalue(), "image/jpeg")},
                     data={"prefix": unique_prefix, "rerank": "false"}).json()["results"]
    assert {r["key"]: (r["verified"], r["identical"]) for r in plain} == {
        key: (False, identical) for key, (_, identical) in same.items()}, plain
    plain_by_key = api.post("/search", json={"key": unique_prefix + "sky.jpg", "prefix": unique_prefix,
                                             "rerank": False}).json()["results"]
    assert {r["key"]: r["identical"] for r in plain_by_key} == {unique_prefix + "sky-copy.jpg": True,
                                                                unique_prefix + "sky-70.jpg": False}, plain_by_key

    def grouped() -> list[Any] | None:
        report = api.get("/duplicates", params={"prefix": unique_prefix}).json()
        return report["groups"] if report["total"] and not report["pending"] else None

    (group,) = wait_for(grouped, 60, what="the exact copies grouped")
    assert sorted(m["key"] for m in group["members"]) == [unique_prefix + "sky-copy.jpg", unique_prefix + "sky.jpg"]


def test_a_file_uploaded_in_parts_is_identical_to_itself(stack: Stack, s3: Any, api: httpx.Client,
                                                         unique_prefix: str) -> None:
    """S3 names a file uploaded in parts by the MD5 of its parts' MD5s ("<md5>-2"), never its MD5: a search with the
    same file (over 8 MB by the AWS CLI or boto3) was never ``identical``, and a smooth one not even the same photo
    (review 61). The index service tries the part sizes S3 clients use."""
    sky = Image.fromarray(np.tile(np.linspace(60, 220, 1200)[:, None, None], (1, 1800, 3)).astype(np.uint8))
    body = io.BytesIO()
    sky.save(body, "BMP")  # 6.5 MB: two parts of 5 MiB (rclone's size)
    key = unique_prefix + "sky.bmp"
    s3.upload_fileobj(io.BytesIO(body.getvalue()), stack.settings.bucket, key,
                      Config=TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024))
    etag = s3.head_object(Bucket=stack.settings.bucket, Key=key)["ETag"].strip('"')
    assert etag.endswith("-2"), etag
    wait_indexed(api, stack, key, etag)
    for rerank in ("true", "false"):
        found = api.post("/search", files={"image": ("q.bmp", body.getvalue(), "image/bmp")},
                         data={"prefix": unique_prefix, "rerank": rerank}).json()["results"]
        assert [(r["key"], r["identical"], r["verified"]) for r in found] == [(key, True, rerank == "true")], found
    other = io.BytesIO()
    sky.save(other, "PNG")  # the same picture as other bytes: a look-alike, as ever
    found = api.post("/search", files={"image": ("q.png", other.getvalue(), "image/png")},
                     data={"prefix": unique_prefix}).json()["results"]
    assert [(r["key"], r["identical"]) for r in found] == [(key, False)], found
