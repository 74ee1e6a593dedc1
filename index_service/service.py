"""The index service's resources, built once per process in the app's lifespan and passed to handlers.

The service holds the serving generation (``index``) and, during a ``reembed`` rebuild, the shadow one; the
merger feeds both; checkpoints (``Backend.checkpoint``: a FAISS snapshot, a Milvus flush) and stream trimming follow
a size/time policy; above ``approx_threshold`` vectors the serving generation is restructured into the backend's
approximate index type in the background. Which backend holds the generations is the settings' choice
(``backend.open_backend``)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import redis
from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError

from bucketlens.keys import Keys
from bucketlens.redis_client import connect, probe, text
from bucketlens.s3 import answered, make_client
from bucketlens.schemas import ResultEntry, object_id
from bucketlens.settings import INDEX_TYPES, Settings
from ingest.publisher import Publisher
from vision import words
from vision.embedders import Embedder, Embedders
from vision.models import recipe

from . import redis_loss
from .backend import Backend, Index, open_backend, restructure_into
from .duplicates import DuplicateFinder
from .failures import RETRY_EVERY_S, Passing, retry_passing
from .feature_store import FeatureStore
from .lease import WriterLease
from .merger import Merger, stream_order
from .orphans import SWEEP_EVERY_S
from .orphans import sweep as sweep_orphans
from .presign import Presigner
from .queues import tasks_outstanding
from .rebuild import RebuildJob, Rebuilds
from .reconcile import reconcile
from .redelivery import CHECK_EVERY_S, Redelivery
from .snapshots import SUFFIX as SNAPSHOT_SUFFIX
from .snapshots import SnapshotHealth, local_folder
from .vector_index import VectorIndex

log = logging.getLogger(__name__)
# After taking the writer lease over, the stream is kept from the takeover's position on for this long: a previous
# writer that was paused in the middle of a batch rewinds the stream to before that batch when it wakes (Merger),
# and the entries from there must still exist for the new writer to apply them again. A pause longer than this is
# left to reconcile (README, "Many API replicas, one writer"); Redis holds this much more of the stream meanwhile.
TAKEOVER_HOLD_S = 600.0
RESTRUCTURE_RETRY_S = 30.0  # a failed restructure is tried again after this long, twice as long each time in a row,
RESTRUCTURE_RETRY_MAX_S = 600.0  # up to this


class Service:
    def __init__(self, settings: Settings, embedder: Embedder | None = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.redis = connect(settings.redis_url)
        self.probe = probe(settings.redis_url)  # /readyz, /queues, the metrics: an answer within seconds
        self.s3 = make_client(settings)
        # Whether S3 answers, or has a bucket, asked beside other work: a call that S3 holds ends within ~5 s, and
        # a timed-out check does not leave its thread waiting up to 2 minutes on the shared client (review 54).
        self.s3_probe = make_client(settings, read_timeout=2.0, attempts=1)
        self._passing = Passing()  # the failure records the service sends again by itself (``_retry_passing``)
        self.presigner = Presigner(settings)
        self.publisher = Publisher(settings, self.redis)
        self.embedders = Embedders(settings, embedder)
        # An empty in-memory generation until _load finds or creates the real one (nothing writes to it).
        self.index: Index = VectorIndex(settings.model, recipe(settings.model).dim, generation=1)
        self.shadow: Index | None = None
        self.retiring: list[Index] = []  # generations a promote swapped out: fed until the new one's checkpoint
        self.rebuilds = Rebuilds(self)
        self.restoring: RebuildJob | None = None  # a reembed started because there was nothing to serve from
        self._made: set[int] = set()  # generations this process made: their feature stores start empty
        self.backend = open_backend(settings, self.redis, self.keys, self.feature_store, self.s3)
        self.redelivery = Redelivery(self.redis, self.keys, self.publisher.celery)
        self.snapshot_health = SnapshotHealth(settings.snapshot_every_s, settings.snapshot_failure_grace_s, self.redis,
                                              self.keys.snapshots_failing)
        # Replicas of one namespace all answer queries; the holder of the writer lease merges (lease.py).
        self.replica = settings.replica or f"{socket.gethostname()}:{os.getpid()}"
        # The lease names this process, not just the replica: a restarted "api" must not renew its predecessor's.
        self.lease = WriterLease(self.redis, self.keys.writer_lease, f"{self.replica}/{uuid.uuid4().hex[:8]}",
                                 settings.writer_lease_s)
        self.writing = threading.Event()
        self.merger = self._merger("0")
        self._applied_before = 0  # entries earlier mergers of this process applied (the lease lost and taken again)
        self.duplicates = DuplicateFinder(lambda: self.index, settings.duplicates_cpu_share, self._tasks_outstanding,
                                          self.writing.is_set)
        self.loaded = threading.Event()
        self.checked = threading.Event()  # the start-up check against the bucket is done (redis_loss.py)
        # the last checkpoint: (entries applied when it began, when it ended, how long it took)
        self._since_snapshot = (0, time.monotonic(), 0.0)
        self._checkpointing = threading.Lock()  # one checkpoint at a time
        self._trim_floor = ("0", -TAKEOVER_HOLD_S)  # (stream id, when): not trimmed past for a while after a takeover
        self.restructuring = threading.Lock()  # one restructure of the serving index at a time (rebuild.py too)
        self._restructure_wait = 0.0  # after a failed restructure: how long until the next try (``_restructure_due``)
        self._restructure_at = 0.0  # (time.monotonic())
        # Held by a batch's routing (``apply``) and by what changes the generations it routes to (a rebuild's start,
        # its swap, its end): neither falls inside a batch (review 66). Taken after ``Rebuilds._lock``, never before.
        self.routing = threading.Lock()
        self.chosen_type: str | None = None  # the index type a rebuild asked for (Keys.index_type), read on takeover
        self._loader = threading.Thread(target=self._load, name="loader", daemon=True)
        self._stopping = threading.Event()

    # -- life cycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loader.start()
        # A dead worker's tasks back in the queue (redelivery.py), then objects whose task was lost (orphans.py).
        self._every(CHECK_EVERY_S, self.redelivery.check, "redelivery")
        self._every(SWEEP_EVERY_S, lambda: sweep_orphans(self), "orphans")
        self._every(redis_loss.CHECK_EVERY_S, lambda: redis_loss.check(self), "redis-loss")
        self._every(RETRY_EVERY_S, self._retry_passing, "failures")
        if self.settings.reconcile_every_s > 0:
            self._every(self.settings.reconcile_every_s, lambda: reconcile(self), "reconcile")

    def _every(self, interval_s: float, job: Callable[[], object], name: str) -> None:
        """Run ``job`` in a thread of its own every ``interval_s`` while the service is ready, until it stops."""

        def loop() -> None:
            while not self._stopping.wait(interval_s):
                if self.writing.is_set() and self._running()[0]:
                    try:
                        job()
                    except redis.RedisError as exc:  # an outage, which the merger and /readyz report already
                        log.debug("%s met a Redis error; next attempt in %.0f s: %s", name, interval_s, exc)
                    except Exception:
                        log.exception("%s failed; next attempt in %.0f s", name, interval_s)

        threading.Thread(target=loop, name=name, daemon=True).start()

    def _load(self) -> None:
        """Heavy start-up off the event loop: the serving generation (newest snapshot, or the Milvus collection
        behind the alias), stream replay, the model (warmed up)."""
        # A FAISS index lives in its process, so a (re)started one takes the lease at once; replicas of a shared index
        # wait for it.
        writer = self._retry(lambda: self.lease.acquire(force=not self.backend.shared), "take the writer lease")
        restored = self._restore()
        while restored is None and not writer and not self._stopping.wait(1.0):
            # No generation yet and another process holds the lease: wait for the writer's first generation, or
            # for the lease (a writer killed before it made one leaves a lease that expires).
            writer = self._retry(self.lease.acquire, "take the writer lease")
            restored = self._restore()
        if writer and self.backend.shared:
            # _restore may have waited for the index server (restarting) past the lease, which nobody renewed
            # meanwhile: another replica may write by now (review 21: two writers, and this one, taking over late,
            # failed the other's running rebuild and dropped its collection).
            writer = self._retry(self.lease.acquire, "take the writer lease")
        if restored is not None:
            self.index, last_id = restored
        else:
            self.index, last_id = self.new_generation(self.settings.model, 1), "0"
        # (Asked before the merger starts: its checkpoints trim the stream.)
        trimmed = writer and restored is not None and self._retry(lambda: redis_loss.trimmed_past(self, last_id),
                                                                   "read the result stream")
        redis_lost = self._take_over(last_id) if writer else ""
        self.loaded.set()
        threading.Thread(target=self._keep_role, name="role", daemon=True).start()
        try:
            self.embedders.get(self.index.model)  # query images are embedded with the serving model
        except Exception as exc:  # BUCKETLENS_DEVICE=cuda without a GPU: /readyz said "loading the model" for good
            log.critical("the index service cannot load its model %s and stops: %s: %s", self.index.model,
                         type(exc).__name__, exc)
            os.kill(os.getpid(), signal.SIGTERM)  # (uvicorn's shutdown: the supervisor restarts it, backing off)
            return
        try:
            words.vocabulary(self.settings.wordnet)  # WordNet read once (~0.6 s), before the first text query
        except Exception as exc:  # (missing or damaged: readiness never waits on it; a dead loader left it 503)
            log.warning("text search is off: %s: %s", type(exc).__name__, exc)
        try:
            if writer:  # a replica that does not write restores nothing: the writer does
                self.restoring = redis_loss.restore_at_start(self, redis_lost, restored is not None, trimmed)
        except Exception:
            log.exception("restoring the index at start failed; a reconcile or rebuild heals it")
        finally:
            self.checked.set()

    def _restore(self) -> tuple[Index, str] | None:
        delay = 0.5
        while not self._stopping.is_set():
            try:
                return self.backend.load()
            except ConnectionError as exc:  # an index server (Milvus) not up yet: wait, never start empty
                log.warning("waiting for the index backend: %s", exc)
                self._stopping.wait(delay)
                delay = min(delay * 2, 5.0)
            except Exception:
                log.exception("cannot load the serving generation; starting from the stream alone")
                return None
        return None

    def _retry(self, action: Callable[[], Any], what: str) -> Any:
        """``action`` once Redis answers (start-up waits for it rather than fail)."""
        delay = 0.2
        while True:
            try:
                return action()
            except redis.RedisError as exc:
                log.warning("waiting for Redis to %s: %s", what, exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _register_generation(self) -> str:
        """Register the serving generation, waiting for Redis; returns what Redis lacked of ours, said ("": none)."""

        def register() -> str:
            self.rebuilds.recover()  # (drops the other generations from the hash, never the serving one)
            self.backend.drop_abandoned(self.index)
            self._drop_abandoned_features()
            return self.claim_redis()

        return str(self._retry(register, "register the serving generation"))

    def claim_redis(self) -> str:
        """Register the serving generation (ingest tags events with it) and the marker that tells a Redis that
        lost its data (redis_loss.py); returns what Redis lacked before, said (``redis_loss.missing``): "" when
        it held both."""
        lacked = redis_loss.missing(self, [self.index.generation])
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.generations, str(self.index.generation), self.index.model)
        pipe.set(self.keys.marker, self.index.generation)
        pipe.execute()
        return lacked

    def forget_other_generations(self) -> None:
        """Take out of the generations hash what neither serves nor is fed until the serving one is durable
        (``retiring``): ingest tags each event with every generation there, and workers embed it for each."""
        kept = {self.index.generation, *(old.generation for old in self.retiring)}
        if (building := self.rebuilds.registered) is not None:  # (one that started meanwhile: its own to drop)
            kept.add(building)
        others = [field for field in self.redis.hkeys(self.keys.generations) if int(field) not in kept]
        if others:
            self.redis.hdel(self.keys.generations, *others)

    # -- one writer among replicas -------------------------------------------------------------------------

    def _merger(self, start_id: str) -> Merger:
        # ``idle``: while the stream is quiet, the same policy: a checkpoint skipped during a burst (one was running,
        # or the wait after a long one was not over) is taken once due, not at the next merge (the end of a burst
        # stayed in no snapshot and untrimmed in the stream until something else arrived: 37,520 entries for 237 s
        # in a scale check), and one that failed (a full or read-only disk) is retried once its wait is over.
        return Merger(self.redis, self.keys, self.apply, self.after_batch, start_id=start_id,
                      batch=self.settings.merge_batch, may_write=self.lease.acquire, idle=self.after_batch,
                      owed=self.owed)

    def _take_over(self, last_id: str) -> str:
        """This replica holds the lease: merge from ``last_id`` (the serving generation's checkpoint); returns what
        Redis lacked of ours, said ("": none)."""
        redis_lost = self._register_generation()
        self.chosen_type = chosen_type(self.redis, self.keys, self.backend)
        self._applied_before += self.merger.applied
        self.merger = self._merger(last_id)
        self._since_snapshot = (0, time.monotonic(), 0.0)
        if self.backend.shared:  # a paused writer of a shared index can wake and write; a FAISS one only to itself
            self._trim_floor = (last_id, time.monotonic())
        self.merger.start()
        if not self.duplicates.started:
            self.duplicates.start()
        self.writing.set()
        log.info("replica %s writes: merging from %s", self.replica, last_id)
        return redis_lost

    def _follow(self) -> None:
        """A replica that does not write serves what the writer made: the generation the shared index serves, swapped
        in when the writer moved it (a rebuild, a restructure)."""
        # (its /stats says the writer's choice; said by the writer, not every few seconds here too)
        self.chosen_type = chosen_type(self.redis, self.keys, self.backend, say=False)
        current = self.index
        fresh = self.backend.moved_from(current)
        if fresh is None:
            return
        # A rebuild that moved to another model: image queries need it here too (never loaded, this replica said
        # "loading the model" until it was restarted).
        self.embedders.get(fresh.model)
        self.index = fresh
        current.features.close()  # searches still on it answer unverified

    def _keep_role(self) -> None:
        """Renew the lease while writing; otherwise try to take it, and follow the writer's serving generation
        (a rebuild's or restructure's swap) where the backend is shared."""
        while not self._stopping.wait(self.settings.writer_lease_s / 3):
            try:
                if self.writing.is_set():
                    # acquire, not renew: a lease that expired during a Redis outage, with nobody taking it, is kept
                    if not self.lease.acquire() or not self.merger.running:
                        self.merger.stop()
                        self.writing.clear()
                        self.backend.stopped_writing(self.index)
                        log.warning("replica %s lost the writer lease (held by %s); it stops merging", self.replica,
                                    self.lease.current())
                        # Its rebuild cannot go on (taking the lease back later, it resent the same objects forever
                        # and refused every new rebuild: an independent review); the new writer drops its shadow.
                        self.rebuilds.abandon(f"replica {self.replica} lost the writer lease during the rebuild")
                elif self.lease.acquire():
                    restored = self.backend.load()
                    if not self.lease.acquire():  # the load waited for a stalled index server past the lease:
                        if restored is not None:  # another replica writes by now (review 21, as at start-up)
                            restored[0].features.close()
                        continue
                    if restored is not None:  # what the previous writer left, up to its checkpoint
                        self.index = restored[0]
                    self._take_over(restored[1] if restored is not None else "0")
                elif self.backend.shared:
                    self._follow()
            except (redis.RedisError, ConnectionError) as exc:  # an outage the merger reports already, once
                log.debug("replica %s: keeping its role waits for Redis or the index server: %s", self.replica, exc)
            except Exception:
                log.warning("replica %s: keeping its role failed; trying again", self.replica, exc_info=True)

    def close(self) -> None:
        """Clean shutdown: stop merging, write a final checkpoint, hand the writer lease on."""
        self._stopping.set()
        self.merger.stop()
        if self.duplicates.started:
            self.duplicates.stop()
        if self.loaded.is_set() and self.writing.is_set():
            try:
                self.snapshot()
                self.lease.release()
            except Exception:
                log.exception("final checkpoint failed")
        self.backend.close()
        self.redis.close()

    def feature_store(self, generation: int) -> FeatureStore:
        """The local features of one generation, on this service's disk beside its snapshots."""
        path = self._features_folder / f"g{generation}.sqlite"
        if self.settings.index_backend != "faiss" and generation not in self._made and not path.exists():
            try:
                self._adopt_shared_store(path)
            except (OSError, sqlite3.Error):  # (its searches go unverified: features are no reason to stop)
                log.exception("cannot take %s over from %s", path.name, path.parent.parent)
        return FeatureStore(path)

    @property
    def _features_folder(self) -> Path:
        """Each backend keeps its own: a stack switched from one backend to the other deleted the other's stores as
        abandoned, and switched back, every object indexed before answered unverified until a reembed (review 29).
        FAISS's is where both were before; Milvus's is in it, ``milvus/``."""
        folder = Path(self.settings.home) / "features" / self.settings.namespace
        return folder if self.settings.index_backend == "faiss" else folder / self.settings.index_backend

    def _adopt_shared_store(self, path: Path) -> None:
        """A Milvus generation's store made before each backend had its folder lies in FAISS's: it is taken over,
        moved, or copied where FAISS has run in this home (one of its snapshots may name the file, which both
        backends' generation 1 shared). Under a lock: replicas sharing a home start together."""
        shared = path.parent.parent / path.name
        if not shared.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / ".adopt.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # (released when the file closes)
            if path.exists():  # another replica took it over meanwhile
                return
            snapshots = local_folder(self.settings.home, self.settings.namespace)
            if any(snapshots.glob(f"*{SNAPSHOT_SUFFIX}")):
                copy = path.with_name(f".{path.name}.copy")
                with contextlib.closing(sqlite3.connect(shared)) as source, \
                        contextlib.closing(sqlite3.connect(copy)) as target:
                    source.backup(target)  # (consistent, the store's write-ahead log included)
                copy.rename(path)
                log.info("copied %s into %s: FAISS's index in this home may use it too", shared, path.parent)
                return
            for suffix in ("-wal", "-shm", ""):  # the log before the store: a store seen is whole
                with contextlib.suppress(FileNotFoundError):
                    shared.with_name(shared.name + suffix).rename(path.with_name(path.name + suffix))
            log.info("moved %s into %s (each backend keeps its own local features)", shared, path.parent)

    def _drop_abandoned_features(self) -> None:
        """Delete the feature stores of generations other than the serving one: a rebuild interrupted by a restart
        left its shadow's (a promote or a cancel removes them otherwise; snapshots name the serving one's)."""
        kept = self.index.features.path
        for path in self._features_folder.glob("g*.sqlite*"):  # the store, its -wal and -shm
            if kept is not None and path.name.split("-")[0] != kept.name:
                log.warning("deleting %s: no generation uses it (interrupted rebuild)", path)
                path.unlink(missing_ok=True)

    def new_generation(self, model: str, generation: int) -> Index:
        self._made.add(generation)  # (a rebuild's: a store of that number in FAISS's folder is not this one's)
        return self.backend.new_generation(model, generation)

    def _tasks_outstanding(self) -> bool:
        """Objects on their way to the index (the duplicate finder keeps to its share meanwhile); True when Redis
        cannot say."""
        try:
            return tasks_outstanding(self.redis, self.keys)
        except redis.RedisError:
            return True

    # -- merging -------------------------------------------------------------------------------------------

    def apply(self, entries: list[ResultEntry]) -> None:
        """Route a batch to the serving and shadow generations (merger thread). Under ``routing``: a one-bucket
        reembed that began during a batch's Milvus write copied the other buckets before the write landed, and the
        batch, routed with no shadow yet, reached the serving generation alone; one that ended during a batch saw its
        carried entries go to the retired generation alone (review 66)."""
        built: list[ResultEntry] = []
        with self.routing:
            serving, shadow = self.index, self.shadow
            for generation in sorted({e.generation for e in entries}):
                part = [e for e in entries if e.generation == generation]
                if generation == serving.generation:
                    stats = serving.apply(part)
                    self.duplicates.wake([(oid, row[0]) for oid, row in stats.features.items() if row is not None])
                    if shadow is not None and (carried := [e for e in part if self.rebuilds.carries(e.bucket)]):
                        shadow.apply([dataclasses.replace(e, generation=shadow.generation) for e in carried])
                elif shadow is not None and generation == shadow.generation:
                    shadow.apply(part)
                    built = part
                elif late := [e for e in part if self.rebuilds.carried_past(generation, e.bucket)]:
                    serving.apply([dataclasses.replace(e, generation=serving.generation) for e in late])
                else:
                    log.debug("dropping %d entries of generation %d (not serving, not being built)", len(part),
                              generation)
        if built:  # (out of ``routing``: observe takes the rebuilds' lock, which a swap holds while it takes routing)
            self.rebuilds.observe(built)
            self.duplicates.arriving()  # a reembed's workers need the cores as much as ingest's

    def owed(self, entries: list[ResultEntry]) -> set[str]:
        """Of ``entries`` just applied, the objects whose version the other generation does not hold yet. During a
        rebuild ingest sends a live upload to both generations under one pending mark, which stays until both hold
        it: the first result dropped it, and the other generation's task, if lost, was never sent again (an
        independent review). A result of neither generation (a retired one's, merged after the swap: dropped) leaves
        the mark while the serving generation lacks its version: that one's own task, if lost, is sent again by the
        lost-task sweep, which judges what is left against the serving generation (review 66)."""
        serving, shadow = self.index, self.shadow
        ours = {serving.generation} | ({shadow.generation} if shadow is not None else set())
        pairs = [(generation, serving) for generation in {e.generation for e in entries} - ours]
        if shadow is not None:
            pairs += [(serving.generation, shadow), (shadow.generation, serving)]
        owed: set[str] = set()
        for generation, other in pairs:
            oids = {object_id(e.bucket, e.key): e.etag for e in entries
                    if e.generation == generation and e.op == "upsert"}
            held = other.etags(list(oids)) if oids else {}
            owed.update(oid for oid, etag in oids.items() if held.get(oid) != etag)
        return owed

    def after_batch(self) -> None:
        """Snapshot policy and the switch to an approximate index (merger thread, between batches). Both run in a
        thread of their own, so merging goes on meanwhile (a snapshot of 1M vectors takes 12-20 s here, and the
        merger, which wrote it between batches until 554a28e, merged nothing meanwhile: bench/README.md, "Merges
        while a snapshot is written"). A checkpoint that took d seconds is followed by at least d seconds without
        one, so a busy stream does not keep the disk writing."""
        applied, when, took = self._since_snapshot
        waited = time.monotonic() - when
        due_entries = self.merger.applied - applied >= self.settings.snapshot_every_entries
        due_time = self.merger.applied > applied and waited >= self.settings.snapshot_every_s
        if ((due_entries or due_time) and waited >= took and time.monotonic() >= self.snapshot_health.retry_at
                and self._checkpointing.acquire(blocking=False)):
            threading.Thread(target=self._checkpoint_beside, name="checkpoint", daemon=True).start()
        self._restructure_due()

    def _restructure_due(self) -> None:
        """The structure the size policy (or a rebuild's choice) asks for, made in a thread of its own. One that
        failed (out of memory, say) is tried again after ``RESTRUCTURE_RETRY_S``, twice as long after each failure in
        a row, up to ``RESTRUCTURE_RETRY_MAX_S``: it was tried again at every batch and twice a second idle, each
        time with a traceback in the log."""
        target = restructure_into(self.index, self.settings.approx_threshold, self.backend.approximate,
                                  self.chosen_type)
        if target and time.monotonic() >= self._restructure_at and self.restructuring.acquire(blocking=False):
            threading.Thread(target=self._restructure, args=(target,), name="restructure", daemon=True).start()

    def _restructure(self, index_type: str) -> None:
        try:
            self.index.restructure(index_type)
            self._restructure_wait = 0.0
        except Exception:
            self._restructure_wait = min(max(2 * self._restructure_wait, RESTRUCTURE_RETRY_S), RESTRUCTURE_RETRY_MAX_S)
            self._restructure_at = time.monotonic() + self._restructure_wait
            log.exception("restructuring the index into %s failed; it stays %s, and is tried again in %.0f s",
                          index_type, self.index.index_type, self._restructure_wait)
        finally:
            self.restructuring.release()

    def _checkpoint_beside(self) -> None:
        try:
            self._checkpoint()
        except Exception:
            log.exception("checkpoint failed; the next batch tries again")
        finally:
            self._checkpointing.release()

    def snapshot(self) -> bool:
        """Checkpoint now, once a checkpoint already running is done (a clean shutdown's last, a promoted
        generation's first); returns whether it was written."""
        with self._checkpointing:
            return self._checkpoint()

    def _checkpoint(self) -> bool:
        """Checkpoint the serving generation (a snapshot, or a Milvus flush), then trim the stream entries it covers;
        returns whether it was written. Merges go on meanwhile: the checkpoint covers what was applied when it began
        (and may hold more, which a restore's replay applies again to the same result). A disk that is full or
        read-only, a refused S3 copy or an unreachable index server is logged and counted (``snapshot_health``); the
        stream then stays untrimmed and serving and merging go on."""
        if not self.lease.acquire():  # a writer paused past its lease (review 22: its Milvus repair overwrote rows)
            log.info("no checkpoint: replica %s does not hold the writer lease (%s does)", self.replica,
                     self.lease.current())
            return False
        merger, index = self.merger, self.index
        last_id, applied, vectors = merger.last_id, merger.applied, len(index)
        held = self._oldest_pending()
        if held is not None and stream_order(held) <= stream_order(last_id):
            # Read, and not applied here (an entry of a later version, held; a batch of another replica's, claimed
            # next): a restore from this checkpoint must read it again. Positioned after it, the snapshot lacked
            # it for good once an upgraded writer had claimed and acknowledged it and then died before its own
            # first checkpoint (review 18). The position is the entry before it (a position is an entry the stream
            # holds: ``redis_loss.trimmed_past``), "0" for none; what lies between is applied twice, to the same
            # effect.
            before: Any = self.redis.xrevrange(self.keys.results, max=f"({held}", min="-", count=1)
            last_id = text(before[0][0]) if before else "0"
        started = time.perf_counter()
        try:
            self.backend.checkpoint(index, last_id)
        except (OSError, BotoCoreError, ClientError, Boto3Error) as exc:  # OSError: ConnectionError (Milvus)
            self.snapshot_health.failed(exc)
            return False
        self.snapshot_health.written()
        if index is self.index and (retiring := self.retiring):
            # Ingest feeds the generations a promote swapped out until the new one is durable: a restart before this
            # restores an old one (the newest snapshot), and its replay drops the new one's entries, so an upload
            # or delete since the swap tagged for the new one alone was lost for good (review 22).
            self.redis.hdel(self.keys.generations, *(str(old.generation) for old in retiring))
            for old in retiring:
                self.backend.retire(old)
            self.retiring = []
        index.expire_tombstones(self.settings.tombstone_retention_s)
        took = time.perf_counter() - started
        if merger is self.merger:  # (a takeover meanwhile started counting again)
            self._since_snapshot = (applied, time.monotonic(), took)
        trim_to = last_id
        floor, since = self._trim_floor
        if time.monotonic() - since < TAKEOVER_HOLD_S and stream_order(floor) < stream_order(last_id):
            trim_to = floor  # a previous writer paused mid-batch may still rewind to here (Merger)
        held = self._oldest_pending()  # (again: the claim may have taken and applied it meanwhile)
        if held is not None and stream_order(held) < stream_order(trim_to):
            # A batch another reader of the group took and did not acknowledge (the previous writer's, stopped with
            # its lease gone): the claim (CLAIM_IDLE_MS) applies it next. Trimmed, it was lost: a delete for good.
            trim_to = held
        if (index is self.index and trim_to != "0" and self.lease.acquire()
                and not redis_loss.trimmed_past(self, trim_to)):
            # Entries before the snapshot's position are covered by it. During a reembed the shadow generation
            # needs no replay either: the merger applied its entries up to the same position, and a restart fails
            # the job and drops the shadow (the stream was left untrimmed for the whole reembed, ~27 KB an object:
            # a 1 GB Redis filled at ~40k objects, an independent review). A generation promoted meanwhile trims
            # after its own first checkpoint. A stream without the entry at that position is another one: Redis
            # lost its data meanwhile, and the new stream's ids need not sort after it.
            self.redis.xtrim(self.keys.results, minid=trim_to, approximate=False)
        log.info("checkpoint at %s (%d vectors then; merges went on) in %.2f s", last_id, vectors, took)
        return True

    def _oldest_pending(self) -> str | None:
        """The oldest stream id read by a reader of the merger's group and not acknowledged, or None."""
        try:
            summary = self.redis.xpending(self.keys.results, self.keys.merger_group)
        except redis.ResponseError:  # no group (Redis lost its data meanwhile)
            return None
        return text(summary["min"]) if summary.get("pending") else None

    def choose_type(self, index_type: str) -> None:
        """Keep ``index_type`` whatever the index's size (``auto``: let the size policy pick again)."""
        self.chosen_type = choose_type(self.redis, self.keys, self.backend, index_type)

    def promote(self, shadow: Index | None) -> None:
        """Swap the shadow generation in (atomically for readers: one reference assignment); the old one is fed
        until the new one's first checkpoint (``_checkpoint``), which the caller asks for (``snapshot``) once it let
        go of its locks."""
        if shadow is None:
            return
        self.embedders.get(shadow.model)  # queries must be embedded like the new generation (already warm)
        old = self.index
        with self.routing:
            self.index, self.shadow = shadow, None
        self.retiring.append(old)  # (with any swapped out before it and not retired yet: a restart may restore it)
        self.backend.promote(old, shadow)
        log.info("generation %d (%d vectors) now serves; generation %d retired", shadow.generation, len(shadow),
                 old.generation)

    # -- reading -------------------------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        ok, reason = self._running()
        job = self.restoring
        if ok and not self.checked.is_set():
            # (Said at every start, a snapshot loaded or not: it read "no snapshot, or no data in Redis" regardless.)
            return False, ("starting: loading the model and the vocabulary (and, only if the snapshot or Redis's "
                           "data is missing, comparing the index with the bucket)")
        if ok and (failing := self.snapshot_health.unready_reason()
                   or self.merger.failing.unready_reason(self.settings.snapshot_failure_grace_s)):
            return False, failing
        if ok and job is not None and job.state == "running":
            return False, (f"no snapshot and no data in Redis: re-embedding the bucket ({job.done} of {job.total} "
                           "objects); searches answer from what is indexed so far")
        return ok, reason

    def _retry_passing(self) -> None:
        shadow = self.shadow  # (its records are the running rebuild's to send again)
        retry_passing(self.redis, self.keys, self.publisher, self.s3_answers, time.time(),
                      leave=() if shadow is None else (shadow.generation,), passing=self._passing)

    def s3_answers(self) -> bool:
        """Whether S3 answers now (a HEAD of the service's bucket: any answer below 500, a 403 or 404 too)."""
        try:
            self.s3_probe.head_bucket(Bucket=self.settings.bucket)
        except ClientError as exc:
            return answered(exc)
        except BotoCoreError:
            return False
        return True

    def _running(self) -> tuple[bool, str]:
        """Loaded, replayed and connected: ready unless the index is being restored from the bucket."""
        if not self.loaded.is_set():
            return False, "loading the newest snapshot"
        if not self.embedders.loaded(self.index.model):
            return False, "loading the model"
        if self.writing.is_set() and not self.merger.caught_up.is_set():
            return False, "replaying the result stream"
        if not self.writing.is_set() and not self.backend.shared:
            return False, "waiting for the writer lease (its index lives in the process that merges)"
        try:
            self.probe.ping()
        except redis.RedisError as exc:
            return False, f"Redis unreachable: {exc}"
        problem = self.backend.problem()
        if problem is not None:
            return False, problem
        return True, "ready"

    def stats(self) -> dict[str, Any]:
        """``GET /stats``; raises ``ConnectionError`` where a shared index's server cannot count the vectors."""
        index = self.index
        return {"vectors": len(index), **self.state(index)}

    def state(self, index: Index) -> dict[str, Any]:
        """What ``stats`` says of ``index`` and this replica besides the vector count: from memory, so it is there
        through an index server's outage too (``/metrics``)."""
        return {
            "model": index.model,
            "dim": index.dim,
            "index_type": index.index_type,
            "index_type_chosen": self.chosen_type,
            "vector_file_bytes": index.file_bytes(),
            "generation": index.generation,
            "last_applied_id": self.merger.last_id,
            "applied_entries": self._applied_before + self.merger.applied,
            "malformed_entries": self.merger.malformed,
            "newer_entries_held": len(self.merger.held),
            "backend": self.backend.name,
            "replica": self.replica,
            "writer": self.writing.is_set(),
            "last_snapshot": self.backend.last,
            "snapshot_failures": self.snapshot_health.public(),
            "merge_failures": self.merger.failing.public(),
            "rebuild": self.rebuilds.progress(),
            "duplicates": {"pending": self.duplicates.pending, "checked": self.duplicates.checked_objects,
                           "cpu_s": round(self.duplicates.cpu_s, 3)},
        }


def choose_type(client: redis.Redis, keys: Keys, backend: Backend, index_type: str) -> str | None:
    """Keep ``index_type`` as ``backend``'s, whatever the index's size (``auto``: the size policy picks again);
    returns what is kept (None: the size policy)."""
    chosen = None if index_type == "auto" else index_type
    pipe = client.pipeline(transaction=True)
    if (before := client.get(keys.index_type_before)) is not None:  # each other backend it was a choice of keeps
        for name, made in INDEX_TYPES.items():  # it as its own (review 77), and the one key goes
            if name != backend.name and text(before) in made:
                pipe.set(keys.index_type(name), before, nx=True)
        pipe.delete(keys.index_type_before)
    if chosen is None:
        pipe.delete(keys.index_type(backend.name))
    else:
        pipe.set(keys.index_type(backend.name), chosen)
    pipe.execute()
    return chosen


def chosen_type(client: redis.Redis, keys: Keys, backend: Backend, say: bool = True) -> str | None:
    """The index type a rebuild asked for on ``backend`` (``Keys.index_type``; the one key of both backends before
    it, while this one has none), None where the size policy picks. One that ``backend`` does not make is left to the
    size policy (said, with ``say``, where it is ``backend``'s own: written by a newer version)."""
    for key in (keys.index_type(backend.name), keys.index_type_before):
        if raw := client.get(key):
            chosen = text(raw)
            if chosen in backend.index_types:
                return chosen
            if say and key != keys.index_type_before:
                log.warning("the index type %r asked for is not one the %s backend makes (%s): the size policy picks",
                            chosen, backend.name, ", ".join(backend.index_types))
            return None
    return None
