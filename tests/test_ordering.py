"""Order values: Ceph's little-endian utime_t sequencers, hex sequencers, event times."""

from __future__ import annotations

import dataclasses
import datetime as dt

from bucketlens.ordering import (
    MAX_CLOCK_SKEW_NS,
    EventOrder,
    beyond_clock_skew,
    ceph_sequencer_order,
    event_order,
    hex_sequencer_order,
    time_order,
)
from index_service.backend import Indexed
from index_service.reconcile import written_before


def test_ceph_sequencer_example_from_design() -> None:
    order = ceph_sequencer_order("5D810B6B61CD2E06")
    when = dt.datetime.fromtimestamp(order // 1_000_000_000, dt.UTC)
    assert when.isoformat().startswith("2026-11-29T01:35:25")
    assert order % 1_000_000_000 // 100_000 == 1037  # .1037 s


def test_ceph_sequencers_do_not_compare_as_strings() -> None:
    # 1 s apart across a byte boundary: the later hex string sorts *before* the earlier one (little-endian).
    earlier = (0x6B0B80FF).to_bytes(4, "little") + (999_000_000).to_bytes(4, "little")
    later = (0x6B0B8100).to_bytes(4, "little") + (1_000).to_bytes(4, "little")
    assert later.hex().upper() < earlier.hex().upper()
    assert ceph_sequencer_order(later.hex()) > ceph_sequencer_order(earlier.hex())


def test_hex_sequencers_compare_as_left_padded_integers() -> None:
    assert hex_sequencer_order("FF") < hex_sequencer_order("0100")
    assert hex_sequencer_order("0A1B") == hex_sequencer_order("00000A1B")


def test_event_order_falls_back_to_event_time() -> None:
    assert event_order("minio:s3", "", "2026-11-29T01:35:25.5Z") == (time_order("2026-11-29T01:35:25.5Z"), True)
    assert event_order("ceph:s3", "nothex", "2026-11-29T01:35:25Z") == (time_order("2026-11-29T01:35:25Z"), True)
    assert event_order("aws:s3", "", "") == (0, False)


def test_only_time_based_orders_are_timed() -> None:
    assert event_order("ceph:s3", "5D810B6B61CD2E06", "").timed
    assert not event_order("aws:s3", "0055AED6DCD90281E5", "2026-11-29T01:35:25Z").timed  # opaque, time ignored
    # MinIO's sequencer is its event time in nanoseconds, in hex: a clock far ahead is caught like Ceph's (review 68)
    assert event_order("minio:s3", "1879B0FBA6D2E3F4", "") == (0x1879B0FBA6D2E3F4, True)
    assert event_order("minio:s3", f"{time_order('2026-11-29T01:35:25.5Z'):X}", "2026-11-29T01:35:25.5Z") == (
        time_order("2026-11-29T01:35:25.5Z"), True)


def test_a_timed_order_beyond_the_clock_skew_is_from_the_future() -> None:
    now = time_order("2026-11-30T12:00:00Z")
    assert not beyond_clock_skew(EventOrder(now + MAX_CLOCK_SKEW_NS, timed=True), now)  # skew tolerated
    assert beyond_clock_skew(EventOrder(now + MAX_CLOCK_SKEW_NS + 1, timed=True), now)
    assert not beyond_clock_skew(EventOrder(now - 10**18, timed=True), now)  # the past is never refused
    assert not beyond_clock_skew(EventOrder(2**64, timed=False), now)  # an opaque sequencer cannot be judged


def test_time_order_accepts_datetimes_and_strings() -> None:
    when = dt.datetime(2026, 11, 29, 1, 35, 25, 103000, tzinfo=dt.UTC)
    assert time_order(when) == time_order("2026-11-29T01:35:25.103Z") == time_order(when.replace(tzinfo=None))
    assert time_order("2026-11-29T01:35:25.103z") == time_order(when)  # (a search filter took it; an event did not)


def test_an_objects_modification_time_comes_from_its_event_or_listing() -> None:
    from bucketlens.schemas import ObjectRef

    assert ObjectRef("b", "k", "e", event_time="2024-06-01T12:00:00.500Z").modified == 1717243200.5
    assert ObjectRef("b", "k", "e", event_time="2024-06-01 12:00:00+00:00").modified == 1717243200.0  # LastModified
    assert ObjectRef("b", "k", "e", event_time="2024-06-01T12:00:00.502677Z").modified == (  # a Ceph event
        ObjectRef("b", "k", "e", event_time="2024-06-01 12:00:00.502000+00:00").modified)  # its listing
    assert ObjectRef("b", "k", "e", event_time="yesterday").modified == 0.0
    assert ObjectRef("b", "k", "e").modified == 0.0


def test_a_listed_objects_time_is_written_as_an_events() -> None:
    """Failure records showed "2026-12-05T18:10:50.362801Z" (an event's) beside "2026-12-05T18:03:24.310000+00:00"
    (a listing's: review 26); the same instant orders the same either way."""
    from ingest.scanner import _ref

    listed = dt.datetime(2026, 12, 5, 20, 3, 24, 310000, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    ref = _ref("b", "k", '"e"', 1, listed, generation=1)
    assert ref.event_time == "2026-12-05T18:03:24.310000Z"
    assert ref.order == time_order(listed) == time_order(ref.event_time)


def test_reconcile_finds_an_object_indexed_from_an_aws_event_gone() -> None:
    """Reconcile removes an object the listing lacks only if it was written before the listing began. It asked the
    object's order: for an AWS event that is the opaque sequencer (~6e18 here, beyond any time in nanoseconds), so
    such an object was never removed. Its modification time (the event's time) answers for every server."""
    began = dt.datetime(2026, 12, 3, tzinfo=dt.UTC).timestamp()
    aws = Indexed("b", "k", "e", "0055AED6DCD90281E5", hex_sequencer_order("0055AED6DCD90281E5"), 1,
                  modified=began - 3600)
    assert written_before(aws, began, time_order("2026-12-03T00:00:00Z"))
    assert not written_before(dataclasses.replace(aws, modified=began + 1), began, time_order("2026-12-03T00:00:00Z"))
    unknown = dataclasses.replace(aws, order=time_order("2026-12-02T23:00:00Z"), modified=0.0)  # an older worker's
    assert written_before(unknown, began, time_order("2026-12-03T00:00:00Z"))
    # Written by an S3 server whose clock ran 12 minutes ahead (its events dropped as "future", the object indexed by
    # a reconcile), then deleted: the delete is older than it, and a reconcile took it for an upload during the
    # listing until those 12 minutes had passed (review 60). Within the skew ingest accepts, it still is one.
    assert written_before(dataclasses.replace(aws, modified=began + 12 * 60), began, 0)
    assert not written_before(dataclasses.replace(aws, modified=began + 4 * 60), began, 0)
