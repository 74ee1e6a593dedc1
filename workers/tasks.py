"""The embed task: thin, idempotent, retrying only what failed transiently."""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable

import redis
from celery import Celery, Task
from celery.exceptions import Reject, Retry

from bucketlens.keys import EMBED_TASK
from bucketlens.schemas import ObjectRef, SchemaError
from bucketlens.settings import Settings

from .errors import TransientError
from .pipeline import Outcome, Pipeline

log = logging.getLogger(__name__)


def backoff(retries: int, cap: float = 60.0) -> float:
    """Exponential backoff, in seconds, with "equal" jitter (half of it random)."""
    return random.uniform(0.5, 1.0) * min(cap, 2.0 ** retries)


def parse_refs(payload: Any) -> list[ObjectRef]:
    refs = []
    for item in payload if isinstance(payload, list) else []:
        try:
            refs.append(ObjectRef.from_json(item))
        except SchemaError as exc:
            log.error("dropping a malformed object reference: %s", exc)
    return refs


def _forget(p: Pipeline, deliveries: str) -> None:
    """The batch is written: its delivery count goes. Not worth failing a written batch for (it expires anyway)."""
    try:
        p.redis.delete(deliveries)
    except redis.RedisError as exc:
        log.debug("delivery count %s left to expire: %s", deliveries, exc)


def register_tasks(app: Celery, settings: Settings, pipeline: Callable[[], Pipeline]) -> None:
    @app.task(name=EMBED_TASK, bind=True, max_retries=settings.max_retries)
    def embed(self: Task, refs: list[dict[str, Any]]) -> None:
        started = time.monotonic()
        batch = parse_refs(refs)
        p = pipeline()
        deliveries = p.keys.deliveries(self.request.id)
        try:
            count = p.redis.incr(deliveries)
            p.redis.expire(deliveries, 7 * 86400)
        except redis.RedisError as exc:  # Redis went away as the task started: give the batch back untouched
            raise Reject(f"Redis unreachable: {exc}", requeue=True) from exc
        if count > settings.max_redeliveries:  # this object keeps killing workers (a batch is split first, below)
            _written(p, Outcome(failed=[(r, "worker_lost", "the worker died on this object repeatedly")
                                        for r in batch]), 0, started)
            _forget(p, deliveries)
            return
        if count > 1 and len(batch) > 1:  # delivered again: a worker died on it (or it outlived the visibility
            # timeout). Each object goes on as a task of its own, so that a poison object fails alone: after
            # MAX_REDELIVERIES every object of its batch became worker_lost (an independent review).
            queue = (self.request.delivery_info or {}).get("routing_key") or p.keys.live_queue
            try:
                for ref in batch:
                    self.app.send_task(EMBED_TASK, args=[[ref.to_json()]], queue=queue)
            except Exception as exc:  # the broker away: the batch comes back whole (what was sent is harmless twice)
                raise Reject(f"could not split the batch: {exc}", requeue=True) from exc
            log.warning("a batch of %d objects was delivered %d times: sent again one object per task", len(batch),
                        count)
            p.heartbeat.handed_on()
            _forget(p, deliveries)
            return
        try:
            out = p.process(batch)
        except Exception as exc:  # a bug or a model crash: record it rather than losing the batch silently
            log.exception("batch failed")
            out = Outcome(failed=[(ref, "internal", f"{type(exc).__name__}: {exc}") for ref in batch])
        attempts = self.request.retries + 1
        if out.transient and self.request.retries >= settings.max_retries:
            out.failed += out.transient  # the retries spent: failure records, not "to retry" in the batch's log line
            out.transient = []
        _written(p, out, attempts, started)
        _forget(p, deliveries)
        if out.transient:  # (emptied above once the retries are spent)
            retry = [ref.to_json() for ref, _, _ in out.transient]
            try:
                raise self.retry(args=[retry], countdown=backoff(self.request.retries))
            except Retry:
                raise
            except Exception as exc:  # the retry not queued: acknowledged, its objects were lost (review)
                raise Reject(f"could not queue the retry: {exc}", requeue=True) from exc


def _written(p: Pipeline, out: Outcome, attempts: int, since: float) -> None:
    """Write the outcome, or give the task back (a task that raised is acknowledged, its outcome lost)."""
    try:
        p.write(out, attempts, since)
    except TransientError as exc:
        raise Reject(str(exc), requeue=True) from exc
