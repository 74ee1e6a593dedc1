"""Worker heartbeats against a real Redis: listed while beating, busy during a batch, gone when stopped or silent."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from bucketlens.keys import Keys
from bucketlens.redis_client import connect
from index_service.queues import live_workers
from infra.stack import Stack
from workers.heartbeat import Heartbeat

from .helpers import wait_for


def test_a_worker_is_listed_while_it_beats_shows_its_batch_and_leaves_when_stopped(stack: Stack) -> None:
    keys = Keys(f"h{uuid.uuid4().hex[:8]}")
    redis = connect(stack.settings.redis_url)
    heartbeat = Heartbeat(redis, keys, model="m", device="cpu")
    heartbeat.busy(3)
    assert live_workers(redis, keys) == []  # nothing is written before start (a pipeline outside a worker)
    heartbeat.start()
    try:
        (worker,) = live_workers(redis, keys)
        assert worker["id"] == heartbeat.id and worker["state"] == "busy" and worker["batch_size"] == 3
        heartbeat.idle()
        (worker,) = live_workers(redis, keys)
        assert worker["state"] == "idle" and worker["batches"] == 1 and worker["objects"] == 3
        assert worker["model"] == "m" and worker["device"] == "cpu" and worker["age_s"] < 5
        heartbeat.busy(4)  # a batch delivered again, sent on one object per task: those tasks count the objects
        heartbeat.handed_on()
        heartbeat.idle()
        (worker,) = live_workers(redis, keys)
        assert (worker["batches"], worker["objects"]) == (2, 3)
        heartbeat.busy(2)  # its batches' model is the index's, not its own setting's (review 28)
        heartbeat.embedding(["m-old", "m-new"])  # a model-switching rebuild
        heartbeat.idle()
        (worker,) = live_workers(redis, keys)
        assert worker["model"] == "m-old, m-new"
    finally:
        heartbeat.stop()
    assert live_workers(redis, keys) == [] and not redis.smembers(keys.workers)


def test_a_silent_worker_drops_out_when_its_heartbeat_expires_and_is_forgotten_later(stack: Stack) -> None:
    keys = Keys(f"h{uuid.uuid4().hex[:8]}")
    redis = connect(stack.settings.redis_url)
    # (200 ms once: three round trips, each write fsynced, could outlast it on a busy disk)
    redis.set(keys.worker("dead:1"), json.dumps({"id": "dead:1", "last_seen": time.time()}), px=3000)
    redis.sadd(keys.workers, "dead:1")
    assert [w["id"] for w in live_workers(redis, keys)] == ["dead:1"]
    wait_for(lambda: live_workers(redis, keys) == [], 10, interval_s=0.1, what="the heartbeat expired")
    heartbeat = Heartbeat(redis, keys)
    heartbeat.start()  # a starting worker prunes the ids of expired ones
    try:
        assert redis.smembers(keys.workers) == {heartbeat.id.encode()}
    finally:
        heartbeat.stop()


def test_a_worker_whose_limits_differ_from_a_live_ones_says_so(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """A worker started by hand kept its own MAX_OBJECT_BYTES: the same object was indexed or a failure by which
    worker took it, without a word (review 86)."""
    keys = Keys(f"h{uuid.uuid4().hex[:8]}")
    redis = connect(stack.settings.redis_url)
    limits = {"max_object_bytes": 300_000, "max_pixels": 2_000_000}
    redis.set(keys.worker("other:1"), json.dumps({"id": "other:1", "last_seen": time.time(), "limits": limits}),
              ex=60)
    redis.sadd(keys.workers, "other:1")
    same = Heartbeat(redis, keys, limits=limits)
    same.start()
    same.stop()
    assert "other limits" not in caplog.text
    other = Heartbeat(redis, keys, limits={**limits, "max_object_bytes": 50 * 2**20})
    other.start()
    try:
        assert ("by {'max_object_bytes': 52428800, 'max_pixels': 2000000}, and 1 live worker(s) by other limits "
                "(other:1: {'max_object_bytes': 300000, 'max_pixels': 2000000})") in caplog.text, caplog.text
        (mine,) = [w for w in live_workers(redis, keys) if w["id"] == other.id]
        assert mine["limits"]["max_object_bytes"] == 50 * 2**20  # (GET /queues shows each worker's)
    finally:
        other.stop()
        redis.delete(keys.worker("other:1"), keys.workers)
