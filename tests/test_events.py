"""Event parsing in the exact shapes MinIO, Ceph RGW (captured from radosgw 16.2.15) and AWS send."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bucketlens.ordering import ceph_sequencer_order, time_order
from ingest.errors import BadEvent
from ingest.events import parse_body

FIXTURES = Path(__file__).parent / "fixtures" / "events"


def load(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def test_ceph_keys_arrive_raw_and_sequencer_is_decoded() -> None:
    (event,) = parse_body(load("ceph_put.json")).events
    assert event.kind == "created"
    assert event.ref.bucket == "capture"
    assert event.ref.key == "dir/a b+c%d ü.jpg"  # not URL-decoded: '+' and '%' stay
    assert event.ref.etag == "5d41402abc4b2a76b9719d911017c592"
    assert event.ref.size == 5
    assert event.ref.order == ceph_sequencer_order("EF950B6B6F02E10C")
    # The decoded sequencer is the event's own time (eventId carries the same seconds.micros).
    assert abs(event.ref.order - time_order("2026-11-29T03:03:11.216072Z")) < 1_000


def test_ceph_delete_is_ordered_after_its_put() -> None:
    (put,) = parse_body(load("ceph_put.json")).events
    (delete,) = parse_body(load("ceph_delete.json")).events
    assert delete.kind == "removed"
    assert delete.ref.key == put.ref.key
    assert delete.ref.order > put.ref.order


def test_a_deleted_version_is_told_from_a_delete() -> None:
    """A version deleted for good may leave the key a current version (the receiver asks S3); a delete in an
    unversioned bucket (Ceph sends an empty versionId) and a delete marker remove the object."""
    record = json.loads(load("ceph_delete.json"))["Records"][0]

    def kind(name: str, version: str) -> str:
        changed = {**record, "eventName": name, "s3": {**record["s3"], "object": {**record["s3"]["object"],
                                                                                   "versionId": version}}}
        (event,) = parse_body(json.dumps({"Records": [changed]}).encode()).events
        return event.kind

    assert kind("ObjectRemoved:Delete", "") == "removed"
    assert kind("ObjectRemoved:DeleteMarkerCreated", "7fQkV2") == "removed"
    assert kind("ObjectRemoved:Delete", "7fQkV2") == "version_removed"
    assert kind("s3:ObjectRemoved:Delete", "null") == "version_removed"  # (a suspended bucket's null version)


def test_minio_keys_are_url_decoded_with_plus_as_space() -> None:
    (event,) = parse_body(load("minio_put.json")).events
    assert event.kind == "created"
    assert event.ref.bucket == "images"
    assert event.ref.key == "holiday/beach day ü+1.jpg"
    assert event.ref.order == int("1879B0FBA6D2E3F4", 16)


def test_minio_delete_without_etag_or_size() -> None:
    (event,) = parse_body(load("minio_delete.json")).events
    assert event.kind == "removed"
    assert event.ref.etag == ""
    assert event.ref.size == 0


def test_aws_multipart_nested_unicode_key_and_long_sequencer() -> None:
    (event,) = parse_body(load("aws_put.json")).events
    assert event.ref.key == "2026/trips/new york/times sq+night 東京.jpg"
    assert event.ref.etag == "9b2cf535f27731c974343645a3985328-2"
    assert event.ref.version_id == "3HL4kqtJlcpXroDTDmjVBH40Nrjfkd"
    assert event.ref.order == int("0A1B2C3D4E5F678901", 16)


def test_aws_test_event_is_ignored() -> None:
    parsed = parse_body(load("aws_test_event.json"))
    assert parsed.events == [] and parsed.ignored == 1


def test_aws_through_sns_is_unwrapped_and_a_subscription_is_to_be_confirmed() -> None:
    """AWS S3 reaches an HTTP endpoint through an SNS topic: the notification is the envelope's Message string."""
    wrapped = parse_body(load("sns_notification.json"))
    assert wrapped.events == parse_body(load("aws_put.json")).events and not wrapped.subscribe_url
    assert wrapped.topic == "arn:aws:sns:eu-west-1:111122223333:photo-archive-uploads"
    test_event = json.loads(load("sns_notification.json")) | {"Message": load("aws_test_event.json").decode()}
    assert parse_body(json.dumps(test_event).encode()).ignored == 1
    confirm = parse_body(load("sns_subscription_confirmation.json"))
    assert confirm.events == [] and confirm.subscribe_url.startswith("https://sns.eu-west-1.amazonaws.com/?Action=")
    unsubscribed = {**json.loads(load("sns_subscription_confirmation.json")), "Type": "UnsubscribeConfirmation"}
    assert not parse_body(json.dumps(unsubscribed).encode()).subscribe_url  # nothing to do


@pytest.mark.parametrize("envelope, message", [
    ({"Message": "{not json"}, "the SNS Message is not JSON"),
    ({"Message": {"Records": []}}, "without a Message string"),
    ({"Message": "[]"}, "the SNS Message must be a JSON object"),
    ({"Type": "SubscriptionConfirmation", "SubscribeURL": None}, "without a SubscribeURL"),
])
def test_malformed_sns_envelopes_raise_bad_event(envelope: dict[str, object], message: str) -> None:
    body = json.loads(load("sns_notification.json")) | envelope
    with pytest.raises(BadEvent, match=message):
        parse_body(json.dumps(body).encode())


def test_unknown_event_kinds_are_ignored_and_counted() -> None:
    record = json.loads(load("ceph_put.json"))["Records"][0]
    other = {**record, "eventName": "ObjectRestore:Completed"}
    parsed = parse_body(json.dumps({"Records": [record, other]}).encode())
    assert len(parsed.events) == 1 and parsed.ignored == 1


@pytest.mark.parametrize("name, kind", [
    ("LifecycleExpiration:Delete", "removed"), ("s3:LifecycleExpiration:DeleteMarkerCreated", "removed"),
    ("ObjectLifecycle:Expiration:Current", "removed"), ("ObjectLifecycle:Expiration:DeleteMarker", "version_removed"),
    ("ObjectLifecycle:Expiration:NonCurrent", None), ("ObjectLifecycle:Expiration:AbortMultipartUpload", None),
    ("ObjectLifecycle:Transition:Current", None),
])
def test_a_lifecycle_expiry_is_a_delete(name: str, kind: str | None) -> None:
    """A lifecycle rule's expiry was acknowledged as ignored, and the expired object stayed searchable (an
    independent review). A non-current version's expiry changes nothing indexed."""
    record = {**json.loads(load("ceph_put.json"))["Records"][0], "eventName": name}
    parsed = parse_body(json.dumps({"Records": [record]}).encode())
    assert [e.kind for e in parsed.events] == ([kind] if kind else []) and parsed.ignored == (0 if kind else 1)


def test_an_event_time_out_of_range_is_no_modification_time() -> None:
    """Year 1 was kept as the object's modification time, and every search that found the object answered 500
    (an independent review). With a sequencer to order by, the event is taken and the time is unknown."""
    record = {**json.loads(load("ceph_put.json"))["Records"][0], "eventTime": "0001-01-01T00:00:00+01:00"}
    (event,) = parse_body(json.dumps({"Records": [record]}).encode()).events
    assert event.ref.order > 0 and event.ref.modified == 0.0
    with pytest.raises(ValueError, match="before 1970"):
        time_order("1969-12-31T23:59:59Z")


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"foo": 1}', "no Records"),
        (b'{"Records": {}}', "must be a list"),
        (b'{"Records": [1]}', "not an object"),
        (b'{"Records": [{"eventName": "ObjectCreated:Put"}]}', "lacks"),
        (b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": ""}}}]}',
         "empty"),
        (b"\xff\xfe", "not JSON"),
        (b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": "a",'
         b' "sequencer": "' + b"F" * 3580 + b'"}}}]}', "sequencer of 3580 characters"),  # was a 503 for its batch
        (b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": '
         b'"\\ud800x.jpg"}}}]}', "not valid UTF-8"),  # a lone surrogate: was a 500
        *((b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": "a",'
           b' "' + field + b'": "\\ud800"}}}]}', "not valid UTF-8") for field in (b"eTag", b"versionId", b"sequencer")),
        *((b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": "a",'
           b' "size": ' + size + b'}}}]}', "size must be a whole number") for size in (b"-5", b"1.9", b"true", b'"7"')),
        (b'{"Records": [{"eventName": "ObjectCreated:Put", "eventTime": "0001-01-01T00:00:00+01:00", "s3": '
         b'{"bucket": {"name": "b"}, "object": {"key": "a"}}}]}', "bad size or eventTime"),  # ordered by it
        # An access point's ARN moved the worker's signed GET to another host (review 10); "/" breaks object ids.
        *((b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "' + name + b'"}, "object": '
           b'{"key": "a"}}}]}', "not an S3 bucket name")
          for name in (b"arn:aws:s3:us-east-1:123456789012:accesspoint/ap", b"a/b", b"evil.example:80", b"x" * 256)),
        (json.dumps({"Records": [{"eventName": "ObjectCreated:Put"}] * 1001}).encode(), "1001 records in one body"),
        # longer than S3 makes (a Milvus index refused the whole batch of its tombstone for good: review 70)
        (b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": "'
         + "\u00e9".encode() * 513 + b'"}}}]}', "key of 1026 bytes"),
    ],
)
def test_malformed_bodies_raise_bad_event(body: bytes, message: str) -> None:
    with pytest.raises(BadEvent, match=message):
        parse_body(body)
