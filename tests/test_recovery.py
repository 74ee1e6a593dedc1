"""SIGKILL the index service in the middle of merging; after a restart the index equals an uninterrupted run, on
each backend."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

from bucketlens import schemas
from bucketlens.keys import Keys
from bucketlens.redis_client import connect, text
from bucketlens.s3 import make_client
from bucketlens.schemas import ObjectRef, ResultEntry, failure_record
from bucketlens.settings import INDEX_TYPES, Settings
from index_service.backend import open_backend
from index_service.feature_store import FeatureStore
from index_service.merger import CLAIM_IDLE_MS, Merger
from index_service.queues import queue_report
from index_service.vector_index import VectorIndex
from infra.stack import Stack, free_port, last_error, scratch_redis

from .helpers import index_difference, wait_for

pytestmark = pytest.mark.slow
DIM = 1280
MODEL = Settings().model  # the default model: the service under test serves it


def entries(n: int, seed: int = 0) -> list[ResultEntry]:
    """A realistic mix: uploads, re-uploads (newer order wins), deletes, and late stale duplicates."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        key = f"obj-{rng.integers(0, n // 2)}.jpg"
        order = int(1e18) + i
        if i % 10 == 9:
            out.append(ResultEntry("delete", "bk", key, "", "", order, 1))
        else:
            vector = rng.standard_normal(DIM).astype(np.float32)
            order = order - 5 * n if i % 17 == 0 else order  # a late, older version: must be discarded
            out.append(ResultEntry("upsert", "bk", key, f"etag{i}", f"{i:x}", order, 1, MODEL,
                                   vector / np.linalg.norm(vector)))
    return out


class IndexProcess:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.api_port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready: bool = False) -> None:
        """Start it and wait until it answers (``ready``: until ``/readyz`` says it serves)."""
        env = {**os.environ, **self.settings.to_env()}
        log = open(Path(self.settings.home) / "logs" / f"recovery-{self.settings.namespace}.log", "ab")
        self.process = process = subprocess.Popen([sys.executable, "-m", "bucketlens.cli", "serve"], env=env,
                                                  stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(lambda: self.healthy() or process.poll() is not None, 120, what="index service up (or exited)")
        if ready:
            wait_for(lambda: httpx.get(self.url + "/readyz", timeout=10).status_code == 200, 120,
                     what=f"{self.settings.namespace} ({self.settings.replica}) ready")

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stats(self) -> dict[str, object]:
        return httpx.get(self.url + "/stats", timeout=10).json()  # type: ignore[no-any-return]

    def stop(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)
        self.process.wait(timeout=60)


def empty_bucket(stack: Stack, name: str) -> str:
    """A bucket of its own for an index service of its own: with the stack's, a service that starts with no index
    and no data in Redis would re-embed it (index_service/redis_loss.py) and report not ready meanwhile."""
    bucket = f"{name}-empty"
    make_client(stack.settings).create_bucket(Bucket=bucket)
    return bucket


def own_settings(stack: Stack, prefix: str, backend: str, milvus_uri: str, **overrides: Any) -> Settings:
    """Settings for an index service of its own on ``backend``: a new namespace, its own empty bucket, a free port."""
    namespace = f"{prefix}{uuid.uuid4().hex[:6]}"
    return dataclasses.replace(stack.settings, namespace=namespace, bucket=empty_bucket(stack, namespace),
                               api_port=free_port(), index_backend=backend, milvus_uri=milvus_uri, **overrides)


@pytest.fixture(params=list(INDEX_TYPES))
def service(stack: Stack, request: pytest.FixtureRequest) -> Iterator[IndexProcess]:
    """An index service of its own, on each backend (Milvus: the session's server)."""
    uri = request.getfixturevalue("milvus_uri") if request.param == "milvus" else stack.settings.milvus_uri
    process = IndexProcess(own_settings(stack, "rec", request.param, uri, snapshot_every_entries=300,
                                        snapshot_every_s=3600, merge_batch=100))
    yield process
    if process.process is not None and process.process.poll() is None:
        process.stop(signal.SIGKILL)


def test_sigkill_mid_merge_then_restart_equals_an_uninterrupted_run(service: IndexProcess) -> None:
    stream = entries(3000)
    keys = Keys(service.settings.namespace)
    redis = connect(service.settings.redis_url)
    service.start()

    added: list[bytes] = []
    killed = threading.Event()

    def produce() -> None:  # entries keep arriving while the service merges, as from busy workers
        for start in range(0, len(stream), 50):
            if start == 2000:  # the rest after the kill: mid-merge however fast the merger (a slow first
                killed.wait(120)  # checkpoint could let it merge all 3,000 first: a flake review)
            pipe = redis.pipeline()
            for entry in stream[start : start + 50]:
                pipe.xadd(keys.results, entry.to_fields())
            added.extend(pipe.execute())

    producer = threading.Thread(target=produce)
    producer.start()
    # Killed mid-merge, once a checkpoint is done (it runs beside the merger: a Milvus flush takes seconds), so the
    # assertions below can see that checkpoints let the stream be trimmed.
    def merged() -> int:
        stats = service.stats()
        return int(stats["applied_entries"]) if int(stats["applied_entries"]) >= 1200 and stats["last_snapshot"] else 0

    try:
        at_kill = wait_for(merged, 120, interval_s=0.02, what="half merged and a checkpoint written")
        service.stop(signal.SIGKILL)
    finally:
        killed.set()
    producer.join()  # (at least the last 1,000 entries arrived after the kill: the restart has them to merge)
    assert at_kill <= 2000, at_kill

    service.start()
    # Restored from the checkpoint before the kill, and /stats says when it was written (before the next one).
    restored = wait_for(lambda: (stats := service.stats())["vectors"] and stats, 60, interval_s=0.05,
                        what="the index restored")
    assert restored["last_snapshot"], f"the checkpoint before the kill is not reported: {restored}"
    wait_for(lambda: service.stats()["applied_entries"] and redis.xinfo_groups(keys.results)[0]["lag"] == 0,
             120, what="replay finished")
    reference = VectorIndex(MODEL, DIM)
    reference.apply(stream)
    assert len(reference) > 100
    wait_for(lambda: service.stats()["vectors"] == len(reference), 30,
             what=f"the restarted writer to count {len(reference)} objects")
    service.stop(signal.SIGTERM)  # clean shutdown writes a final checkpoint (snapshot, or Milvus flush)

    backend = open_backend(service.settings, redis, keys, lambda _: FeatureStore())
    loaded = backend.load()
    assert loaded is not None
    recovered = loaded[0]

    assert not index_difference(recovered, reference), index_difference(recovered, reference)
    # The checkpoints let the stream be trimmed: Redis keeps only what the newest one does not cover (with Milvus,
    # the stream position is recorded, and the stream trimmed, only after the collection was flushed).
    assert redis.xlen(keys.results) < len(stream)
    if service.settings.index_backend == "milvus":
        assert redis.hget(keys.checkpoints, backend.alias) == loaded[1].encode()  # type: ignore[attr-defined]
        def order(stream_id: bytes | str) -> tuple[int, ...]:
            return tuple(int(x) for x in (stream_id.decode() if isinstance(stream_id, bytes) else stream_id).split("-"))

        kept = {i for i, _ in redis.xrange(keys.results)}  # nothing the checkpoint does not cover was trimmed
        assert {i for i in added if order(i) > order(loaded[1])} <= kept
        client = backend.connection.client  # type: ignore[attr-defined]
        client.drop_alias(backend.alias)  # type: ignore[attr-defined]  # this test's alias and collection
        client.drop_collection(recovered.collection)  # type: ignore[attr-defined]


def test_reconcile_sends_what_the_index_lacks_and_deletes_what_the_bucket_lost(service: IndexProcess) -> None:
    """The listing is the authority on both backends: an object the index lacks and one it holds at an older etag
    go to the workers (the rebuild queue), an indexed object the bucket no longer has is deleted, and the rest is
    left alone."""
    s = service.settings
    keys, redis, s3 = Keys(s.namespace), connect(s.redis_url), make_client(s)
    service.start(ready=True)  # on an empty bucket: nothing to re-embed at start
    rng = np.random.default_rng(11)
    vector = rng.standard_normal(DIM).astype(np.float32)
    etag = s3.put_object(Bucket=s.bucket, Key="kept.jpg", Body=b"kept")["ETag"].strip('"')
    for i, (key, held) in enumerate((("kept.jpg", etag), ("changed.jpg", "an-older-etag"), ("gone.jpg", "e"))):
        redis.xadd(keys.results, ResultEntry("upsert", s.bucket, key, held, f"{i:x}", int(1e18) + i, 1, MODEL,
                                             vector / np.linalg.norm(vector)).to_fields())
    wait_for(lambda: service.stats()["vectors"] == 3, 60, what="three objects indexed")
    s3.put_object(Bucket=s.bucket, Key="changed.jpg", Body=b"changed")
    s3.put_object(Bucket=s.bucket, Key="missing.jpg", Body=b"missing")  # no notification: the bucket has none

    headers = {"Authorization": f"Bearer {s.admin_token}"}
    counted = {"listed": 3, "missing": 1, "changed": 1, "removed": 1, "failed": 0}
    dry = httpx.post(service.url + "/reconcile", json={"bucket": s.bucket, "dry_run": True}, headers=headers,
                     timeout=60).json()
    assert {k: dry[k] for k in (*counted, "dry_run")} == {**counted, "dry_run": True}, dry
    assert queue_report(redis, keys)["pending_objects"] == 0 and service.stats()["vectors"] == 3  # nothing done
    assert redis.xlen(keys.results) == 3  # (no delete written)
    refused = httpx.post(service.url + "/reconcile", json={"dry_run": "yes"}, headers=headers, timeout=60)
    assert refused.status_code == 400 and "dry_run must be true or false" in refused.text, refused.text
    report = httpx.post(service.url + "/reconcile", json={"bucket": s.bucket}, headers=headers, timeout=60).json()
    assert {k: report[k] for k in (*counted, "dry_run")} == {**counted, "dry_run": False}, report
    assert queue_report(redis, keys)["pending_objects"] == 2
    queued = queue_report(redis, keys)["queues"][keys.rebuild_queue]["depth"]
    again = httpx.post(service.url + "/reconcile", json={"bucket": s.bucket}, headers=headers, timeout=60).json()
    assert (again["missing"], again["changed"], again["in_flight"]) == (1, 1, 2), again  # on their way: not sent
    assert queue_report(redis, keys)["queues"][keys.rebuild_queue]["depth"] == queued  # (twice: an independent check)
    wait_for(lambda: service.stats()["vectors"] == 2, 60, what="the lost object deleted")
    states = {key: httpx.get(f"{service.url}/objects/{s.bucket}/{key}", timeout=30)
              for key in ("kept.jpg", "changed.jpg", "missing.jpg", "gone.jpg")}
    assert states["kept.jpg"].json()["state"] == "indexed" and states["kept.jpg"].json()["etag"] == etag
    assert states["changed.jpg"].json()["state"] == "pending", states["changed.jpg"].text
    assert states["missing.jpg"].json()["state"] == "pending", states["missing.jpg"].text
    assert states["gone.jpg"].status_code == 404, states["gone.jpg"].text


def test_reconcile_takes_out_an_older_picture_whose_key_now_holds_a_failed_version(service: IndexProcess) -> None:
    """An index that holds a photo under a key whose listed version already failed by its content (overwritten with
    a text, its failure note lost or merged before failed versions removed older ones): reconcile left it searchable
    ("6 not sent ... 0 removed", an independent check). It now removes the older picture and keeps the record."""
    s = service.settings
    keys, redis, s3 = Keys(s.namespace), connect(s.redis_url), make_client(s)
    service.start(ready=True)
    vector = np.random.default_rng(12).standard_normal(DIM).astype(np.float32)
    redis.xadd(keys.results, ResultEntry("upsert", s.bucket, "broken.jpg", "photo-etag", "1", int(1e18), 1, MODEL,
                                         vector / np.linalg.norm(vector)).to_fields())
    wait_for(lambda: service.stats()["vectors"] == 1, 60, what="the photo indexed")
    etag = s3.put_object(Bucket=s.bucket, Key="broken.jpg", Body=b"not an image")["ETag"].strip('"')
    now = ObjectRef(s.bucket, "broken.jpg", etag, order=int(1e18) + 5, generation=1)
    redis.hset(keys.failures, now.object_id, failure_record(now, "not_an_image", "cannot identify image file", 1,
                                                            time.time()))
    headers = {"Authorization": f"Bearer {s.admin_token}"}
    report = httpx.post(service.url + "/reconcile", json={"bucket": s.bucket}, headers=headers, timeout=60).json()
    assert (report["changed"], report["failed"], report["removed"]) == (1, 1, 1), report
    wait_for(lambda: service.stats()["vectors"] == 0, 60, what="the older picture removed")
    state = httpx.get(f"{service.url}/objects/{s.bucket}/broken.jpg", timeout=30).json()
    assert (state["state"], state["indexed"], state["etag"]) == ("failed", False, etag), state
    again = httpx.post(service.url + "/reconcile", json={"bucket": s.bucket}, headers=headers, timeout=60).json()
    assert (again["changed"], again["missing"], again["failed"], again["removed"]) == (0, 1, 1, 0), again


def test_an_index_service_that_cannot_load_its_model_stops_and_says_why(stack: Stack) -> None:
    """BUCKETLENS_DEVICE=cuda without a GPU: the loader's thread died, and /readyz said "loading the model" for good,
    `up` waiting minutes without a word (review 19). It stops, as a worker does, and says why; the supervisor
    restarts it, backing off."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the index service would load its model")
    process = IndexProcess(own_settings(stack, "nocuda", "faiss", stack.settings.milvus_uri, device="cuda"))
    process.start()
    assert process.process is not None
    process.process.wait(timeout=120)
    log_file = Path(process.settings.home) / "logs" / f"recovery-{process.settings.namespace}.log"
    said = last_error(log_file)  # what `up` quotes of a process that exited
    assert " CRITICAL " in said and "cannot load its model" in said and "BUCKETLENS_DEVICE=cuda" in said, (
        log_file.read_text()[-2000:])


def test_a_malformed_stream_entry_is_skipped_counted_and_acknowledged(stack: Stack) -> None:
    """An entry the merger cannot read (a foreign writer, a damaged Redis) is logged, counted in ``/stats`` and
    acknowledged: it neither stops the entries after it nor stays pending to be read again after a restart."""
    process = IndexProcess(own_settings(stack, "bad", "faiss", stack.settings.milvus_uri))
    keys, redis = Keys(process.settings.namespace), connect(process.settings.redis_url)
    process.start(ready=True)
    try:
        redis.xadd(keys.results, {"op": "upsert", "bucket": "bk"})  # no key, no order, no vector
        (good,) = [e for e in entries(2) if e.op == "upsert"][:1]
        redis.xadd(keys.results, good.to_fields())
        stats = wait_for(lambda: (s := process.stats())["applied_entries"] >= 1 and s, 60, what="the good entry merged")
        assert (stats["malformed_entries"], stats["vectors"]) == (1, 1), stats
        assert redis.xpending(keys.results, keys.merger_group)["pending"] == 0
    finally:
        process.stop(signal.SIGTERM)


def test_an_entry_of_a_later_version_is_held_until_an_upgraded_index_service_applies_it(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers upgraded before the index service write entries it cannot read: it counted them malformed and
    acknowledged them, and each such object stayed out of the index until it was embedded again (review 14). Now
    the entry is held: applied by no one, left unacknowledged (a checkpoint trims no further), claimed again by this
    release without being fetched or handed back as a batch (thousands of them, in turn every 2 s, kept new entries
    from being read: review 18), and claimed and applied by the upgraded one."""
    keys, redis = Keys(f"newer{uuid.uuid4().hex[:6]}"), connect(stack.settings.redis_url)
    current, later = [e for e in entries(20, seed=11) if e.op == "upsert"][:2]
    later_version = str(schemas.RESULT_VERSION + 1)
    redis.xadd(keys.results, current.to_fields())
    held = text(redis.xadd(keys.results, {**later.to_fields(), "v": later_version}))
    applied: list[ResultEntry] = []
    old = Merger(redis, keys, apply=applied.extend, batch=8, consumer="old")
    old._ensure_group()
    assert old.step() == 2 and [e.key for e in applied] == [current.key]
    assert (old.malformed, old.held, old.applied) == (0, {held}, 1)
    pending = redis.xpending(keys.results, keys.merger_group)
    assert (pending["pending"], text(pending["min"])) == (1, held)  # the oldest pending: checkpoints trim to it
    time.sleep(CLAIM_IDLE_MS / 1000 + 0.2)
    newest = redis.xadd(keys.results, entries(20, seed=12)[0].to_fields())
    assert old.step() == 1 and len(applied) == 2  # past the held entry, claimed again, to the new one
    assert redis.xpending(keys.results, keys.merger_group)["pending"] == 1 and old.last_id == text(newest)
    monkeypatch.setattr(schemas, "READABLE_RESULTS", (*schemas.READABLE_RESULTS, later_version.encode()))
    upgraded = Merger(redis, keys, apply=applied.extend, batch=8, consumer="upgraded")
    wait_for(lambda: upgraded.step() >= 0 and len(applied) == 3, 30, interval_s=0.1, what="the held entry applied")
    assert (applied[2].key, applied[2].order, not upgraded.held) == (later.key, later.order, True)
    assert np.array_equal(applied[2].vector, later.vector)
    assert redis.xpending(keys.results, keys.merger_group)["pending"] == 0
    redis.delete(keys.results)


def test_a_checkpoint_is_positioned_before_an_entry_it_does_not_hold(stack: Stack) -> None:
    """A held entry (a later version) lies behind the merger's position; a snapshot positioned at the merger's
    position lacked it, and a restore from it never read it again (review 18): a writer upgraded from it claimed and
    acknowledged the entry, then died before its own first checkpoint. The snapshot is positioned at the entry
    before it."""
    process = IndexProcess(own_settings(stack, "pos", "faiss", stack.settings.milvus_uri, snapshot_every_s=1))
    keys, redis = Keys(process.settings.namespace), connect(process.settings.redis_url)
    process.start(ready=True)
    try:
        first, later, last = [e for e in entries(20, seed=13) if e.op == "upsert"][:3]
        before = text(redis.xadd(keys.results, first.to_fields()))
        held = text(redis.xadd(keys.results, {**later.to_fields(), "v": str(schemas.RESULT_VERSION + 1)}))
        newest = text(redis.xadd(keys.results, last.to_fields()))
        merged = wait_for(lambda: (s := process.stats())["last_applied_id"] == newest and s, 60, what="merged")
        assert (merged["newer_entries_held"], merged["vectors"]) == (1, 2), merged
        # A checkpoint of both merged vectors: one begun as the last entry merged is that one, and the next is
        # never due (nothing new), so waiting for one timed after the merge could time out (a full run, 2026-12-06)
        snapshot = wait_for(lambda: (s := process.stats()["last_snapshot"]) and s["count"] == 2 and s, 60,
                            what="a checkpoint after the merge")
        assert snapshot["last_id"] == before, (snapshot, held)  # the entry before it: one the stream holds
        assert redis.xrange(keys.results, min=held, max=held)  # not trimmed
    finally:
        process.stop(signal.SIGTERM)


def test_the_end_of_a_burst_is_checkpointed_and_trimmed_while_the_stream_is_quiet(stack: Stack) -> None:
    """The snapshot policy ran only after a merged batch: a checkpoint skipped during a burst (one was running, or
    the wait after a long one was not over) waited for the next entry, so the end of a burst was in no snapshot and
    stayed in the stream (a scale check: 37,520 entries for 237 s). Now it is taken while the stream is quiet."""
    process = IndexProcess(own_settings(stack, "quiet", "faiss", stack.settings.milvus_uri, merge_batch=50,
                                        snapshot_every_entries=1_000_000, snapshot_every_s=2))
    keys, redis = Keys(process.settings.namespace), connect(process.settings.redis_url)
    process.start(ready=True)
    try:
        burst = entries(600)
        pipe = redis.pipeline()
        for entry in burst:
            pipe.xadd(keys.results, entry.to_fields())
        pipe.execute()
        wait_for(lambda: process.stats()["applied_entries"] == len(burst), 60, what="the burst merged")
        # Nothing arrives after it: the stream is trimmed to the last entry once a checkpoint covers them all.
        wait_for(lambda: redis.xlen(keys.results) <= 1, 30, what="the burst's entries trimmed by a checkpoint")
    finally:
        process.stop(signal.SIGTERM)


def test_a_restore_from_an_older_snapshot_reconciles_what_the_trimmed_stream_lost(stack: Stack) -> None:
    """A checkpoint trims the stream to the newest snapshot; when that one does not load (truncated, or written by
    a newer release), the previous one does, and the entries between the two are in neither: the restart reconciles
    with the bucket, which sends the object they held to the workers again (it was lost silently: a review)."""
    s = own_settings(stack, "older", "faiss", stack.settings.milvus_uri, snapshot_every_entries=1,
                     snapshot_every_s=3600)
    process, keys, redis, s3 = IndexProcess(s), Keys(s.namespace), connect(s.redis_url), make_client(s)
    process.start(ready=True)
    vector = np.ones(DIM, np.float32) / np.sqrt(DIM)

    def uploaded(key: str, order: int) -> dict[str, Any]:
        etag = s3.put_object(Bucket=s.bucket, Key=key, Body=key.encode())["ETag"].strip('"')
        return ResultEntry("upsert", s.bucket, key, etag, f"{order:x}", order, 1, MODEL, vector).to_fields()

    def snapshots() -> list[Path]:
        return sorted((Path(s.home) / "snapshots" / s.namespace).glob("*.snapshot.npz"))

    try:
        redis.xadd(keys.results, uploaded("first.jpg", 1))
        wait_for(lambda: len(snapshots()) == 1 and process.stats()["last_snapshot"], 60, what="the first checkpoint")
        pipe = redis.pipeline()  # one batch, so the next checkpoint comes after both
        pipe.xadd(keys.results, uploaded("second.jpg", 2))
        pipe.xadd(keys.results, uploaded("third.jpg", 3))
        pipe.execute()
        wait_for(lambda: len(snapshots()) == 2 and redis.xlen(keys.results) == 1, 60,
                 what="the second checkpoint, the stream trimmed to it")
    finally:
        process.stop(signal.SIGKILL)  # (no last checkpoint at shutdown)
    newest = snapshots()[-1]
    newest.write_bytes(newest.read_bytes()[:-100])
    process.start(ready=True)
    try:
        assert process.stats()["vectors"] == 2  # first.jpg from the older snapshot, third.jpg from the stream
        wait_for(lambda: queue_report(redis, keys)["pending_objects"] == 1, 60,
                 what="second.jpg, lost between the two snapshots, sent to the workers again")
        state = httpx.get(f"{process.url}/objects/{s.bucket}/second.jpg", timeout=30).json()
        assert state["state"] == "pending", state
    finally:
        process.stop(signal.SIGTERM)


def test_a_merge_step_that_keeps_failing_is_counted_and_said_then_resumes_where_it_stopped(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """The features folder's disk full: each step raised, a 30-line traceback every second, while /readyz said ready
    and /stats nothing (review 20). Now the run is counted, its first failure logged with its traceback and the
    rest a line a minute, /readyz says why once it has lasted the grace, and merging resumes at the same batch."""
    keys, redis = Keys(f"fail{uuid.uuid4().hex[:6]}"), connect(stack.settings.redis_url)
    stream = [e for e in entries(20, seed=13) if e.op == "upsert"][:3]
    for entry in stream:
        redis.xadd(keys.results, entry.to_fields())
    applied: list[ResultEntry] = []
    full = threading.Event()
    full.set()

    def apply(batch: list[ResultEntry]) -> None:
        if full.is_set():
            raise OSError(28, "No space left on device")
        applied.extend(batch)

    merger = Merger(redis, keys, apply=apply, batch=8, consumer="full")
    merger.start()
    try:
        wait_for(lambda: merger.failing.failures >= 3, 30, what="three failed steps")
        state = merger.failing.public()
        assert state["error"] == "OSError: [Errno 28] No space left on device" and state["failing_s"] > 0, state
        assert merger.failing.unready_reason(3600) is None  # (within the grace)
        assert "No space left on device" in (merger.failing.unready_reason(0) or "")
        tracebacks = [r for r in caplog.records if r.name == "index_service.merger" and r.exc_info]
        assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]  # once, not at every step
        assert applied == [] and redis.xpending(keys.results, keys.merger_group)["pending"] == len(stream)
        full.clear()
        wait_for(lambda: len(applied) == len(stream), 30, what="merging resumed")
        assert [e.key for e in applied] == [e.key for e in stream]
        wait_for(lambda: merger.failing.public()["failing_s"] == 0, 10, what="the run ended")
        assert merger.failing.unready_reason(0) is None and merger.failing.failures >= 3
        assert redis.xpending(keys.results, keys.merger_group)["pending"] == 0
    finally:
        merger.stop()


def test_a_writer_that_lost_its_lease_neither_checkpoints_nor_trims(tmp_path: Path) -> None:
    """A checkpoint never asked for the lease: a writer paused past it still checkpointed when it woke (a Milvus
    repair overwrote the new writer's rows) and trimmed the stream to its own position (review 22). On a real
    Redis, through the service's own checkpoint."""
    from index_service.service import Service

    with scratch_redis(tmp_path) as (url, _):
        settings = Settings(home=str(tmp_path), redis_url=url, namespace="lease", s3_endpoint="http://127.0.0.1:9")
        service = Service(settings, embedder=SimpleNamespace(model=MODEL, device="cpu"))  # type: ignore[arg-type]
        assert service.lease.acquire(force=True)
        service.index = service.new_generation(MODEL, 1)
        stream = entries(40)
        ids = [text(service.redis.xadd(service.keys.results, e.to_fields())) for e in stream]
        service.index.apply(stream)
        service.merger.last_id = ids[-1]
        service.redis.set(service.keys.writer_lease, "another replica")  # it took over while this one was paused
        assert service.snapshot() is False
        assert service.redis.xlen(service.keys.results) == 40 and service.backend.last is None
        service.redis.delete(service.keys.writer_lease)  # expired, nobody took it: this one holds it again
        assert service.snapshot() is True
        assert service.redis.xlen(service.keys.results) == 1 and service.backend.last["count"] == len(service.index)
        service.backend.close()


def test_a_replica_whose_lease_passed_while_it_waited_for_the_index_does_not_write(tmp_path: Path) -> None:
    """A replica took the lease as it started, then waited for a restarting Milvus past the lease, and took over
    on its stale flag: two writers, and the late one failed the other's running rebuild and dropped its collection
    (review 21). Through the service's own start-up, on a real Redis, the index server stood in for."""
    from index_service.service import Service

    with scratch_redis(tmp_path) as (url, _):
        settings = Settings(home=str(tmp_path), redis_url=url, namespace="late", s3_endpoint="http://127.0.0.1:9")
        service = Service(settings, embedder=SimpleNamespace(model=MODEL, device="cpu"))  # type: ignore[arg-type]
        service.backend.shared = True  # type: ignore[misc]  # as Milvus's

        def restore() -> tuple[Any, str]:  # the wait: meanwhile the lease expired and another replica took it
            service.redis.set(service.keys.writer_lease, "another replica")
            return service.new_generation(MODEL, 3), "0"

        recovered: list[bool] = []
        service._restore = restore  # type: ignore[method-assign]
        service.rebuilds.recover = lambda: recovered.append(True)  # type: ignore[method-assign]
        try:
            service._load()
            assert not service.writing.is_set() and recovered == []  # a reader: the other replica's rebuild is its own
            assert service.index.generation == 3 and service.redis.get(service.keys.writer_lease) == b"another replica"
        finally:
            service._stopping.set()
            service.backend.close()


def test_a_reader_whose_takeover_waited_past_the_lease_stays_a_reader(tmp_path: Path) -> None:
    """The same wait on a running replica: taking the lease after the writer died, it waited for a stalled Milvus
    past the lease, and took over although another replica had taken it meanwhile (review 21's re-check)."""
    from index_service.service import Service

    with scratch_redis(tmp_path) as (url, _):
        settings = Settings(home=str(tmp_path), redis_url=url, namespace="stall", s3_endpoint="http://127.0.0.1:9",
                            writer_lease_s=0.6)
        service = Service(settings, embedder=SimpleNamespace(model=MODEL, device="cpu"))  # type: ignore[arg-type]
        service.backend.shared = True  # type: ignore[misc]  # as Milvus's

        def load() -> tuple[Any, str]:  # stalled: meanwhile the lease expired and another replica took it
            service.redis.set(service.keys.writer_lease, "another replica")
            return service.new_generation(MODEL, 3), "0"

        recovered: list[bool] = []
        service.backend.load = load  # type: ignore[method-assign]
        service.rebuilds.recover = lambda: recovered.append(True)  # type: ignore[method-assign]
        role = threading.Thread(target=service._keep_role)
        role.start()
        try:
            wait_for(lambda: service.redis.get(service.keys.writer_lease) == b"another replica", 10,
                     what="the takeover tried")
            time.sleep(0.5)
            assert not service.writing.is_set() and recovered == [] and service.index.generation == 1
        finally:
            service._stopping.set()
            role.join()
            service.backend.close()
