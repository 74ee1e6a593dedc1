"""List a bucket as object references: the source of rebuilds and reconciles (no notification involved)."""

from __future__ import annotations

from typing import Any, Iterator

from bucketlens.ordering import time_order
from bucketlens.schemas import ObjectRef, normalise_etag


def scan(s3: Any, bucket: str, reserved_prefix: str, generation: int = 1) -> Iterator[ObjectRef]:
    """Every object of ``bucket`` outside the reserved prefix, ordered by its LastModified."""
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, PaginationConfig={"PageSize": 1000}):
        for item in page.get("Contents", []):
            key = item["Key"]
            if key.startswith(reserved_prefix):
                continue
            yield ObjectRef(
                bucket=bucket,
                key=key,
                etag=normalise_etag(item.get("ETag", "")),
                size=int(item.get("Size", 0)),
                order=time_order(item["LastModified"]),
                event_time=item["LastModified"].isoformat(),
                generation=generation,
            )
