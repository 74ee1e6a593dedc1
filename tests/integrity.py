"""What the fault and hostile-input tests share: distinct test images, an upload stream that keeps going while a
fault happens, a recorder of the result stream, and the check that the index holds exactly the bucket's images.

The check is end to end: every object listed under the test's prefix is indexed with its etag, its vector equals
the one this process computes from the same bytes with the same model (found by ``POST /search {"vector"}`` with
score > 0.999), no stream entry gave one object two different vectors, and no failure records exist except for
objects that really are bad.
"""

from __future__ import annotations

import functools
import io
import json
import random
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Iterable

import boto3
import httpx
import numpy as np
from botocore.config import Config
from PIL import Image, ImageEnhance, ImageOps

from bucketlens.keys import Keys
from bucketlens.redis_client import connect
from bucketlens.schemas import ResultEntry, SchemaError
from infra.samples import PHOTOS, skimage_data
from infra.stack import Stack
from vision.decode import decode_for

from .helpers import object_state, wait_for

ARTIFACTS = Path(__file__).parent / "artifacts"


# -- images ---------------------------------------------------------------------------------------------------

@functools.cache
def _photo(name: str) -> Image.Image:
    return Image.open(skimage_data() / name).convert("RGB")


def distinct_jpeg(index: int, seed: int) -> bytes:
    """A small JPEG (~10-30 KB) made from one of the skimage photos: its own crop, rotation, mirror and colour,
    so that no two images of one (seed, index) range look alike to the model."""
    rng = random.Random(seed * 100_003 + index)
    image = _photo(PHOTOS[index % len(PHOTOS)])
    w, h = image.size
    cw, ch = int(w * rng.uniform(0.45, 0.9)), int(h * rng.uniform(0.45, 0.9))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((x, y, x + cw, y + ch)).rotate(rng.uniform(-40, 40), expand=True, fillcolor=(
        rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.2, 1.8))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
    side = rng.randint(160, 320)
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=rng.randint(70, 92))
    return out.getvalue()


def image_set(prefix: str, count: int) -> dict[str, bytes]:
    """``count`` distinct images under ``prefix``; another prefix (another test run) gets other images."""
    seed = zlib.crc32(prefix.encode())
    return {f"{prefix}{i:04d}.jpg": distinct_jpeg(i, seed) for i in range(count)}


@functools.cache
def reference_embedder(home: str) -> Any:
    """The model the workers run, loaded once in the test process (from the stack's exported ONNX graph)."""
    from bucketlens.settings import Settings
    from vision.embedders import load_embedder

    return load_embedder(Settings(home=Path(home), torch_threads=1))


def reference_vectors(stack: Stack, bodies: dict[str, bytes]) -> dict[str, np.ndarray]:
    embedder = reference_embedder(str(stack.home))
    keys = list(bodies)
    vectors: dict[str, np.ndarray] = {}
    for start in range(0, len(keys), 32):
        part = keys[start : start + 32]
        pixels = np.stack([decode_for(embedder.recipe, bodies[k], stack.settings.max_pixels).pixels for k in part])
        vectors.update(zip(part, embedder.embed(pixels)))
    return vectors


# -- uploads --------------------------------------------------------------------------------------------------

def patient_s3(stack: Stack) -> Any:
    """An S3 client for uploads during faults: many retries, so a radosgw restart delays an upload, never fails it."""
    s = stack.settings
    config = Config(s3={"addressing_style": "path"}, signature_version="s3v4", connect_timeout=3, read_timeout=60,
                    retries={"max_attempts": 30, "mode": "standard"})
    return boto3.client("s3", endpoint_url=s.s3_endpoint, aws_access_key_id=s.s3_access_key,
                        aws_secret_access_key=s.s3_secret_key, region_name=s.s3_region, config=config)


class Uploader(threading.Thread):
    """Uploads ``bodies`` in order at about ``rate`` objects per second, in the background; ``etags`` fills up."""

    def __init__(self, stack: Stack, bodies: dict[str, bytes], rate: float = 10.0) -> None:
        super().__init__(name="uploader", daemon=True)
        self.s3 = patient_s3(stack)
        self.bucket = stack.settings.bucket
        self.bodies = bodies
        self.interval = 1.0 / rate
        self.etags: dict[str, str] = {}
        self.errors: list[str] = []
        self.finished_at = 0.0

    def run(self) -> None:
        for key, body in self.bodies.items():
            started = time.monotonic()
            try:
                self.etags[key] = self.s3.put_object(Bucket=self.bucket, Key=key, Body=body)["ETag"].strip('"')
            except Exception as exc:  # reported by the test: an upload the S3 server refused is not ours to index
                self.errors.append(f"{key}: {exc}")
            time.sleep(max(0.0, self.interval - (time.monotonic() - started)))
        self.finished_at = time.monotonic()

    def wait_uploaded(self, count: int, timeout_s: float = 120) -> None:
        wait_for(lambda: len(self.etags) + len(self.errors) >= count, timeout_s, what=f"{count} uploads")

    def finish(self, timeout_s: float = 600) -> dict[str, str]:
        self.join(timeout_s)
        assert not self.is_alive(), "uploads did not finish"
        assert not self.errors, self.errors[:5]
        return self.etags


# -- the result stream ----------------------------------------------------------------------------------------

class StreamRecorder(threading.Thread):
    """Reads every result-stream entry under ``prefix`` from now on (no consumer group: it takes nothing from the
    merger), surviving Redis restarts, so a test can check that no object got two different vectors."""

    def __init__(self, stack: Stack, prefix: str) -> None:
        super().__init__(name="stream-recorder", daemon=True)
        self.redis = connect(stack.settings.redis_url)
        self.stream = Keys(stack.settings.namespace).results
        self.prefix = prefix
        self.entries: dict[str, list[ResultEntry]] = {}
        self._halt = threading.Event()
        ids = self.redis.xrevrange(self.stream, count=1)
        self.last_id = ids[0][0] if ids else b"0"

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                response = self.redis.xread({self.stream: self.last_id}, count=500, block=500)
            except Exception:  # Redis restarting under a fault test
                self._halt.wait(0.5)
                continue
            for _, messages in response or []:
                for message_id, fields in messages:
                    self.last_id = message_id
                    try:
                        entry = ResultEntry.from_fields(fields)
                    except SchemaError:
                        continue
                    if entry.key.startswith(self.prefix):
                        self.entries.setdefault(entry.key, []).append(entry)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def upserts(self) -> dict[str, list[ResultEntry]]:
        return {key: [e for e in entries if e.op == "upsert"] for key, entries in self.entries.items()}


# -- the check ------------------------------------------------------------------------------------------------

def listing(s3: Any, bucket: str, prefix: str) -> dict[str, str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"].strip('"') for page in pages for o in page.get("Contents", [])}


def failures_under(api: httpx.Client, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    records = api.get("/failures", params={"bucket": bucket, "limit": 1000}).json()["failures"]
    return {r["key"]: r for r in records if r["key"].startswith(prefix)}


def indexed_keys(api: httpx.Client, bucket: str, etags: dict[str, str]) -> set[str]:
    done = set()
    for key, etag in etags.items():
        state = object_state(api, bucket, key)
        if state and state["state"] == "indexed" and state["etag"] == etag:
            done.add(key)
    return done


def wait_all_indexed(api: httpx.Client, bucket: str, etags: dict[str, str], timeout_s: float) -> float:
    """Wait until every object is indexed with its etag; returns the seconds waited. Polls only what is left."""
    started = time.monotonic()
    left = dict(etags)
    deadline = started + timeout_s
    while left and time.monotonic() < deadline:
        left = {k: e for k, e in left.items() if k not in indexed_keys(api, bucket, {k: e})}
        if left:
            time.sleep(1.0)
    assert not left, f"{len(left)} of {len(etags)} objects not indexed after {timeout_s:.0f} s, e.g. {sorted(left)[:5]}"
    return time.monotonic() - started


def assert_index_matches_bucket(stack: Stack, s3: Any, api: httpx.Client, prefix: str, bodies: dict[str, bytes],
                                recorder: StreamRecorder | None = None, bad: Iterable[str] = (),
                                timeout_s: float = 300, bucket: str | None = None) -> dict[str, Any]:
    """The index holds exactly the bucket's images under ``prefix`` (see the module docstring); returns counts
    and the time it took to get there. ``bucket``: another than the stack's."""
    bucket = bucket or stack.settings.bucket
    bad = set(bad)
    listed = listing(s3, bucket, prefix)
    assert set(listed) == set(bodies), f"bucket listing differs from the uploads: {set(listed) ^ set(bodies)}"
    good = {k: e for k, e in listed.items() if k not in bad}
    waited = wait_all_indexed(api, bucket, good, timeout_s)

    vectors = reference_vectors(stack, {k: bodies[k] for k in good})
    wrong = []
    for key, vector in vectors.items():
        hits = api.post("/search", json={"vector": vector.tolist(), "k": 10}).json()["results"]
        mine = [h for h in hits if h["bucket"] == bucket and h["key"] == key]
        if len(mine) != 1 or mine[0]["score"] < 0.999 or mine[0]["etag"] != good[key]:
            wrong.append((key, mine))
    assert not wrong, f"{len(wrong)} objects indexed with another vector or etag, e.g. {wrong[:3]}"

    failures = failures_under(api, bucket, prefix)
    assert set(failures) <= bad, {k: failures[k]["reason"] for k in set(failures) - bad}

    reembedded = 0
    if recorder is not None:
        for key, upserts in recorder.upserts().items():
            if not upserts:  # a bad object: its entries are failure notes
                continue
            assert {e.etag for e in upserts} <= {listed.get(key)}, f"{key}: upserts of another etag"
            first = upserts[0].vector
            for entry in upserts[1:]:
                assert entry.vector is not None and first is not None
                assert float(np.dot(first, entry.vector)) > 0.9999, f"{key} embedded twice into different vectors"
            reembedded += len(upserts) > 1
    return {"uploaded": len(bodies), "indexed": len(good), "lost": 0, "failed": len(failures),
            "embedded_more_than_once": reembedded, "seconds_to_all_indexed": round(waited, 1)}


def record_outcome(name: str, outcome: dict[str, Any], file: str = "fault-outcomes.json") -> None:
    """Merge one test's outcome into ``tests/artifacts/<file>`` and print it (visible with ``-s``)."""
    path = ARTIFACTS / file
    ARTIFACTS.mkdir(exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = outcome
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(f"\n{name}: {json.dumps(outcome)}")
