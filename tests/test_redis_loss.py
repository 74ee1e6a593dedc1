"""What Redis losing its data does to publishing, against a real Redis (the healing itself runs on the real stack
in tests/test_faults.py): kombu's binding tables go with everything else, and bucketlens's publishes must not
depend on them. And a Redis that cannot start says why."""

from __future__ import annotations

import dataclasses
import socket
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bucketlens.keys import EMBED_TASK, Keys
from bucketlens.redis_client import connect
from bucketlens.schemas import ObjectRef
from bucketlens.settings import Settings
from index_service.queues import queue_report
from index_service.service import Service
from index_service.snapshots import SnapshotHealth
from index_service.vector_index import VectorIndex
from infra.stack import Stack, StackError
from ingest.publisher import Publisher


def test_publishes_after_a_wipe_reach_their_queues_without_the_binding_tables(stack: Stack) -> None:
    settings = dataclasses.replace(stack.settings, namespace=f"l{uuid.uuid4().hex[:8]}")
    redis = connect(settings.redis_url)
    publisher = Publisher(settings, redis)
    keys = publisher.keys
    publisher.send_embeds([ObjectRef("b", "k0", "e")])  # the connection declares its queues once, here
    assert redis.exists(keys.celery_prefix + f"_kombu.binding.{keys.live_queue}")
    for key in redis.scan_iter(match=f"{settings.namespace}:*"):  # Redis loses its data
        redis.delete(key)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # kombu warns (UndeliverableWarning) when it routes a message nowhere
        publisher.send_embeds([ObjectRef("b", "k1", "e")])  # ingest
        publisher.send_embeds([ObjectRef("b", "k2", "e")], queue=keys.rebuild_queue)  # reconcile, rebuild
        # A worker's retry: Celery republishes with the delivery info of the message it got (default exchange).
        publisher.celery.send_task(EMBED_TASK, args=[[ObjectRef("b", "k3", "e").to_json()]], exchange="",
                                   routing_key=keys.live_queue)
    depths = {name: queue["depth"] for name, queue in queue_report(redis, keys)["queues"].items()}
    assert depths == {keys.live_queue: 2, keys.rebuild_queue: 1}
    publisher.close()
    for key in redis.scan_iter(match=f"{settings.namespace}:*"):
        redis.delete(key)


def test_a_redis_that_cannot_start_says_why(tmp_path: Path) -> None:
    """Its port taken: Redis exits at once, is started once more, and the error quotes its log and says the free
    space of its folder (a full disk makes it exit at once too: review 49)."""
    stack = Stack(Settings(home=tmp_path, namespace="t", ingest_port=0, api_port=0))
    for folder in ("run", "logs", "redis"):  # as ``Stack.up`` makes them
        (tmp_path / folder).mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", stack.config.redis_port))
        taken.listen()
        with pytest.raises(StackError, match=f"port {stack.config.redis_port}: .*Address already in use.*MB free in"):
            stack.start_redis(timeout_s=3)
    assert (tmp_path / "logs" / "redis.log").read_text().count("Address already in use") == 2


def test_a_checkpoint_whose_position_is_in_no_stream_trims_nothing() -> None:
    """A checkpoint takes its stream position as it begins and trims the stream to it as it ends. If Redis lost its
    data in between (a failover to an empty replica), the stream is a new one whose ids need not sort after that
    position (another server's clock), and the trim dropped new entries not yet read (an independent review). The
    checkpoint now trims only a stream that still holds the entry at its position. (Pure logic: a stand-in Redis.)"""
    trims: list[str] = []
    held: list[Any] = []  # what XRANGE finds at the position: nothing, in a new stream

    class Redis:
        def xrange(self, name: str, min: str, max: str) -> list[Any]:
            return held

        def xtrim(self, name: str, minid: str, approximate: bool) -> None:
            trims.append(minid)

        def xrevrange(self, name: str, max: str, min: str, count: int) -> list[Any]:
            assert (max, min, count) == ("(1796313507409-7", "-", 1)
            return [(b"1796313507409-5", {})]  # the entry before the one held unacknowledged

    service: Any = SimpleNamespace(
        merger=SimpleNamespace(last_id="1796313507409-48", applied=1), index=VectorIndex("m", 8),
        backend=SimpleNamespace(checkpoint=lambda index, last_id: None), snapshot_health=SnapshotHealth(60, 60),
        settings=SimpleNamespace(tombstone_retention_s=86_400), _since_snapshot=(0, 0.0, 0.0),
        _trim_floor=("0", -1e9), shadow=None, redis=Redis(), keys=Keys("t"), _oldest_pending=lambda: None,
        lease=SimpleNamespace(acquire=lambda: True), retiring=[])
    assert Service._checkpoint(service)
    assert trims == []
    held.append((b"1796313507409-48", {}))  # the stream the position came from
    assert Service._checkpoint(service)
    assert trims == ["1796313507409-48"]
    # During a reembed too (the stream was kept whole: a 1 GB Redis filled at ~40k objects), but never past a batch
    # another reader holds unacknowledged (a previous writer's: trimmed, a delete in it was lost for good).
    service.shadow = VectorIndex("m", 8, generation=2)
    assert Service._checkpoint(service) and trims == ["1796313507409-48"] * 2
    service._oldest_pending = lambda: "1796313507409-7"
    # ... and positioned before it, at an entry the stream holds: a restore reads it again (review 18)
    positions: list[str] = []
    service.backend = SimpleNamespace(checkpoint=lambda index, last_id: positions.append(last_id))
    assert Service._checkpoint(service) and trims[-1] == "1796313507409-5" and positions == ["1796313507409-5"]
