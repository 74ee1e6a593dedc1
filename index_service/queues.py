"""How far behind the system is: Celery queue depths (priority sub-lists included), unacked tasks,
the result stream's length and the merger's lag, failures, live workers."""

from __future__ import annotations

from typing import Any

import redis

from bucketlens.keys import Keys

# kombu's Redis transport keeps priorities 3, 6, 9 in sub-lists named queue + "\x06\x16" + priority.
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)


def queue_report(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    pipe = client.pipeline(transaction=False)
    for queue in keys.queues:
        for step in PRIORITY_STEPS:
            pipe.llen(_list_key(keys, queue, step))
    pipe.hlen(keys.celery_prefix + "unacked")
    pipe.xlen(keys.results)
    pipe.hlen(keys.failures)
    pipe.hlen(keys.pending)
    pipe.hgetall(keys.counters)
    replies = pipe.execute()
    queues: dict[str, Any] = {}
    for i, queue in enumerate(keys.queues):
        lengths = replies[i * len(PRIORITY_STEPS) : (i + 1) * len(PRIORITY_STEPS)]
        queues[queue] = {"depth": sum(lengths),
                         "by_priority": {str(step): n for step, n in zip(PRIORITY_STEPS, lengths)}}
    unacked, stream_length, failures, pending, counters = replies[len(keys.queues) * len(PRIORITY_STEPS):]
    group = _group_info(client, keys)
    return {
        "queues": queues,
        "unacked": unacked,
        "stream": {"length": stream_length, "lag": group.get("lag"), "pending": group.get("pending", 0),
                   "last_delivered_id": group.get("last-delivered-id")},
        "failures": failures,
        "pending_objects": pending,
        "events": {k.decode(): int(float(v)) for k, v in counters.items()},
    }


def _list_key(keys: Keys, queue: str, step: int) -> str:
    return keys.celery_prefix + (queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}")


def _group_info(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    try:
        groups = client.xinfo_groups(keys.results)
    except redis.ResponseError:  # no stream yet
        return {"lag": 0, "pending": 0}
    for group in groups:
        name = group.get("name")
        if (name.decode() if isinstance(name, bytes) else name) == keys.merger_group:
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in group.items()}
    return {"lag": None, "pending": 0}
