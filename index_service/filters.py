"""Which objects a search may return: a bucket, a key prefix (a folder), a range of modification times.

The index answers a filter from structures kept for it (``vector_index.py``: the keys in sorted order, each
object's time in an array), so a filter that keeps few objects costs little; ``keeps`` is the same rule for one
object, used where candidates are few anyway (text search).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Iterable

from bucketlens.http import HTTPError
from bucketlens.ordering import parse_iso
from bucketlens.schemas import object_id
from bucketlens.settings import BUCKET_NAME

FIELDS = ("bucket", "prefix", "modified_after", "modified_before")


@dataclasses.dataclass(frozen=True)
class Filter:
    bucket: str | None = None
    prefix: str = ""  # of the key, within the bucket(s)
    after: float | None = None  # modified at or after (seconds since the epoch)
    before: float | None = None  # modified strictly before

    def __bool__(self) -> bool:
        return bool(self.bucket or self.prefix or self.after is not None or self.before is not None)

    @property
    def dated(self) -> bool:
        return self.after is not None or self.before is not None

    def ranges(self, buckets: Iterable[str]) -> list[str]:
        """The object-id prefixes that hold every object this filter can keep."""
        chosen = [self.bucket] if self.bucket else sorted(buckets)
        return [object_id(b, self.prefix) for b in chosen]

    def keeps_time(self, modified: float) -> bool:
        """An object of unknown time (0: indexed before times were kept) is outside every range."""
        if not self.dated:
            return True
        if modified <= 0:
            return False
        return (self.after is None or modified >= self.after) and (self.before is None or modified < self.before)

    def keeps(self, bucket: str, key: str, modified: float) -> bool:
        return ((self.bucket is None or bucket == self.bucket) and key.startswith(self.prefix)
                and self.keeps_time(modified))

    def public(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "prefix": self.prefix,  # (a bound at the epoch, 0, is a bound: not iso's None)
                "modified_after": None if self.after is None else utc(self.after),
                "modified_before": None if self.before is None else utc(self.before)}


def bucket_field(value: Any, code: str = "bad_parameter") -> str | None:
    """A request's ``bucket``: None when not given; 400 ``code`` when not a non-empty string, or not a bucket name.
    (An access point's ARN in a filter made the service send a HEAD, signed with its S3 keys, to a host the ARN
    named: review 70.)"""
    if value is not None and not (isinstance(value, str) and value):
        raise HTTPError(400, code, "bucket must be a non-empty string")
    if value is not None and not BUCKET_NAME.fullmatch(value):
        raise HTTPError(400, code, f"bucket {value[:80]!r} is not an S3 bucket name (letters, digits, '.', '-', '_')")
    return value


def parse(fields: dict[str, Any], bucket_filters: bool = True) -> Filter:
    """A filter from request fields (JSON body, form fields or query parameters); 400 on a bad value.
    ``bucket_filters``: False for a key query, where ``bucket`` names the key's bucket instead."""
    bucket = bucket_field(fields.get("bucket")) if bucket_filters else None
    prefix = "" if fields.get("prefix") is None else fields["prefix"]
    if not isinstance(prefix, str):  # (0, false and [] were read as no prefix)
        raise HTTPError(400, "bad_parameter", "prefix must be a string")
    after = parse_time(fields.get("modified_after"), "modified_after")
    before = parse_time(fields.get("modified_before"), "modified_before")
    if after is not None and before is not None and after >= before:
        raise HTTPError(400, "bad_parameter", "modified_after must be earlier than modified_before")
    return Filter(bucket, prefix, after, before)


def parse_time(value: Any, name: str) -> float | None:
    """ISO 8601: a date (midnight UTC) or a date and time; a time without an offset is UTC. None: no bound; an empty
    string is 400 (a script's unset variable searched every date without a word: an independent check)."""
    if value is None:
        return None
    if value == "":
        raise HTTPError(400, "bad_parameter", f"{name} is empty: give a date or time such as 2024-06-01, or leave "
                                              "it out")
    if not isinstance(value, str):
        raise HTTPError(400, "bad_parameter", f"{name} must be an ISO 8601 date or time, e.g. 2024-06-01")
    try:
        seconds = parse_iso(value).timestamp()
        iso(seconds, strict=True)  # (echoed in the answer: a UTC time in years 1 to 9999)
    except (ValueError, OverflowError):  # not ISO 8601, or a UTC time past year 1 or 9999 (was a 500)
        raise HTTPError(400, "bad_parameter",
                        f"{name} must be an ISO 8601 date or time in years 1 to 9999 UTC, e.g. 2024-06-01 or "
                        f"2024-06-01T12:00:00Z; got {value!r:.80}") from None
    return seconds


def iso(when: float | None, strict: bool = False) -> str | None:
    """Seconds since the epoch as ISO 8601 UTC; None for an unknown time, or (unless ``strict``) for one that is
    out of range."""
    return utc(when, strict) if when else None


def utc(when: float, strict: bool = False) -> str | None:
    """``iso`` of a known time."""
    try:
        return dt.datetime.fromtimestamp(when, dt.UTC).isoformat().replace("+00:00", "Z")
    except (ValueError, OverflowError, OSError):
        if strict:
            raise
        return None
