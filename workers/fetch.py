"""Fetch an object from S3 by reference (the pipeline runs many at once), with the etag from the event and
per-object limits.

Both limits hold *during* the download, not only between chunks: the body is read with ``read1`` (whatever one
receive brings, so a server that drips bytes cannot hold a read for long) and the socket's timeout is the time
left before the deadline (so a server that stalls cannot hold it at all). A download past its deadline is retried
like an unreachable server (a stall may be brief: an OSD that blocks, a network that drops packets for a while);
once the task's retries are spent it is a ``fetch_timeout`` failure. An object stored with
``Content-Encoding: gzip`` (``aws s3 cp --content-encoding gzip``; a browser given its URL inflates it) is inflated
here, within the same size limit.
"""

from __future__ import annotations

import datetime as dt
import time
import zlib
from typing import Any, NamedTuple

from botocore.exceptions import BotoCoreError, ClientError
from urllib3.exceptions import HTTPError as URLLib3Error
from urllib3.exceptions import ReadTimeoutError

from bucketlens.ordering import event_time
from bucketlens.s3 import error_code, http_status
from bucketlens.schemas import ObjectRef

from .errors import ObjectChanged, PermanentError, TransientError

CHUNK = 256 * 1024
GONE = {"NoSuchKey", "404", "PreconditionFailed", "412", "NoSuchBucket"}


class Fetched(NamedTuple):
    data: bytes
    modified: str  # S3's LastModified, as an event's time says it ("" when it gave none)


def fetch(s3: Any, ref: ObjectRef, max_bytes: int, timeout_s: float) -> Fetched:
    """The object's bytes, and when it was written, if it still has the event's etag.

    Raises ObjectChanged (skip), PermanentError (too large) or TransientError (retry: unreachable, too slow).
    """
    deadline = time.monotonic() + timeout_s
    kwargs = {"Bucket": ref.bucket, "Key": ref.key}
    if ref.etag:
        kwargs["IfMatch"] = f'"{ref.etag}"'
    try:
        response = s3.get_object(**kwargs)
    except ClientError as exc:
        code, status = error_code(exc), http_status(exc)
        if code in GONE or status in (404, 412):
            raise ObjectChanged(f"{ref.object_id} is gone or changed ({code or status})") from exc
        if status == 403 or code == "AccessDenied":
            raise PermanentError("access_denied", f"S3 refused access: {code}") from exc
        raise TransientError(f"S3 error {code or status or '(no status)'} for {ref.object_id}") from exc
    except BotoCoreError as exc:  # connection refused, timeouts, closed connections
        raise TransientError(f"S3 unreachable: {exc}") from exc
    body = response["Body"]
    try:
        length = int(response.get("ContentLength") or 0)
        if length > max_bytes:
            raise PermanentError("too_large",
                                 f"object is {length} bytes, the limit is {max_bytes} (BUCKETLENS_MAX_OBJECT_BYTES)")
        data = _read_body(body, max_bytes, deadline, timeout_s)
    except (PermanentError, TransientError):
        body.close()  # an unfinished body is dropped with its connection, never read to the end
        raise
    if str(response.get("ContentEncoding", "")).strip().lower() in ("gzip", "x-gzip"):
        data = _gunzip(data, max_bytes)
    written = response.get("LastModified")
    return Fetched(data, event_time(written) if isinstance(written, dt.datetime) else "")


def _read_body(body: Any, max_bytes: int, deadline: float, timeout_s: float) -> bytes:
    raw = body._raw_stream  # the urllib3 response under botocore's StreamingBody: it has read1
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _too_slow(timeout_s, size)
        try:
            if not raw.closed:  # closed once the whole body is in: nothing left to wait for
                body.set_socket_timeout(left)
            chunk = raw.read1(CHUNK)
        except (TimeoutError, ReadTimeoutError) as exc:
            raise _too_slow(timeout_s, size) from exc
        except (URLLib3Error, OSError) as exc:  # connection reset or closed early: the server's fault, retry
            raise TransientError(f"download interrupted after {size} bytes: {exc}") from exc
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise PermanentError("too_large",
                                 f"object exceeds the limit of {max_bytes} bytes (BUCKETLENS_MAX_OBJECT_BYTES)")
        chunks.append(chunk)


def _gunzip(data: bytes, max_bytes: int) -> bytes:
    """The inflated bytes of a gzip body; the bytes as they are when they are not gzip (a header set by mistake:
    the decoder judges them)."""
    inflater = zlib.decompressobj(wbits=31)  # 31: a gzip header and trailer
    try:
        inflated = inflater.decompress(data, max_bytes + 1)
    except zlib.error:
        return data
    if len(inflated) > max_bytes:
        raise PermanentError("too_large", f"object inflates past the limit of {max_bytes} bytes (it is gzipped; "
                                          "BUCKETLENS_MAX_OBJECT_BYTES)")
    return inflated


def _too_slow(timeout_s: float, size: int) -> TransientError:
    return TransientError(f"download did not finish within {timeout_s:g} s ({size} bytes read)", reason="fetch_timeout")
