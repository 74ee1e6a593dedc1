"""The supervisor's restart policy, as pure logic: a stand-in stack whose service dies whenever the test says so.
(Restarting real servers and services is tests/test_faults.py's.)"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis
from botocore.exceptions import ClientError

from bucketlens.settings import Settings
from infra import canary as canary_module
from infra import liveness as liveness_module
from infra import supervisor as supervisor_module
from infra.canary import RESTART_GRACE_S
from infra.liveness import Liveness, Watch, ceph_daemon, serves
from infra.procfs import live_pid, pid_record, terminate
from infra.stack import Stack, StackError
from infra.supervisor import MAX_BACKOFF_S, SERVERS, STABLE_S, WELL_S, Supervisor

from .helpers import wait_for


class Services:
    """A stack of one service, ``worker``, that is up or down as the test sets ``up``; counts its starts."""

    def __init__(self, home: Path) -> None:
        self.settings = Settings(canary_interval_s=30)
        self.home = home
        self.services = ["supervisor", "worker"]
        self.up = True
        self.starts = 0
        self.writes = True  # whether a start writes to the service's log
        (home / "logs").mkdir()
        (home / "logs" / "worker.log").write_text("an earlier process's last line\n")

    def pid(self, name: str) -> int | None:
        return 1234 if self.up else None

    def start_service(self, name: str) -> None:
        self.starts += 1
        self.up = True
        if self.writes:
            with (self.home / "logs" / "worker.log").open("a") as log:
                log.write("loading\nbucketlens worker: BUCKETLENS_DEVICE='cuda': no CUDA\n")


def starts_over(supervisor: Supervisor, stack: Services, seconds: float, dies: bool) -> list[float]:
    """Tick every canary interval for ``seconds``; a service that ``dies`` is down again by each next tick.
    Returns the times of the restarts."""
    times = []
    for tick in range(int(seconds // 30)):
        now = tick * 30.0
        if dies:
            stack.up = False
        before = stack.starts
        supervisor.keep_up("worker", now)
        if stack.starts > before:
            times.append(now)
    return times


@pytest.fixture
def stack(tmp_path: Path) -> Services:
    return Services(tmp_path)


def test_a_service_that_keeps_dying_is_restarted_less_and_less_often(stack: Services,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor(stack)  # type: ignore[arg-type]  # the stand-in has what the policy uses
    times = starts_over(supervisor, stack, 3600, dies=True)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[:5] == [30, 60, 120, 240, 480], gaps  # the first restart at once, then twice the wait each time
    assert max(gaps) <= MAX_BACKOFF_S + 30 and len(times) < 12, times  # every tick would have been 120
    assert "what it wrote to" in caplog.text and "no CUDA" in caplog.text  # says why, from the service's own log
    caplog.clear()
    stack.writes = False  # a process that dies before it writes a word: nothing of an earlier one is quoted for it
    starts_over(Supervisor(stack), stack, 120, dies=True)  # type: ignore[arg-type]
    assert "ends (nothing)" in caplog.text and "no CUDA" not in caplog.text, caplog.text


def test_a_service_well_again_is_restarted_at_once_next_time(stack: Services) -> None:
    supervisor = Supervisor(stack)  # type: ignore[arg-type]
    last = starts_over(supervisor, stack, 600, dies=True)[-1]  # backing off by now
    supervisor.keep_up("worker", last + 30)  # up this time
    stack.up = False
    supervisor.keep_up("worker", last + 60)
    assert stack.starts == 5, "a service that died within STABLE_S of its restart was restarted at once"
    stack.start_service("worker")  # by hand, say; the supervisor sees it running STABLE_S after its restart
    supervisor.keep_up("worker", last + STABLE_S)
    stack.up = False
    supervisor.keep_up("worker", last + STABLE_S + 30)
    assert stack.starts == 7


def test_a_service_that_ran_well_since_its_restart_is_restarted_at_once_when_it_dies(stack: Services) -> None:
    """Killed from outside three times within two minutes, the worker waited two minutes more for its restart: a
    kill of a process that ran well was taken for a crash loop of its start (review 83). A crash loop is a start that
    dies before it answers its liveness question WELL_S after its start: a worker whose model fails to load answers
    first (its main process beats before the pool loads the model), and was restarted without end (review 88): a
    worker runs well once a pool process beats too."""
    supervisor = Supervisor(stack)  # type: ignore[arg-type]
    last = starts_over(supervisor, stack, 600, dies=True)[-1]  # backing off by now: it never answered
    starts, stack.up = stack.starts, False
    supervisor.keep_up("worker", last + 30)
    assert stack.starts == starts, "backing off"
    supervisor.liveness.answered["worker"] = last - 1  # an answer asked before its last restart is the last process's
    supervisor.keep_up("worker", last + 31)
    assert stack.starts == starts, "backing off"
    supervisor.liveness.answered["worker"] = last + 5  # it beat, then died loading its model: a crash loop still
    supervisor.keep_up("worker", last + 32)
    assert stack.starts == starts, "a start that answered once and died was not backed off"
    # Its main process beat 30 s on, while a model loaded that then failed: no pool process beat (review 89)
    supervisor.liveness.answered["worker"] = last + WELL_S + 1
    supervisor.keep_up("worker", last + WELL_S + 2)
    assert stack.starts == starts, "a worker whose pool never beat was not backed off"
    supervisor.liveness.answered["worker-pool"] = last + WELL_S + 1  # its pool beat too: it ran well, then was killed
    supervisor.keep_up("worker", last + WELL_S + 3)
    assert stack.starts == starts + 1, "a death after it ran well waited for the back-off"
    restarted = last + WELL_S + 3
    stack.up = False  # and again: no crash loop either
    supervisor.liveness.answered.update(dict.fromkeys(("worker", "worker-pool"), restarted + WELL_S + 5))
    supervisor.keep_up("worker", restarted + WELL_S + 9)
    assert stack.starts == starts + 2


def test_an_s3_server_runs_well_only_when_each_of_its_daemons_answers(tmp_path: Path) -> None:
    """An OSD that dies at each start (its disk full) beside a radosgw that answers was taken for a server that ran
    well, and restarted every time, each with a reconcile (review 88)."""
    supervisor = Supervisor(SimpleNamespace(settings=Settings(canary_interval_s=30), home=tmp_path,  # type: ignore
                                            services=["supervisor"]))
    supervisor.restarts["s3"] = supervisor_module.Restarts(at=100.0, quick=2)
    supervisor.liveness.answered.update({"radosgw": 200.0, "ceph-mon": 200.0})
    supervisor._down = lambda name: "the S3 server (ceph-osd)"  # type: ignore[method-assign]
    assert supervisor.keep_up("s3", 201.0) is False, "restarted at once: radosgw answered, the OSD never did"
    supervisor.liveness.answered["ceph-osd"] = 150.0
    started: list[str] = []
    supervisor.stack.start_ceph = lambda: started.append("ceph")
    supervisor.restarted_radosgw = lambda: None  # type: ignore[method-assign]
    assert supervisor.keep_up("s3", 202.0) is True and started == ["ceph"]
    assert supervisor.restarts["s3"].quick == 0, "it ran well: no back-off"


def test_a_stopped_process_is_continued_to_take_its_terminate_signal(tmp_path: Path) -> None:
    """A `down` of a stack whose processes were frozen (SIGSTOP) waited 30 s for each, then killed it (review 83)."""
    took = tmp_path / "took"
    code = ("import pathlib, signal, sys, time\n"
            f"signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path({str(took)!r}).touch(), sys.exit(0)))\n"
            "pathlib.Path(sys.argv[1]).touch()\ntime.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "ready")], start_new_session=True)
    try:
        wait_for(lambda: (tmp_path / "ready").exists(), 30)
        os.kill(process.pid, signal.SIGSTOP)
        terminate(process.pid, signal.SIGTERM, 30, group=True)
        assert took.exists(), "it was killed after the wait, its SIGTERM never taken"
    finally:
        process.kill()
        with contextlib.suppress(ChildProcessError):
            process.wait()


class HeldCanaries:
    """A Redis where no canary's event arrives, and an S3 server that takes canaries and says which it deleted."""

    def __init__(self) -> None:
        self.fields: dict[bytes, bytes] = {}
        self.deleted: list[str] = []

    def hset(self, key: str, field: str | None = None, value: Any = None,
             mapping: dict[str, Any] | None = None) -> None:
        self.fields.update({k.encode(): str(v).encode() for k, v in (mapping or {field: value}).items()})

    def hget(self, key: str, field: str) -> bytes | None:
        return self.fields.get(field.encode())

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        return self.fields

    def get(self, key: str) -> None:
        return None

    def put_object(self, **kwargs: Any) -> None:
        pass

    def delete_object(self, Bucket: str, Key: str) -> None:  # noqa: N803  (boto3's names)
        self.deleted.append(Key)


def test_a_long_wait_for_a_canary_is_said_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """`up` waited up to 90 s for its test upload's notification without a word (review 83)."""
    monkeypatch.setattr(canary_module, "SAY_WAITING_S", 0.3)
    said: list[float] = []
    held = HeldCanaries()
    canary = canary_module.Canary(Settings(), held, held)  # type: ignore[arg-type]
    with pytest.raises(TimeoutError, match="no notification for the canary within 1 s"):
        canary.wait(1.0, waiting=said.append)
    assert len(said) == 1 and 0.3 <= said[0] < 1.0, said


def test_a_canary_never_delivered_is_removed_when_the_next_is_written() -> None:
    """A canary not delivered, or not checked since (a `down`), stayed in the bucket: 4 after 5 restarts (review
    86), each indexed as a failure once RESERVED_PREFIX changed."""
    held = HeldCanaries()
    canary = canary_module.Canary(Settings(), held, held)  # type: ignore[arg-type]
    first = canary.write()
    assert held.deleted == []
    second = canary.write()
    assert held.deleted == [first] and second != first


def test_liveness_notes_when_a_process_last_answered() -> None:
    liveness, clock = Liveness(60), iter([10.0, 20.0, 30.0])
    liveness.probe({"worker": (1, lambda pid: True, False)}, lambda: next(clock))
    liveness.probe({"worker": (1, lambda pid: False, False)}, lambda: next(clock))
    liveness.probe({"worker": (2, lambda pid: None, False)}, lambda: next(clock))
    assert liveness.answered_since("worker", 9.0) and not liveness.answered_since("worker", 10.0)
    assert not liveness.answered_since("ingest", 0.0)


def test_a_death_after_a_redis_restart_is_not_held_against_the_service(stack: Services) -> None:
    """A worker dies of a Redis restart (kombu 5.7.0's crash on a reconnect): counted as dying of itself, two Redis
    restarts left the stack without workers for minutes (an independent check)."""
    supervisor = Supervisor(stack)  # type: ignore[arg-type]
    last = starts_over(supervisor, stack, 600, dies=True)[-1]  # backing off by now
    starts, stack.up = stack.starts, False
    supervisor.keep_up("worker", last + 30)
    assert stack.starts == starts, "backing off"
    supervisor.redis_restarted = last + 40
    supervisor.keep_up("worker", last + 45)
    assert stack.starts == starts + 1, "a death after a Redis restart waited for the back-off"


def test_a_redis_that_dies_at_each_start_is_restarted_less_and_less_often_and_the_log_says_why(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its disk full, Redis exits at its first write (`appendfsync always`): it was restarted every second, each time
    with a line saying only that its append-only file brings back what it held (review 49)."""
    redis_starts: list[float] = []

    class DyingRedis(Services):
        def redis_pid(self) -> int | None:
            return None  # (dead again by each tick)

        def start_redis(self) -> None:
            redis_starts.append(now)
            with (self.home / "logs" / "redis.log").open("a") as log:
                log.write("# Short write while writing to the AOF file (No space left on device)\n"
                          "# Can't recover from AOF write error when the AOF fsync policy is 'always'. Exiting...\n")

    dying = DyingRedis(tmp_path)
    (tmp_path / "redis").mkdir()
    supervisor = Supervisor(dying)  # type: ignore[arg-type]
    for tick in range(120):  # every 5 s (WATCH_S) for 10 minutes
        now = tick * 5.0
        assert supervisor.keep_up("redis", now) == (now in redis_starts)
    assert redis_starts == [0.0, 5.0, 65.0, 185.0, 425.0], redis_starts  # (every tick, 120, before)
    assert "No space left on device" in caplog.text and "MB free in" in caplog.text, caplog.text


def test_a_running_service_is_left_alone(stack: Services) -> None:
    supervisor = Supervisor(stack)  # type: ignore[arg-type]
    assert starts_over(supervisor, stack, 600, dies=False) == [] and stack.starts == 0


# -- the delivery check ---------------------------------------------------------------------------------------

class Canary:
    """Stands in for infra/canary.py: the outstanding canary and its age, as the test sets them."""

    def __init__(self) -> None:
        self.pending: str | None = None  # the last one was delivered
        self.age = 0.0
        self.written = 0
        self.after_restart = False

    def check(self) -> tuple[str | None, float]:
        return self.pending, self.age

    def write(self, after_restart: bool = False) -> None:
        self.pending, self.age = f"canary-{self.written}", 0.0
        self.written += 1
        self.after_restart = after_restart


class Servers(Services):
    """The stand-in stack with an S3 server that is up or down, and an API address nobody answers on."""

    servers = ()
    api_url = "http://127.0.0.1:9"
    api_urls = [api_url]
    writer_url, reconcile = Stack.writer_url, Stack.reconcile

    def __init__(self, home: Path) -> None:
        super().__init__(home)
        self.s3 = True
        self.s3_starts = 0
        self.osd_kills = 0
        self.osd_hung: int | None = None
        self.notification: bool | None = True  # whether the bucket notifies ingest (None: S3 does not say)
        self.notified_again = 0

    def notified(self, timeout_s: float) -> bool:
        if self.notification is None:  # S3 does not say
            raise httpx.ConnectError("refused")
        return self.notification

    def notify(self) -> None:
        self.notification, self.notified_again = True, self.notified_again + 1

    def hung_osd(self) -> int | None:
        return self.osd_hung

    def kill_ceph(self, daemon: str, pid: int) -> None:
        assert (daemon, pid) == ("osd.0", self.osd_hung)
        self.osd_kills += 1
        self.s3 = False

    def redis_pid(self) -> int:
        return 1

    def ceph_missing(self) -> list[str]:
        return [] if self.s3 else ["radosgw on port 9"]

    def ceph_dead(self) -> list[str]:
        return [] if self.s3 else ["client.rgw.a"]

    def start_ceph(self) -> None:
        self.s3, self.s3_starts = True, self.s3_starts + 1

    def stop_s3(self) -> None:
        self.s3 = False

    start_s3 = start_ceph


class Counters:
    def hincrby(self, *args: object) -> None:
        pass


def supervised(home: Path) -> tuple[Supervisor, Servers, Canary]:
    stack = Servers(home)
    supervisor = Supervisor(stack)  # type: ignore[arg-type]
    supervisor.canary, supervisor.redis = Canary(), Counters()  # type: ignore[assignment]
    return supervisor, stack, supervisor.canary  # type: ignore[return-value]


@pytest.mark.parametrize("name, log_file, said", [
    ("s3", "ceph-script.log", "the S3 server (ceph-osd) died again"),
    ("milvus", "milvus.log", "milvus died again"),
])
def test_a_server_that_dies_at_each_start_is_restarted_less_and_less_often_and_the_log_says_why(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, log_file: str, said: str) -> None:
    """Its disk full, the Ceph OSD died at each start: it was started every second, each time with a line that said
    only that it was not running; the cause was in ceph-script.log alone (review 60). Milvus had a branch of its own
    in the process watch, with no back-off, log tail or free space (review 63)."""
    supervisor, stack, _ = supervised(tmp_path)
    starts: list[float] = []

    def start() -> None:
        starts.append(now)
        with (stack.home / "logs" / log_file).open("a") as log:
            log.write("write_meta: (28) No space left on device\n")

    down: list[str] = ["ceph-osd"]  # (dead again by each tick)
    stack.ceph_missing = lambda: down  # type: ignore[method-assign]
    stack.milvus_pid = lambda: None if down else 1  # type: ignore[method-assign]
    stack.start_ceph = stack.start_milvus = start  # type: ignore[method-assign]
    (tmp_path / SERVERS[name]).mkdir()
    for tick in range(120):  # every 5 s (WATCH_S) for 10 minutes
        now = tick * 5.0
        assert supervisor.keep_up(name, now) == (now in starts)
    assert starts == [0.0, 5.0, 65.0, 185.0, 425.0], starts  # (every tick, 120, before)
    assert said in caplog.text, caplog.text
    assert "No space left on device" in caplog.text and "MB free in" in caplog.text, caplog.text
    down.clear()
    assert supervisor.keep_up(name, 600.0) is False


def test_a_server_whose_start_fails_does_not_hold_back_the_services(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A Milvus that died as it started ended the process watch's round: a dead worker (or ingest) after it in the
    round was not restarted until a round without a Milvus start (review 64)."""
    supervisor, stack, _ = supervised(tmp_path)

    def start_milvus() -> None:
        raise StackError("Milvus did not start: it exited with code 1")

    stack.servers = ("milvus",)  # type: ignore[assignment]
    stack.milvus_pid = lambda: None  # type: ignore[attr-defined]
    stack.start_milvus = start_milvus  # type: ignore[attr-defined]
    stack.up = False  # the worker died too
    supervisor.keep_processes_up()
    assert stack.starts == 1, "the worker was not restarted"
    assert "supervisor restart of milvus failed (StackError: Milvus did not start" in caplog.text, caplog.text


def test_a_dead_s3_server_is_started_again_and_then_reconciled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """An S3 server that dies as it stores uploads may never tell of them: after a kill of the whole stack three
    stored uploads stayed out of the index, every status green, until a reconcile by hand (review 83)."""
    posts: list[str] = []
    monkeypatch.setattr(httpx, "post", lambda url, **k: posts.append(url) or httpx.Response(200, json={}))
    supervisor, stack, _ = supervised(tmp_path)
    stack.s3 = False  # killed
    supervisor.keep_processes_up()
    assert stack.s3_starts == 1 and supervisor.reconcile_owed and "then reconciling" in caplog.text
    supervisor.check_delivery()
    assert supervisor.reconciler is not None
    supervisor.reconciler.join()
    assert posts == ["http://127.0.0.1:9/reconcile"] and not supervisor.reconcile_owed


def test_a_reconcile_owed_while_one_runs_is_still_owed_when_that_one_ends(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A reconcile that was listing the bucket when radosgw died again cleared the reconcile owed for that death
    (review 85); and one owed for an S3 restart that raised was lost, the next round finding S3 running."""
    supervisor, stack, _ = supervised(tmp_path)

    def dies_again(url: str, **kwargs: object) -> httpx.Response:
        supervisor.owe_reconcile()  # S3 died and was started again meanwhile
        return httpx.Response(200, json={})

    monkeypatch.setattr(httpx, "post", dies_again)
    supervisor.owe_reconcile()
    supervisor.reconcile()
    assert supervisor.reconcile_owed
    monkeypatch.setattr(httpx, "post", lambda url, **kwargs: httpx.Response(200, json={}))
    supervisor.reconcile()
    assert not supervisor.reconcile_owed

    def fails() -> None:
        raise StackError("radosgw did not take its port within 15 s")

    stack.s3, stack.start_ceph = False, fails  # type: ignore[method-assign]
    supervisor.keep_processes_up()
    assert supervisor.reconcile_owed


def test_a_restarted_radosgw_gets_its_grace_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The canary delivered before radosgw died ended the grace of its restart at the next check, and the check
    after restarted it again while it resumed (S3 refused connections twice for one death)."""
    monkeypatch.setattr(httpx, "post", lambda *a, **k: httpx.Response(200, json={}))
    supervisor, stack, canary = supervised(tmp_path)
    timeout = supervisor.settings.canary_timeout_s
    stack.s3 = False  # killed; the last canary was delivered before
    supervisor.keep_processes_up()
    assert stack.s3_starts == 1 and canary.after_restart  # `bucketlens queues` says it at once
    canary.age = timeout + RESTART_GRACE_S - 1  # still resuming its persistent queues
    supervisor.check_delivery()
    assert stack.s3_starts == 1, "restarted again within the grace"
    canary.age = timeout + RESTART_GRACE_S + 1  # never resumed: healed
    supervisor.check_delivery()
    assert stack.s3_starts == 2


def test_a_removed_notification_or_bucket_is_made_again_not_taken_for_a_stalled_radosgw(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone removed the bucket's notification, or the bucket: the stall was healed by restarting radosgw, again
    and again with growing waits (up to 10 minutes), uploads indexed only at the reconciles after; a removed bucket
    failed every delivery check (review 60). Both are made again, as `up` makes them, and reconciled."""
    reconciles: list[str] = []
    monkeypatch.setattr(httpx, "post", lambda url, *a, **k: reconciles.append(url) or httpx.Response(200, json={}))
    supervisor, stack, canary = supervised(tmp_path)
    supervisor.check_delivery()
    stack.notification, canary.age = False, supervisor.settings.canary_timeout_s + 1
    supervisor.check_delivery()
    assert (stack.notified_again, stack.s3_starts, supervisor.stalls) == (1, 0, 0)
    assert canary.after_restart and supervisor.grace > 0  # its own canary, with the grace a new topic needs
    wait_for(lambda: reconciles, 5, what="the reconcile")

    write = canary.write

    def gone(after_restart: bool = False) -> None:  # until the bucket is made again
        if stack.notified_again < 2:
            raise ClientError({"Error": {"Code": "NoSuchBucket", "Message": "The specified bucket does not exist"}},
                              "PutObject")
        write(after_restart)

    canary.pending, canary.write = None, gone  # type: ignore[method-assign]
    supervisor.check_delivery()  # (the fresh canary after a delivery fails: no bucket)
    assert stack.notified_again == 2
    canary.write = write  # type: ignore[method-assign]
    stack.notification, canary.pending, canary.age = None, "late", 10_000.0  # S3 does not answer the question
    supervisor.check_delivery()
    assert (stack.notified_again, stack.s3_starts) == (2, 1), "no answer: healed as a stall"


def test_a_canary_from_before_the_supervisor_started_restarts_nothing(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The canary a stopped supervisor left outstanding restarted the radosgw just started with the new supervisor
    (`bucketlens up`, a fault test's restore) at its first check, while that radosgw resumed its queues."""
    monkeypatch.setattr(httpx, "post", lambda *a, **k: httpx.Response(200, json={}))
    supervisor, stack, canary = supervised(tmp_path)
    canary.pending, canary.age = "left-by-the-last-supervisor", 3600.0
    supervisor.check_delivery()
    assert stack.s3_starts == 0 and canary.pending == "canary-0", "restarted radosgw for a canary not its own"
    canary.age = supervisor.settings.canary_timeout_s + RESTART_GRACE_S - 1  # resuming
    supervisor.check_delivery()
    assert stack.s3_starts == 0
    canary.age = supervisor.settings.canary_timeout_s + RESTART_GRACE_S + 1  # its own, never delivered: healed
    supervisor.check_delivery()
    assert stack.s3_starts == 1


def test_a_stall_the_process_watch_is_restarting_radosgw_for_is_not_healed(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A canary written as radosgw died stays undelivered while the process watch starts it again (20-30 s on a
    busy host). The delivery check found it overdue meanwhile, waited for the process watch's lock, then counted a
    stall and restarted the radosgw just started (a flake review: S3 refused connections twice for one death)."""
    monkeypatch.setattr(httpx, "post", lambda *a, **k: httpx.Response(200, json={}))
    supervisor, stack, canary = supervised(tmp_path)
    supervisor.check_delivery()
    overdue = supervisor.settings.canary_timeout_s + 1
    stack.s3, canary.age = False, overdue  # dead, and its canary overdue before the process watch came round
    supervisor.check_delivery()
    assert (stack.s3_starts, supervisor.stalls) == (0, 0), "a dead radosgw is the process watch's to start"
    asked, check = threading.Event(), canary.check

    def checked() -> tuple[str | None, float]:
        answer = check()
        asked.set()
        return answer

    canary.check = checked  # type: ignore[method-assign]
    with supervisor.acting:  # the process watch, starting it
        checking = threading.Thread(target=supervisor.check_delivery)
        checking.start()
        assert asked.wait(5)  # found overdue: on to heal, which waits for the lock
        stack.start_ceph()
        supervisor.restarted_radosgw()  # as keep_processes_up does: a canary of its own, with the grace
    checking.join(5)
    assert not checking.is_alive()
    assert (stack.s3_starts, supervisor.stalls) == (1, 0), "healed a stall the restart had already ended"
    canary.age = overdue + supervisor.grace  # that canary never delivered: healed
    supervisor.check_delivery()
    assert (stack.s3_starts, supervisor.stalls) == (2, 1)


def test_a_failed_heal_waits_for_the_grace_before_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart that raised left the grace unset: the next check (seconds later) healed again, and again,
    leaving radosgw no time to start."""
    monkeypatch.setattr(httpx, "post", lambda *a, **k: httpx.Response(200, json={}))
    supervisor, stack, canary = supervised(tmp_path)
    supervisor.check_delivery()

    def refused() -> None:
        stack.s3_starts += 1
        raise RuntimeError("radosgw does not hold its port")

    stack.start_s3 = refused  # type: ignore[method-assign]
    canary.age = supervisor.settings.canary_timeout_s + 1
    with pytest.raises(RuntimeError):
        supervisor.check_delivery()
    stack.s3 = True  # (its process runs again, and delivery still stalls: a heal's case, but for the grace)
    canary.age = supervisor.settings.canary_timeout_s + 1  # the next check, a few seconds on
    supervisor.check_delivery()
    assert stack.s3_starts == 1, "healed again within the grace"


def test_heals_in_a_row_without_a_delivery_wait_longer_each_time(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A radosgw that needs longer than the grace to resume its queues (another's lock on them lasts until it
    expires) was restarted before it could, again and again: each heal in a row doubles the grace."""
    monkeypatch.setattr(httpx, "post", lambda *a, **k: httpx.Response(200, json={}))
    supervisor, stack, canary = supervised(tmp_path)
    supervisor.check_delivery()
    timeout = supervisor.settings.canary_timeout_s
    waits = []
    for _ in range(6):
        canary.age = timeout + supervisor.grace + 1
        supervisor.check_delivery()
        supervisor.reconciler.join()  # type: ignore[union-attr]
        waits.append(supervisor.grace)
    assert stack.s3_starts == 6 and waits == [RESTART_GRACE_S * 2 ** n for n in range(4)] + [MAX_BACKOFF_S] * 2
    canary.age = timeout + waits[-1] - 1  # within the last grace: no restart
    supervisor.check_delivery()
    assert stack.s3_starts == 6
    canary.pending = None  # delivered at last: the next stall's restart gets the first grace again
    supervisor.check_delivery()
    canary.age = timeout + 1
    supervisor.check_delivery()
    assert stack.s3_starts == 7 and supervisor.grace == RESTART_GRACE_S


def test_a_heal_restarts_an_ingest_that_does_not_answer_as_well_as_radosgw(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An ingest alive but not answering (frozen, hung) has a pid, so the process watch left it alone, and each heal
    restarted radosgw only: its log blamed radosgw (review 20), and a hung one was never healed."""
    monkeypatch.setattr(httpx, "post", lambda *a, **k: httpx.Response(200, json={}))
    supervisor, stack, canary = supervised(tmp_path)
    stack.services = ["ingest", "worker", "supervisor"]
    restarts: list[str] = []
    stack.stop_service = lambda name, kill=False: restarts.append(f"stop {name} kill={kill}")  # type: ignore[attr-defined]
    stack.start_service = lambda name: restarts.append(f"start {name}")  # type: ignore[method-assign]
    answering = {"http://127.0.0.1:9/healthz": True}
    stack.answers = lambda url, timeout_s=5.0: answering[url]  # type: ignore[attr-defined]
    stack.ingest_url = "http://127.0.0.1:9"  # type: ignore[attr-defined]
    supervisor.check_delivery()
    canary.age = supervisor.settings.canary_timeout_s + 1
    supervisor.check_delivery()  # ingest answers: radosgw alone
    assert stack.s3_starts == 1 and restarts == []
    supervisor.reconciler.join()  # type: ignore[union-attr]
    answering["http://127.0.0.1:9/healthz"] = False
    canary.age = supervisor.settings.canary_timeout_s + supervisor.grace + 1
    supervisor.check_delivery()
    assert restarts == ["stop ingest kill=True", "start ingest"] and stack.s3_starts == 2


def test_a_heal_restarts_an_osd_that_holds_an_op_stuck_not_radosgw(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Delivery stalled behind a frozen or wedged OSD: the heal restarted radosgw, which broke the uploads the OSD
    held, and whose start-up then waited on the OSD for good (review 24). It restarts the OSD instead."""
    posts: list[str] = []
    monkeypatch.setattr(httpx, "post", lambda url, **k: posts.append(url) or httpx.Response(200, json={}))
    supervisor, stack, canary = supervised(tmp_path)
    stack.stop_s3 = lambda: pytest.fail("radosgw restarted")  # type: ignore[method-assign]
    stack.osd_hung = 77
    supervisor.check_delivery()
    canary.age = supervisor.settings.canary_timeout_s + 1
    supervisor.check_delivery()
    supervisor.reconciler.join()  # type: ignore[union-attr]
    assert stack.osd_kills == 1 and stack.s3_starts == 1 and supervisor.grace == RESTART_GRACE_S
    assert posts == ["http://127.0.0.1:9/reconcile"]  # what the stall missed


def test_a_heal_whose_reconcile_fails_reconciles_at_the_next_check(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    supervisor, stack, canary = supervised(tmp_path)
    supervisor.check_delivery()  # its canary, written
    canary.age = supervisor.settings.canary_timeout_s + 1
    supervisor.check_delivery()  # the index service is away (nobody answers on its address)
    assert supervisor.reconciler is not None
    supervisor.reconciler.join()  # (in a thread: processes are watched meanwhile)
    assert stack.s3_starts == 1 and supervisor.reconcile_owed
    canary.pending = None  # the canary written after the restart arrives: no more heals
    posts: list[str] = []
    monkeypatch.setattr(httpx, "post", lambda url, **k: posts.append(url) or httpx.Response(200, json={}))
    supervisor.check_delivery()
    supervisor.reconciler.join()
    assert posts == ["http://127.0.0.1:9/reconcile"] and stack.s3_starts == 1
    supervisor.check_delivery()
    supervisor.reconciler.join()
    assert len(posts) == 1, "reconciled once the reconcile answered"


def test_a_pid_file_names_its_process_by_start_time_too(tmp_path: Path) -> None:
    """By name alone, a stale pid file whose pid a new Python process reused was taken for a service: `status`
    said it was up and `down` killed it (an independent review). The file keeps the start time too."""
    path, name = tmp_path / "x.pid", Path("/proc/self/comm").read_text().strip()
    path.write_text(pid_record(os.getpid()))
    assert live_pid(path, name) == os.getpid()
    path.write_text(f"{os.getpid()} 1")  # the pid reused: another start time
    assert live_pid(path, name) is None
    path.write_text(str(os.getpid()))  # a file of an earlier release: by name, as before
    assert live_pid(path, name) == os.getpid()
    path.write_text("")
    assert live_pid(path, name) is None


@pytest.mark.skipif(os.getuid() != 0, reason="starts a process as another user")
def test_a_daemons_pid_file_naming_another_users_process_is_not_ours(tmp_path: Path) -> None:
    """Redis and Ceph write their own pid files (the pid alone): a stale one naming another user's process of that
    name (the system's own redis-server) was taken for the stack's, which ``down`` then tried to kill (review 10)."""
    other = subprocess.Popen(["sleep", "30"], user=65534)  # nobody
    try:
        path = tmp_path / "redis.pid"
        path.write_text(str(other.pid))
        wait_for(lambda: Path(f"/proc/{other.pid}/comm").read_text().strip() == "sleep", 10)
        assert live_pid(path, "sleep") is None
    finally:
        other.kill()
        other.wait()


def test_a_heal_reconciles_at_the_replica_that_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With Milvus replicas the writer lease moves when the writer dies; the heal's reconcile went to the first
    replica's address, which then answers 409 not_writer, and was owed again at every check for good."""
    replicas = {"http://127.0.0.1:9": False, "http://127.0.0.1:10": True}  # the first was restarted: not the writer
    monkeypatch.setattr(httpx, "get", lambda url, **k: httpx.Response(200, json={
        "writer": replicas[url.removesuffix("/stats")]}))
    posts: list[str] = []
    monkeypatch.setattr(httpx, "post", lambda url, **k: posts.append(url) or httpx.Response(200, json={}))
    supervisor, stack, canary = supervised(tmp_path)
    stack.api_urls = list(replicas)
    supervisor.check_delivery()
    canary.age = supervisor.settings.canary_timeout_s + 1
    supervisor.check_delivery()
    supervisor.reconciler.join()  # type: ignore[union-attr]
    assert posts == ["http://127.0.0.1:10/reconcile"] and not supervisor.reconcile_owed
    replicas["http://127.0.0.1:10"] = False  # it died: the lease moves within WRITER_LEASE_S and a third
    moved = threading.Timer(1.5, lambda: replicas.update({"http://127.0.0.1:9": True}))
    moved.start()
    assert stack.writer_url() == "http://127.0.0.1:9"  # (was the first address at once: 409 not_writer)
    moved.join()


# -- liveness ---------------------------------------------------------------------------------------------------

def test_liveness_judges_a_process_only_once_it_answered_and_then_fell_silent() -> None:
    liveness = Liveness(timeout_s=60)
    answers: dict[str, bool | None] = {"api": False, "worker": True}
    pids = {"api": 10, "worker": 20}

    def ask(at: float) -> dict[str, tuple[int, float]]:
        liveness.probe({name: (pids[name], lambda pid, n=name: answers[n], False) for name in pids}, lambda: at)
        return liveness.hung(at)

    assert ask(0) == {} and ask(500) == {}  # api never answered since it started (a model, a snapshot loading)
    answers.update(api=True)
    assert ask(505) == {}
    answers.update(api=False, worker=False)
    assert ask(510) == {} and ask(569) == {}  # silent since 510: 59 s
    assert ask(570) == {"api": (10, 60.0), "worker": (20, 60.0)}
    answers.update(worker=None)  # Redis cannot say: the worker's count starts again
    assert ask(575) == {"api": (10, 65.0)}
    answers.update(worker=False)
    assert ask(580) == {"api": (10, 70.0)} and ask(639) == {"api": (10, 129.0)}
    assert ask(640) == {"api": (10, 130.0), "worker": (20, 60.0)}
    pids.update(api=11)  # restarted: the new process is judged afresh, from its first answer on
    assert ask(645) == {"worker": (20, 65.0)}
    liveness.forget("worker")
    assert ask(650) == {}


def test_an_http_service_is_silent_once_its_port_takes_connections_it_does_not_answer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A service binds its port once its start-up is done: a refused connection says nothing (None), a connection
    taken and never answered (frozen: the kernel takes it for the process) is silence, counted at once; any HTTP
    answer, an error included, is an answer (radosgw's to an anonymous GET)."""
    monkeypatch.setattr(liveness_module, "PROBE_TIMEOUT_S", 0.5)
    with socket.socket() as frozen:
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(8)  # and never accepts, as a SIGSTOPped server
        ask = serves(f"http://127.0.0.1:{frozen.getsockname()[1]}/healthz")
        assert ask(1) is False
    assert ask(1) is None  # closed: refused
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # 501 to every GET
    threading.Thread(target=server.handle_request, daemon=True).start()
    assert serves(f"http://127.0.0.1:{server.server_port}/")(1) is True  # an answer, whatever its status
    server.server_close()
    liveness = Liveness(timeout_s=60)
    liveness.probe({"api": (7, ask, True)}, lambda: 0.0)
    liveness.probe({"api": (7, lambda pid: False, True)}, lambda: 1.0)
    assert liveness.hung(61.0) == {"api": (7, 60.0)}  # silent from its first question on: no answer needed first


@contextlib.contextmanager
def admin_socket(path: Path, answer: dict[str, object] | bytes | None) -> Iterator[None]:
    """A Ceph admin socket at ``path`` that answers every command with ``answer`` as it is then (bytes: as they are);
    None: one that takes connections and answers nothing (its daemon frozen)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(8)

        def serve() -> None:
            while True:
                try:
                    connection, _ = server.accept()
                except OSError:  # closed
                    return
                with connection:
                    request = b""
                    while not request.endswith(b"\0"):
                        request += connection.recv(1024)
                    body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                    connection.sendall(struct.pack(">I", len(body)) + body)

        if answer is not None:
            threading.Thread(target=serve, daemon=True).start()
        yield
        server.shutdown(socket.SHUT_RDWR)


def test_a_ceph_daemon_is_silent_when_its_admin_socket_is_or_an_osd_holds_an_op_stuck(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A frozen OSD answered nothing and was never restarted; after a 90 s freeze one answered, while ops on some of
    its placement groups stayed "waiting for readable" for good (review 24). Both are silence."""
    monkeypatch.setattr(liveness_module, "PROBE_TIMEOUT_S", 0.5)
    ask = ceph_daemon(tmp_path, "osd.0", osd=True)
    assert ask(7) is None  # no socket yet: starting
    op = {"age": 3.0, "description": "osd_op(client.4175.0:9 3.2 notify.0 [create])",
          "type_data": {"flag_point": "waiting for readable"}}
    with admin_socket(tmp_path / "osd.0.7.asok", {"ops": [op], "num_ops": 1}):
        assert ask(7) is True  # an op in flight, not for long
        op["age"] = 4294967296.0  # begun a hair after the dump read its clock: Ceph 16's seconds wrapped (review 73)
        assert ask(7) is True
        op["age"] = 31.0
        assert ask(7) is False and ask(7) is False
    assert caplog.text.count("holds 1 ops in flight") == 1 and "notify.0 [create]" in caplog.text  # logged once
    with admin_socket(tmp_path / "osd.0.8.asok", None):
        assert ask(8) is False  # frozen: takes the connection, answers nothing
    with admin_socket(tmp_path / "osd.0.10.asok", b"command not defined"):
        assert ask(10) is None  # starting: for ~5 s its socket knows no dump_ops_in_flight yet (review 25)
    with admin_socket(tmp_path / "mon.a.9.asok", {"version": "16.2.15"}):
        assert ceph_daemon(tmp_path, "mon.a")(9) is True


def test_the_supervisor_kills_a_hung_service_and_the_process_watch_starts_it(
        stack: Services, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor(stack)  # type: ignore[arg-type]
    counters = Counted()
    stops: list[tuple[str, bool]] = []
    answers = {1234: False}
    monkeypatch.setattr(supervisor, "probes", lambda asker: {"worker": (1234, lambda pid: answers[pid], False)})

    def stop_service(name: str, kill: bool = False) -> None:
        stops.append((name, kill))
        stack.up = False

    stack.stop_service = stop_service  # type: ignore[attr-defined]
    supervisor.liveness.watches["worker"] = Watch(pid=4321, started=True, silent_since=0.0)  # another process
    supervisor.kill_hung(counters)  # type: ignore[arg-type]
    assert stops == [] and supervisor.liveness.watches == {}  # the hung one is gone already: nothing killed
    answers[1234] = True  # silent for 61 s, and answers the last question (asked while a start held the kill)
    supervisor.liveness.watches["worker"] = Watch(pid=1234, started=True, silent_since=time.monotonic() - 61)
    supervisor.kill_hung(counters)  # type: ignore[arg-type]
    assert stops == [] and supervisor.liveness.watches == {}  # counted afresh
    answers[1234] = False
    for kill in (1, 2):
        supervisor.liveness.watches["worker"] = Watch(pid=1234, started=True, silent_since=time.monotonic() - 61)
        supervisor.kill_hung(counters)  # type: ignore[arg-type]
        assert stops == [("worker", True)] * kill and counters.counts == {"hung_restarts": kill}
        supervisor.keep_up("worker", time.monotonic())
        assert stack.starts == kill and stack.up
    assert caplog.text.count("kills in a row") == 1
    assert "(2 kills in a row: starting it again has not helped" in caplog.text


class Counted:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.away = False  # Redis does not answer

    def hincrby(self, key: str, name: str, by: int) -> None:
        if self.away:
            raise redis.ConnectionError("Connection refused")
        self.counts[name] = self.counts.get(name, 0) + by


def test_a_worker_whose_pool_processes_stopped_beating_is_silent(stack: Services, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Pool processes hung under a main process that beat: its tasks were held by a live worker and never ran, and
    the worker counted as alive (review 24). One hung pool process beside one that beat did the same with the batch
    it held, for as long as it hung (review 73: 30 uploads pending for 213 s, nothing said). A pool process loading
    its model (none of them has beaten yet) is no silence, nor is a new one that took a gone one's place."""
    supervisor = Supervisor(stack)  # type: ignore[arg-type]
    host, keys = socket.gethostname(), supervisor.keys
    records: set[str] = {keys.consumer(f"{host}:100")}
    asker = SimpleNamespace(exists=lambda key: int(key in records))
    pool = [101, 102]
    monkeypatch.setattr(supervisor_module, "children", lambda pid: pool if pid == 100 else [])
    assert supervisor.beats(asker, 100) is True  # (loading: no pool process has beaten yet)
    assert "worker-pool" not in supervisor.liveness.answered  # (not yet well: its model may fail, review 89)
    records |= {keys.worker(f"{host}:101")}
    assert supervisor.beats(asker, 100) is True  # (102 still loading)
    assert "worker-pool" in supervisor.liveness.answered  # one loaded its model
    records |= {keys.worker(f"{host}:102")}
    assert supervisor.beats(asker, 100) is True
    records -= {keys.worker(f"{host}:101")}
    caplog.set_level(logging.INFO, logger="infra.supervisor")
    assert supervisor.beats(asker, 100) is False  # one of two silent: it holds its batch
    assert supervisor.beats(asker, 100) is False
    assert caplog.text.count("worker pool process 101 (of the worker, pid 100) stopped beating") == 1
    pool[0] = 103  # 101 gone, and a new pool process loading in its place
    assert supervisor.beats(asker, 100) is True
    pool[0] = 101  # and one given the gone one's pid: loading, not silent (review 75)
    assert supervisor.beats(asker, 100) is True
    records -= {keys.worker(f"{host}:102")}
    assert supervisor.beats(asker, 100) is False  # every one that beat silent
    records.clear()
    assert supervisor.beats(asker, 100) is False  # the main process silent


def test_a_silent_pool_process_is_killed_alone_and_a_silent_main_process_kills_the_worker(
        stack: Services, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """One hung pool process restarted the whole worker: the batch of the other, which beat, ran again (counted
    towards MAX_REDELIVERIES) and the model was loaded again (review 75). Only the one silent for the timeout is
    killed (the worker starts another, and Celery gives its batch back), not one that has just gone silent beside
    it (review 77); a worker whose main process is silent is killed whole."""
    supervisor = Supervisor(stack)  # type: ignore[arg-type]
    host, keys = socket.gethostname(), supervisor.keys
    pool = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    hung, beating = (process.pid for process in pool)
    records = {keys.consumer(f"{host}:1234"), keys.worker(f"{host}:{hung}"), keys.worker(f"{host}:{beating}")}
    counters = Counted()
    asker = SimpleNamespace(exists=lambda key: int(key in records), hincrby=counters.hincrby)
    monkeypatch.setattr(supervisor_module, "children", lambda pid: [hung, beating] if pid == 1234 else [])
    monkeypatch.setattr(supervisor, "probes", lambda asker: {"worker": (1234, lambda pid: supervisor.beats(asker, pid),
                                                                        False)})
    stops: list[tuple[str, bool]] = []
    stack.stop_service = lambda name, kill=False: stops.append((name, kill))  # type: ignore[attr-defined]
    try:
        assert supervisor.beats(asker, 1234) is True  # type: ignore[arg-type]
        records.discard(keys.worker(f"{host}:{hung}"))
        assert supervisor.beats(asker, 1234) is False  # type: ignore[arg-type]
        supervisor.silent_pool[hung] -= 61  # (silent since a minute ago)
        records.discard(keys.worker(f"{host}:{beating}"))  # and the other only now
        supervisor.liveness.watches["worker"] = Watch(pid=1234, started=True, silent_since=time.monotonic() - 61)
        supervisor.kill_hung(asker)  # type: ignore[arg-type]
        assert pool[0].wait(10) == -signal.SIGKILL and pool[1].poll() is None and stops == []
        assert f"worker pool process {hung} (of the worker, pid 1234) is running but has answered" in caplog.text
        assert counters.counts == {"hung_restarts": 1}
        records.discard(keys.consumer(f"{host}:1234"))  # the main process silent: the whole worker goes
        supervisor.liveness.watches["worker"] = Watch(pid=1234, started=True, silent_since=time.monotonic() - 61)
        supervisor.kill_hung(asker)  # type: ignore[arg-type]
        assert stops == [("worker", True)] and pool[1].poll() is None and counters.counts == {"hung_restarts": 2}
    finally:
        for process in pool:
            process.kill()
            process.wait()


def test_a_step_failing_on_a_server_away_is_one_line_and_anything_else_its_traceback(
        stack: Services, caplog: pytest.LogCaptureFixture) -> None:
    """Each kill of a frozen Redis was followed by a 60-line traceback of the supervisor's own delivery check
    (review 24): a server away is said in one line, once; a bug keeps its traceback."""
    supervisor = Supervisor(stack)  # type: ignore[arg-type]

    def away() -> None:
        raise redis.ConnectionError("Connection reset by peer")

    def bug() -> None:
        raise KeyError("oops")

    supervisor.attempt("delivery check", away)
    supervisor.attempt("delivery check", away)
    supervisor.attempt("process watch", bug)
    [first, second] = caplog.records
    assert first.getMessage() == ("supervisor delivery check failed (ConnectionError: Connection reset by peer); "
                                  "retrying") and not first.exc_info
    assert second.exc_info is not None and second.exc_info[0] is KeyError


def test_a_supervisor_that_stood_still_says_so_and_counts_every_silence_afresh(
        stack: Services, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Frozen for 91 s, the supervisor logged nothing of it, and judged the processes on silences it had not seen
    (review 24)."""
    supervisor = Supervisor(stack)  # type: ignore[arg-type]
    supervisor.liveness.watches["worker"] = Watch(pid=1234, started=True, silent_since=0.0)
    clock = iter([0.0, 5.0 + 61.0, 66.0])  # before the first wait; after it, 61 s late; before the second
    monkeypatch.setattr(supervisor_module, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    waits = iter([False, True])
    steps: list[str] = []
    supervisor.attempt = lambda what, step: steps.append(what)  # type: ignore[method-assign]
    supervisor.ask_forever(SimpleNamespace(wait=lambda s: next(waits)))  # type: ignore[arg-type]
    assert "the supervisor itself stood still for 61 s" in caplog.text
    assert supervisor.liveness.watches == {} and steps == ["liveness check", "hung process kill"]


def test_a_redis_kill_is_counted_once_redis_answers_again(stack: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis's own kills were left out of ``hung_restarts`` (the count goes to the Redis just killed: review 24)."""
    supervisor = Supervisor(stack)  # type: ignore[arg-type]
    monkeypatch.setattr(supervisor, "probes", lambda asker: {"redis": (1, lambda pid: False, False)})
    monkeypatch.setattr(supervisor, "process", lambda name: (1, lambda kill: None))
    counters = Counted()
    counters.away = True
    supervisor.liveness.watches["redis"] = Watch(pid=1, started=True, silent_since=time.monotonic() - 61)
    supervisor.kill_hung(counters)  # type: ignore[arg-type]
    assert counters.counts == {} and supervisor.uncounted == 1
    counters.away = False  # started again from its file
    supervisor.kill_hung(counters)  # type: ignore[arg-type]
    assert counters.counts == {"hung_restarts": 1} and supervisor.uncounted == 0
