"""The index service's resources, built once per process in the app's lifespan and passed to handlers.

The service holds the serving generation (``index``) and, during a ``reembed`` rebuild, the shadow one; the
merger feeds both; snapshots and stream trimming follow a size/time policy; above ``approx_threshold``
vectors the serving generation is restructured into an approximate (IVF) index in the background.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import redis
from botocore.exceptions import BotoCoreError, ClientError

from bucketlens.keys import Keys
from bucketlens.redis_client import connect
from bucketlens.s3 import make_client
from bucketlens.schemas import ResultEntry
from bucketlens.settings import Settings
from ingest.publisher import Publisher
from vision import words
from vision.embedders import Embedder, Embedders
from vision.models import dims, recipe

from . import redis_loss
from .duplicates import DuplicateFinder
from .feature_store import FeatureStore
from .merger import Merger
from .orphans import SWEEP_EVERY_S
from .orphans import sweep as sweep_orphans
from .presign import Presigner
from .rebuild import RebuildJob, Rebuilds
from .reconcile import reconcile
from .redelivery import CHECK_EVERY_S, Redelivery
from .snapshots import SnapshotHealth, SnapshotStore
from .vector_index import VectorIndex, set_search_threads

log = logging.getLogger(__name__)


class Service:
    def __init__(self, settings: Settings, embedder: Embedder | None = None) -> None:
        self.settings = settings
        set_search_threads(settings.faiss_threads)
        self.keys = Keys(settings.namespace)
        self.redis = connect(settings.redis_url)
        self.s3 = make_client(settings)
        self.presigner = Presigner(settings)
        self.publisher = Publisher(settings, self.redis)
        self.embedders = Embedders(settings, embedder)
        self.index = VectorIndex(settings.model, recipe(settings.model).dim, generation=1)  # until _load decides
        self.shadow: VectorIndex | None = None
        self.rebuilds = Rebuilds(self)
        self.restoring: RebuildJob | None = None  # a reembed started because there was nothing to serve from
        self.snapshots = SnapshotStore(
            Path(settings.home) / "snapshots" / settings.namespace, settings.snapshots_kept,
            self.s3 if settings.snapshot_s3 else None, settings.bucket, f"{settings.reserved_prefix}snapshots/",
        )
        self.redelivery = Redelivery(self.redis, self.keys, self.publisher.celery)
        self.snapshot_health = SnapshotHealth(settings.snapshot_every_s, settings.snapshot_failure_grace_s)
        self.merger = Merger(self.redis, self.keys, self.apply, self.after_batch, batch=settings.merge_batch)
        self.duplicates = DuplicateFinder(lambda: self.index)
        self.loaded = threading.Event()
        self.checked = threading.Event()  # the start-up check against the bucket is done (redis_loss.py)
        self._since_snapshot = (0, time.monotonic())  # (entries applied at last snapshot, when)
        self._restructuring = threading.Lock()
        self._loader = threading.Thread(target=self._load, name="loader", daemon=True)
        self._stopping = threading.Event()

    # -- life cycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loader.start()
        # A dead worker's tasks back in the queue (redelivery.py), then objects whose task was lost (orphans.py).
        self._every(CHECK_EVERY_S, self.redelivery.check, "redelivery")
        self._every(SWEEP_EVERY_S, lambda: sweep_orphans(self), "orphans")
        self._every(redis_loss.CHECK_EVERY_S, lambda: redis_loss.check(self), "redis-loss")
        if self.settings.reconcile_every_s > 0:
            self._every(self.settings.reconcile_every_s, lambda: reconcile(self), "reconcile")

    def _every(self, interval_s: float, job: Callable[[], object], name: str) -> None:
        """Run ``job`` in a thread of its own every ``interval_s`` while the service is ready, until it stops."""

        def loop() -> None:
            while not self._stopping.wait(interval_s):
                if self._running()[0]:
                    try:
                        job()
                    except redis.RedisError as exc:  # an outage, which the merger and /readyz report already
                        log.debug("%s met a Redis error; next attempt in %.0f s: %s", name, interval_s, exc)
                    except Exception:
                        log.exception("%s failed; next attempt in %.0f s", name, interval_s)

        threading.Thread(target=loop, name=name, daemon=True).start()

    def _load(self) -> None:
        """Heavy start-up off the event loop: newest snapshot, stream replay, the model (warmed up)."""
        try:
            restored = self.snapshots.load_newest(dims(), self.feature_store)
        except Exception:
            log.exception("cannot read snapshots; starting from the stream alone")
            restored = None
        if restored is not None:
            self.index, self.merger.last_id = restored
        else:
            self.index = self.new_generation(self.settings.model, 1)
        redis_was_empty = self._register_generation()
        self.loaded.set()
        self.merger.start()
        self.duplicates.start()
        self.embedders.get(self.index.model)  # query images are embedded with the serving model
        try:
            words.vocabulary(self.settings.wordnet)  # WordNet read once (~0.6 s), before the first text query
        except words.VocabularyMissing as exc:
            log.warning("text search is off: %s", exc)
        try:
            self.restoring = redis_loss.restore_at_start(self, redis_was_empty, restored is not None)
        except Exception:
            log.exception("restoring the index at start failed; a reconcile or rebuild heals it")
        finally:
            self.checked.set()

    def _register_generation(self) -> bool:
        """Register the serving generation, waiting for Redis; returns whether Redis held no data of ours."""
        delay = 0.2
        while True:
            try:
                self.rebuilds.recover()
                return self.claim_redis()
            except redis.RedisError as exc:
                log.warning("waiting for Redis to register the serving generation: %s", exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def claim_redis(self) -> bool:
        """Register the serving generation (ingest tags events with it) and the marker that tells a Redis that
        lost its data (redis_loss.py); returns whether the marker was missing."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.exists(self.keys.marker)
        pipe.hset(self.keys.generations, str(self.index.generation), self.index.model)
        pipe.set(self.keys.marker, self.index.generation)
        return not pipe.execute()[0]

    def close(self) -> None:
        """Clean shutdown: stop merging, write a final snapshot."""
        self._stopping.set()
        self.merger.stop()
        self.duplicates.stop()
        if self.loaded.is_set():
            try:
                self.snapshot()
            except Exception:
                log.exception("final snapshot failed")
        self.redis.close()

    def feature_store(self, generation: int) -> FeatureStore:
        """The local features of one generation, on this service's disk beside its snapshots."""
        return FeatureStore(Path(self.settings.home) / "features" / self.settings.namespace / f"g{generation}.sqlite")

    def new_generation(self, model: str, generation: int) -> VectorIndex:
        return VectorIndex(model, recipe(model).dim, generation, self.feature_store(generation))

    # -- merging -------------------------------------------------------------------------------------------

    def apply(self, entries: list[ResultEntry]) -> None:
        """Route a batch to the serving and shadow generations (merger thread)."""
        serving, shadow = self.index, self.shadow
        for generation in sorted({e.generation for e in entries}):
            part = [e for e in entries if e.generation == generation]
            if generation == serving.generation:
                stats = serving.apply(part)
                self.duplicates.wake([(oid, row[0]) for oid, row in stats.features.items() if row is not None])
            elif shadow is not None and generation == shadow.generation:
                shadow.apply(part)
                self.rebuilds.observe(part)
            else:
                log.debug("dropping %d entries of generation %d (not serving, not being built)", len(part),
                          generation)

    def after_batch(self) -> None:
        """Snapshot policy and the switch to an approximate index (merger thread, between batches)."""
        applied, when = self._since_snapshot
        due_entries = self.merger.applied - applied >= self.settings.snapshot_every_entries
        due_time = self.merger.applied > applied and time.monotonic() - when >= self.settings.snapshot_every_s
        if (due_entries or due_time) and time.monotonic() >= self.snapshot_health.retry_at:
            self.snapshot()
        if self._wants_restructure() and self._restructuring.acquire(blocking=False):
            threading.Thread(target=self._restructure, name="restructure", daemon=True).start()

    def _wants_restructure(self) -> bool:
        n = len(self.index)
        if self.index.index_type == "Flat":
            return n > self.settings.approx_threshold
        return n < self.settings.approx_threshold // 2

    def _restructure(self) -> None:
        try:
            self.index.restructure("IVF" if self.index.index_type == "Flat" else "Flat")
        except Exception:
            log.exception("restructuring the index failed; it stays %s", self.index.index_type)
        finally:
            self._restructuring.release()

    def snapshot(self) -> bool:
        """Write a snapshot of the serving generation, then trim the stream entries it covers; returns whether it
        was written. A disk that is full or read-only, or a refused S3 copy, is logged and counted
        (``snapshot_health``); the stream then stays untrimmed and serving and merging go on."""
        last_id = self.merger.last_id
        started = time.perf_counter()
        try:
            self.snapshots.write(self.index, last_id)
        except (OSError, BotoCoreError, ClientError) as exc:
            self.snapshot_health.failed(exc)
            return False
        self.snapshot_health.written()
        self.index.expire_tombstones(self.settings.tombstone_retention_s)
        self._since_snapshot = (self.merger.applied, time.monotonic())
        if self.shadow is None and last_id != "0":
            # Entries before the snapshot's position are covered by it. (During a reembed the shadow
            # generation is rebuilt from scratch after a restart, so it needs no replay either.)
            self.redis.xtrim(self.keys.results, minid=last_id, approximate=False)
        log.info("snapshot of %d vectors at %s in %.2f s", len(self.index), last_id, time.perf_counter() - started)
        return True

    def promote(self, shadow: VectorIndex | None) -> None:
        """Swap the shadow generation in (atomically for readers: one reference assignment)."""
        if shadow is None:
            return
        self.embedders.get(shadow.model)  # queries must be embedded like the new generation (already warm)
        old = self.index
        self.index, self.shadow = shadow, None
        self.redis.hdel(self.keys.generations, str(old.generation))
        old.features.close(remove=True)  # searches hold the generation they started with; they verify without it
        log.info("generation %d (%d vectors) now serves; generation %d retired", shadow.generation, len(shadow),
                 old.generation)
        self.snapshot()

    # -- reading -------------------------------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        ok, reason = self._running()
        job = self.restoring
        if ok and not self.checked.is_set():
            return False, "comparing the index with the bucket (no snapshot, or no data in Redis)"
        if ok and (failing := self.snapshot_health.unready_reason()):
            return False, failing
        if ok and job is not None and job.state == "running":
            return False, (f"no snapshot and no data in Redis: re-embedding the bucket ({job.done} of {job.total} "
                           "objects); searches answer from what is indexed so far")
        return ok, reason

    def _running(self) -> tuple[bool, str]:
        """Loaded, replayed and connected: ready unless the index is being restored from the bucket."""
        if not self.loaded.is_set():
            return False, "loading the newest snapshot"
        if not self.embedders.loaded(self.index.model):
            return False, "loading the model"
        if not self.merger.caught_up.is_set():
            return False, "replaying the result stream"
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            return False, f"Redis unreachable: {exc}"
        return True, "ready"

    def stats(self) -> dict[str, Any]:
        index = self.index
        return {
            "vectors": len(index),
            "model": index.model,
            "dim": index.dim,
            "index_type": index.index_type,
            "generation": index.generation,
            "last_applied_id": self.merger.last_id,
            "applied_entries": self.merger.applied,
            "last_snapshot": self.snapshots.last,
            "snapshot_failures": self.snapshot_health.public(),
            "rebuild": self.rebuilds.progress(),
            "duplicates": {"pending": len(self.duplicates.pending), "checked": self.duplicates.checked_objects},
        }
