"""Each worker process tells Redis, every few seconds, that it is alive and what it is doing.

``GET /queues`` lists the workers whose heartbeat key still exists. The key expires ``TTL_S`` seconds after the
last beat, on Redis's clock, so a worker that died or hangs drops out within ``TTL_S`` whatever the clocks of
the machines say, and a worker that stops cleanly removes itself at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from typing import Any

import redis

from bucketlens.keys import Keys

log = logging.getLogger(__name__)

INTERVAL_S = 5.0  # between beats; also written on every batch start and end
TTL_S = 30  # a worker silent for this long is not listed any more


class Heartbeat:
    """The state of one worker process and the daemon thread that publishes it."""

    def __init__(self, client: redis.Redis, keys: Keys, model: str = "", device: str = "") -> None:
        self.redis = client
        self.keys = keys
        hostname = socket.gethostname()
        self.id = f"{hostname}:{os.getpid()}"
        self._state: dict[str, Any] = {
            "id": self.id, "hostname": hostname, "pid": os.getpid(), "model": model, "device": device,
            "started": time.time(), "state": "idle", "batch_size": 0, "batch_started": None,
            "batches": 0, "objects": 0,
        }
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start beating (once per process, after the pool forked)."""
        if self._thread is not None:
            return
        self._forget_dead()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self.beat()  # listed from now on, not one interval later
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and leave the list at once (a clean shutdown)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(self.keys.worker(self.id))
            pipe.srem(self.keys.workers, self.id)
            pipe.execute()

    def busy(self, size: int) -> None:
        """A batch of ``size`` objects started."""
        with self._lock:
            self._state.update(state="busy", batch_size=size, batch_started=time.time())
        self.beat()

    def idle(self) -> None:
        """The current batch ended (written, retried or failed)."""
        with self._lock:
            size = self._state["batch_size"]
            self._state.update(state="idle", batch_size=0, batch_started=None,
                               batches=self._state["batches"] + 1, objects=self._state["objects"] + size)
        self.beat()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self._state, "last_seen": time.time()}

    def beat(self) -> None:
        """Publish the current state; does nothing before ``start`` (a pipeline used outside a worker)."""
        if self._thread is None:
            return
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(self.keys.worker(self.id), json.dumps(self.snapshot()), ex=TTL_S)
            pipe.sadd(self.keys.workers, self.id)
            pipe.execute()
        except redis.RedisError as exc:  # the worker's own Redis handling reports outages; stay quiet here
            log.debug("heartbeat not written: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self.beat()

    def _forget_dead(self) -> None:
        """Drop ids whose heartbeat expired, so the set does not grow with every worker ever started.

        Safe against a live worker: every beat adds its id again together with its key.
        """
        try:
            ids = sorted(self.redis.smembers(self.keys.workers))
            if not ids:
                return
            pipe = self.redis.pipeline(transaction=False)
            for worker_id in ids:
                pipe.exists(self.keys.worker(worker_id.decode() if isinstance(worker_id, bytes) else worker_id))
            dead = [worker_id for worker_id, alive in zip(ids, pipe.execute(), strict=True) if not alive]
            if dead:
                self.redis.srem(self.keys.workers, *dead)
        except redis.RedisError as exc:
            log.debug("cannot prune dead workers: %s", exc)
