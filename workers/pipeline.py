"""The stages of one batch, each timed: fetch (concurrent) -> decode -> embed (vectors and labels) -> features -> write;
the model embeds what has arrived while the rest of the batch downloads."""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Sequence

import numpy as np
import redis

from bucketlens.keys import Keys
from bucketlens.redis_client import connect, text
from bucketlens.s3 import make_client
from bucketlens.schemas import ObjectRef
from bucketlens.settings import Settings
from vision import labels, local_features
from vision.decode import Decoded, decode_for
from vision.embedders import Embedder, Embedders, load_embedder
from vision.models import UnknownModel, recipe

from .errors import ObjectChanged, PermanentError, TransientError
from .fetch import Fetched, fetch
from .heartbeat import Heartbeat
from .results import ResultWriter

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Embedded:
    ref: ObjectRef
    vector: np.ndarray
    model: str
    features: bytes = b""  # local features, when the model's recipe keeps them
    pixels: int = 0  # width x height of the stored image
    labels: str = ""  # the classifier's most probable classes (``vision.labels.encode``), when the model has them


@dataclasses.dataclass
class Outcome:
    embedded: list[Embedded] = dataclasses.field(default_factory=list)
    failed: list[tuple[ObjectRef, str, str]] = dataclasses.field(default_factory=list)
    skipped: list[ObjectRef] = dataclasses.field(default_factory=list)
    # Retried with the task; (ref, reason once the retries are spent, message): unreachable (S3), fetch_timeout (a
    # download past its deadline), internal (a model call that raised: CUDA out of memory, a model that cannot load).
    transient: list[tuple[ObjectRef, str, str]] = dataclasses.field(default_factory=list)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    abandoned: int = 0  # objects of a generation no index merges any more: dropped, not embedded


class Pipeline:
    """Per-process resources (S3 client, fetch pool, model, Redis) and the batch stages that use them."""

    def __init__(self, settings: Settings, embedder: Embedder | None = None, client: redis.Redis | None = None):
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.s3 = make_client(settings, read_timeout=settings.fetch_timeout_s)  # (fetch.py holds it per object)
        self.pool = ThreadPoolExecutor(max_workers=settings.fetch_concurrency, thread_name_prefix="fetch")
        default = embedder or load_embedder(settings)
        self.embedders = Embedders(settings, default)
        self.redis = client or connect(settings.redis_url)
        self.writer = ResultWriter(self.redis, self.keys)
        self._models: dict[int, str] = {}  # generation -> model, read at each batch
        self.heartbeat = Heartbeat(self.redis, self.keys, default.model, default.device, {
            "max_object_bytes": settings.max_object_bytes, "max_pixels": settings.max_pixels})

    def process(self, refs: Sequence[ObjectRef]) -> Outcome:
        """Run one batch through every stage; bad objects never block the rest of the batch.

        Downloads run in the fetch pool while this thread decodes and embeds whatever has arrived, so the model
        works while the rest of the batch downloads. Timings are the time this thread spent in each stage
        (``fetch``: waiting for downloads). Every list in the outcome keeps the order of ``refs``.
        """
        out = Outcome(timings={"fetch": 0.0, "decode": 0.0, "embed": 0.0, "features": 0.0})
        if self._read_generations():  # once a batch: a generation gone since the batch was queued is not embedded
            refs = [ref for ref in refs if not self._abandoned(ref, out)]
        limits = (self.settings.max_object_bytes, self.settings.fetch_timeout_s)
        futures = {self.pool.submit(fetch, self.s3, ref, *limits): ref for ref in refs}
        pending = set(futures)
        dated: dict[int, ObjectRef] = {}  # id(ref) -> the ref with its object's time, where the ref had none
        while pending:
            started = time.perf_counter()
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            out.timings["fetch"] += time.perf_counter() - started

            started = time.perf_counter()  # (each body dropped as it is decoded: the whole batch's stayed in memory)
            decoded = [(ref, pixels) for f in done
                       if (pixels := self._decode(ref := futures.pop(f), f, out, dated)) is not None]
            done.clear()
            out.timings["decode"] += time.perf_counter() - started

            if decoded:
                self._embed(decoded, out)
        if not out.embedded:
            del out.timings["embed"]
        if not any(e.features for e in out.embedded):
            del out.timings["features"]
        position = {id(ref): i for i, ref in enumerate(refs)}
        out.embedded.sort(key=lambda item: position[id(item.ref)])
        out.embedded = [dataclasses.replace(e, ref=dated.get(id(e.ref), e.ref)) for e in out.embedded]
        for items in (out.failed, out.transient):
            items.sort(key=lambda item: position[id(item[0])])
        out.skipped.sort(key=lambda ref: position[id(ref)])
        return out

    def _decode(self, ref: ObjectRef, download: Future[Fetched], out: Outcome, dated: dict[int, ObjectRef]
                ) -> Decoded | None:
        """The object's pixels as its generation's model wants them, or None once its outcome (skipped, failed,
        to retry) is recorded. A ref with no time (a failure record or pending mark of a release before 2026-12-02,
        sent again) gets the object's own: such objects were indexed with none, and every date filter left them
        out (review 51)."""
        try:
            chosen = recipe(self.model_for(ref.generation))
            fetched = download.result()
            if not ref.event_time and fetched.modified:
                dated[id(ref)] = dataclasses.replace(ref, event_time=fetched.modified)
            return decode_for(chosen, fetched.data, self.settings.max_pixels, local=True)
        except ObjectChanged:
            out.skipped.append(ref)
        except TransientError as exc:
            out.transient.append((ref, exc.reason, str(exc)))
        except PermanentError as exc:
            out.failed.append((ref, exc.reason, str(exc)))
        except UnknownModel as exc:  # a rebuild's model this worker's release does not know (the index service is
            # upgraded first: README, "Upgrading"): retried like a model that cannot load, and the rest of the batch,
            # the serving generation's copy of the same upload included, goes on (it failed whole: review 68)
            out.transient.append((ref, "internal", str(exc)))
        return None

    def _embed(self, decoded: list[tuple[ObjectRef, Decoded]], out: Outcome) -> None:
        """One model call per model among ``decoded`` (a model-switching rebuild embeds two generations), then
        the local features of the objects whose model keeps them."""
        models = [self.model_for(ref.generation) for ref, _ in decoded]
        running = sorted(set(models))
        if running:
            self.heartbeat.embedding(running)
        for model in running:
            part = [item for item, wanted in zip(decoded, models) if wanted == model]
            started = time.perf_counter()
            try:
                vectors, found = self.embedders.get(model).describe(np.stack([image.pixels for _, image in part]))
            except Exception as exc:  # CUDA out of memory, a rebuild's model that cannot load: these objects are
                # retried; the rest of the batch, another model's objects included, goes on (the whole batch, what
                # was embedded too, became permanent failures: an independent review)
                log.exception("the %s model failed on %d objects; they are retried", model, len(part))
                out.transient += [(ref, "internal", f"{type(exc).__name__}: {exc}") for ref, _ in part]
                continue
            finally:
                out.timings["embed"] += time.perf_counter() - started
            started = time.perf_counter()
            count = recipe(model).local_count
            for (ref, image), vector, top in zip(part, vectors, found):
                features = b"" if image.gray is None else local_features.encode(local_features.views(image.gray, count))
                out.embedded.append(Embedded(ref, vector, model, features, image.width * image.height,
                                             "" if top is None else labels.encode(top)))
            out.timings["features"] += time.perf_counter() - started

    def model_for(self, generation: int) -> str:
        """The model a generation is embedded with (a model-switching rebuild names another one)."""
        return self._models.get(generation, self.settings.model)

    def _read_generations(self) -> bool:
        """The generations an index merges, with their models (``Keys.generations``); False when Redis could not
        say (what was known stays, and abandons nothing: a rebuild's new generation may be missing from it)."""
        try:
            self._models = {int(g): text(m) for g, m in self.redis.hgetall(self.keys.generations).items()}
            return True
        except redis.RedisError:
            return False  # the write stage retries Redis anyway

    def _abandoned(self, ref: ObjectRef, out: Outcome) -> bool:
        """Whether no index merges ``ref``'s generation any more: its rebuild was cancelled or failed after
        queueing it (or a swap retired it: the serving generation got the same event). Such refs are dropped
        unfetched; an empty list (Redis lost it) abandons nothing."""
        if not self._models or ref.generation in self._models:
            return False
        out.abandoned += 1
        return True

    def write(self, out: Outcome, attempts: int, since: float) -> None:
        """Write the outcome, retrying in-task while Redis is briefly away (a retry cannot be queued then), for up
        to half the visibility timeout counted from ``since`` (``time.monotonic()`` when the task started): a slow
        batch must not still be retrying its write when the broker hands it to another worker."""
        started = time.perf_counter()
        delay = 0.2
        deadline = since + self.settings.visibility_timeout_s / 2
        while True:
            try:
                # A rebuild's generation cancelled or failed while the batch ran (read again; Redis not saying
                # abandons nothing): newer than every one merged. An older one is retired, and a one-bucket reembed's
                # still feeds the serving generation its other buckets' results (``carried_past``: review 58).
                gone: set[int] = set()
                if out.failed and self._read_generations() and self._models:
                    gone = {ref.generation for ref, _, _ in out.failed if ref.generation > max(self._models)}
                self.writer.write(out.embedded, out.failed, out.skipped, out.timings, attempts, abandoned=gone)
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
            "batch: %d embedded, %d failed, %d skipped, %d to retry%s; %s",
            len(out.embedded), len(out.failed), len(out.skipped), len(out.transient),
            f", {out.abandoned} of a cancelled or retired generation dropped" if out.abandoned else "",
            " ".join(f"{k}={v * 1000:.0f}ms" for k, v in out.timings.items()),
        )
        for ref, reason, message in out.failed:  # (the batch line named no object: review 31)
            log.info("failed: %r (%s): %r", ref.object_id, reason, message)  # (repr: an uploader's text)
