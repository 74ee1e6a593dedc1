"""How far behind the system is: Celery queue depths (priority sub-lists included), unacked tasks (held by live
workers, or left by dead ones), the result stream's length and the merger's lag, failures, live workers."""

from __future__ import annotations

import time
from typing import Any

import redis

from bucketlens.keys import PRIORITY_STEPS, Keys
from bucketlens.redis_client import text
from bucketlens.schemas import json_object
from workers.heartbeat import live_workers


def queue_report(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    pipe = client.pipeline(transaction=False)
    _queue_lengths(pipe, keys)
    pipe.hkeys(keys.unacked)
    pipe.xlen(keys.results)
    pipe.hlen(keys.failures)
    pipe.hlen(keys.pending)
    pipe.hgetall(keys.counters)
    pipe.hgetall(keys.canary)
    pipe.smembers(keys.workers)
    replies = pipe.execute()
    queues: dict[str, Any] = {}
    for i, queue in enumerate(keys.queues):
        lengths = replies[i * len(PRIORITY_STEPS) : (i + 1) * len(PRIORITY_STEPS)]
        queues[queue] = {"depth": sum(lengths),
                         "by_priority": {str(step): n for step, n in zip(PRIORITY_STEPS, lengths, strict=True)}}
    tags, stream_length, failures, pending, counters, canary, worker_ids = replies[
        len(keys.queues) * len(PRIORITY_STEPS):]
    group = _group_info(client, keys)
    held = held_deliveries(client, keys)
    live = sum(1 for tag in tags if text(tag) in held)
    return {
        "queues": queues,
        "unacked": len(tags),
        "unacked_live": live,  # held by a worker whose heartbeat is current
        "unacked_dead": len(tags) - live,  # held by none: its worker died; index_service/redelivery.py restores it
        "stream": {"length": stream_length, "lag": group.get("lag"), "pending": group.get("pending", 0),
                   "last_delivered_id": group.get("last-delivered-id")},
        "failures": failures,
        "pending_objects": pending,
        "events": {k.decode(): int(float(v)) for k, v in counters.items()},
        "canary": _canary(canary),
        "workers": live_workers(client, keys, worker_ids),
    }


def tasks_outstanding(client: redis.Redis, keys: Keys) -> bool:
    """Whether a task waits in a queue or is held, unacknowledged, by a worker: objects are on their way to the index
    (a worker writes a task's results only once the whole task is embedded, so merges alone leave gaps)."""
    pipe = client.pipeline(transaction=False)
    _queue_lengths(pipe, keys)
    pipe.hlen(keys.unacked)
    return any(pipe.execute())


def held_deliveries(client: redis.Redis, keys: Keys) -> set[str]:
    """Delivery tags that the main process of a live worker says it holds (workers/heartbeat.py, ``Deliveries``)."""
    ids = sorted(client.smembers(keys.consumers))
    if not ids:
        return set()
    held: set[str] = set()
    for raw in client.mget([keys.consumer(text(consumer_id)) for consumer_id in ids]):
        consumer = json_object(raw)  # None: expired (that worker is dead or hung), or not ours
        if consumer is not None and isinstance(tags := consumer.get("deliveries"), list):
            held.update(tag for tag in tags if isinstance(tag, str))
    return held


def _canary(fields: dict[bytes, bytes]) -> dict[str, Any]:
    """End-to-end delivery (infra/canary.py): when the last canary event arrived (``age_s``), how long the
    last checked canary took from PUT to receiver (``lag_s``), and how long the outstanding one has been
    waiting (``waiting_s``, 0 when none is outstanding; the supervisor heals above canary_timeout_s), and whether
    that one was written just after the S3 server was (re)started (``after_restart``: its notifications resume
    within ~30 s, and the uploads meanwhile are nowhere in the queues: an independent check)."""
    now = time.time()
    last_seen = float(fields[b"last_seen"]) if b"last_seen" in fields else None
    pending = fields.get(b"pending_key")
    outstanding = pending and pending != fields.get(b"last_key") and b"written" in fields
    waiting = now - float(fields[b"written"]) if outstanding else 0.0
    return {
        "last_seen": last_seen,
        "age_s": None if last_seen is None else round(max(0.0, now - last_seen), 3),
        "lag_s": round(float(fields[b"lag_s"]), 3) if b"lag_s" in fields else None,
        "waiting_s": round(max(0.0, waiting), 3),
        "after_restart": bool(outstanding) and fields.get(b"after_restart") == b"1",
    }


def _queue_lengths(pipe: Any, keys: Keys) -> None:
    """Queue on ``pipe`` the length of every queue's list at each priority, queue by queue."""
    for queue in keys.queues:
        for step in PRIORITY_STEPS:
            pipe.llen(keys.queue_list(queue, step))


def _group_info(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    try:
        groups = client.xinfo_groups(keys.results)
    except redis.ResponseError:  # no stream yet
        return {"lag": 0, "pending": 0}
    for group in groups:
        if text(group["name"]) == keys.merger_group:
            info = {k: text(v) for k, v in group.items()}
            return {**info, "lag": _lag(client, keys, info)}
    return {"lag": None, "pending": 0}


def _lag(client: redis.Redis, keys: Keys, group: dict[str, Any]) -> int | None:
    """The stream entries the merger has not read. Redis counts them from the group's ``entries-read``, which a
    restart can bring back below the stream's count (Redis 7.0 with AOF): a lag of 99 with every entry merged and 2
    in the stream, for good, and the service never looked caught up again (an independent check). Nothing is left
    once the group has read the stream's last entry, and never more than the stream holds (an empty stream: none;
    the group of a service started from a snapshot over an emptied Redis sits at the snapshot's id)."""
    try:
        stream = client.xinfo_stream(keys.results)
    except redis.ResponseError:  # the stream went meanwhile (Redis flushed)
        return 0
    last, length = stream["last-generated-id"], int(stream["length"])
    if length == 0 or text(last) == group.get("last-delivered-id"):
        return 0
    lag = group.get("lag")
    return None if lag is None else max(1, min(int(lag), length))
