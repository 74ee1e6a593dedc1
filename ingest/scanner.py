"""List a bucket as object references: the source of rebuilds and reconciles (no notification involved)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterator

from botocore.exceptions import ClientError

from bucketlens.ordering import event_time, time_order
from bucketlens.s3 import error_code
from bucketlens.schemas import ObjectRef, normalise_etag


def scan(s3: Any, bucket: str, reserved_prefix: str, generation: int = 1) -> Iterator[ObjectRef]:
    """Every object of ``bucket`` outside the reserved prefix, ordered by its LastModified."""
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, PaginationConfig={"PageSize": 1000}):
        for item in page.get("Contents", []):
            key = item["Key"]
            if key.startswith(reserved_prefix):
                continue
            yield _ref(bucket, key, item.get("ETag", ""), item.get("Size", 0), item["LastModified"], generation)


def head(s3: Any, bucket: str, key: str, generation: int = 1) -> ObjectRef | None:
    """One object as ``scan`` lists it, or None once it is gone."""
    try:
        meta = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if error_code(exc) in ("404", "NoSuchKey", "NoSuchBucket"):
            return None
        raise
    return _ref(bucket, key, meta.get("ETag", ""), meta.get("ContentLength", 0), meta["LastModified"], generation)


def _ref(bucket: str, key: str, etag: str, size: int, modified: dt.datetime, generation: int) -> ObjectRef:
    return ObjectRef(bucket=bucket, key=key, etag=normalise_etag(etag), size=int(size), order=time_order(modified),
                     event_time=event_time(modified), generation=generation)
