"""Comparable ``order`` values for events about one object, normalised per source (DESIGN.md, "Ordering").

Orders are integers: nanoseconds since the epoch for time-based sources, the sequencer's integer value for
AWS and MinIO (whose hex sequencers compare as integers once left-padded to equal length).
"""

from __future__ import annotations

import datetime as dt


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


def time_order(when: str | dt.datetime) -> int:
    """Nanoseconds since the epoch of an ISO-8601 ``eventTime`` or a listing's ``LastModified``."""
    if isinstance(when, str):
        when = dt.datetime.fromisoformat(when.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    delta = when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def event_order(source: str, sequencer: str, event_time: str) -> int:
    """The order of one event: its sequencer decoded for its source, else its event time."""
    try:
        if sequencer:
            if source.startswith("ceph"):
                return ceph_sequencer_order(sequencer)
            return hex_sequencer_order(sequencer)
    except ValueError:
        pass  # an unusable sequencer falls back to the event time
    return time_order(event_time) if event_time else 0
