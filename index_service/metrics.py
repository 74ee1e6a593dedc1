"""``GET /metrics``: Prometheus text built from the current state at each scrape.

Workers and ingest run in other processes, often on other machines, so they push what they measure through
Redis (counters in ``Keys.counters``, stage histograms in ``Keys.stages``, heartbeats) and this module turns
it into metrics; the index service adds what it knows itself (index size, merges, search latency). Each app
has its own ``CollectorRegistry``, never the process-global default, so several apps can live in one process.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import redis
from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from bucketlens.keys import STAGE_BUCKETS, stage_bucket_field
from bucketlens.redis_client import text

from .queues import queue_report
from .service import Service

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STAGES = ("fetch", "decode", "embed", "write")
# Their sum is ``received``
EVENT_OUTCOMES = ("accepted", "duplicated", "ignored", "future", "stale_deletes", "reserved", "in_flight")
SEARCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The metrics of one index-service app: a state collector and the search latency histogram."""

    def __init__(self, service: Service) -> None:
        disable_created_metrics()  # (the histogram's `_created` series, a start time, was the one exported name
        # README's table lacked: review 79)
        self.registry = CollectorRegistry()
        self.search_seconds = Histogram(
            "bucketlens_search_seconds", "Time to answer POST /search, query embedding included, by query kind",
            ["by"], buckets=SEARCH_BUCKETS, registry=self.registry,
        )
        self.registry.register(StateCollector(service))

    def render(self) -> bytes:
        """The text exposition; reads Redis, so call it from a thread, not the event loop."""
        return generate_latest(self.registry)


class StateCollector:
    """Reads the service and Redis at each scrape; a Redis outage yields ``bucketlens_redis_up 0``, not an error."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        index = self.service.index
        try:
            vectors: int | None = len(index)
        except ConnectionError as exc:  # (Milvus counts on the server) the rest of the metrics still come
            log.warning("metrics without the index's vector count: %s", exc)
            vectors = None
        # The writer counts from memory: its Milvus server is asked too (it read 1 through a whole Milvus outage
        # while searches answered 503: an independent check).
        yield _gauge("bucketlens_index_up", "1 when the index (for Milvus: its server) answered this scrape",
                     int(vectors is not None and self.service.backend.problem() is None))
        # From memory, so an outage still says which replica writes and how merging stands (review 29: only
        # bucketlens_index_up was left)
        yield from _index(self.service.state(index), vectors)
        up = GaugeMetricFamily("bucketlens_redis_up", "1 when Redis answered this scrape")
        try:
            report = queue_report(self.service.probe, self.service.keys)
            stages = self.service.probe.hgetall(self.service.keys.stages)
        except redis.RedisError as exc:
            log.warning("metrics without Redis: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _queues(report)
        yield from _counters(report["events"], report["failures"])
        yield from _workers(report)
        yield _stage_histogram({text(k): v for k, v in stages.items()})


def _index(stats: dict[str, Any], vectors: int | None) -> Iterator[Metric]:
    """The serving index's metrics, from ``Service.state`` and the vector count (None: the index server is away)."""
    if vectors is not None:
        yield _gauge("bucketlens_index_vectors", "Vectors in the serving index", vectors)
    yield _gauge("bucketlens_index_generation", "Generation of the serving index", stats["generation"])
    yield _gauge("bucketlens_index_writer", "1 when this replica holds the writer lease and merges",
                 int(stats["writer"]))
    info = GaugeMetricFamily("bucketlens_index_info", "The serving index's model, dimension and index type",
                             labels=["model", "dim", "index_type"])
    info.add_metric([str(stats["model"]), str(stats["dim"]), str(stats["index_type"])], 1)
    yield info
    yield _counter("bucketlens_merged_entries", "Result-stream entries the merger applied since start",
                   stats["applied_entries"])
    failures = stats["snapshot_failures"]
    yield _counter("bucketlens_snapshot_failures", "Snapshots that could not be written (disk full, read-only)",
                   failures["failures"])
    yield _gauge("bucketlens_snapshot_failing_seconds", "How long snapshots have been failing (0: they are not)",
                 failures["failing_s"])
    merging = stats["merge_failures"]
    yield _counter("bucketlens_merge_failures", "Merge steps that raised (the features folder's disk full)",
                   merging["failures"])
    yield _gauge("bucketlens_merge_failing_seconds", "How long merge steps have been failing (0: they are not)",
                 merging["failing_s"])
    snapshot_time = _snapshot_time(stats.get("last_snapshot"))
    if snapshot_time is not None:
        yield _gauge("bucketlens_snapshot_age_seconds", "Seconds since the newest snapshot was written",
                     max(0.0, time.time() - snapshot_time))


def _queues(report: dict[str, Any]) -> Iterator[Metric]:
    depth = GaugeMetricFamily("bucketlens_queue_depth", "Tasks (batches of objects) waiting in each Celery queue",
                              labels=["queue"])
    for name, queue in report["queues"].items():
        depth.add_metric([name], queue["depth"])
    yield depth
    stream = report["stream"]
    yield _gauge("bucketlens_unacked_tasks", "Tasks handed to a worker and not acknowledged yet", report["unacked"])
    yield _gauge("bucketlens_unacked_dead_tasks", "Unacknowledged tasks no live worker holds (being handed back)",
                 report["unacked_dead"])
    yield _gauge("bucketlens_stream_length", "Entries in the result stream (trimmed after snapshots)",
                 stream["length"])
    # Redis cannot say the lag after the merger's group is moved inside an untrimmed stream (a restart after a
    # rebuild, a Redis restart while behind: ``XINFO`` answers nil until the merger reads the last entry), which is
    # when the backlog is large: then the stream's length, which holds every unread entry (it was exported as 0).
    yield _gauge("bucketlens_stream_lag", "Result-stream entries not yet read by the merger (when Redis cannot say: "
                 "the stream's length, an upper bound)", stream["length"] if stream["lag"] is None else stream["lag"])
    yield _gauge("bucketlens_stream_pending", "Result-stream entries read by the merger and not acknowledged",
                 stream["pending"])
    yield _gauge("bucketlens_pending_objects", "Objects whose event was accepted and whose vector is not merged yet",
                 report["pending_objects"])


def _counters(counters: dict[str, int], failure_records: int) -> Iterator[Metric]:
    yield _counter("bucketlens_events_received", "Notification records received by ingest",
                   counters.get("received", 0))
    events = CounterMetricFamily("bucketlens_events", "Notification records by outcome", labels=["outcome"])
    for outcome in EVENT_OUTCOMES:
        events.add_metric([outcome], counters.get(outcome, 0))
    yield events
    yield _counter("bucketlens_events_unauthorized", "Requests to ingest's /events refused for a missing or wrong "
                   "webhook token (a bucket notification still pushing an earlier one loses its events)",
                   counters.get("unauthorized", 0))
    yield _counter("bucketlens_embeddings", "Vectors written to the result stream by workers",
                   counters.get("embedded", 0))
    yield _counter("bucketlens_tasks_restored", "Tasks of dead workers handed back to the queue",
                   counters.get("tasks_restored", 0))
    yield _counter("bucketlens_lost_tasks_resent", "Objects sent again because their task was lost",
                   counters.get("orphans_resent", 0))
    yield _counter("bucketlens_failures_retried", "Failed objects sent again by the index service itself (S3 away)",
                   counters.get("failures_retried", 0))
    yield _counter("bucketlens_canary_stalls", "Canaries the local supervisor saw undelivered, and healed",
                   counters.get("canary_stalls", 0))
    yield _counter("bucketlens_hung_restarts", "Processes the local supervisor killed as running but silent",
                   counters.get("hung_restarts", 0))
    yield _counter("bucketlens_notifications_restored", "Bucket notifications (or buckets) the local supervisor found "
                   "gone and made again", counters.get("notifications_restored", 0))
    failures = CounterMetricFamily("bucketlens_failures", "Objects that became failure records, by reason",
                                   labels=["reason"])
    for name, value in sorted(counters.items()):
        if name.startswith("failed:"):
            failures.add_metric([name.removeprefix("failed:")], value)
    yield failures
    yield _gauge("bucketlens_failure_records", "Failure records now kept (cleared by success, retry or clear)",
                 failure_records)


def _workers(report: dict[str, Any]) -> Iterator[Metric]:
    workers = report["workers"]
    yield _gauge("bucketlens_workers", "Workers with a live heartbeat", len(workers))
    yield _gauge("bucketlens_workers_busy", "Workers embedding a batch now",
                 sum(1 for w in workers if w.get("state") == "busy"))
    canary = report["canary"]
    if canary["age_s"] is not None:
        yield _gauge("bucketlens_canary_age_seconds", "Seconds since the last canary notification reached ingest",
                     canary["age_s"])
    if canary["lag_s"] is not None:
        yield _gauge("bucketlens_canary_lag_seconds", "Upload-to-receiver delay of the last checked canary",
                     canary["lag_s"])
    yield _gauge("bucketlens_canary_waiting_seconds", "How long the outstanding canary has waited for its event",
                 canary["waiting_s"])


def _stage_histogram(fields: dict[str, bytes | str]) -> Metric:
    """Per-batch stage latency from the cumulative counters workers keep in ``Keys.stages``."""
    family = HistogramMetricFamily("bucketlens_stage_seconds", "Time one batch spent in each worker stage",
                                   labels=["stage"])
    seen = {name.split(":", 1)[0] for name in fields}
    for stage in [s for s in STAGES if s in seen] + sorted(seen - set(STAGES)):
        count = int(fields.get(f"{stage}:count", b"0"))
        buckets: list[tuple[str, float]] = [
            (str(float(bound)), float(int(fields.get(stage_bucket_field(stage, bound), b"0"))))
            for bound in STAGE_BUCKETS
        ]
        buckets.append(("+Inf", float(count)))
        family.add_metric([stage], buckets, float(fields.get(f"{stage}:seconds", b"0")))
    return family


def _snapshot_time(last: Any) -> float | None:
    """When the newest snapshot was written (epoch seconds), if the service says."""
    value = last.get("time") if isinstance(last, dict) else last
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
