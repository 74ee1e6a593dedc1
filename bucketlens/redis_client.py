"""One way to open Redis: binary responses (vectors are bytes), short timeouts, bounded retries."""

from __future__ import annotations

from typing import overload

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


@overload
def text(value: bytes | str) -> str: ...
@overload
def text(value: None) -> None: ...
def text(value: bytes | str | None) -> str | None:
    """A Redis reply as text (this client returns bytes; typing allows either), or None for a missing one."""
    return value.decode() if isinstance(value, bytes) else value


def connect(url: str, timeout_s: float = 10, retries: int = 3) -> redis.Redis:
    """A client for work that should ride out a short stall (a merge, a queued task); ``probe`` for health checks."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=min(3, timeout_s),
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


PROBE_TIMEOUT_S = 2.0


def probe(url: str) -> redis.Redis:
    """A client for /readyz, /queues and the metrics scrape: one try of ``PROBE_TIMEOUT_S``. With the working one's
    (10 s, 3 retries) a frozen Redis held /readyz 70 s and a scrape 41 s, past a prober's or Prometheus's own
    timeout, so ``bucketlens_redis_up 0`` never reached anyone (review 20)."""
    return connect(url, PROBE_TIMEOUT_S, retries=0)
