"""Parse S3 ``Records[]`` notifications as MinIO, Ceph RGW and AWS send them into object events.

Key encoding differs: MinIO and AWS URL-encode keys (``+`` for space), Ceph RGW sends them raw.
MinIO prefixes event names with ``s3:``; AWS sends ``s3:TestEvent`` when a notification is set up.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any
from urllib.parse import unquote_plus

from bucketlens.ordering import EventOrder, event_order
from bucketlens.schemas import ObjectRef, normalise_etag

from .errors import BadEvent


@dataclasses.dataclass(frozen=True)
class ObjectEvent:
    kind: str  # "created" | "removed" | "version_removed" (see parse_record)
    ref: ObjectRef
    timed: bool = False  # ``ref.order`` is a time (bucketlens/ordering.py): it can be checked against the clock

    @property
    def order(self) -> EventOrder:
        return EventOrder(self.ref.order, self.timed)


@dataclasses.dataclass
class ParsedBody:
    events: list[ObjectEvent]
    ignored: int  # records of other kinds (test events, restores, ...)


def parse_body(body: bytes) -> ParsedBody:
    """Parse one notification request body; raises :class:`BadEvent` with a message for clients."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested too deeply to parse
        raise BadEvent(f"body is not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise BadEvent("body must be a JSON object with a Records list")
    if "Records" not in payload:
        if payload.get("Event") == "s3:TestEvent":  # AWS set-up probe
            return ParsedBody([], 1)
        raise BadEvent("body has no Records list")
    records = payload["Records"]
    if not isinstance(records, list):
        raise BadEvent("Records must be a list")
    parsed = ParsedBody([], 0)
    for index, record in enumerate(records):
        event = parse_record(record, index)
        if event is None:
            parsed.ignored += 1
        else:
            parsed.events.append(event)
    return parsed


def parse_record(record: Any, index: int = 0) -> ObjectEvent | None:
    """One record -> an event, or None for event kinds bucketlens does not act on."""
    if not isinstance(record, dict):
        raise BadEvent(f"Records[{index}] is not an object")
    name = record.get("eventName")
    if not isinstance(name, str):
        raise BadEvent(f"Records[{index}] has no eventName")
    name = name.removeprefix("s3:")
    if name.startswith("ObjectCreated:"):
        kind = "created"
    elif name.startswith("ObjectRemoved:"):
        kind = "removed"
    else:
        return None
    try:
        s3 = record["s3"]
        bucket = s3["bucket"]["name"]
        obj = s3["object"]
        raw_key = obj["key"]
    except (KeyError, TypeError) as exc:
        raise BadEvent(f"Records[{index}] lacks s3.bucket.name or s3.object.key") from exc
    if not isinstance(bucket, str) or not isinstance(raw_key, str) or not bucket or not raw_key:
        raise BadEvent(f"Records[{index}] has an empty or non-string bucket or key")
    source = str(record.get("eventSource", ""))
    key = raw_key if source.startswith("ceph") else unquote_plus(raw_key)
    sequencer = str(obj.get("sequencer") or "")
    event_time = str(record.get("eventTime") or "")
    try:
        size = int(obj.get("size") or 0)
        order = event_order(source, sequencer, event_time)
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: a size of 1e400 is a float infinity
        raise BadEvent(f"Records[{index}] has a bad size or eventTime: {exc}") from exc
    ref = ObjectRef(
        bucket=bucket,
        key=key,
        etag=normalise_etag(str(obj.get("eTag") or obj.get("etag") or "")),
        size=size,
        sequencer=sequencer,
        order=order.value,
        event_time=event_time,
        version_id=str(obj.get("versionId") or obj.get("version") or ""),
    )
    if name == "ObjectRemoved:Delete" and ref.version_id:
        # One version of a versioned object deleted for good: the key's current version, if it has one (an older
        # version, or the one a removed delete marker hid), stays. Ingest asks S3 (receiver.Receiver._settle).
        # Deleting the current version without a version id leaves a delete marker: ObjectRemoved:DeleteMarkerCreated.
        kind = "version_removed"
    return ObjectEvent(kind, ref, order.timed)
