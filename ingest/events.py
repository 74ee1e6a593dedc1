"""Parse S3 ``Records[]`` notifications as MinIO, Ceph RGW and AWS send them into object events.

Key encoding differs: MinIO and AWS URL-encode keys (``+`` for space), Ceph RGW sends them raw.
MinIO prefixes event names with ``s3:``; AWS sends ``s3:TestEvent`` when a notification is set up.

AWS S3 reaches an HTTP endpoint through an Amazon SNS topic: each message comes in SNS's envelope (``Type``,
``TopicArn``, the S3 notification as the ``Message`` string), and a new subscription first sends a
``SubscriptionConfirmation`` whose ``SubscribeURL`` must be visited (``ParsedBody.subscribe_url``: the receiver
does it). A subscription with raw message delivery sends the S3 notification itself.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any
from urllib.parse import unquote_plus

from bucketlens.ordering import EventOrder, event_order
from bucketlens.schemas import ObjectRef, normalise_etag
from bucketlens.settings import BUCKET_NAME

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
    subscribe_url: str = ""  # an Amazon SNS subscription to confirm by visiting this URL
    topic: str = ""  # the SNS topic's ARN, when the body came through SNS


MAX_RECORDS = 1000  # per body: S3 servers send one (each a HEAD for a delete, on a thread all requests share)
MAX_KEY_BYTES = 1024  # UTF-8 bytes of an S3 object key (AWS, MinIO and Ceph alike)
MAX_SEQUENCER = 64  # characters; AWS's and MinIO's are 18, Ceph's 16
SNS_TYPES = ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation")


def parse_body(body: bytes) -> ParsedBody:
    """Parse one notification request body; raises :class:`BadEvent` with a message for clients."""
    payload = _object(body, "body")
    if payload.get("Type") in SNS_TYPES and "TopicArn" in payload:
        return _sns(payload)
    return _records(payload)


def _object(text: bytes | str, what: str) -> dict[str, Any]:
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested too deeply to parse
        raise BadEvent(f"{what} is not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise BadEvent(f"{what} must be a JSON object with a Records list")
    return payload


def _sns(envelope: dict[str, Any]) -> ParsedBody:
    """An Amazon SNS message: a notification's S3 records, or a subscription to confirm."""
    topic = str(envelope["TopicArn"])
    if envelope["Type"] == "Notification":
        message = envelope.get("Message")
        if not isinstance(message, str):
            raise BadEvent("SNS Notification without a Message string")
        return dataclasses.replace(_records(_object(message, "the SNS Message")), topic=topic)
    if envelope["Type"] == "SubscriptionConfirmation":
        url = envelope.get("SubscribeURL")
        if not isinstance(url, str) or not url:
            raise BadEvent("SNS SubscriptionConfirmation without a SubscribeURL")
        return ParsedBody([], 1, subscribe_url=url, topic=topic)
    return ParsedBody([], 1, topic=topic)  # UnsubscribeConfirmation: nothing to do


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _records(payload: dict[str, Any]) -> ParsedBody:
    if "Records" not in payload:
        if payload.get("Event") == "s3:TestEvent":  # AWS set-up probe
            return ParsedBody([], 1)
        raise BadEvent("body has no Records list")
    records = payload["Records"]
    if not isinstance(records, list):
        raise BadEvent("Records must be a list")
    if len(records) > MAX_RECORDS:
        raise BadEvent(f"{len(records)} records in one body: at most {MAX_RECORDS} are taken (S3 servers send one)")
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
    elif name.startswith(("ObjectRemoved:", "LifecycleExpiration:")) or name == "ObjectLifecycle:Expiration:Current":
        kind = "removed"  # (a lifecycle rule's expiry was ignored, and the object stayed searchable)
    elif name == "ObjectLifecycle:Expiration:DeleteMarker":
        kind = "version_removed"  # a delete marker gone: the key's older version may be current again
    else:
        return None  # (a non-current version expired or an upload aborted: nothing indexed changes)
    try:
        s3 = record["s3"]
        bucket = s3["bucket"]["name"]
        obj = s3["object"]
        raw_key = obj["key"]
    except (KeyError, TypeError) as exc:
        raise BadEvent(f"Records[{index}] lacks s3.bucket.name or s3.object.key") from exc
    if not isinstance(bucket, str) or not isinstance(raw_key, str) or not bucket or not raw_key:
        raise BadEvent(f"Records[{index}] has an empty or non-string bucket or key")
    if not BUCKET_NAME.fullmatch(bucket):
        raise BadEvent(f"Records[{index}] has a bucket that is not an S3 bucket name: {bucket[:80]!r}")
    source = str(record.get("eventSource", ""))
    key = raw_key if source.startswith("ceph") else unquote_plus(raw_key)
    if not _utf8(key):  # (a bucket name is ASCII: BUCKET_NAME)
        raise BadEvent(f"Records[{index}] has a key that is not valid UTF-8 (a lone surrogate)")
    if (length := len(key.encode())) > MAX_KEY_BYTES:  # (S3 makes none; one stopped a Milvus index merging: review 70)
        raise BadEvent(f"Records[{index}] has a key of {length} bytes: S3 keys have at most {MAX_KEY_BYTES}")
    sequencer = str(obj.get("sequencer") or "")
    if len(sequencer) > MAX_SEQUENCER:  # (thousands of hex digits made an order no int-to-text conversion takes)
        raise BadEvent(f"Records[{index}] has a sequencer of {len(sequencer)} characters (at most {MAX_SEQUENCER})")
    event_time = str(record.get("eventTime") or "")
    try:
        size = obj.get("size") or 0
        if isinstance(size, float) and size.is_integer():  # (JSON Schema's integer: 5.0 is 5)
            size = int(size)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:  # (-5, 1.9 and true were taken)
            raise ValueError(f"size must be a whole number of bytes, not {size!r:.40}")
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
    if not all(_utf8(text) for text in (ref.etag, ref.sequencer, ref.event_time, ref.version_id, source)):
        raise BadEvent(f"Records[{index}] has a field that is not valid UTF-8 (a lone surrogate)")  # (was a 500)
    if name in ("ObjectRemoved:Delete", "LifecycleExpiration:Delete") and ref.version_id:
        # One version of a versioned object deleted for good: the key's current version, if it has one (an older
        # version, or the one a removed delete marker hid), stays. Ingest asks S3 (receiver.Receiver._settle).
        # Deleting the current version without a version id leaves a delete marker: ObjectRemoved:DeleteMarkerCreated.
        kind = "version_removed"
    return ObjectEvent(kind, ref, order.timed)
