"""End-to-end delivery proof: a canary object under the reserved prefix must produce its notification.

The writer records what it wrote and when (``pending_key``, ``written``) before it writes it; the receiver marks
that key's event when it arrives (``keys.canary_seen(key)``, and ``last_key``/``last_seen`` in ``keys.canary``), and
no other reserved-prefix event; once its canary is seen, the writer records the lag (``lag_s``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from bucketlens.keys import Keys
from bucketlens.redis_client import text
from bucketlens.settings import Settings

log = logging.getLogger(__name__)
SAY_WAITING_S = 15.0  # a wait this long is said (a new topic's first event takes 4-21 s)
RESTART_GRACE_S = 45.0  # radosgw rereads its persistent-queue list every 30 s; a little more for the redeliveries


class Canary:
    def __init__(self, settings: Settings, s3: Any, client: redis.Redis) -> None:
        self.settings = settings
        self.s3 = s3
        self.redis = client
        self.keys = Keys(settings.namespace)

    def write(self, after_restart: bool = False) -> str:
        """Upload a canary; ``after_restart``: the S3 server was just (re)started, and its notifications resume only
        within ~30 s (Ceph 16's persistent topics): ``bucketlens queues`` says so at once."""
        key = f"{self.settings.reserved_prefix}canary/{time.time_ns()}"
        previous = text(self.redis.hget(self.keys.canary, "pending_key") or b"")
        self.redis.hset(self.keys.canary, mapping={"pending_key": key, "written": time.time(),
                                                   "after_restart": int(after_restart)})
        self.s3.put_object(Bucket=self.settings.bucket, Key=key, Body=b"canary")
        # Its age counts from S3's acknowledgement: a PUT held by a frozen S3 server and answered as it thawed was
        # judged undelivered at once, and the radosgw that had just resumed was restarted (review 24).
        self.redis.hset(self.keys.canary, "written", time.time())
        if previous:  # one never delivered, or not checked since (a `down` meanwhile): it stayed in the bucket for
            self._remove(previous)  # good, one more at each restart (review 86: 4 after 5)
        return key

    def _remove(self, key: str) -> None:
        """Delete a canary whose work is done (S3 away: a leftover canary is harmless, never indexed or counted)."""
        try:
            self.s3.delete_object(Bucket=self.settings.bucket, Key=key)
        except Exception as exc:
            log.debug("canary %s left in the bucket: %s", key, exc)

    def check(self) -> tuple[str | None, float]:
        """(the outstanding canary key or None once delivered, seconds since it was written)."""
        state = {text(k): text(v) for k, v in self.redis.hgetall(self.keys.canary).items()}
        pending = state.get("pending_key")
        if not pending:
            return None, 0.0
        written = float(state.get("written", 0))
        seen = self.redis.get(self.keys.canary_seen(pending))
        if seen is not None:
            lag = max(0.0, float(seen) - written)  # (its event can come before S3 answered the PUT)
            self.redis.hset(self.keys.canary, mapping={"pending_key": "", "lag_s": lag, "delivered": float(seen)})
            self._remove(pending)  # (without it the bucket gained a canary object every interval, forever)
            return None, lag
        return pending, time.time() - written

    def wait(self, timeout_s: float, after_restart: bool = False,
             waiting: Callable[[float], None] | None = None) -> float:
        """Write a canary (``write``) and wait for its event; returns the delivery lag in seconds. ``waiting`` is
        told once, ``SAY_WAITING_S`` into the wait, how long it has waited (`up` was silent for 90 s: review 83)."""
        self.write(after_restart)
        start = time.monotonic()
        while (waited := time.monotonic() - start) < timeout_s:
            pending, lag = self.check()
            if pending is None:
                return lag
            if waiting is not None and waited >= SAY_WAITING_S:
                waiting(waited)
                waiting = None
            time.sleep(0.1)
        raise TimeoutError(f"no notification for the canary within {timeout_s:.0f} s")
