"""Redis losing its data, noticed and healed: at start-up, and within seconds while the service runs.

Redis can come back empty: restarted without its AOF, a failover to an empty replica, a FLUSHALL. Everything in it
goes: the result stream and its consumer group, the generations hash (ingest answers 503 until the serving
generation is registered again, rather than tagging events with a guessed generation), queued and unacknowledged
tasks, pending marks, failure records, kombu's binding tables (bucketlens publishes by queue name through the
default exchange, which never reads them: tests/test_redis_loss.py publishes after a wipe and finds the tasks).
The index service keeps a marker key in Redis (``Keys.marker``); Redis answering without it has lost its data.
Redis answering without the serving generation in its generations hash went back to an older copy of its data,
from before the rebuild that made that generation: it is healed the same way.

While running, the service keeps serving from its index in memory, fails a rebuild in progress (its tasks are
gone), registers its generation and the marker again, reads the new stream from its start, and reconciles: the
bucket listing brings back whatever was in flight. At start-up, a service that found Redis empty, or no snapshot,
or a stream trimmed past its snapshot (an older one, loaded because the newest would not), reconciles once the
stream is replayed; one that has nothing at all (no snapshot, local or in the bucket, and an
empty index) while the bucket holds objects re-embeds the bucket, and ``/readyz`` answers 503 and says so until
that rebuild swaps in.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ingest.scanner import scan

from .rebuild import RebuildJob
from .reconcile import reconcile

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger(__name__)

CHECK_EVERY_S = 3.0


def check(service: Service) -> bool:
    """Heal if Redis lost its data, or went back to a copy older than a generation it serves or builds, since the
    service last registered; returns whether it had."""
    serving, building = service.index, service.rebuilds.registered
    gone = missing(service, [serving.generation, *([] if building is None else [building])])
    if not gone or service.index is not serving or service.rebuilds.registered != building:
        return False  # (or a swap or a rebuild's end meanwhile, which takes a generation out of the hash)
    if not service.lease.acquire():  # a writer paused past its lease: the hash is the new writer's now
        return False
    log.error("Redis %s: serving from memory, registering generation %d again, reconciling with the bucket",
              gone, serving.generation)
    if service.rebuilds.abandon("Redis lost data, and the rebuild's queued tasks with it; start it again"):
        log.error("the running rebuild is marked failed: its queued tasks are gone")
    service.claim_redis()
    service.forget_other_generations()  # (an older copy's: ingest fed each event to them too)
    service.merger.rewind()
    service.redis.hincrby(service.keys.counters, "redis_data_lost", 1)
    reconcile(service)
    return True


def missing(service: Service, generations: list[int]) -> str:
    """What Redis lacks of this index's, said, or "". The marker gone: it lost its data. A generation this service
    serves or builds not in the generations hash: an older copy of Redis's data came back (a backup restored, a
    failover to a lagging replica, an AOF cut short by ``redis-check-aof --fix``) from before a rebuild registered
    it, and ingest tagged every event since with a retired generation, whose results the merger drops: every upload,
    overwrite and delete was lost, and reconciles too (an independent review)."""
    pipe = service.redis.pipeline(transaction=False)
    pipe.exists(service.keys.marker)
    pipe.hmget(service.keys.generations, [str(generation) for generation in generations])
    marker, registered = pipe.execute()
    if not marker:
        return f"lost its data (the index service's marker {service.keys.marker} is gone)"
    unknown = [generation for generation, model in zip(generations, registered, strict=True) if model is None]
    if unknown:
        return (f"went back to an older copy of its data (a backup restored, a failover to a replica that lagged, an "
                f"AOF cut short; or the stack switched index backends): generation {unknown[0]} is not in "
                f"{service.keys.generations}")
    return ""


def trimmed_past(service: Service, position: str) -> bool:
    """Whether the result stream no longer holds the entry at ``position`` (an applied entry's id), so entries after
    it may be gone. A checkpoint trims the stream to its position and keeps the entry there: a restore from an older
    snapshot (the newest would not load: truncated, unreadable by this release) finds its own position trimmed, and
    the entries between the two are in neither; a checkpoint that began before Redis lost its data finds its
    position in no stream (the new one's ids need not sort after it: a trim to it could drop unread entries)."""
    return position != "0" and not service.redis.xrange(service.keys.results, min=position, max=position)


def restore_at_start(service: Service, redis_lost: str, snapshot_loaded: bool,
                     trimmed: bool = False) -> RebuildJob | None:
    """After the stream is replayed: a reembed of the bucket when there is nothing else to serve from (returned,
    for readiness), else a reconcile when Redis lacked this index's data (``redis_lost``, said by ``missing``: it
    was empty, or an older copy), no snapshot was found or the stream was ``trimmed`` past the snapshot's position;
    nothing otherwise."""
    if snapshot_loaded and not redis_lost and not trimmed:
        return None
    service.merger.caught_up.wait()
    settings = service.settings
    if len(service.index) == 0 and next(iter(scan(service.s3, settings.bucket, settings.reserved_prefix)), None):
        log.warning("no snapshot (%s) and %s (a first start, or both lost): re-embedding bucket %s; /readyz answers "
                    "503 until it is done", "local or in the bucket" if settings.snapshot_s3 else
                    "local; SNAPSHOT_S3 is off", "an empty Redis" if redis_lost else "an empty result stream",
                    settings.bucket)
        return service.rebuilds.start("reembed")
    if not snapshot_loaded and redis_lost:  # (alarming words at every first start: review 19)
        log.info("no snapshot and no data in Redis (a first start, or both lost): reconciling with the bucket")
    else:
        log.warning("%s: reconciling with the bucket", f"Redis {redis_lost}" if redis_lost else
                    "no snapshot found" if not snapshot_loaded else
                    "the result stream no longer holds what followed the snapshot loaded (a newer one was not loaded)")
    reconcile(service)
    return None
