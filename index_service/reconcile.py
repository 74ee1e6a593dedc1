"""Reconcile: the bucket listing is the final authority. Objects missing from the index (or indexed with
another etag) are sent for embedding; indexed objects that no longer exist are deleted. This heals events
that were never delivered. Objects whose listed version already failed for a reason its bytes decide (empty,
not an image, corrupt, too many pixels, too large) are not sent again, that is ``POST /failures/retry``'s call:
every reconcile, each watchdog heal included, re-embedded every bad object of the bucket. An older version the
index still holds of such an object is removed: the key no longer holds that picture. Failure records of objects
the listing did not find go too. Failures that a later attempt can undo (S3 unreachable, too slow, a lost worker)
are sent again. Objects whose listed version is queued already (a pending mark younger than the visibility timeout)
are not sent twice."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Callable

from bucketlens.ordering import MAX_CLOCK_SKEW_NS
from bucketlens.records import record
from bucketlens.schemas import CONTENT_REASONS, ObjectRef, object_id
from ingest.scanner import scan

from .backend import Indexed
from .failures import clear_gone

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ReconcileReport:
    listed: int = 0
    missing: int = 0
    changed: int = 0
    removed: int = 0
    failed: int = 0  # missing or changed, but this very version already failed by content: left to /failures/retry
    in_flight: int = 0  # missing or changed, but this very version is queued already (its task not yet merged)
    failures_cleared: int = 0  # failure records of objects the listing did not find (S3 no longer holds them)
    seconds: float = 0.0
    dry_run: bool = False  # counted only: nothing was sent, nothing removed


def reconcile(service: Service, bucket: str | None = None, dry_run: bool = False) -> ReconcileReport:
    """Compare ``bucket`` (None: the service's buckets) with the index and heal it; ``dry_run``: only count what it
    would send and remove (a listing that lost most of the bucket, a wrong bucket or prefix, removes most of the
    index)."""
    started, began = time.monotonic(), time.time() - 1
    started_order = int(began) * 1_000_000_000  # as an order: nanoseconds since the epoch, to the second
    report = ReconcileReport()
    serving = service.index
    buckets = [bucket] if bucket else sorted({service.settings.bucket} | serving.buckets())
    indexed = {object_id(o.bucket, o.key): o for o in serving.objects() if o.bucket in buckets}
    buried = serving.tombstones()  # (read before the listing: every delete it records happened before it)
    to_embed: list[ObjectRef] = []
    seen: set[str] = set()
    for name in buckets:
        for ref in scan(service.s3, name, service.settings.reserved_prefix, serving.generation):
            report.listed += 1
            seen.add(ref.object_id)
            current = indexed.get(ref.object_id)
            if current is None:
                report.missing += 1
            elif current.etag != ref.etag:
                report.changed += 1
            else:
                continue
            # Order it after what the index holds, so the listing's version wins over a stale one, and after a
            # delete the listing came after (a deleted version of a versioned object whose key lives on, a delete
            # marker removed: the tombstone is newer than the object's last modification).
            held = current.order if current else buried.get(ref.object_id, (-1, 0.0))[0]
            order = max(ref.order, held + 1)
            to_embed.append(dataclasses.replace(ref, order=order))
    listed_versions = to_embed
    to_embed = _without(service, to_embed, service.keys.failures, _settled)
    report.failed = report.missing + report.changed - len(to_embed)
    sent = {ref.object_id for ref in to_embed}
    superseded = [o for ref in listed_versions if ref.object_id not in sent and (o := indexed.get(ref.object_id))]
    # A version queued less than a visibility timeout ago is on its way (a reconcile every few seconds sent a whole
    # backlog again each time: 97 embeddings for 35 uploads in an independent check); an older mark may be a lost
    # task (orphans.py), sent again.
    oldest = time.time() - service.settings.visibility_timeout_s
    to_embed = _without(service, to_embed, service.keys.pending, lambda mark, ref: _queued(mark, ref, oldest))
    report.in_flight = report.missing + report.changed - report.failed - len(to_embed)
    gone = [o for oid, o in indexed.items() if oid not in seen and written_before(o, began, started_order)]
    for generation in [] if dry_run else service.publisher.generations():
        service.publisher.send_embeds([dataclasses.replace(r, generation=generation) for r in to_embed],
                                      queue=service.keys.rebuild_queue)
        service.publisher.write_deletes([
            ObjectRef(o.bucket, o.key, o.etag, order=max(o.order + 1, started_order), generation=generation)
            for o in gone
        ] + [  # at the held version's own order: nothing newer is touched, and a retry of the failed one comes in
            ObjectRef(o.bucket, o.key, o.etag, order=o.order, generation=generation) for o in superseded
        ])
    report.removed, report.dry_run = len(gone) + len(superseded), dry_run
    report.failures_cleared = clear_gone(service.redis, service.keys, buckets, seen, began, dry_run)
    report.seconds = round(time.monotonic() - started, 3)
    log.info("reconcile: %s", report)
    return report


def written_before(obj: Indexed, when: float, when_order: int) -> bool:
    """Whether ``obj`` was written before ``when`` (seconds since the epoch; ``when_order``, the same as an order):
    by its modification time where known, else by its order. An order is a time for Ceph's events and listings, but
    AWS's sequencers are opaque (~6e18 and more, beyond any time in nanoseconds), so an object indexed from an AWS
    event was never found gone. A modification time past the clock skew ingest accepts is an S3 clock that ran
    ahead, not an upload during the listing: such an object, deleted, stayed searchable until that time (review 60)."""
    if obj.modified:
        return obj.modified < when or obj.modified > when + MAX_CLOCK_SKEW_NS / 1e9
    return obj.order < when_order


def _without(service: Service, refs: list[ObjectRef], records: str,
             drop: Callable[[dict[str, str], ObjectRef], bool]) -> list[ObjectRef]:
    """``refs`` but those whose record in the hash ``records`` (by object id) ``drop`` leaves out."""
    kept: list[ObjectRef] = []
    for start in range(0, len(refs), 1000):
        part = refs[start : start + 1000]
        found = service.redis.hmget(records, [ref.object_id for ref in part])
        kept += [ref for ref, raw in zip(part, found, strict=True)
                 if (held := record(raw)) is None or not drop(held, ref)]
    return kept


def _queued(mark: dict[str, str], ref: ObjectRef, oldest: float) -> bool:
    return mark.get("etag") == ref.etag and float(mark.get("queued") or 0) >= oldest


def _settled(failure: dict[str, str], ref: ObjectRef) -> bool:
    return failure["etag"] == ref.etag and failure["reason"] in CONTENT_REASONS
