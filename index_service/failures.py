"""Failure records (DESIGN.md, "Failures are data"): list them, send the objects again, clear them.

Workers write one record per object into the ``Keys.failures`` hash and delete it when the object later
succeeds. Retry and clear remove a record only if it is still the one that was read (compare and delete in
one Lua call), so a record that a worker rewrote meanwhile, for example after the retry itself failed again,
is never lost. Records of S3 being away or slow are retried by the index service itself (``retry_passing``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence, cast

import redis

from bucketlens.keys import Keys
from bucketlens.records import record, remove_unchanged
from bucketlens.schemas import ObjectRef, object_id
from ingest.publisher import Publisher

log = logging.getLogger(__name__)

CHUNK = 500  # records per HMGET step (Redis serves others in between); above this many due: the rebuild queue
# Reasons of S3 away or slow, which a later attempt mends: ``retry_passing`` makes it. Not the object's bytes
# (``CONTENT_REASONS``), S3 refusing access, a worker dying on the object, or a bug: those wait for the user.
RETRIED_BY_ITSELF = frozenset({"unreachable", "fetch_timeout"})
RETRY_FIRST_S = 120.0  # a record's first retry comes this long after it was written, each next one 4x as long after
RETRY_MOST_S = 4 * 3600.0  # its own record, at most this,
RETRY_ROUNDS = 6  # and no more than this many times (~11 h): an object that times out whatever S3 does is the user's
RETRY_EVERY_S = 30.0  # how often the index service looks
RESCAN_S = 600.0  # ... reading every record at least this often; in between, only when a worker counted a new one


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which records an operation applies to; an empty selection means all of them."""

    reason: str | None = None
    bucket: str | None = None
    keys: frozenset[str] | None = None  # object keys (with ``bucket``, or in any bucket)

    PARAMETERS = ("reason", "bucket", "key")  # query parameters (key repeatable)
    FIELDS = ("reason", "bucket", "keys")  # JSON body

    @classmethod
    def parse(cls, query: Mapping[str, str], body: Mapping[str, Any] | None = None,
              query_keys: Sequence[str] = ()) -> Selection:
        """From query parameters (``reason``, ``bucket``, repeated ``key``) and an optional JSON body (``reason``,
        ``bucket``, ``keys``). Raises ValueError on a value that is empty or of the wrong type, and on one given in
        both places with two values: an empty selection means every record, and a blank ``reason`` or an empty
        ``keys`` list once cleared (or retried) them all (an independent review)."""
        merged: dict[str, Any] = {name: query[name] for name in ("reason", "bucket") if name in query}  # (not key)
        if query_keys:
            merged["keys"] = list(query_keys)
        for name, value in (body or {}).items():
            if name in cls.FIELDS:
                if name in merged and merged[name] != value:
                    raise ValueError(f"{name} is given twice, {merged[name]!r:.40} as a query parameter and "
                                     f"{value!r:.40} in the body: give it once")
                merged[name] = value
        for name in ("reason", "bucket"):
            if name in merged and not (isinstance(merged[name], str) and merged[name]):
                raise ValueError(f"{name} must be a non-empty string (leave it out to select every record)")
        names = merged.get("keys")
        if "keys" in merged and not (isinstance(names, list) and names and all(isinstance(k, str) and k
                                                                              for k in names)):
            raise ValueError("keys must be a non-empty list of non-empty strings (leave it out to select every "
                             "record)")
        return cls(merged.get("reason"), merged.get("bucket"), frozenset(names) if names is not None else None)

    def matches(self, record: Mapping[str, Any]) -> bool:
        return ((self.reason is None or record.get("reason") == self.reason)
                and (self.bucket is None or record.get("bucket") == self.bucket)
                and (self.keys is None or record.get("key") in self.keys))


def list_failures(client: redis.Redis, keys: Keys, selection: Selection = Selection()) -> list[dict[str, Any]]:
    """The selected records, newest first, each with ``retries`` (the times the index service sent its object
    again by itself) and ``retry_at`` (when it will next: ``retry_time``)."""
    items = _read(client, keys, selection)
    passing = [field for field, _, found in items if found.get("reason") in RETRIED_BY_ITSELF]
    counts = cast(list[bytes | None], client.hmget(keys.auto_retries, passing)) if passing else []
    rounds = {field: int(n or 0) for field, n in zip(passing, counts, strict=True)}
    records = [{**found, "retries": rounds.get(field, 0), "retry_at": retry_time(found, rounds.get(field, 0))}
               for field, _, found in items]
    return sorted(records, key=lambda r: (-r["time"], r["bucket"], r["key"]))


def retry_time(record: Mapping[str, Any], rounds: int) -> float | None:
    """When the index service sends ``record``'s object again by itself (``retry_passing``), if S3 answers then
    (a running rebuild sends its own generation's sooner: ``Rebuilds.resend_lost``); None: only the user does
    (``retry_failures``)."""
    if record.get("reason") not in RETRIED_BY_ITSELF or rounds >= RETRY_ROUNDS:
        return None
    return float(record.get("time") or 0) + min(RETRY_FIRST_S * 4**rounds, RETRY_MOST_S)


def clear_failures(client: redis.Redis, keys: Keys, selection: Selection = Selection()) -> int:
    """Remove the selected records; returns how many were removed."""
    return len(_remove_unchanged(client, keys, _read(client, keys, selection)))


def clear_gone(client: redis.Redis, keys: Keys, buckets: Collection[str], listed: Collection[str], before: float,
               dry_run: bool = False) -> int:
    """Remove the records of objects in ``buckets`` that a listing begun at ``before`` (seconds since the epoch) did
    not find (``listed``: object ids), written before it began; returns how many (``dry_run``: counted only).

    A delete clears the records when it comes, but a worker that had read the broken bytes before writes its record
    after it, and that record of a key S3 no longer holds stayed, ``/objects`` saying ``failed`` (an independent
    check). A record written since the listing began may be of an upload it did not see: it stays."""
    gone = [(field, raw, found) for field, raw, found in _read(client, keys, Selection())
            if found.get("bucket") in buckets and object_id(found["bucket"], found.get("key", "")) not in listed
            and float(found.get("time") or 0) < before]
    return len(gone) if dry_run else len(_remove_unchanged(client, keys, gone))


def clear_held(client: redis.Redis, keys: Keys, generation: int, held: Callable[[list[str]], Mapping[str, str]]
               ) -> int:
    """Remove the records of ``generation`` (a rebuild's, cancelled or failed) of versions the serving generation
    holds (``held``: object ids -> the etags it holds of them); returns how many. A cancelled rebuild under a lower
    ``MAX_PIXELS`` left ~20 records on photos that searches found, counted as failures for good (review 57). A
    record of a version it does not hold stays: it replaced the serving generation's own failure of that version."""
    items = [item for item in _read(client, keys, Selection()) if str(item[2].get("generation")) == str(generation)]
    etags = held([object_id(found["bucket"], found["key"]) for _, _, found in items]) if items else {}
    return len(_remove_unchanged(client, keys, [item for item in items
                                                if etags.get(object_id(item[2]["bucket"], item[2]["key"]))
                                                == item[2].get("etag")]))


def retry_failures(client: redis.Redis, keys: Keys, publisher: Publisher, selection: Selection = Selection()
                   ) -> tuple[int, int]:
    """Send the selected objects to the workers again and remove their records; returns (objects, tasks).

    The recorded etag goes with each object: if the object changed since, the worker skips it and the newer
    event (or a reconcile) brings the newer version. A record of a generation no longer fed (a finished or
    cancelled rebuild) is sent to the generations fed now.
    """
    taken, tasks = _send_again(client, keys, publisher, _read(client, keys, selection))
    return len(taken), tasks


class Passing:
    """The records ``retry_passing`` may send again, read whole only when a worker counted a new one of S3 away
    or slow (the ``failed:REASON`` counters, written with the record) or ``RESCAN_S`` after the last whole read;
    in between, only those that read found are read again. Every record every 30 s cost the index service
    1.3-2.0 s of CPU (beside searches, on the GIL) and Redis a 62 ms HGETALL, at 100k records of objects that
    are not images (review 54; measured on a local Redis)."""

    COUNTERS = [f"failed:{reason}" for reason in sorted(RETRIED_BY_ITSELF)]

    def __init__(self) -> None:
        self.counted: list[bytes | None] | None = None  # the counters at the last whole read
        self.read_at = -RESCAN_S  # its time (``now`` of ``retry_passing``)
        self.fields: list[bytes] = []  # the records it found, and still there at the last read

    def read(self, client: redis.Redis, keys: Keys, now: float) -> list[Item]:
        counted = cast(list[bytes | None], client.hmget(keys.counters, self.COUNTERS))
        if counted != self.counted or not 0 <= now - self.read_at < RESCAN_S:
            items = _read(client, keys, Selection(), reasons=RETRIED_BY_ITSELF)
            self.counted, self.read_at = counted, now
        else:
            items = _read(client, keys, Selection(), fields=self.fields, reasons=RETRIED_BY_ITSELF)
        self.fields = [field for field, _, _ in items]
        return items


def retry_passing(client: redis.Redis, keys: Keys, publisher: Publisher, s3_answers: Callable[[], bool],
                  now: float, leave: Collection[int] = (), passing: Passing | None = None) -> int:
    """Send again the objects whose record says S3 was away or slow (``RETRIED_BY_ITSELF``); returns how many.

    An outage past the workers' retries (~3 min) failed every upload queued meanwhile for good, and a key
    overwritten then lost its older picture too; only ``failures --retry`` or a reconcile brought them back
    (review 53). A record is sent again ``RETRY_FIRST_S`` after it was written, and each time after that 4x as
    long after its new record, ``RETRY_ROUNDS`` times at most (``Keys.auto_retries`` counts the rounds until the
    object has neither such a record nor a pending mark), and only while ``s3_answers()``. Records of the
    generations in ``leave`` (a running rebuild's, which sends its objects again itself) stay. Many at once go to
    the rebuild queue, behind uploads. ``passing`` (the index service keeps one) spares reading every record."""
    rounds = {field: int(n) for field, n in cast(dict[bytes, bytes], client.hgetall(keys.auto_retries)).items()}
    # The marks before the records: a worker's failure writes its record and drops its mark at once, and between
    # a read of the records and one of the marks it looked settled, its rounds forgotten (review 54).
    marks = dict(zip(rounds, cast(list[bytes | None], client.hmget(keys.pending, list(rounds))), strict=True)
                 ) if rounds else {}
    items = (passing or Passing()).read(client, keys, now)
    recorded = {field for field, _, _ in items}
    left = {str(generation) for generation in leave}
    if over := [field for field in rounds if field not in recorded and marks[field] is None]:  # settled since
        client.hdel(keys.auto_retries, *over)  # (indexed, deleted, cleared, failed by content)
    due = [item for item in items if str(item[2].get("generation", "1")) not in left
           and (at := retry_time(item[2], rounds.get(item[0], 0))) is not None and now >= at]
    if not due or not s3_answers():
        return 0
    taken, _ = _send_again(client, keys, publisher, due, queue=keys.rebuild_queue if len(due) > CHUNK else None)
    pipe = client.pipeline(transaction=False)
    for field in taken:
        pipe.hincrby(keys.auto_retries, field, 1)
    pipe.hincrby(keys.counters, "failures_retried", len(taken))
    pipe.execute()
    if taken:
        record = next(iter(taken.values()))[1]
        log.warning("sent %d failed objects to the workers again: S3 was away or slow for them, and answers now "
                    "(e.g. %r: %s)", len(taken), object_id(record["bucket"], record["key"]), record["reason"])
    return len(taken)


def _send_again(client: redis.Redis, keys: Keys, publisher: Publisher, items: list[Item], queue: str | None = None
                ) -> tuple[dict[bytes, tuple[bytes, dict[str, Any]]], int]:
    """Take the records of ``items`` that are unchanged and send their objects again; (the records taken, tasks)."""
    generations = publisher.generations()  # (before the records are taken: an error after lost them, review 54)
    taken = _remove_unchanged(client, keys, items)
    if not taken:
        return taken, 0
    try:
        tasks = publisher.send_embeds([ref for _, record in taken.values() for ref in _refs(record, generations)],
                                      queue=queue)
    except Exception:  # nothing was sent: put back what we took, unless a worker wrote a newer record meanwhile
        pipe = client.pipeline(transaction=False)
        for field, (raw, _) in taken.items():
            pipe.hsetnx(keys.failures, field, raw)
        pipe.execute()
        raise
    return taken, tasks


Item = tuple[bytes, bytes, dict[str, Any]]  # hash field, stored JSON, parsed record


def _read(client: redis.Redis, keys: Keys, selection: Selection, fields: Sequence[bytes] | None = None,
          reasons: Collection[str] | None = None) -> list[Item]:
    """The selected records (of ``fields`` only, when given; of ``reasons`` only, when given: a record is parsed
    only if its text names one)."""
    if fields is None and selection.bucket is not None and selection.keys is not None:  # exact fields
        fields = sorted(object_id(selection.bucket, key).encode() for key in selection.keys)
    if fields is not None:  # in steps, as the whole read below (one HMGET of 100k fields held Redis 68 ms: review 58)
        parts = [fields[start : start + CHUNK] for start in range(0, len(fields), CHUNK)]
        pairs: Iterable[Any] = [pair for part in parts
                                for pair in zip(part, client.hmget(keys.failures, part), strict=True)]
    else:  # in steps: one HGETALL held Redis 62 ms at 100k records
        pairs = dict(client.hscan_iter(keys.failures, count=1000)).items()
    items = cast(Iterable[tuple[bytes, bytes | None]], pairs)  # the client answers bytes (bucketlens.redis_client)
    named = [reason.encode() for reason in reasons or ()]
    return [(field, raw, found) for field, raw in items
            if raw and (not named or any(name in raw for name in named)) and (found := record(raw)) is not None
            and selection.matches(found) and (reasons is None or found.get("reason") in reasons)]


def _remove_unchanged(client: redis.Redis, keys: Keys, items: list[Item]) -> dict[bytes, tuple[bytes, dict[str, Any]]]:
    """Delete each record that still holds what was read; returns the deleted ones (stored JSON, parsed) by field."""
    by_field = {field: (raw, record) for field, raw, record in items}
    removed = remove_unchanged(client, keys.failures, {field: raw for field, (raw, _) in by_field.items()})
    return {field: by_field[field] for field in removed}


def _refs(record: dict[str, Any], generations: list[int]) -> list[ObjectRef]:
    recorded = int(record.get("generation", 1))
    targets = [recorded] if recorded in generations else generations
    return [ObjectRef(bucket=record["bucket"], key=record["key"], etag=record.get("etag", ""),
                      order=int(record.get("order", 0)), event_time=record.get("event_time", ""),
                      generation=generation) for generation in targets]
