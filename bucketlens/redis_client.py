"""One way to open Redis: binary responses (vectors are bytes), short timeouts, bounded retries."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


def text(value: bytes | str) -> str:
    """A Redis reply as text (this client returns bytes; typing allows either)."""
    return value.decode() if isinstance(value, bytes) else value


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_timeout=10,
        socket_connect_timeout=3,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )
