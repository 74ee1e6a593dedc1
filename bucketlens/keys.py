"""Every Redis key and Celery queue name bucketlens uses, under one namespace."""

from __future__ import annotations

import dataclasses

EMBED_TASK = "bucketlens.embed"  # workers register it under this name; ingest and the index service send by name

# Worker records (``Keys.worker``, ``Keys.consumer``) are written every HEARTBEAT_INTERVAL_S and expire
# HEARTBEAT_TTL_S after the last write: a worker silent that long (four beats missed) counts as dead.
# kombu's Redis transport keeps priorities 3, 6, 9 in sub-lists named queue + "\x06\x16" + priority.
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
HEARTBEAT_INTERVAL_S = 3.0
HEARTBEAT_TTL_S = 12

# Upper bounds (seconds) of the per-stage latency histograms that workers keep in ``Keys.stages``.
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def stage_bucket_field(stage: str, bound: float) -> str:
    """Field of ``Keys.stages`` counting the batches whose ``stage`` took at most ``bound`` seconds (cumulative)."""
    return f"{stage}:le:{bound:g}"


@dataclasses.dataclass(frozen=True)
class Keys:
    namespace: str = "bl"

    @property
    def results(self) -> str:
        """Stream of upsert/delete entries, consumed by the index service."""
        return f"{self.namespace}:results"

    @property
    def merger_group(self) -> str:
        return "index"

    @property
    def failures(self) -> str:
        """Hash: object id -> JSON failure record."""
        return f"{self.namespace}:failures"

    @property
    def auto_retries(self) -> str:
        """Hash: object id -> how many times the index service sent it again by itself (failures.retry_passing)."""
        return f"{self.namespace}:auto-retries"

    @property
    def pending(self) -> str:
        """Hash: object id -> JSON {etag, order, queued, event_time} for events seen whose vector is not merged yet
        (``records.Records.mark_pending``)."""
        return f"{self.namespace}:pending"

    def dedup(self, digest: str) -> str:
        return f"{self.namespace}:seen:{digest}"

    @property
    def generations(self) -> str:
        """Hash: generation number -> model name, for every generation ingest must feed (serving + shadow)."""
        return f"{self.namespace}:generations"

    @property
    def counters(self) -> str:
        """Hash of event counters (received, ignored, duplicated, ...)."""
        return f"{self.namespace}:counters"

    def canary_seen(self, key: str) -> str:
        """Set (with a TTL) by the receiver when the canary object ``key``'s event arrives."""
        return f"{self.namespace}:canary:seen:{key}"

    @property
    def canary(self) -> str:
        """Hash: when the last canary event under the reserved prefix arrived, and its key."""
        return f"{self.namespace}:canary"

    @property
    def stages(self) -> str:
        """Hash of per-stage latency histograms written by workers: ``<stage>:seconds`` (sum), ``<stage>:count``
        and one cumulative ``<stage>:le:<bound>`` counter per bound of ``STAGE_BUCKETS``."""
        return f"{self.namespace}:stages"

    @property
    def workers(self) -> str:
        """Set of worker ids that have sent a heartbeat; each one's state is under ``worker(id)``."""
        return f"{self.namespace}:workers"

    def worker(self, worker_id: str) -> str:
        """JSON heartbeat of one worker process; it expires when the worker stops beating (dead or hung)."""
        return f"{self.namespace}:worker:{worker_id}"

    @property
    def consumers(self) -> str:
        """Set of worker main processes (the broker's consumers); each one's record is under ``consumer(id)``."""
        return f"{self.namespace}:consumers"

    def consumer(self, consumer_id: str) -> str:
        """JSON of one worker main process: the delivery tags it holds unacknowledged; expires like ``worker``."""
        return f"{self.namespace}:consumer:{consumer_id}"

    def deliveries(self, task_id: str) -> str:
        """How often the broker handed out one task (a redelivery cap against poison batches)."""
        return f"{self.namespace}:deliveries:{task_id}"

    def rebuild_job(self, job_id: str) -> str:
        """JSON state of one rebuild job."""
        return f"{self.namespace}:rebuild:{job_id}"

    @property
    def rebuild_current(self) -> str:
        """Id of the newest rebuild job."""
        return f"{self.namespace}:rebuild:current"

    @property
    def last_generation(self) -> str:
        """Highest generation number ever handed to a rebuild: numbers are never reused, since the tasks of a
        cancelled or interrupted rebuild may still be queued and must not feed a later one."""
        return f"{self.namespace}:generation:last"

    @property
    def marker(self) -> str:
        """Written by the index service when it registers its generation; Redis answering without it has lost its
        data (a fresh Redis, a failover to an empty replica, a FLUSHALL): index_service/redis_loss.py heals."""
        return f"{self.namespace}:index:marker"

    def index_type(self, backend: str) -> str:
        """The index type a rebuild on ``backend`` asked for (``POST /rebuild``'s ``index_type``), kept whatever the
        index's size; absent (and after ``"index_type": "auto"``): the size policy (``APPROX_THRESHOLD``) picks. Each
        backend its own: with one key for both, HNSW asked of Milvus became a FAISS restructure that failed twice a
        second once the stack switched (review 76)."""
        return f"{self.namespace}:index:type:{backend}"

    @property
    def index_type_before(self) -> str:
        """The one index type key of both backends before ``index_type``: read while a backend has none of its own,
        where the type is one it makes."""
        return f"{self.namespace}:index:type"

    @property
    def writer_lease(self) -> str:
        """The name of the index service replica that merges the result stream, with a time to live (lease.py)."""
        return f"{self.namespace}:index:writer"

    @property
    def snapshots_failing(self) -> str:
        """When the writer's checkpoints began failing (seconds since the epoch), while they fail (``SnapshotHealth``):
        a restarted index service goes on counting from then."""
        return f"{self.namespace}:index:snapshots_failing"

    @property
    def checkpoints(self) -> str:
        """Hash: index collection name -> the last result-stream id it covers, written after the index server flushed
        it (the Milvus backend's counterpart of a snapshot's stream position)."""
        return f"{self.namespace}:index:checkpoints"

    @property
    def checkpoint_times(self) -> str:
        """Hash: index alias -> when its checkpoint was written (Unix seconds), so ``/stats``' ``last_snapshot``
        survives a restart on Milvus as it does in a FAISS snapshot's header."""
        return f"{self.namespace}:index:checkpoint-times"

    @property
    def celery_prefix(self) -> str:
        """Prefix of every key kombu writes (queue lists, ``unacked``, bindings)."""
        return f"{self.namespace}:celery:"

    @property
    def unacked(self) -> str:
        """kombu's hash of delivered, unacknowledged tasks: delivery tag -> [message, exchange, routing key]."""
        return self.celery_prefix + "unacked"

    def queue_list(self, queue: str, step: int = 0) -> str:
        """kombu's list holding ``queue``'s tasks of priority ``step`` (one of ``PRIORITY_STEPS``)."""
        return self.celery_prefix + (queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}")

    @property
    def live_queue(self) -> str:
        return f"{self.namespace}.live"

    @property
    def rebuild_queue(self) -> str:
        return f"{self.namespace}.rebuild"

    @property
    def queues(self) -> tuple[str, str]:
        return (self.live_queue, self.rebuild_queue)
