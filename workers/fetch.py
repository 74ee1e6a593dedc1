"""Fetch objects from S3 by reference, concurrently, with the etag from the event and per-object limits."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from botocore.exceptions import BotoCoreError, ClientError

from bucketlens.schemas import ObjectRef

from .errors import ObjectChanged, PermanentError, TransientError

CHUNK = 256 * 1024
GONE = {"NoSuchKey", "404", "PreconditionFailed", "412", "NoSuchBucket"}


def fetch(s3: Any, ref: ObjectRef, max_bytes: int, timeout_s: float) -> bytes:
    """The object's bytes if it still has the event's etag.

    Raises ObjectChanged (skip), PermanentError (too large, too slow) or TransientError (retry).
    """
    deadline = time.monotonic() + timeout_s
    kwargs = {"Bucket": ref.bucket, "Key": ref.key}
    if ref.etag:
        kwargs["IfMatch"] = f'"{ref.etag}"'
    try:
        response = s3.get_object(**kwargs)
        length = int(response.get("ContentLength") or 0)
        if length > max_bytes:
            response["Body"].close()
            raise PermanentError("too_large", f"object is {length} bytes, the limit is {max_bytes}")
        body = response["Body"]
        chunks: list[bytes] = []
        size = 0
        while chunk := body.read(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                body.close()
                raise PermanentError("too_large", f"object exceeds the limit of {max_bytes} bytes")
            if time.monotonic() > deadline:
                body.close()
                raise PermanentError("fetch_timeout", f"download took longer than {timeout_s:.0f} s")
            chunks.append(chunk)
        return b"".join(chunks)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in GONE or status in (404, 412):
            raise ObjectChanged(f"{ref.object_id} is gone or changed ({code or status})") from exc
        if status == 403 or code == "AccessDenied":
            raise PermanentError("access_denied", f"S3 refused access: {code}") from exc
        raise TransientError(f"S3 error {code or status} for {ref.object_id}") from exc
    except BotoCoreError as exc:  # connection refused, timeouts, closed connections
        raise TransientError(f"S3 unreachable: {exc}") from exc


def fetch_many(
    pool: ThreadPoolExecutor, s3: Any, refs: Sequence[ObjectRef], max_bytes: int, timeout_s: float
) -> list[bytes | BaseException]:
    """Fetch every reference concurrently; each slot holds the bytes or the exception for that object."""
    futures = [pool.submit(fetch, s3, ref, max_bytes, timeout_s) for ref in refs]
    results: list[bytes | BaseException] = []
    for future in futures:
        try:
            results.append(future.result())
        except (ObjectChanged, PermanentError, TransientError) as exc:
            results.append(exc)
    return results
