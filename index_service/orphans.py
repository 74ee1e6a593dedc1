"""Pending marks whose task was lost, found and healed without listing the bucket.

Every queued object carries a pending mark (``Keys.pending``: etag, order, when queued) until its result is
merged. A task can still vanish between the broker and a worker: kombu's Redis transport pops a message (BRPOP)
and only then records it as unacknowledged, so a worker killed in between loses it (seen in
tests/test_faults.py: one of 120 uploads, the one whose task a SIGKILLed worker had just popped); an index service
killed while queueing a rebuild leaves marks whose tasks were never sent. When nothing is queued, unacknowledged or
unmerged (a dead worker's unacknowledged tasks are restored within seconds, redelivery.py), a mark older than
``MIN_AGE_S`` cannot belong to work in flight: if the index (or a failure record) already holds its etag the mark
is stale and dropped, otherwise the object is sent to the workers again. Checked every ``SWEEP_EVERY_S``, so a
lost task comes back within ~20 s of the pipeline going idle.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, cast

from bucketlens.records import record, remove_unchanged
from bucketlens.schemas import ObjectRef, split_object_id

from .queues import queue_report

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 5.0
# A mark is written just before its task is published (publish retries take under a second); a task in flight is
# queued, unacknowledged or unmerged, which the idle check sees. 15 s leaves a wide margin for a slow publish.
MIN_AGE_S = 15.0
CHUNK = 1000  # above this many lost objects, they go to the rebuild queue


def quiet(service: Service) -> bool:
    """Nothing queued, handed out, or written and not merged: read by the merger and not yet applied counts too, and
    a lag Redis cannot say (after the merger's group moved inside an untrimmed stream) is not taken for none (both
    sent results not merged yet again as lost: an independent review). Entries the merger holds (of a later version,
    ``Merger.held``) count as unmerged, so the sweep waits while they are held: their objects' marks would look lost,
    and each one sent again would come back as another held entry, every sweep, until the index service upgrades."""
    report = queue_report(service.redis, service.keys)
    stream = report["stream"]
    unmerged = stream["pending"] or (stream["lag"] if stream["lag"] is not None else stream["length"])
    return not (any(q["depth"] for q in report["queues"].values()) or report["unacked"] or unmerged)


def idle(service: Service) -> bool:
    """Quiet, and no rebuild building a shadow generation (whose marks name objects the serving index holds)."""
    return service.shadow is None and quiet(service)


def sweep(service: Service, min_age_s: float = MIN_AGE_S) -> tuple[int, int]:
    """Drop stale marks and send lost objects again, if the pipeline is idle; returns (dropped, sent again). During a
    rebuild, the rebuild's lost objects are sent again instead (``Rebuilds.resend_lost``)."""
    if service.shadow is not None:
        return 0, service.rebuilds.resend_lost(min_age_s)
    if not idle(service):
        return 0, 0
    redis, keys = service.redis, service.keys
    marks = cast(dict[bytes, bytes], redis.hgetall(keys.pending))  # the client answers bytes
    old = {field: raw for field, raw in marks.items()
           if (mark := record(raw)) is not None and time.time() - float(mark.get("queued", 0)) >= min_age_s}
    if not old:
        return 0, 0
    stale, lost = _settled(service, old)
    dropped = len(remove_unchanged(redis, keys.pending, stale))
    sent = 0
    if lost and idle(service):  # still idle: nothing started meanwhile that could settle them
        # Many at once (a reembed abandoned by a restart left a mark per listed object) go to the rebuild queue, so
        # that uploads arriving meanwhile do not wait behind them (an independent review).
        service.publisher.send_embeds(lost, queue=keys.rebuild_queue if len(lost) > CHUNK else None)
        sent = len(lost)
        redis.hincrby(keys.counters, "orphans_resent", len(lost))
        log.warning("sent %d objects to the workers again: their tasks were lost (e.g. %r)", len(lost),
                    lost[0].object_id)
    if dropped:
        log.info("dropped %d stale pending marks (their etag is indexed or failed already)", dropped)
    return dropped, sent


def drop_settled(service: Service) -> int:
    """Drop the pending marks whose version is settled already, of any age and with work in flight; the number
    dropped. Called when a reembed rebuild ends: its marks, one per object it listed, counted as backlog until the
    next idle sweep, though the workers drop a cancelled job's queued tasks unfetched (review 78: 1,318 objects "on
    their way" for ~15 s, with every queue empty). Not while a rebuild runs: its marks name what the serving index
    holds (a mark rewritten meanwhile stays: ``remove_unchanged``)."""
    if service.shadow is not None:
        return 0
    marks = {field: raw for field, raw in cast(dict[bytes, bytes], service.redis.hgetall(service.keys.pending)).items()
             if record(raw) is not None}
    stale, _ = _settled(service, marks)
    return len(remove_unchanged(service.redis, service.keys.pending, stale))


def _settled(service: Service, marks: dict[bytes, bytes]) -> tuple[dict[bytes, bytes], list[ObjectRef]]:
    """``marks`` (pending marks that are ours) split: those whose version the serving index or a failure record
    holds already, at the mark's order or a newer one (stale), and the objects of the others, at the serving
    generation. By etag alone, a newer event of the same bytes on its way (a revert to an earlier version, a delete
    and the same file uploaded again) was taken for settled while an older version's result could still land after
    it (review 82)."""
    fields = list(marks)
    failures = dict(zip(fields, cast(list[bytes | None], service.redis.hmget(service.keys.failures, fields)),
                        strict=True)) if fields else {}
    serving = service.index
    stale: dict[bytes, bytes] = {}
    lost: list[ObjectRef] = []
    for field, raw in marks.items():
        mark = cast(dict[str, Any], record(raw))
        bucket, key = split_object_id(field.decode())
        held = serving.get(bucket, key)
        failure = record(failures[field])
        order = int(mark["order"])
        if ((held is not None and held.etag == mark["etag"] and held.order >= order)
                or (failure and failure["etag"] == mark["etag"] and _order(failure) >= order)):
            stale[field] = raw
        else:
            lost.append(ObjectRef(bucket, key, mark["etag"], order=order,
                                  event_time=mark.get("event_time", ""), generation=serving.generation))
    return stale, lost


def _order(failure: dict[str, Any]) -> int:
    """A failure record's order (a decimal string; 0 for one without, of an earlier release or not ours)."""
    written = str(failure.get("order", ""))
    return int(written) if written.isdigit() else 0
