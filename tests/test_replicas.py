"""Many index service replicas on one Milvus index, one writer (index_service/lease.py): a killed writer is replaced,
a paused one finds its lease gone and stops, and the index ends equal to an uninterrupted run.

The replicas are real processes (``bucketlens serve``) on the stack's Redis and the session's Milvus server; entries
go straight into the result stream (test_recovery.py's mix of uploads, re-uploads, deletes and late stale versions).
"""

from __future__ import annotations

import dataclasses
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from bucketlens.keys import Keys
from bucketlens.redis_client import connect
from bucketlens.settings import Settings
from index_service.backend import open_backend
from index_service.feature_store import FeatureStore
from index_service.merger import CLAIM_IDLE_MS, Merger, stream_order
from index_service.milvus_index import EVERYTHING
from index_service.vector_index import VectorIndex
from infra.stack import Stack, free_port

from .helpers import index_difference, wait_for
from .integrity import record_outcome
from .test_recovery import DIM, MODEL, IndexProcess, entries, own_settings

pytestmark = pytest.mark.slow
LEASE_S = 6.0


@pytest.fixture
def replicas(stack: Stack, milvus_uri: str) -> Iterator[tuple[Settings, list[IndexProcess]]]:
    settings = own_settings(stack, "rep", "milvus", milvus_uri, merge_batch=100, snapshot_every_entries=400,
                            writer_lease_s=LEASE_S)
    made: list[IndexProcess] = []
    yield settings, made
    for process in made:
        if process.process is not None and process.process.poll() is None:
            process.process.send_signal(signal.SIGCONT)
            process.stop(signal.SIGKILL)
    backend: Any = open_backend(settings, connect(settings.redis_url), Keys(settings.namespace),
                                lambda _: FeatureStore())
    client = backend.connection.client
    for name in client.list_collections():
        if name.startswith(f"{backend.alias}_g"):
            for alias in client.list_aliases(name)["aliases"]:
                client.drop_alias(alias)
            client.drop_collection(name)


def replica(settings: Settings, made: list[IndexProcess], name: str) -> IndexProcess:
    process = IndexProcess(dataclasses.replace(settings, api_port=free_port(), replica=name))
    made.append(process)
    process.start(ready=True)
    return process


def rows_per_key(index: Any) -> str:
    """What the collection holds, read at Strong consistency: rows, keys, and a few keys with more than one row."""
    oids = sorted({row["oid"] for row in index._scan(EVERYTHING, [])})
    doubled = list(index._doubled(oids))
    return f"now: {index._rows(EVERYTHING)} rows for {len(oids)} keys; keys with more than one row: {doubled[:5]}"


def repairs_logged(settings: Settings) -> list[str]:
    """The replicas' last log lines about repairs, leases, claims and checkpoints (they share one log file)."""
    log = Path(settings.home) / "logs" / f"recovery-{settings.namespace}.log"
    return [line for line in log.read_text(errors="replace").splitlines()
            if any(word in line for word in ("rows for", "lease", "claimed", "checkpoint", "ERROR"))][-20:]


def caught_up(settings: Settings, redis: Any, keys: Keys, who: str,
              also: Callable[[], bool] = lambda: True) -> None:
    """Wait until the writer has merged every entry in the stream (and ``also``); a timeout says what the replicas
    logged meanwhile."""
    try:
        wait_for(lambda: redis.xinfo_groups(keys.results)[0]["lag"] == 0 and also(), 120, what=f"{who} caught up")
    except AssertionError as exc:
        raise AssertionError("\n".join([str(exc), *repairs_logged(settings)])) from None


def writer(process: IndexProcess) -> bool:
    try:
        return bool(process.stats()["writer"])
    except httpx.HTTPError:
        return False


def test_a_batch_read_by_a_writer_that_lost_the_lease_is_claimed_by_the_next(stack: Stack) -> None:
    """A paused writer wakes, reads a batch, then finds its lease gone: nobody else would ever read those entries
    (they are delivered), so the current writer claims them once idle. (What made the SIGSTOP case below lose
    entries in 2 of 4 runs before the claim.)"""
    keys, redis = Keys(f"claim{uuid.uuid4().hex[:6]}"), connect(stack.settings.redis_url)
    stream = entries(20, seed=7)
    ids = [redis.xadd(keys.results, entry.to_fields()) for entry in stream]
    stale = Merger(redis, keys, apply=lambda batch: pytest.fail(f"applied {len(batch)} entries without the lease"),
                   batch=8, consumer="stale", may_write=lambda: False)
    stale._ensure_group()
    assert stale.step() == 0
    assert redis.xpending(keys.results, keys.merger_group)["pending"] == 8
    applied: list[Any] = []
    current = Merger(redis, keys, apply=applied.extend, batch=8, consumer="current")
    started = time.monotonic()
    wait_for(lambda: current.step() == 0 and len(applied) == len(stream), 30, interval_s=0.1, what="all applied")
    assert time.monotonic() - started >= CLAIM_IDLE_MS / 1000 - 0.5  # a batch in a live writer's hands is left alone
    assert sorted(e.key for e in applied) == sorted(e.key for e in stream)
    assert redis.xpending(keys.results, keys.merger_group)["pending"] == 0
    assert current.last_id == ids[-1].decode()
    redis.delete(keys.results)


def test_a_writer_that_lost_its_lease_never_moves_the_group_forward_and_trims_stop_at_its_batch(stack: Stack
                                                                                                ) -> None:
    """An old writer that finds its lease gone mid-batch rewinds the group to before its batch, for the current
    writer to apply it again. A FAISS writer replaying from an older snapshot may not have read that far: the
    "rewind" moved it forward, past entries it never read. And a checkpoint trimmed the stream to the current
    writer's position, past a batch another reader held unacknowledged: a delete in it was lost for good (an
    independent review)."""
    from types import SimpleNamespace

    from index_service.service import Service

    keys, redis = Keys(f"rewind{uuid.uuid4().hex[:6]}"), connect(stack.settings.redis_url)
    ids = [redis.xadd(keys.results, entry.to_fields()).decode() for entry in entries(30, seed=5)]
    current = Merger(redis, keys, apply=lambda batch: None, batch=8, consumer="current")
    current._ensure_group()
    current.step()  # the current writer has read 8
    old = Merger(redis, keys, apply=lambda batch: None, batch=8, consumer="old")
    holder = SimpleNamespace(redis=redis, keys=keys)
    assert Service._oldest_pending(holder) is None  # type: ignore[arg-type]
    redis.xreadgroup(keys.merger_group, "old", {keys.results: ">"}, count=4)  # the old writer's batch, held
    assert Service._oldest_pending(holder) == ids[8]  # type: ignore[arg-type]  # a trim stops there
    redis.xgroup_setid(keys.results, keys.merger_group, id=ids[7])  # the current writer behind the old one's batch
    old._yield_after_overlap(ids[20])
    assert redis.xinfo_groups(keys.results)[0]["last-delivered-id"].decode() == ids[7]  # not moved forward
    redis.xgroup_setid(keys.results, keys.merger_group, id=ids[25])  # the current writer past it: rewound
    old._yield_after_overlap(ids[20])
    rewound = stream_order(redis.xinfo_groups(keys.results)[0]["last-delivered-id"].decode())
    assert stream_order(ids[19]) <= rewound < stream_order(ids[20])  # just before the old writer's batch
    redis.delete(keys.results)


def test_a_restarted_writer_claiming_its_last_batch_keeps_its_position_behind_the_unread(stack: Stack) -> None:
    """A writer killed mid-batch leaves that batch delivered and unacknowledged; restarted from an older snapshot, it
    claims the batch before it reads the entries in between (XAUTOCLAIM comes first). Its position must not move past
    those: the next checkpoint trimmed the stream to it, and the entries between, not yet read, were lost (the
    SIGKILL test in test_recovery.py, 3 of 4 whole-suite runs: the restarted writer never reached the reference)."""
    keys, redis = Keys(f"restart{uuid.uuid4().hex[:6]}"), connect(stack.settings.redis_url)
    stream = entries(40, seed=3)
    ids = [redis.xadd(keys.results, entry.to_fields()).decode() for entry in stream]
    killed = Merger(redis, keys, apply=lambda batch: None, batch=8)
    killed._ensure_group()
    for _ in range(3):
        killed.step()  # 24 applied; the snapshot covers the first 8
    redis.xreadgroup(keys.merger_group, killed.consumer, {keys.results: ">"}, count=8)  # read, then killed
    time.sleep(CLAIM_IDLE_MS / 1000 + 0.1)
    applied: list[Any] = []
    restarted = Merger(redis, keys, apply=applied.extend, batch=8, start_id=ids[7])  # the same consumer name
    restarted._ensure_group()
    assert restarted.step() == 8 and [e.sequencer for e in applied] == [e.sequencer for e in stream[24:32]]
    assert restarted.last_id == ids[7]  # the claimed batch lies past 16 entries not yet read again
    while restarted.step():
        pass
    assert restarted.last_id == ids[-1]
    assert {e.sequencer for e in applied} == {e.sequencer for e in stream[8:]}
    redis.delete(keys.results)


@pytest.mark.parametrize("pause", [False, True], ids=["kill", "kill-then-pause"])
def test_one_writer_a_killed_one_is_replaced_a_paused_one_stops(replicas: tuple[Settings, list[IndexProcess]],
                                                                pause: bool) -> None:
    settings, made = replicas
    keys, redis = Keys(settings.namespace), connect(settings.redis_url)
    stream = entries(3000, seed=5)
    a = replica(settings, made, "a")
    b = replica(settings, made, "b")
    assert writer(a) and not writer(b)
    assert redis.get(keys.writer_lease).startswith(b"a/")  # type: ignore[union-attr]
    for process, writes in ((a, True), (b, False)):  # /stats, /queues and /metrics say which replica writes
        assert httpx.get(process.url + "/queues", timeout=30).json()["index"] == {
            "replica": process.settings.replica, "writer": writes, "writer_lease": "a"}
        assert f"bucketlens_index_writer {float(writes)}" in httpx.get(process.url + "/metrics", timeout=30).text

    for entry in stream[:1000]:
        redis.xadd(keys.results, entry.to_fields())
    wait_for(lambda: int(a.stats()["applied_entries"]) >= 300, 120, interval_s=0.05, what="a merging")
    a.stop(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: writer(b), 60, interval_s=0.2, what="b takes the lease")
    takeover_s = time.monotonic() - killed
    for entry in stream[1000:2000]:
        redis.xadd(keys.results, entry.to_fields())
    caught_up(settings, redis, keys, "b")
    # Queries go to every replica: b answers from what a merged and what it merged itself.
    hits = httpx.post(b.url + "/search", json={"vector": [1.0] * DIM, "k": 3}, timeout=30)
    assert hits.status_code == 200 and len(hits.json()["results"]) == 3, hits.text

    last = b
    if pause:
        c = replica(settings, made, "c")
        assert not writer(c)
        assert b.process is not None
        b.process.send_signal(signal.SIGSTOP)  # paused past its lease: c takes over
        wait_for(lambda: writer(c), 60, interval_s=0.2, what="c takes the lease")
        for entry in stream[2000:]:
            redis.xadd(keys.results, entry.to_fields())
        b.process.send_signal(signal.SIGCONT)
        wait_for(lambda: not writer(b), 60, interval_s=0.2, what="b notices it lost the lease")
        caught_up(settings, redis, keys, "c", also=lambda: writer(c))
        assert redis.get(keys.writer_lease).startswith(b"c/")  # type: ignore[union-attr]
        # b only reads now: it reports the server's count(*), as a reader just opened does, not the count of its own
        # writes, frozen (review 29). (Not c's exact count: rows a left doubled count until a checkpoint repairs them.)
        reader = open_backend(settings, redis, keys, lambda _: FeatureStore()).load()
        assert reader is not None
        wait_for(lambda: b.stats()["vectors"] == len(reader[0]), 30, interval_s=0.5, what="b counts c's writes")
        last = c
    else:
        for entry in stream[2000:]:
            redis.xadd(keys.results, entry.to_fields())
        caught_up(settings, redis, keys, "b")
    last.stop(signal.SIGTERM)  # its final checkpoint

    loaded = open_backend(settings, redis, keys, lambda _: FeatureStore()).load()
    assert loaded is not None
    reference = VectorIndex(MODEL, DIM)
    reference.apply(stream)
    # A reader counts rows with count(*), at Session consistency, which for a client that never wrote is eventual:
    # it may trail the writer's last checkpoint for a moment, not for long.
    deadline = time.monotonic() + 30
    while len(loaded[0]) != len(reference) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not index_difference(loaded[0], reference), "\n".join([
        index_difference(loaded[0], reference), rows_per_key(loaded[0]), *repairs_logged(settings)])
    name = f"milvus_replicas_{'pause' if pause else 'kill'}"
    record_outcome(name, {"entries": len(stream), "indexed": len(reference), "lease_s": LEASE_S,
                          "seconds_kill_to_new_writer": round(takeover_s, 1)})
