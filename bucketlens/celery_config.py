"""Celery configuration shared by the workers (which consume) and ingest / index service (which publish)."""

from __future__ import annotations

from typing import Any

from kombu import Queue

from .keys import EMBED_TASK, Keys
from .settings import Settings, least_time_limit_s


def celery_config(settings: Settings) -> dict[str, Any]:
    keys = Keys(settings.namespace)
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # the worker waits out a Redis restart instead of exiting
        # The live queue is listed first and read first: a rebuild never starves fresh uploads.
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            # Sweep for tasks of dead workers every few seconds, not every 100 s (kombu's default 10 s x 10):
            # a task is redelivered at most a sweep after its visibility timeout expired.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 6)),
            "unacked_restore_throttle": 1,
            "queue_order_strategy": "priority",
            "global_keyprefix": keys.celery_prefix,  # every kombu key inside the namespace
        },
        "task_queues": [Queue(keys.live_queue), Queue(keys.rebuild_queue)],
        "task_default_queue": keys.live_queue,
        "task_routes": {EMBED_TASK: {"queue": keys.live_queue}},
        "task_serializer": "json",
        "accept_content": ["json"],  # never pickle
        "result_accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A batch still running at 3/4 of the visibility timeout is stuck (a decoder that never returns, a wedged
        # model call) while its worker's main process beats on: it held the batch, and its pool process, for good
        # where no supervisor watches. Celery kills that pool process and starts another, and hands the batch back
        # to the queue (not acknowledged on a timeout); delivered again, it goes on one object per task
        # (workers/tasks.py), and an object that hangs every time becomes a ``worker_lost`` failure after
        # MAX_REDELIVERIES. After a write's Redis retries (half the timeout), before the broker's own redelivery
        # (``time_limit_s``).
        "task_time_limit": time_limit_s(settings),
        "task_acks_on_timeout": False,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
        "broker_heartbeat": 0,
    }


def time_limit_s(settings: Settings) -> int:
    """How long a batch may run before its pool process is killed and the batch goes back to the queue: 3/4 of the
    visibility timeout, and never less than one stalled download takes to give up (``least_time_limit_s``): 450 s
    with the defaults; ``Settings`` refuses a VISIBILITY_TIMEOUT_S that leaves no room above it. A task of one object
    waiting on a slow S3 is not stuck: it must end as ``fetch_timeout``, which the index service sends again once S3
    answers, not as ``worker_lost`` after repeated kills (review 82: at the least VISIBILITY_TIMEOUT_S, 60 s, the
    limit was 45 s against ~66 s)."""
    return max(settings.visibility_timeout_s * 3 // 4, least_time_limit_s(settings.fetch_timeout_s))
