"""Helpers for integration tests: polling, object state, test images (real photographs and bad objects)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import httpx
import redis
from botocore.exceptions import EndpointConnectionError
from PIL import Image

from index_service.backend import Index
from infra.samples import augment, skimage_data

FIXTURES = Path(__file__).parent / "fixtures" / "events"


# A server not listening (yet: a restarted one binds its port only after its start-up): no answer yet, to a poll.
# Not a connection that broke mid-request or a request that timed out: a crash or a hang must fail the test (a
# restart by the supervisor would otherwise pass it). (redis-py's BusyLoadingError, a Redis loading its append-only
# file, is a ConnectionError; so is its AuthenticationError, which is not retried.)
AWAY = (httpx.ConnectError, redis.ConnectionError, EndpointConnectionError)


def wait_for(predicate: Callable[[], Any], timeout_s: float = 60, interval_s: float = 0.2, what: str = "") -> Any:
    """Poll until ``predicate`` returns something truthy; fail with ``what`` after ``timeout_s``. A server that is
    not listening (``AWAY``) is polled again, and named on a timeout if the last poll met it; any other error fails
    at once."""
    deadline = time.monotonic() + timeout_s
    away: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value, away = predicate(), None
        except AWAY as exc:
            if isinstance(exc, redis.AuthenticationError):
                raise
            away, value = exc, None
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what or predicate}"
                         + (f" (last: {away!r})" if away is not None else ""))


def wait_rebuild(api: httpx.Client, job_id: str, stall_s: float = 180, what: str = "the rebuild finished"
                 ) -> dict[str, Any]:
    """The rebuild job once it is no longer running. It fails once the job's progress has stood still for
    ``stall_s``, not after a fixed time: a reembed of the stack's bucket re-embeds every earlier test's objects
    (~1,300 late in the suite), and a fixed 180-300 s passed or failed by the pace of the host."""
    seen, moved = None, time.monotonic()
    while True:
        job: dict[str, Any] = api.get(f"/rebuild/{job_id}").json()
        if job["state"] != "running":
            return job
        progress = (job["listed"], job["total"], job["done"], job["failed"])
        if progress != seen:
            seen, moved = progress, time.monotonic()
        elif time.monotonic() - moved > stall_s:
            raise AssertionError(f"{what}: no progress for {stall_s:.0f} s: {job}")
        time.sleep(0.5)


def object_state(api: httpx.Client, bucket: str, key: str) -> dict[str, Any] | None:
    response = api.get(f"/objects/{bucket}/{quote(key, safe='/')}")
    return response.json() if response.status_code == 200 else None


def photo(name: str, transform: bool = False) -> bytes:
    image = Image.open(skimage_data() / name).convert("RGB")
    if transform:
        image = augment(image)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def truncated_jpeg() -> bytes:
    data = photo("coffee.png")
    return data[: len(data) // 3]


def ceph_event(name: str, seconds: int, **object_fields: str | int) -> str:
    """A Ceph RGW fixture (``FIXTURES``) whose sequencer, a little-endian utime_t, says ``seconds`` since the
    epoch; ``bucket`` and any ``s3.object`` field (key, eTag, size) can be replaced."""
    body = json.loads((FIXTURES / name).read_bytes())
    s3 = body["Records"][0]["s3"]
    if "bucket" in object_fields:
        s3["bucket"]["name"] = object_fields.pop("bucket")
    s3["object"].update(object_fields, sequencer=(seconds.to_bytes(4, "little") + bytes(4)).hex().upper())
    return json.dumps(body)


def index_difference(actual: Index, expected: Index) -> str:
    """How ``actual`` differs from ``expected`` in objects (key, etag, order, vector) and in length, in a few lines;
    empty when they agree. (pytest's own diff of two dicts of thousands of vectors ran past the 900 s timeout.)"""
    def contents(index: Index) -> dict[str, tuple[str, int, bytes]]:
        objects, vectors, _ = index.export()
        return {o.key: (o.etag, o.order, v.tobytes()) for o, v in zip(objects, vectors)}

    have, want = contents(actual), contents(expected)
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    changed = sorted(key for key in want.keys() & have.keys() if want[key] != have[key])
    lines = [f"{len(missing)} missing: {missing[:5]}"] if missing else []
    lines += [f"{len(extra)} extra: {extra[:5]}"] if extra else []
    if changed:
        lines.append(f"{len(changed)} differ (etag, order, same vector), held vs expected: " + "; ".join(
            f"{key} {have[key][:2]}, {want[key][:2]}, {have[key][2] == want[key][2]}" for key in changed[:5]))
    if len(actual) != len(have) or len(expected) != len(want):
        lines.append(f"lengths {len(actual)} and {len(expected)} for {len(have)} and {len(want)} objects exported")
    return "\n".join(lines)


