"""The stages of one batch, each timed: fetch (concurrent) -> decode -> embed (one model call) -> write."""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import redis

from bucketlens.keys import Keys
from bucketlens.redis_client import connect
from bucketlens.s3 import make_client
from bucketlens.schemas import ObjectRef
from bucketlens.settings import Settings

from .decode import decode
from .embedders import Embedder, Embedders, load_embedder
from .errors import ObjectChanged, PermanentError, TransientError
from .fetch import fetch_many
from .heartbeat import Heartbeat
from .results import ResultWriter

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Outcome:
    embedded: list[tuple[ObjectRef, np.ndarray, str]] = dataclasses.field(default_factory=list)  # + model
    failed: list[tuple[ObjectRef, str, str]] = dataclasses.field(default_factory=list)
    skipped: list[ObjectRef] = dataclasses.field(default_factory=list)
    transient: list[tuple[ObjectRef, str]] = dataclasses.field(default_factory=list)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


class Pipeline:
    """Per-process resources (S3 client, fetch pool, model, Redis) and the batch stages that use them."""

    def __init__(self, settings: Settings, embedder: Embedder | None = None, client: redis.Redis | None = None):
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.s3 = make_client(settings)
        self.pool = ThreadPoolExecutor(max_workers=settings.fetch_concurrency, thread_name_prefix="fetch")
        default = embedder or load_embedder(settings)
        self.embedders = Embedders(settings, default)
        self.redis = client or connect(settings.redis_url)
        self.writer = ResultWriter(self.redis, self.keys)
        self._models: dict[int, str] = {}
        self._models_read = 0.0
        self.heartbeat = Heartbeat(self.redis, self.keys, default.model, default.device)

    def process(self, refs: Sequence[ObjectRef]) -> Outcome:
        """Run one batch through every stage; bad objects never block the rest of the batch."""
        out = Outcome()
        started = time.perf_counter()
        blobs = fetch_many(self.pool, self.s3, refs, self.settings.max_object_bytes, self.settings.fetch_timeout_s)
        out.timings["fetch"] = time.perf_counter() - started

        started = time.perf_counter()
        decoded: list[tuple[ObjectRef, np.ndarray]] = []
        for ref, blob in zip(refs, blobs):
            if isinstance(blob, ObjectChanged):
                out.skipped.append(ref)
            elif isinstance(blob, TransientError):
                out.transient.append((ref, str(blob)))
            elif isinstance(blob, PermanentError):
                out.failed.append((ref, blob.reason, str(blob)))
            else:
                assert isinstance(blob, bytes)
                try:
                    decoded.append((ref, decode(blob, self.settings.max_pixels)))
                except PermanentError as exc:
                    out.failed.append((ref, exc.reason, str(exc)))
        out.timings["decode"] = time.perf_counter() - started

        if decoded:
            started = time.perf_counter()
            for model in sorted({self.model_for(ref.generation) for ref, _ in decoded}):
                part = [(ref, pixels) for ref, pixels in decoded if self.model_for(ref.generation) == model]
                vectors = self.embedders.get(model).embed(np.stack([pixels for _, pixels in part]))
                out.embedded += [(ref, vector, model) for (ref, _), vector in zip(part, vectors)]
            out.timings["embed"] = time.perf_counter() - started
        return out

    def model_for(self, generation: int) -> str:
        """The model a generation is embedded with (a model-switching rebuild names another one)."""
        if generation not in self._models or time.monotonic() - self._models_read > 10:
            try:
                raw = self.redis.hgetall(self.keys.generations)
                self._models = {int(g): m.decode() for g, m in raw.items()}
                self._models_read = time.monotonic()
            except redis.RedisError:
                pass  # keep what we knew; the write stage retries Redis anyway
        return self._models.get(generation, self.settings.model)

    def write(self, out: Outcome, attempts: int) -> None:
        """Write the outcome, retrying in-task while Redis is briefly away (a retry cannot be queued then)."""
        started = time.perf_counter()
        delay = 0.2
        deadline = time.monotonic() + self.settings.visibility_timeout_s / 2
        while True:
            try:
                self.writer.write(out.embedded, out.failed, out.skipped, out.timings, attempts)
                break
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    raise TransientError(f"Redis unreachable for too long: {exc}") from exc
                if delay == 0.2:
                    log.warning("Redis unreachable while writing results, retrying: %s", exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        out.timings["write"] = time.perf_counter() - started
        try:  # the write stage is known only once written; its timing is not worth retrying for
            self.writer.record_timings({"write": out.timings["write"]})
        except redis.RedisError as exc:
            log.warning("write-stage timing lost: %s", exc)
        log.info(
            "batch: %d embedded, %d failed, %d skipped, %d to retry; %s",
            len(out.embedded), len(out.failed), len(out.skipped), len(out.transient),
            " ".join(f"{k}={v * 1000:.0f}ms" for k, v in out.timings.items()),
        )
