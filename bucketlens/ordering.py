"""Comparable ``order`` values for events about one object, normalised per source (DESIGN.md, "Ordering").

Orders are integers: nanoseconds since the epoch for time-based sources (Ceph's sequencer, MinIO's, which is the
hex of its event or modification time, an event time), the sequencer's integer value for AWS (whose hex sequencers
compare as integers once left-padded to equal length). A time-based order
can be checked against the clock: one beyond now + ``MAX_CLOCK_SKEW_NS`` would win over every real event for
that object (a delete would hide it through re-uploads), so ingest acknowledges such an event and drops it,
leaving the object to reconcile. An opaque sequencer cannot be checked that way (README, "Threat model").
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

MAX_CLOCK_SKEW_NS = 5 * 60 * 1_000_000_000


class EventOrder(NamedTuple):
    value: int
    timed: bool  # nanoseconds since the epoch (Ceph sequencer, eventTime), not an opaque counter


def beyond_clock_skew(order: EventOrder, now_ns: int) -> bool:
    """A time-based order later than ``now_ns`` plus the clock skew tolerated between S3 server and ingest."""
    return order.timed and order.value > now_ns + MAX_CLOCK_SKEW_NS


def ceph_sequencer_order(sequencer: str) -> int:
    """Ceph 16: hex of the little-endian bytes of a ``utime_t`` (4 bytes seconds, 4 bytes nanoseconds)."""
    raw = bytes.fromhex(sequencer)
    if len(raw) != 8:
        raise ValueError(f"Ceph sequencer must be 8 bytes of hex, got {sequencer!r}")
    seconds = int.from_bytes(raw[:4], "little")
    nanos = int.from_bytes(raw[4:], "little")
    return seconds * 1_000_000_000 + nanos


def hex_sequencer_order(sequencer: str) -> int:
    """AWS and MinIO: the sequencer as an integer (equivalent to comparing left-padded hex strings)."""
    return int(sequencer, 16)


def event_time(when: dt.datetime) -> str:
    """A listing's ``LastModified`` as an event's ``eventTime`` says it (failure records showed "...Z" and
    "...+00:00" side by side); naive: UTC, as ``time_order`` takes it."""
    when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> dt.datetime:
    """An ISO-8601 date or time, aware: ``Z`` or ``z`` is UTC, and so is a time without an offset; ValueError if it
    is not one (one parse for events, listings and search filters: only the filters took ``z``: review 63)."""
    when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def time_order(when: str | dt.datetime) -> int:
    """Nanoseconds since the epoch of an ISO-8601 ``eventTime`` or a listing's ``LastModified``; ValueError for a
    time before the epoch or past year 9999 in UTC (an eventTime of year 1 was indexed as modified in year 1, and
    every search that found the object answered 500 rendering it: an independent review)."""
    when = parse_iso(when) if isinstance(when, str) else when
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    try:
        when = when.astimezone(dt.UTC)
    except OverflowError as exc:
        raise ValueError(f"{when.isoformat()} is out of range") from exc
    if when.year < 1970:
        raise ValueError(f"{when.isoformat()} is before 1970")
    delta = when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def event_order(source: str, sequencer: str, event_time: str) -> EventOrder:
    """The order of one event: its sequencer decoded for its source, else its event time."""
    try:
        if sequencer:
            if source.startswith("ceph"):
                return EventOrder(ceph_sequencer_order(sequencer), timed=True)
            # MinIO's is the hex of a time in nanoseconds (its event time, ``fmt.Sprintf("%X",
            # eventTime.UnixNano())``; the object's modification time in later releases): checked against the clock
            # like Ceph's (review 68); AWS's is an opaque counter.
            return EventOrder(hex_sequencer_order(sequencer), timed=source.startswith("minio"))
    except ValueError:
        pass  # an unusable sequencer falls back to the event time
    return EventOrder(time_order(event_time), timed=True) if event_time else EventOrder(0, timed=False)
