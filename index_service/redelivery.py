"""A dead worker's tasks go back to the queue within seconds, without shortening the visibility timeout.

kombu's Redis transport keeps every delivered, unacknowledged task in its ``unacked`` hash and restores it only
once it is older than the broker's visibility timeout (600 s by default: above the slowest live batch, which
must not run twice). Each worker's main process beats the delivery tags it holds (workers/heartbeat.py,
``Deliveries``). A tag that no live worker has held for ``GRACE_S`` belongs to a dead worker (or to one that
died between taking the task and saying so) and is restored with kombu's own restore: a WATCHed transaction, so
a restore racing an acknowledgement or kombu's own sweep never puts a task back twice. From a worker's death:
its record expires within ``HEARTBEAT_TTL_S``, the check sees the tag unheld within ``CHECK_EVERY_S`` and
restores it ``GRACE_S`` later, at the head of its queue (about 12 + 3 + 6 = 21 s in the worst case).
"""

from __future__ import annotations

import logging
import time

import redis
from celery import Celery

from bucketlens.keys import HEARTBEAT_INTERVAL_S, Keys
from bucketlens.redis_client import text

from .queues import held_deliveries

log = logging.getLogger(__name__)

CHECK_EVERY_S = 3.0
# A live worker publishes a tag as it takes the task, and beats again within HEARTBEAT_INTERVAL_S after a Redis
# outage; two intervals of grace keep its tasks from ever being restored under it.
GRACE_S = 2 * HEARTBEAT_INTERVAL_S


class Redelivery:
    """Finds the unacknowledged tasks that no live worker holds and hands them back to their queues."""

    def __init__(self, client: redis.Redis, keys: Keys, celery: Celery) -> None:
        self.redis = client
        self.keys = keys
        self.celery = celery  # a publisher's app: its broker connection runs kombu's restore
        self._unheld_since: dict[str, float] = {}  # tag -> when this process first saw it held by no live worker

    def check(self, now: float | None = None) -> list[str]:
        """Restore the tasks unheld for ``GRACE_S`` (by this process's clock); returns their delivery tags."""
        now = time.monotonic() if now is None else now
        try:
            tags = {text(tag) for tag in self.redis.hkeys(self.keys.unacked)}
            unheld = tags - held_deliveries(self.redis, self.keys)
        except redis.RedisError:
            self._unheld_since.clear()  # live workers could not beat either: give them a grace period again
            raise
        self._unheld_since = {tag: self._unheld_since.get(tag, now) for tag in unheld}
        due = sorted(tag for tag, since in self._unheld_since.items() if now - since >= GRACE_S)
        if due:
            self._restore(due)
            for tag in due:
                del self._unheld_since[tag]
            self.redis.hincrby(self.keys.counters, "tasks_restored", len(due))
            log.warning("handed %d unacknowledged tasks back to the queue: no live worker has held them for %.0f s "
                        "(their worker died); delivery tags: %s", len(due), GRACE_S, " ".join(due))
        return due

    def _restore(self, tags: list[str]) -> None:
        with self.celery.connection_for_write() as connection:
            qos = connection.default_channel.qos
            for tag in tags:
                qos.restore_by_tag(tag)  # back where the next worker takes it first; a no-op once acknowledged
