"""A batch's objects fail alone: a model call that raises, a poison object that kills workers, bodies held in memory.
Pure logic: the pipeline and the task around stand-ins for S3, Redis and the model (the real path is
tests/test_pipeline.py and tests/test_faults.py)."""

from __future__ import annotations

import io
import time
import tracemalloc
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import redis
from celery import Celery
from PIL import Image

import workers.pipeline as pipeline_module
from bucketlens.keys import EMBED_TASK
from bucketlens.schemas import ObjectRef
from bucketlens.settings import Settings
from workers.errors import TransientError
from workers.fetch import Fetched
from workers.pipeline import Outcome, Pipeline
from workers.tasks import register_tasks


def png(extra: int = 0) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(out, "PNG")
    return out.getvalue() + bytes(extra)  # (trailing bytes: an object of that size, decoded as the PNG)


class Model:
    """Answers unit vectors; raises on the calls numbered in ``failing``."""

    model, dim, device = Settings().model, 8, "cpu"

    def __init__(self, failing: tuple[int, ...] = ()) -> None:
        self.calls, self.failing = 0, failing

    def describe(self, images: np.ndarray) -> tuple[np.ndarray, list[None]]:
        self.calls += 1
        if self.calls in self.failing:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return np.ones((len(images), 8), np.float32) / np.sqrt(8), [None] * len(images)


class Redis:
    """What the task and the pipeline ask of Redis here: a delivery count."""

    def __init__(self, deliveries: int = 1) -> None:
        self.deliveries = deliveries

    def incr(self, key: str) -> int:
        return self.deliveries

    def expire(self, key: str, seconds: int) -> None:
        pass

    def delete(self, key: str) -> None:
        pass

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        return {}

    def register_script(self, script: str) -> None:
        return None


APP = Celery("test-batches", set_as_current=False)  # one app: Celery registers a task name once per process
APP.conf.task_always_eager = True
CURRENT: dict[str, Pipeline] = {}
register_tasks(APP, Settings(), lambda: CURRENT["pipeline"])


def task_around(p: Pipeline) -> tuple[Celery, list[Outcome], list[dict[str, Any]]]:
    """The embed task around ``p``, with what it writes and the tasks it sends kept."""
    written: list[Outcome] = []
    sent: list[dict[str, Any]] = []
    p.write = lambda out, attempts, since: written.append(out)  # type: ignore[method-assign]
    APP.send_task = lambda name, args, queue: sent.append({"name": name, "args": args, "queue": queue})  # type: ignore
    CURRENT["pipeline"] = p
    return APP, written, sent


def test_a_model_call_that_raises_retries_its_objects_and_keeps_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """One exception in the model call (CUDA out of memory, a rebuild's model that cannot load) made every object
    of the batch a permanent ``internal`` failure, those embedded already too (an independent review)."""
    def fetch(s3: Any, ref: ObjectRef, max_bytes: int, timeout_s: float) -> Fetched:
        time.sleep(0.0 if ref.key == "a.png" else 0.5)  # a.png first, then b and c: two model calls
        return Fetched(png(), "")

    monkeypatch.setattr(pipeline_module, "fetch", fetch)
    p = Pipeline(Settings(), embedder=Model(failing=(2,)), client=Redis())  # type: ignore[arg-type]
    app, written, _ = task_around(p)
    refs = [ObjectRef("b", key, "e-" + key).to_json() for key in ("a.png", "b.png", "c.png")]
    app.tasks[EMBED_TASK].apply(args=[refs], retries=0)
    p.pool.shutdown()
    first, retried = written  # the retry runs at once (eager)
    crashed = [r.key for r, reason, _ in first.transient if reason == "internal"]
    assert crashed and "a.png" not in crashed and not first.failed
    assert sorted([e.ref.key for e in first.embedded] + crashed) == ["a.png", "b.png", "c.png"]
    assert [e.ref.key for e in retried.embedded] == crashed and not retried.failed


def test_a_rebuilds_model_this_release_does_not_know_retries_its_objects_and_keeps_the_rest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review 68: with the index service upgraded first (README, "Upgrading"), a reembed with a model only the new
    release knows reached workers of the old one; looking its recipe up raised, and every object of the batch,
    the serving generation's copy of the same upload too, became a permanent ``internal`` failure."""
    monkeypatch.setattr(pipeline_module, "fetch", lambda s3, ref, max_bytes, timeout_s: Fetched(png(), ""))
    redis = Redis()
    redis.hgetall = lambda key: {b"1": Settings().model.encode(), b"2": b"lite0-copy-v9"}  # type: ignore[method-assign]
    p = Pipeline(Settings(), embedder=Model(), client=redis)  # type: ignore[arg-type]
    out = p.process([ObjectRef("b", "k.png", "e1", generation=1), ObjectRef("b", "k.png", "e1", generation=2)])
    p.pool.shutdown()
    assert [e.ref.generation for e in out.embedded] == [1] and not out.failed
    assert [(r.generation, reason) for r, reason, _ in out.transient] == [(2, "internal")]
    assert "lite0-copy-v9" in out.transient[0][2]


def test_a_download_past_its_deadline_is_retried_then_fails_as_fetch_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stall mid-body (an OSD that blocks for a while) made the object a ``fetch_timeout`` failure at once, while
    the same stall before the headers was retried; now both are retried, and only an object that times out on every
    attempt becomes a ``fetch_timeout`` failure."""
    calls: dict[str, int] = {}

    def fetch(s3: Any, ref: ObjectRef, max_bytes: int, timeout_s: float) -> Fetched:
        calls[ref.key] = calls.get(ref.key, 0) + 1
        if ref.key == "never.png" or (ref.key == "once.png" and calls[ref.key] == 1):
            raise TransientError(f"download did not finish within {timeout_s:g} s (7 bytes read)",
                                 reason="fetch_timeout")
        return Fetched(png(), "")

    monkeypatch.setattr(pipeline_module, "fetch", fetch)
    p = Pipeline(Settings(), embedder=Model(), client=Redis())  # type: ignore[arg-type]
    app, written, _ = task_around(p)
    refs = [ObjectRef("b", key, "e-" + key).to_json() for key in ("ok.png", "once.png", "never.png")]
    app.tasks[EMBED_TASK].apply(args=[refs], retries=0)
    p.pool.shutdown()
    retries = Settings().max_retries
    assert calls == {"ok.png": 1, "once.png": 2, "never.png": retries + 1} and len(written) == retries + 1
    assert [(r.key, reason) for r, reason, _ in written[0].transient] == [("once.png", "fetch_timeout"),
                                                                         ("never.png", "fetch_timeout")]
    assert [e.ref.key for e in written[0].embedded] == ["ok.png"] and not written[0].failed
    assert [e.ref.key for e in written[1].embedded] == ["once.png"]
    last = written[-1]
    assert [(r.key, reason) for r, reason, _ in last.failed] == [("never.png", "fetch_timeout")]
    assert not last.transient  # spent: the batch's log line says failed, not "to retry"


class Writer:
    """A result writer whose first ``failures`` writes find Redis away."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0

    def write(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    def record_timings(self, timings: dict[str, float]) -> None:
        pass


def test_a_write_waits_for_redis_only_while_the_task_is_young() -> None:
    """The write retried Redis for half the visibility timeout counted from the write: after a slow batch it was
    still retrying when the broker handed the batch to another worker. It counts from the task's start now."""
    p = Pipeline(Settings(), embedder=Model(), client=Redis())  # type: ignore[arg-type]
    p.writer = writer = Writer(failures=1)  # type: ignore[assignment]
    p.write(Outcome(), 1, since=time.monotonic())
    assert writer.calls == 2  # Redis back at the second try: written
    p.writer = writer = Writer(failures=10**6)  # type: ignore[assignment]
    with pytest.raises(TransientError, match="Redis unreachable for too long"):
        p.write(Outcome(), 1, since=time.monotonic() - Settings().visibility_timeout_s / 2)
    assert writer.calls == 1  # half the visibility timeout spent already: the task is given back at once
    p.pool.shutdown()


def test_failures_of_a_cancelled_rebuild_write_no_record_and_of_a_retired_generation_do() -> None:
    """A batch of a rebuild cancelled while it ran left failure records on objects the serving generation holds
    (review 57). Its generation is newer than every one merged; an older one missing from the generations is
    retired, and a one-bucket reembed's still feeds the serving generation its other buckets' results, so its
    failures keep their records (review 58)."""
    client = Redis()
    client.hgetall = lambda key: {b"5": b"m"}  # type: ignore[method-assign]  # generation 5 serves
    p = Pipeline(Settings(), embedder=Model(), client=client)  # type: ignore[arg-type]
    said: dict[str, Any] = {}
    p.writer = SimpleNamespace(write=lambda *args, abandoned: said.update(abandoned=abandoned),  # type: ignore[assignment]
                               record_timings=lambda timings: None)
    failed = [(ObjectRef("b", f"k{g}.jpg", "e", generation=g), "too_large", "big") for g in (4, 5, 6)]
    p.write(Outcome(failed=failed), 1, since=time.monotonic())
    assert said["abandoned"] == {6}
    p.pool.shutdown()


def test_a_batch_delivered_again_goes_on_one_object_per_task() -> None:
    """A batch that kills its worker is delivered again; after MAX_REDELIVERIES every object of it became
    worker_lost, 31 good ones beside one poison object (an independent review). From its second delivery it is
    sent again one object per task, so the poison object fails alone."""
    p = Pipeline(Settings(), embedder=Model(), client=Redis(deliveries=2))  # type: ignore[arg-type]
    app, written, sent = task_around(p)
    refs = [ObjectRef("b", f"k{i}.jpg", "e", generation=2).to_json() for i in range(3)]
    app.tasks[EMBED_TASK].apply(args=[refs])
    p.pool.shutdown()
    assert not written and [s["args"] for s in sent] == [[[ref]] for ref in refs]
    assert {s["name"] for s in sent} == {EMBED_TASK}


def test_a_batchs_bodies_are_dropped_as_they_are_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every downloaded body stayed referenced until the batch ended: 32 objects of 50 MB held 1.6 GB (an
    independent review). Now about ``fetch_concurrency`` bodies at a time."""
    size, count = 2 << 20, 24

    def fetch(s3: Any, ref: ObjectRef, max_bytes: int, timeout_s: float) -> Fetched:
        time.sleep(0.03 * int(ref.key.split(".")[0]))  # one after another
        return Fetched(png(size), "")

    held: list[int] = []
    embed = Pipeline._embed

    def measured(self: Pipeline, decoded: Any, out: Outcome) -> None:
        held.append(tracemalloc.get_traced_memory()[0])
        embed(self, decoded, out)

    monkeypatch.setattr(pipeline_module, "fetch", fetch)
    monkeypatch.setattr(Pipeline, "_embed", measured)
    p = Pipeline(Settings(), embedder=Model(), client=Redis())  # type: ignore[arg-type]
    tracemalloc.start()
    try:
        out = p.process([ObjectRef("b", f"{i}.png", "e") for i in range(count)])
    finally:
        tracemalloc.stop()
        p.pool.shutdown()
    assert len(out.embedded) == count
    assert max(held) < (p.settings.fetch_concurrency + 2) * size < count * size, [h >> 20 for h in held]


def test_the_heartbeat_names_the_models_a_batch_is_embedded_with(monkeypatch: pytest.MonkeyPatch) -> None:
    """``/queues`` showed a worker's own ``BUCKETLENS_MODEL`` while it embedded with the index's (review 28): the
    pipeline tells its heartbeat the models of each batch's generations, both during a model-switching rebuild."""
    class Generations(Redis):
        def hgetall(self, key: str) -> dict[bytes, bytes]:
            return {b"1": b"lite0-copy-v3", b"2": b"lite0-copy-v3-fast"}

    fast = Model()
    fast.model = "lite0-copy-v3-fast"
    monkeypatch.setattr(pipeline_module, "fetch", lambda s3, ref, max_bytes, timeout_s: Fetched(png(), ""))
    p = Pipeline(Settings(model="lite0-copy-v3"), embedder=Model(), client=Generations())  # type: ignore[arg-type]
    p.embedders._loaded[fast.model] = fast  # type: ignore[assignment]
    told: list[list[str]] = []
    p.heartbeat.embedding = told.append  # type: ignore[method-assign]
    try:
        out = p.process([ObjectRef("b", f"{i}.png", "e", generation=1 + i % 2) for i in range(4)])
    finally:
        p.pool.shutdown()
    assert {e.model for e in out.embedded} == {"lite0-copy-v3", "lite0-copy-v3-fast"} and len(out.embedded) == 4
    assert told and set().union(*told) == {"lite0-copy-v3", "lite0-copy-v3-fast"}
    assert all(models == sorted(set(models)) for models in told)  # each call names a model once, in order


def test_the_log_names_each_object_that_failed(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
                                               ) -> None:
    """The batch's line said "1 failed" and no key (review 31); a key an uploader chose is written escaped."""
    class Writer:
        def write(self, *args: Any, **kwargs: Any) -> None:
            pass

        def record_timings(self, timings: dict[str, float]) -> None:
            pass

    monkeypatch.setattr(pipeline_module, "fetch", lambda s3, ref, max_bytes, timeout_s: Fetched(
        b"no image" if "bad" in ref.key else png(), ""))
    p = Pipeline(Settings(), embedder=Model(), client=Redis())  # type: ignore[arg-type]
    p.writer = Writer()  # type: ignore[assignment]
    try:
        out = p.process([ObjectRef("b", key, "e") for key in ("good.png", "bad\nforged line.jpg")])
    finally:
        p.pool.shutdown()
    caplog.set_level("INFO", logger=pipeline_module.log.name)
    p.write(out, 1, since=time.monotonic())
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("failed:")]
    assert line.startswith("failed: 'b/bad\\nforged line.jpg' (") and "\n" not in line, line


def test_an_object_sent_again_without_a_time_is_indexed_with_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Failure records and pending marks of the release before 2026-12-02 name no time: retried after an upgrade,
    their objects were indexed with none, and every date filter left them out (review 51). The object's own
    LastModified, which the download answers with, stands in; a ref's own time is kept."""
    written = "2024-05-01T10:00:00.123456Z"
    monkeypatch.setattr(pipeline_module, "fetch", lambda *args: Fetched(png(), written))
    p = Pipeline(Settings(), embedder=Model(), client=Redis())  # type: ignore[arg-type]
    try:
        out = p.process([ObjectRef("b", "old.png", "e1"),
                         ObjectRef("b", "new.png", "e2", event_time="2025-01-01T00:00:00Z")])
    finally:
        p.pool.shutdown()
    assert [(e.ref.key, e.ref.event_time) for e in out.embedded] == [("old.png", written),
                                                                      ("new.png", "2025-01-01T00:00:00Z")]
    assert out.embedded[0].ref.modified == 1714557600.123
