"""Each worker tells Redis, every few seconds, that it is alive: its pool processes what they are doing
(``Heartbeat``), its main process which broker deliveries it holds (``Deliveries``).

A record is written every ``HEARTBEAT_INTERVAL_S`` (and on every batch start and end and every delivery) and
expires ``HEARTBEAT_TTL_S`` after, on Redis's clock, so a worker that died or hangs drops out within that
whatever the clocks of the machines say, and a worker that stops cleanly removes itself at
once. ``GET /queues`` lists the live pool processes; the index service hands the unacknowledged tasks that no
live main process holds back to the queue (index_service/redelivery.py), so a dead worker's tasks come back
within seconds instead of after the broker's visibility timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Protocol

import redis

from bucketlens.keys import HEARTBEAT_INTERVAL_S, HEARTBEAT_TTL_S, Keys
from bucketlens.redis_client import text
from bucketlens.schemas import json_object

log = logging.getLogger(__name__)


class Beacon:
    """A JSON record under ``key_of(id)``, listed in the set ``members``, refreshed by a daemon thread."""

    def __init__(self, client: redis.Redis, members: str, key_of: Callable[[str], str]) -> None:
        self.redis = client
        self.members = members
        self.key_of = key_of
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self.id = f"{self.hostname}:{self.pid}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self) -> dict[str, Any]:
        """What this beacon publishes (``last_seen`` is added)."""
        raise NotImplementedError

    def start(self) -> None:
        """Start beating (once per process; call it in the process that beats)."""
        if self._thread is not None:
            return
        self.pid = os.getpid()  # built before a fork, started after it
        self.id = f"{self.hostname}:{self.pid}"
        self._forget_dead()
        self._thread = threading.Thread(target=self._run, name=f"beacon-{self.members}", daemon=True)
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
            pipe.delete(self.key_of(self.id))
            pipe.srem(self.members, self.id)
            pipe.execute()

    def beat(self) -> None:
        """Publish the record now; does nothing before ``start`` (a pipeline used outside a worker)."""
        if self._thread is None:
            return
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(self.key_of(self.id), json.dumps({**self.record(), "last_seen": time.time()}), ex=HEARTBEAT_TTL_S)
            pipe.sadd(self.members, self.id)
            pipe.execute()
        except redis.RedisError as exc:  # the worker's own Redis handling reports outages; stay quiet here
            log.debug("heartbeat not written: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            try:
                self.beat()
            except Exception:  # (a thread that died of it left a live process silent: the supervisor kills it)
                log.exception("heartbeat not written")

    def _forget_dead(self) -> None:
        """Drop ids whose record expired, so the set does not grow with every worker ever started.

        Safe against a live worker: every beat adds its id again together with its record.
        """
        try:
            ids = sorted(self.redis.smembers(self.members))
            if not ids:
                return
            pipe = self.redis.pipeline(transaction=False)
            for member in ids:
                pipe.exists(self.key_of(text(member)))
            dead = [member for member, alive in zip(ids, pipe.execute(), strict=True) if not alive]
            if dead:
                self.redis.srem(self.members, *dead)
        except redis.RedisError as exc:
            log.debug("cannot prune dead workers: %s", exc)


def live_workers(client: redis.Redis, keys: Keys, worker_ids: set[bytes] | None = None) -> list[dict[str, Any]]:
    """Workers whose heartbeat has not expired (``Heartbeat``), with what each is doing, by id (``GET /queues``)."""
    ids = sorted(client.smembers(keys.workers) if worker_ids is None else worker_ids)
    if not ids:
        return []
    now = time.time()
    workers = []
    for raw in client.mget([keys.worker(text(worker_id)) for worker_id in ids]):
        worker = json_object(raw)  # None: expired (dead or hung for longer than the heartbeat's TTL), or not ours
        if worker is None or not isinstance(last_seen := worker.get("last_seen", now), (int, float)):
            continue
        worker["age_s"] = round(max(0.0, now - last_seen), 3)  # clocks of other machines may differ
        workers.append(worker)
    return workers



class Heartbeat(Beacon):
    """The state of one pool process (which runs the tasks), shown in ``GET /queues``."""

    def __init__(self, client: redis.Redis, keys: Keys, model: str = "", device: str = "",
                 limits: dict[str, int] | None = None) -> None:
        super().__init__(client, keys.workers, keys.worker)
        self.keys = keys
        self._state: dict[str, Any] = {
            "model": model, "device": device, "started": time.time(), "state": "idle", "batch_size": 0,
            "batch_started": None, "batches": 0, "objects": 0, "limits": limits or {},
        }
        self._lock = threading.Lock()

    def start(self) -> None:
        super().start()
        self._compare_limits()

    def _compare_limits(self) -> None:
        """Warn where a live worker refuses objects by other limits than this one's: the same object was indexed or
        a failure by which worker took it (review 86: a worker started by hand kept its own MAX_OBJECT_BYTES)."""
        mine = self._state["limits"]
        try:
            workers = live_workers(self.redis, self.keys)
        except redis.RedisError:
            return
        if differ := {worker["id"]: worker["limits"] for worker in workers if worker.get("id") != self.id
                      and isinstance(worker.get("limits"), dict) and worker["limits"] != mine}:
            log.warning("this worker refuses objects by %s, and %d live worker(s) by other limits (%s): the same "
                        "object is indexed or a failure by which worker takes it; give every worker the same "
                        "BUCKETLENS_MAX_OBJECT_BYTES and MAX_PIXELS", mine, len(differ),
                        "; ".join(f"{worker}: {limits}" for worker, limits in sorted(differ.items())[:3]))

    def busy(self, size: int) -> None:
        """A batch of ``size`` objects started."""
        with self._lock:
            self._state.update(state="busy", batch_size=size, batch_started=time.time())
        self.beat()

    def embedding(self, models: list[str]) -> None:
        """The models the current batch runs: its generations' (a model-switching rebuild: two), which a worker takes
        from the index, not from its own ``BUCKETLENS_MODEL`` (shown until its first batch: review 28)."""
        with self._lock:
            self._state.update(model=", ".join(models))

    def handed_on(self) -> None:
        """The current batch was sent on as tasks of its own, which count its objects when they run (it was counted
        twice: 30 objects shown for 15 embedded after a worker's death, an independent check)."""
        with self._lock:
            self._state.update(batch_size=0)

    def idle(self) -> None:
        """The current batch ended (written, retried or failed)."""
        with self._lock:
            size = self._state["batch_size"]
            self._state.update(state="idle", batch_size=0, batch_started=None,
                               batches=self._state["batches"] + 1, objects=self._state["objects"] + size)
        self.beat()

    def record(self) -> dict[str, Any]:
        with self._lock:
            return {"id": self.id, "hostname": self.hostname, "pid": self.pid, **self._state}


class Message(Protocol):
    """What ``Deliveries`` reads of a kombu message."""

    delivery_tag: str

    @property
    def acknowledged(self) -> bool: ...


class Request(Protocol):
    """What ``Deliveries`` reads of a Celery request (``celery.worker.request.Request``)."""

    message: Message
    acknowledged: bool  # the worker asked the broker to acknowledge or reject the message, whether or not it heard


def settled(request: Request) -> bool:
    """The request's message is no longer the worker's: acknowledged, rejected or requeued, or asked to be. An ack
    that Redis never got (restarting) leaves the message unacknowledged, and a live worker said it held that task
    until the visibility timeout put it back (``unacked`` 1 with every worker idle for 10 minutes: an independent
    check); unheld, it goes back after the grace and is embedded again, to the same result."""
    return request.acknowledged or request.message.acknowledged


class Deliveries(Beacon):
    """The broker deliveries a worker's main process holds: received (running, waiting for a free pool process or
    for a retry's countdown) and not yet acknowledged, rejected or requeued.

    Celery's main process receives, acknowledges and requeues every task; when it dies, whatever it held stays in
    kombu's ``unacked`` hash until someone restores it. Beating the tags lets the index service tell those from
    the tasks of a live worker, however long a live batch runs (up to its time limit: celery_config.py).
    """

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        super().__init__(client, keys.consumers, keys.consumer)
        self._held: list[Request] = []
        self._lock = threading.Lock()

    def hold(self, request: Request) -> None:
        """A delivery arrived (main process, before the task runs): published at once."""
        self.start()
        with self._lock:
            self._held = [r for r in self._held if not settled(r)] + [request]
        self.beat()

    def record(self) -> dict[str, Any]:
        with self._lock:
            self._held = [r for r in self._held if not settled(r)]
            tags = [r.message.delivery_tag for r in self._held]
        return {"id": self.id, "hostname": self.hostname, "pid": self.pid, "deliveries": tags}
