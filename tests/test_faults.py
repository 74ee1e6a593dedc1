"""Fault injection on the real local stack: nothing is lost.

Each test uploads a stream of distinct images while one fault happens (a worker SIGKILLed mid-batch, one of two
workers killed, Redis restarted cleanly or killed, S3 unreachable, the receiver down long enough to stall Ceph's
persistent topic, the index service killed during a rebuild, huge and stalling objects), then checks that the
index holds exactly the bucket's images under the test's prefix (tests/integrity.py). Every test puts the stack
back as it found it (all services running), since the whole suite shares one stack.

Per-fault counts and recovery times are printed (``-s``) and saved in ``tests/artifacts/fault-outcomes.json``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import http.server
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from bucketlens.celery_config import time_limit_s
from bucketlens.keys import Keys
from bucketlens.redis_client import connect, text
from bucketlens.schemas import ObjectRef
from bucketlens.settings import Settings
from infra.milvus import log_tail
from infra.notifications import remove_notifications
from infra.procfs import children
from infra.stack import Stack, StackError, free_port
from ingest.publisher import Publisher

from .helpers import index_difference, object_state, wait_for, wait_rebuild
from .integrity import (
    StreamRecorder,
    Uploader,
    assert_index_matches_bucket,
    failures_under,
    image_set,
    listing,
    patient_s3,
    record_outcome,
    reference_vectors,
)
from .proxy import SlowBodyProxy

pytestmark = [pytest.mark.slow, pytest.mark.faults]

UPLOADS = 120  # distinct images per fault test (the issue aims at a few hundred; 2 shared cores set the pace)
RATE = 10.0  # uploads per second while the fault happens


# -- stack control --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def supervisor_paused(stack: Stack) -> Iterator[None]:
    """The supervisor would restart what a test stops on purpose (and heal what it breaks): pause it. What it was
    restarting when stopped is running when the test starts."""
    stack.stop_service("supervisor")
    try:
        stack.start_redis()
        stack.start_s3()
        yield
    finally:
        restore(stack)


def restore(stack: Stack) -> None:
    """Everything running again, the supervisor last (as ``Stack.up`` does)."""
    stack.start_redis()
    stack.start_s3()
    for name in ("ingest", "worker", "api"):
        stack.start_service(name)
    wait_for(lambda: _ready(stack), 300, what="index service ready")
    stack.start_service("supervisor")


def _ready(stack: Stack) -> bool:
    return stack.answers(stack.api_url + "/readyz")


def wait_for_a_canary(stack: Stack, since: float, timeout_s: float = 150) -> None:
    """Until the supervisor's canary written after ``since`` is delivered (a restarted radosgw resumes its persistent
    queue once it rereads the list, ~30 s). On a timeout, what the supervisor and the S3 script did meanwhile."""
    redis, canary = connect(stack.settings.redis_url), Keys(stack.settings.namespace).canary
    try:
        wait_for(lambda: float(redis.hget(canary, "delivered") or 0) > since, timeout_s, what="a canary delivered")
    except AssertionError as exc:
        logs = stack.home / "logs"
        raise AssertionError(f"{exc}; the canary: {redis.hgetall(canary)}; the supervisor's log ends "
                             f"{log_tail(logs / 'supervisor.log', 20)}; ceph.sh's "
                             f"{log_tail(logs / 'ceph-script.log', 10)}") from None


def workers(api: httpx.Client) -> list[dict[str, Any]]:
    response = api.get("/queues")
    return response.json()["workers"] if response.status_code == 200 else []  # type: ignore[no-any-return]


def busy_worker(stack: Stack, api: httpx.Client, timeout_s: float = 60) -> dict[str, Any]:
    """A worker in the middle of a batch: its heartbeat says busy and its main process holds tasks that are still
    unacknowledged now (a heartbeat's "busy" can be a second old, its batch acknowledged since, and a kill then
    leaves nothing to hand back)."""
    redis = connect(stack.settings.redis_url)

    def holds_unacked(worker: dict[str, Any]) -> bool:
        try:
            main = os.getpgid(worker["pid"])  # the pool child's group: its worker's main process
        except ProcessLookupError:
            return False
        unacked_now = {text(tag) for tag in redis.hkeys(Keys(stack.settings.namespace).unacked)}
        return bool(held(stack, main) & unacked_now)

    found = wait_for(lambda: [w for w in workers(api) if w["state"] == "busy" and holds_unacked(w)], timeout_s,
                     interval_s=0.02, what="a worker busy with unacknowledged tasks")
    return found[0]  # type: ignore[no-any-return]


def start_worker(stack: Stack, log_name: str, command: str = "worker", **env: str) -> subprocess.Popen[bytes]:
    """Another ``bucketlens worker`` (or ``command``) process on the stack's settings, changed by ``env`` (its own
    session, so killpg reaches it all)."""
    log = open(stack.home / "logs" / log_name, "ab")
    process = subprocess.Popen([sys.executable, "-m", "bucketlens.cli", command],
                               env={**os.environ, **stack.settings.to_env(), **env}, stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    return process


def stop_worker(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def unacked(api: httpx.Client) -> int:
    return int(api.get("/queues").json()["unacked"])


def held(stack: Stack, main_pid: int) -> set[str]:
    """The delivery tags a worker's main process says it holds (its record outlives it by up to HEARTBEAT_TTL_S)."""
    raw = connect(stack.settings.redis_url).get(Keys(stack.settings.namespace).consumer(f"{socket.gethostname()}:"
                                                                                         f"{main_pid}"))
    return set(json.loads(raw)["deliveries"]) if raw else set()


def restored_tags(logs: LogWindow) -> set[str]:
    """Delivery tags the index service handed back to the queue (index_service/redelivery.py logs them)."""
    return {tag for line in logs.lines("api") if "handed" in line and "delivery tags:" in line
            for tag in line.split("delivery tags:", 1)[1].split()}


def wait_restored(stack: Stack, api: httpx.Client, before: int) -> float:
    """Seconds until the index service handed a dead worker's tasks back (the tasks_restored counter moved). A
    timeout says what the queues and the index service's log showed (it failed twice in whole-suite runs, never
    alone: the redelivery check runs only while the service writes and merges)."""
    started = time.monotonic()
    since = LogWindow(stack, ("api",))
    try:
        wait_for(lambda: counter(api, "tasks_restored") > before, 120, interval_s=0.5,
                 what="the dead worker's tasks handed back to the queue")
    except AssertionError as exc:
        report = api.get("/queues").json()
        said = [line for line in since.lines("api") if re.search(r"WARNING|ERROR|lease|merg|redeliver", line)]
        raise AssertionError(f"{exc}; unacked {report.get('unacked')}, workers {report.get('workers')}, events "
                             f"{report.get('events')}, stats {api.get('/stats').json()}; the index service "
                             f"said: {said[-20:]}") from None
    return time.monotonic() - started


def counter(api: httpx.Client, name: str) -> int:
    return int(api.get("/queues").json()["events"].get(name, 0))


class LogWindow:
    """The lines the services log from now on (to count reconnect warnings)."""

    def __init__(self, stack: Stack, names: tuple[str, ...] = ("ingest", "worker", "api")) -> None:
        self.paths = {name: stack.home / "logs" / f"{name}.log" for name in names}
        self.offsets = {name: path.stat().st_size if path.exists() else 0 for name, path in self.paths.items()}

    def lines(self, name: str) -> list[str]:
        with open(self.paths[name], "rb") as log:
            log.seek(self.offsets[name])
            return log.read().decode(errors="replace").splitlines()

    def count(self, name: str, pattern: str) -> int:
        return sum(1 for line in self.lines(name) if re.search(pattern, line))


# -- 1. a worker killed mid-batch -----------------------------------------------------------------------------

def test_worker_killed_mid_batch_loses_nothing(stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str) -> None:
    """With the default visibility timeout (600 s): the dead worker's tasks come back long before it expires."""
    bodies = image_set(unique_prefix, UPLOADS)
    orphans, restored = counter(api, "orphans_resent"), counter(api, "tasks_restored")
    recorder = StreamRecorder(stack, unique_prefix)
    recorder.start()
    with supervisor_paused(stack):
        uploader = Uploader(stack, bodies, RATE)
        uploader.start()
        uploader.wait_uploaded(UPLOADS // 3)
        for _ in range(3):
            busy_worker(stack, api)
            stack.stop_service("worker", kill=True)  # SIGKILL to the process group: main process and pool child
            killed_at = time.monotonic()
            in_flight = unacked(api)
            if in_flight:
                break
            stack.start_service("worker")  # its batch was acknowledged as the kill came (its record lags): again
        time.sleep(3)
        stack.start_service("worker")
        restarted = time.monotonic()
        seconds_to_restored = wait_restored(stack, api, restored) + restarted - killed_at
        uploader.finish()
        outcome = assert_index_matches_bucket(stack, s3, api, unique_prefix, bodies, recorder)
    recorder.stop()
    assert stack.settings.visibility_timeout_s == 600  # the default: no shortcut for the test
    assert in_flight >= 1, "the kill did not leave an unacknowledged task behind"
    report = api.get("/queues").json()
    assert report["unacked_dead"] == 0, report
    record_outcome("worker_killed_mid_batch", {**outcome, "unacked_tasks_at_kill": in_flight,
                                               "tasks_restored": counter(api, "tasks_restored") - restored,
                                               "seconds_kill_to_tasks_restored": round(seconds_to_restored, 1),
                                               "lost_tasks_resent": counter(api, "orphans_resent") - orphans,
                                               "seconds_restart_to_all_indexed": round(time.monotonic() - restarted)})


def test_a_worker_that_cannot_load_its_model_takes_no_task(stack: Stack, s3: Any, api: httpx.Client,
                                                            unique_prefix: str) -> None:
    """A worker added with settings it cannot run (CUDA asked for on a machine without it) once took tasks,
    failed each one at once and acknowledged it: the objects stayed pending, with no failure record and no sign in
    GET /queues. It shuts down now, and what it took goes back to the queue for the workers that can embed."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the worker would load its model")
    bodies = image_set(unique_prefix, 40)
    recorder = StreamRecorder(stack, unique_prefix)
    recorder.start()
    bad = start_worker(stack, "worker-no-cuda.log", BUCKETLENS_DEVICE="cuda", BUCKETLENS_WORKER_CONCURRENCY="1")
    try:
        uploader = Uploader(stack, bodies, RATE)  # arriving while the bad worker starts, consumes and stops
        uploader.start()
        # It stops by itself (without the fix it ran on, eating tasks), and says it failed (review 86: exit 0, a
        # clean stop to systemd's Restart=on-failure)
        assert bad.wait(timeout=120) == 1
        uploader.finish()
        outcome = assert_index_matches_bucket(stack, s3, api, unique_prefix, bodies, recorder)
    finally:
        stop_worker(bad)
    recorder.stop()
    failed = failures_under(api, stack.settings.bucket, unique_prefix)
    assert not failed, failed
    log = (stack.home / "logs" / "worker-no-cuda.log").read_text()
    assert "cannot load its model" in log and "BUCKETLENS_DEVICE=cuda" in log, log[-2000:]
    assert log.rstrip().endswith("bucketlens worker: a worker process could not load its model (the log above says "
                                 "why)"), log[-2000:]
    record_outcome("worker_without_its_model", outcome)


def test_a_batch_that_hangs_is_killed_at_its_time_limit_and_handed_back(stack: Stack, s3: Any, api: httpx.Client,
                                                                          unique_prefix: str) -> None:
    """A pool process stuck in a batch while its worker's main process beats on (a decoder that never returns, a
    wedged model call; here a frozen pool process, with no supervisor to see it) held its batch and its slot for
    good: the broker handed the batch to the other pool process at the visibility timeout, and the stuck one stayed.
    Celery's hard time limit (``time_limit_s``: 450 s by default; 46 s for this worker's least VISIBILITY_TIMEOUT_S,
    60 s, and FETCH_TIMEOUT_S of 5 s) kills it, the worker starts another pool process, and the batch goes back to
    the queue."""
    bodies = image_set(unique_prefix, 40)
    recorder = StreamRecorder(stack, unique_prefix)
    recorder.start()
    with supervisor_paused(stack):
        stack.stop_service("worker")
        worker = start_worker(stack, "worker-time-limit.log", BUCKETLENS_VISIBILITY_TIMEOUT_S="60",
                              BUCKETLENS_FETCH_TIMEOUT_S="5")
        limit = time_limit_s(dataclasses.replace(stack.settings, visibility_timeout_s=60, fetch_timeout_s=5.0))
        frozen: int | None = None
        try:
            uploader = Uploader(stack, bodies, RATE)
            uploader.start()
            frozen = int(busy_worker(stack, api, timeout_s=180)["pid"])  # (the new worker loads its model first)
            pool = len(children(worker.pid))
            os.kill(frozen, signal.SIGSTOP)
            frozen_at = time.monotonic()
            uploader.finish()
            outcome = assert_index_matches_bucket(stack, s3, api, unique_prefix, bodies, recorder)
            seconds = time.monotonic() - frozen_at
            wait_for(lambda: frozen not in children(worker.pid) and len(children(worker.pid)) == pool, 30,
                     what="the frozen pool process killed and another in its place")
        finally:
            if frozen is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(frozen, signal.SIGCONT)
            stop_worker(worker)
    recorder.stop()
    log = (stack.home / "logs" / "worker-time-limit.log").read_text()
    assert limit == 46 and f"Hard time limit ({limit}s) exceeded" in log, log[-3000:]
    assert time_limit_s(Settings()) == 450 and time_limit_s(Settings(visibility_timeout_s=106)) == 96  # (the default
    # FETCH_TIMEOUT_S: a stalled download, ~66 s, is no hang; a visibility timeout below 106 s is refused, test_s3)
    assert not failures_under(api, stack.settings.bucket, unique_prefix)
    record_outcome("batch_past_its_time_limit", {**outcome, "seconds_freeze_to_all_indexed": round(seconds)})


# -- 2. one of two workers killed -----------------------------------------------------------------------------

def test_one_of_two_workers_killed_the_other_finishes(
    stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    """The dead worker's tasks come back within seconds; the survivor's tasks, however long they run, never do."""
    bodies = image_set(unique_prefix, UPLOADS)
    orphans, restored = counter(api, "orphans_resent"), counter(api, "tasks_restored")
    recorder = StreamRecorder(stack, unique_prefix)
    recorder.start()
    logs = LogWindow(stack, ("api",))
    extra: list[Uploader] = []  # uploads made for a kill tried again
    second = start_worker(stack, "worker-second.log")
    try:
        with supervisor_paused(stack):
            wait_for(lambda: len(workers(api)) >= 2, 120, what="two live workers")
            uploader = Uploader(stack, bodies, RATE)
            uploader.start()
            uploader.wait_uploaded(UPLOADS // 3)
            for _ in range(3):
                victim = busy_worker(stack, api)
                group = os.getpgid(victim["pid"])  # the pool child's group: its worker's main process
                survivor = stack.pid("worker") if group == second.pid else second.pid
                assert survivor is not None
                os.killpg(group, signal.SIGKILL)
                killed = "second" if group == second.pid else "stack"
                killed_at = time.monotonic()
                in_flight = unacked(api)
                # Tasks a restore may hand back: what was unacknowledged at the kill and the survivor did not hold.
                at_kill = {text(tag) for tag in connect(stack.settings.redis_url).hkeys(
                    f"{stack.settings.namespace}:celery:unacked")} - held(stack, survivor)
                if at_kill:
                    break
                # Its batch was acknowledged as the kill came (its record lags): a worker in its place, again.
                if killed == "second":
                    second = start_worker(stack, "worker-second.log")
                else:
                    stack.stop_service("worker")  # (reaps it)
                    stack.start_service("worker")
                wait_for(lambda: len(workers(api)) >= 2, 120, what="two live workers again")
                # Work for the next kill: the uploads had often all been embedded while the worker started.
                more = image_set(f"{unique_prefix}again{len(extra)}-", 30)
                extra.append(Uploader(stack, more, RATE))  # (its own dict: the first uploader still reads bodies)
                extra[-1].start()
            seconds_to_restored = wait_restored(stack, api, restored)
            for uploads in (uploader, *extra):
                uploads.finish()
            everything = {**bodies, **{key: body for uploads in extra for key, body in uploads.bodies.items()}}
            outcome = assert_index_matches_bucket(stack, s3, api, unique_prefix, everything, recorder)
            if killed == "stack":
                stack.stop_service("worker")  # reap it; restored below
    finally:
        stop_worker(second)
    recorder.stop()
    assert in_flight >= 1, "the kill did not leave an unacknowledged task behind"
    handed_back = restored_tags(logs)
    assert handed_back and handed_back <= at_kill, ("restored a task the survivor held or took later",
                                                    handed_back - at_kill)
    record_outcome("one_of_two_workers_killed", {**outcome, "killed": killed, "unacked_tasks_at_kill": in_flight,
                                                 "tasks_restored": len(handed_back),
                                                 "seconds_kill_to_tasks_restored": round(seconds_to_restored, 1),
                                                 "lost_tasks_resent": counter(api, "orphans_resent") - orphans,
                                                 "seconds_kill_to_all_indexed": round(time.monotonic() - killed_at)})


# -- 3. Redis restarted ---------------------------------------------------------------------------------------

def added(redis: Any, stack: Stack) -> int:
    """Entries ever added to the result stream: a checkpoint's trim does not lower it (XLEN, compared across one,
    could), the append-only file keeps it."""
    return int(redis.xinfo_stream(Keys(stack.settings.namespace).results)["entries-added"])


@pytest.mark.parametrize("kill", [False, True], ids=["clean", "sigkill"])
def test_redis_restart_loses_nothing_and_services_reconnect(
    stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str, kill: bool
) -> None:
    bucket = stack.settings.bucket
    bodies = image_set(unique_prefix, UPLOADS)
    bad_key = unique_prefix + "not-an-image.jpg"
    recorder = StreamRecorder(stack, unique_prefix)
    recorder.start()
    redis = connect(stack.settings.redis_url)
    with supervisor_paused(stack):
        s3.put_object(Bucket=bucket, Key=bad_key, Body=b"plain text, no picture")
        wait_for(lambda: bad_key in failures_under(api, bucket, unique_prefix), 60, what="a failure record")
        logs = LogWindow(stack)
        uploader = Uploader(stack, bodies, RATE)
        uploader.start()
        uploader.wait_uploaded(UPLOADS // 3)
        worker = stack.pid("worker")
        assert worker is not None
        os.killpg(worker, signal.SIGSTOP)  # frozen, not gone: tasks queue up, and it must reconnect once thawed
        try:
            time.sleep(4)
            before = {"stream": added(redis, stack), "unacked": unacked(api),
                      "queued": sum(q["depth"] for q in api.get("/queues").json()["queues"].values())}
            stack.stop_redis(kill=kill)
            down_at = time.monotonic()
            time.sleep(8)  # longer than the clients' own retries: every service sees the outage
            stack.start_redis()
            up_at = time.monotonic()
        finally:
            os.killpg(worker, signal.SIGCONT)
        after_stream = added(redis, stack)
        after_queued = sum(q["depth"] for q in api.get("/queues").json()["queues"].values())
        uploader.finish()
        outcome = assert_index_matches_bucket(stack, s3, api, unique_prefix, {**bodies, bad_key: b""}, recorder,
                                              bad=[bad_key])
    recorder.stop()
    assert failures_under(api, bucket, unique_prefix)[bad_key]["reason"] == "not_an_image"  # survived the restart
    assert after_stream >= before["stream"], (before, after_stream)  # every stream entry added survived
    assert before["queued"] > 0 and after_queued >= before["queued"] - 1, (before, after_queued)  # so did tasks
    warnings = {name: logs.count(name, r"WARNING|ERROR|CRITICAL") for name in logs.paths}
    record_outcome(f"redis_restart_{'sigkill' if kill else 'clean'}", {
        **outcome, "redis_down_s": round(up_at - down_at, 1), "before_restart": before,
        "queued_after_restart": after_queued,
        "warnings_logged": warnings, "seconds_redis_up_to_all_indexed": round(time.monotonic() - up_at)})
    for name, count in warnings.items():
        assert count <= 4, f"{name} logged {count} warnings for one Redis outage:\n" + "\n".join(
            line for line in logs.lines(name) if re.search(r"WARNING|ERROR", line))


def test_the_supervisor_restarts_a_dead_redis_and_a_dead_radosgw(
    stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    """Nobody restarts them by hand here: the supervisor's next tick does (CANARY_INTERVAL_S, 5 s in the suite's
    stack), and what is uploaded afterwards is indexed. (Until this test's fix, a dead Redis stayed dead and every
    tick failed on it; a dead radosgw waited for the canary's timeout.)"""
    bodies = image_set(unique_prefix, 6)
    keys = list(bodies)
    stalls_before = counter(api, "canary_stalls")
    try:
        redis = stack.redis_pid()
        assert redis is not None
        os.kill(redis, signal.SIGKILL)
        # Gone, or already restarted: a supervisor tick right after the kill can beat the first poll.
        wait_for(lambda: stack.redis_pid() != redis, 10, what="redis gone")
        wait_for(stack.redis_pid, 60, what="redis restarted by the supervisor")
        os.kill(int((stack.home / "ceph" / "run" / "client.rgw.a.pid").read_text()), signal.SIGKILL)
        wait_for(lambda: not stack.s3_up(), 10, what="radosgw gone")
        wait_for(stack.s3_up, 180, what="radosgw restarted by the supervisor")
        # A restarted radosgw resumes its persistent queue once it rereads the list (~30 s): the supervisor's
        # canaries show when notifications flow again (until then, what follows would be left to a reconcile).
        wait_for_a_canary(stack, since=time.time())
        uploads = patient_s3(stack)
        for key in keys:
            uploads.put_object(Bucket=stack.settings.bucket, Key=key, Body=bodies[key])
        wait_for(lambda: all((state := object_state(api, stack.settings.bucket, key)) and state["state"] == "indexed"
                             for key in keys), 180, what="every upload after the restarts indexed")
        # One restart: the canary delivered before the kill had ended the restart's grace, and the next check
        # took the resuming radosgw for a stalled one and restarted it again (S3 refused connections twice).
        assert counter(api, "canary_stalls") == stalls_before
    finally:
        restore(stack)


def test_the_supervisor_restarts_a_frozen_worker_and_index_service(
    stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    """Frozen (SIGSTOP), a process keeps its pid, and the process watch left it be for good: every search waited, and
    with the stack's one worker frozen no upload was indexed. Here one of the worker's pool processes is frozen and
    its main process is not: it goes on taking tasks and beating, so what it hands the frozen one counted as held by
    a live worker and nobody ran it (review 24 froze them all; review 73 one of two, which the supervisor took for
    alive while the other beat: 30 uploads pending for 213 s). With the default LIVENESS_TIMEOUT_S the supervisor
    kills the index service and the frozen pool process alone (killing the whole worker ran its sibling's batch again
    and loaded the model again: review 75), the worker replaces that one, and what was uploaded meanwhile is
    indexed."""
    assert stack.settings.liveness_timeout_s == Settings().liveness_timeout_s  # the default users run
    bodies = image_set(unique_prefix, 4)
    bucket = stack.settings.bucket
    hung_before = counter(api, "hung_restarts")
    worker, api_pid = stack.pid("worker"), stack.pid("api")
    assert worker is not None and api_pid is not None
    pool, *siblings = children(worker)  # (the default: one pool process per core)
    try:
        os.killpg(api_pid, signal.SIGSTOP)
        os.kill(pool, signal.SIGSTOP)
        frozen_at = time.monotonic()
        uploads = patient_s3(stack)
        for key, body in bodies.items():
            uploads.put_object(Bucket=bucket, Key=key, Body=body)
        wait_for(lambda: stack.pid("api") not in (None, api_pid) and pool not in children(worker),
                 stack.settings.liveness_timeout_s + 120, what="the frozen pool process and index service restarted")
        restarted_s = time.monotonic() - frozen_at
        # A new pid is not yet a listening service: the restarted index service loads its snapshot first (the
        # first poll of an object's state was refused once, in CI).
        wait_for(lambda: _ready(stack), 300, what="the restarted index service ready")
        wait_for(lambda: all((state := object_state(api, bucket, key)) and state["state"] == "indexed"
                             for key in bodies), 300, what="every upload made while they were frozen indexed")
        key = next(iter(bodies))
        found = api.post("/search", json={"key": key, "bucket": bucket, "prefix": unique_prefix}).json()["results"]
        assert {hit["key"] for hit in found} == set(bodies) - {key}  # (the suite's images recur under other prefixes)
        assert counter(api, "hung_restarts") == hung_before + 2
        assert f"bucketlens_hung_restarts_total {hung_before + 2:.1f}" in api.get("/metrics").text
        assert stack.settings.liveness_timeout_s <= restarted_s, restarted_s  # not before the timeout
        assert stack.pid("worker") == worker and set(siblings) <= set(children(worker))  # (left running)
        log = (stack.home / "logs" / "supervisor.log").read_text()
        assert f"api (pid {api_pid}) is running but has answered nothing" in log
        assert f"worker pool process {pool} (of the worker, pid {worker}) is running but has answered nothing" in log
        record_outcome("frozen_worker_and_api", {"seconds_freeze_to_both_restarted": round(restarted_s)})
    finally:
        for pid in (api_pid, pool):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # (there if the supervisor never killed it)
        restore(stack)


def test_the_supervisor_restarts_a_frozen_redis_and_radosgw(stack: Stack, s3: Any, api: httpx.Client,
                                                           unique_prefix: str) -> None:
    """A frozen Redis stalled the whole stack for as long as it stayed frozen; killed, it comes back from its
    append-only file (fsynced at every write) with what it held. A frozen radosgw was healed only by the canary,
    once the supervisor's own S3 calls had waited out boto3's timeouts (184 s: review 24)."""
    key = unique_prefix + "after-redis.jpg"
    frozen = {"redis": stack.redis_pid(), "radosgw": stack.ceph_pid("client.rgw.a")}
    try:
        for pid in frozen.values():
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: stack.redis_pid() not in (None, frozen["redis"]) and stack.s3_up()
                 and stack.ceph_pid("client.rgw.a") != frozen["radosgw"], stack.settings.liveness_timeout_s + 120,
                 what="the frozen Redis and radosgw restarted")
        patient_s3(stack).put_object(Bucket=stack.settings.bucket, Key=key, Body=next(iter(image_set(key, 1).values())))
        wait_for(lambda: (state := object_state(api, stack.settings.bucket, key)) and state["state"] == "indexed", 240,
                 what=f"{key} indexed")
        log = (stack.home / "logs" / "supervisor.log").read_text()
        assert all(f"{name} (pid {pid}) is running but has answered nothing" in log for name, pid in frozen.items())
    finally:
        for pid in frozen.values():
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(pid, signal.SIGCONT)  # type: ignore[arg-type]
        restore(stack)


def test_the_supervisor_restarts_a_dead_ceph_osd(stack: Stack, s3: Any, api: httpx.Client,
                                                 unique_prefix: str) -> None:
    """With the OSD dead, radosgw held its port and every request hung: the supervisor, which looked at radosgw
    alone, restarted nothing and `status` said S3 was up (an independent review)."""
    osd = stack.ceph_pid("osd.0")
    assert osd is not None
    try:
        os.kill(osd, signal.SIGKILL)
        wait_for(lambda: stack.ceph_pid("osd.0") != osd, 10, what="the OSD gone")
        wait_for(lambda: stack.ceph_pid("osd.0") is not None and stack.status()["processes"]["s3"], 180,
                 what="the OSD restarted by the supervisor")
        key = unique_prefix + "after-osd.jpg"
        patient_s3(stack).put_object(Bucket=stack.settings.bucket, Key=key, Body=next(iter(image_set(key, 1).values())))
        wait_for(lambda: (state := object_state(api, stack.settings.bucket, key)) and state["state"] == "indexed", 180,
                 what=f"{key} indexed")
    finally:
        restore(stack)


def test_the_supervisor_restarts_a_frozen_ceph_osd(stack: Stack, s3: Any, api: httpx.Client,
                                                   unique_prefix: str) -> None:
    """A frozen OSD kept its pid: radosgw answered, `status` said S3 was up and every upload waited. The canary's heal
    restarted radosgw, which broke the uploads the OSD held, and whose start-up then waited on the OSD; and after a
    thaw, ops on some placement groups stayed "waiting for readable" for good (review 24). The supervisor asks the
    OSD's admin socket and restarts the OSD, not radosgw; the upload it held completes and is indexed."""
    osd, radosgw = stack.ceph_pid("osd.0"), stack.ceph_pid("client.rgw.a")
    assert osd is not None and radosgw is not None
    key = unique_prefix + "during-the-osd-freeze.jpg"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            os.kill(osd, signal.SIGSTOP)
            upload = pool.submit(patient_s3(stack).put_object, Bucket=stack.settings.bucket, Key=key,
                                 Body=next(iter(image_set(key, 1).values())))
            wait_for(lambda: stack.ceph_pid("osd.0") not in (None, osd) and stack.ceph_up(),
                     stack.settings.liveness_timeout_s + 120, what="the frozen OSD restarted")
            upload.result(timeout=120)  # (held by the frozen OSD, not failed)
            wait_for(lambda: (state := object_state(api, stack.settings.bucket, key)) and state["state"] == "indexed",
                     240, what=f"{key} indexed")
            assert stack.ceph_pid("client.rgw.a") == radosgw, "radosgw restarted: the OSD was the one hung"
            log = (stack.home / "logs" / "supervisor.log").read_text()
            assert (f"the Ceph OSD (pid {osd}) does not answer its admin socket" in log  # the canary's heal
                    or f"ceph-osd (pid {osd}) is running but has answered nothing" in log)  # or the liveness kill
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(osd, signal.SIGCONT)
            restore(stack)


def test_starting_the_s3_server_restarts_a_ceph_osd_that_does_not_answer(stack: Stack, s3: Any,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """`bucketlens up` over a frozen or wedged OSD ended in a botocore traceback (an S3 read timeout), and started no
    supervisor to heal it, while `status` said S3 was up. Now `status` says it is not, and starting the S3 server
    restarts such an OSD first."""
    with supervisor_paused(stack):
        osd = stack.ceph_pid("osd.0")
        assert osd is not None
        os.kill(osd, signal.SIGSTOP)
        try:
            assert not stack.status()["processes"]["s3"]  # (`bucketlens status` said "s3 up")
            stack.start_ceph()
            assert stack.ceph_pid("osd.0") not in (None, osd) and stack.ceph_up()
            assert f"the Ceph OSD (pid {osd}) does not answer its admin socket" in caplog.text
            assert s3.list_objects_v2(Bucket=stack.settings.bucket, MaxKeys=1)["KeyCount"] == 1  # (its bucket index)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(osd, signal.SIGCONT)


def test_two_starts_of_the_s3_server_at_once_start_one_osd(stack: Stack, s3: Any) -> None:
    """`bucketlens up` while the supervisor restarts a dead OSD: both started one, and the second failed on the
    first's lock on its pid file (`ceph.sh start failed`). The script takes its turn."""
    with supervisor_paused(stack):
        osd = stack.ceph_pid("osd.0")
        assert osd is not None
        stack.kill_ceph("osd.0", osd)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for start in [pool.submit(stack.start_ceph) for _ in range(2)]:
                start.result(timeout=300)
        assert stack.ceph_pid("osd.0") not in (None, osd) and stack.ceph_up()
        assert [path.name for path in (stack.home / "ceph" / "run").glob("osd.0.*.asok")] == [
            f"osd.0.{stack.ceph_pid('osd.0')}.asok"]  # (the killed one's socket is gone)
        assert s3.list_objects_v2(Bucket=stack.settings.bucket, MaxKeys=1)["KeyCount"] == 1


def test_another_server_on_the_s3_port_is_not_taken_for_this_stacks(stack: Stack) -> None:
    """Another stack's S3 server took this stack's port while its radosgw started (an independent check, two stacks
    made together): `up` succeeded against it, made the bucket and notifications there, and the index drifted from
    its own bucket. Now a radosgw that does not hold its port is an error naming it, and `status` says S3 is down."""
    with supervisor_paused(stack):
        stack.stop_s3()
        squatter = http.server.ThreadingHTTPServer(("127.0.0.1", stack.config.s3_port),
                                                   http.server.BaseHTTPRequestHandler)
        threading.Thread(target=squatter.serve_forever, daemon=True).start()
        try:
            with pytest.raises(StackError, match=f"does not hold its port {stack.config.s3_port} \\(another program"):
                stack.start_s3()
            assert not stack.s3_up() and not stack.status()["processes"]["s3"]
        finally:
            squatter.shutdown()
            squatter.server_close()
            stack.stop_s3()  # (the radosgw that could not bind, if it still runs)
    assert stack.s3_up()  # restored by this stack's own radosgw
    # A restarted radosgw resumes its persistent queue once it rereads the list (~30 s): the next test uploads and
    # expects notifications (the S3-outage test found its backlog not yet queued when S3 went away).
    wait_for_a_canary(stack, since=time.time())


# -- 4. S3 unreachable ----------------------------------------------------------------------------------------

def test_s3_unreachable_fetches_retry_and_succeed(stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str) -> None:
    bodies = image_set(unique_prefix, UPLOADS)
    recorder = StreamRecorder(stack, unique_prefix)
    recorder.start()
    logs = LogWindow(stack, ("worker",))
    with supervisor_paused(stack):
        worker = stack.pid("worker")
        assert worker is not None
        os.killpg(worker, signal.SIGSTOP)  # a backlog whatever the pace of the uploads (a fast worker kept up)
        try:
            uploader = Uploader(stack, bodies, rate=1000)
            uploader.start()
            uploader.finish()
            wait_for(lambda: sum(q["depth"] for q in api.get("/queues").json()["queues"].values()) or unacked(api),
                     60, what="a backlog queued")
            stack.stop_s3()  # the worker's fetches of the queued and in-flight objects now fail to connect
        finally:
            os.killpg(worker, signal.SIGCONT)
        down_at = time.monotonic()
        time.sleep(15)
        stack.start_s3()
        up_at = time.monotonic()
        outcome = assert_index_matches_bucket(stack, s3, api, unique_prefix, bodies, recorder)
    recorder.stop()
    retried = logs.count("worker", r"batch: .* [1-9][0-9]* to retry")
    assert retried > 0, "no fetch met the outage"
    record_outcome("s3_unreachable", {**outcome, "s3_down_s": round(up_at - down_at, 1), "batches_retried": retried,
                                      "seconds_s3_up_to_all_indexed": round(time.monotonic() - up_at)})


# -- 5. the receiver down -------------------------------------------------------------------------------------

def test_receiver_down_stalls_the_topic_and_the_watchdog_heals_it(
    stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    bodies = image_set(unique_prefix, UPLOADS)
    stalls_before = counter(api, "canary_stalls")
    recorder = StreamRecorder(stack, unique_prefix)
    recorder.start()
    try:
        uploader = Uploader(stack, bodies, rate=UPLOADS / 45)  # uploads before, during and after the outage
        uploader.start()
        uploader.wait_uploaded(UPLOADS // 6)
        stack.stop_service("supervisor")
        stack.stop_service("ingest")
        down_at = time.monotonic()
        time.sleep(30)  # Ceph 16 stops delivering a topic whose endpoint refused connections for >= 10 s
        stack.start_service("ingest")
        stack.start_service("supervisor")
        up_at = time.monotonic()
        uploader.finish()
        outcome = assert_index_matches_bucket(stack, s3, api, unique_prefix, bodies, recorder, timeout_s=420)
    finally:
        restore(stack)
    recorder.stop()
    stalls = counter(api, "canary_stalls") - stalls_before
    record_outcome("receiver_down_30s", {**outcome, "receiver_down_s": round(up_at - down_at, 1),
                                         "watchdog_heals": stalls,
                                         "seconds_receiver_up_to_all_indexed": round(time.monotonic() - up_at)})


def test_up_heals_a_topic_that_stalled_while_the_supervisor_was_down(stack: Stack, s3: Any, api: httpx.Client,
                                                                     unique_prefix: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Review 79: with the supervisor and ingest stopped, uploads stalled Ceph 16's topic; `up` waited 90 s for its
    test upload, failed, and never started the supervisor that heals a stall: again at every `up`, the uploads never
    indexed. `up` restarts radosgw itself now, and reconciles what the stall held back."""
    bodies = image_set(unique_prefix, 6)
    try:
        stack.stop_service("supervisor")
        stack.stop_service("ingest")
        for key, body in bodies.items():
            s3.put_object(Bucket=stack.settings.bucket, Key=key, Body=body)
        time.sleep(30)  # Ceph 16 stops delivering a topic whose endpoint refused connections for >= 10 s
        radosgw = stack.ceph_pid("client.rgw.a")
        started = time.monotonic()
        stack.up()
        took = time.monotonic() - started
        said = capsys.readouterr().err
        # Whether the topic stalled is Ceph's timing: where it did, `up` said so, restarted radosgw and reconciled
        # (other reconciles `up` may run say other reasons: a bucket of an earlier test that notified elsewhere)
        healed = "restarting the S3 server's gateway" in said
        assert not healed or ("reconciling with the bucket" in said and stack.ceph_pid("client.rgw.a") != radosgw), said
        assert stack.pid("supervisor") is not None
        outcome = assert_index_matches_bucket(stack, s3, api, unique_prefix, bodies, timeout_s=120)
    finally:
        restore(stack)
    record_outcome("up_after_a_stall", {**outcome, "radosgw_restarted_by_up": healed, "seconds_up": round(took)})


def test_up_after_a_kill_of_the_whole_stack_reconciles(stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Review 83: after a kill -9 of every process of the stack (a crash, a power cut), uploads radosgw had stored and
    never told of stayed out of the index, every status green, until a reconcile by hand: `up` found nothing running
    and reconciled only where it found ingest down beside the rest. Ingest's pid file left behind says it too, and a
    `down` after the crash keeps it said."""
    bodies = image_set(unique_prefix, 4)
    for key, body in bodies.items():
        s3.put_object(Bucket=stack.settings.bucket, Key=key, Body=body)
    pids = [stack.pid(name) for name in ("supervisor", *stack.services)] + [stack.redis_pid()] + [
        stack.ceph_pid(daemon) for daemon in ("client.rgw.a", "osd.0", "mon.a")]
    try:
        for pid in pids:
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(stack.status()["processes"].values()) or None, 30, what="every process gone")
        stack.down()  # (what a user runs first, often: it removes the pid files, and `up` still knows: review 85)
        stack.up()
        said = capsys.readouterr().err
        assert "the stack stopped without `bucketlens down`" in said and "reconciling with the bucket" in said, said
        assert_index_matches_bucket(stack, s3, api, unique_prefix, bodies, timeout_s=120)
    finally:
        if stack.pid("supervisor") is None:
            restore(stack)


def test_a_removed_bucket_notification_is_made_again_not_healed_by_restarting_radosgw(
    stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    """Someone removes the bucket's notification (or deletes the bucket and makes it again): the supervisor took the
    undelivered canary for a stalled topic and restarted radosgw, again and again with growing waits (up to 10
    minutes), and uploads were indexed only at the reconciles after (review 60). It puts the notification back, as
    `up` does, and reconciles; radosgw is left alone."""
    bodies = image_set(unique_prefix, 6)
    restored, radosgw = counter(api, "notifications_restored"), stack.ceph_pid("client.rgw.a")
    remove_notifications(stack.settings, stack.settings.bucket)
    try:
        for key, body in bodies.items():
            s3.put_object(Bucket=stack.settings.bucket, Key=key, Body=body)
        assert_index_matches_bucket(stack, s3, api, unique_prefix, bodies, timeout_s=300)
        assert stack.notified(5)
    finally:
        stack.notify()  # (as `up` would, whatever happened)
    assert counter(api, "notifications_restored") == restored + 1
    assert stack.ceph_pid("client.rgw.a") == radosgw, "radosgw was restarted"


def test_a_killed_receiver_is_back_before_the_topic_stalls(
    stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    """With the default delivery check (every 30 s), a SIGKILLed ingest waited for the next check: 15-30 s of
    refused deliveries, so Ceph 16 stalled the topic until the watchdog restarted radosgw (uploads meanwhile were
    indexed ~50 s late and S3 refused connections during the heal). The supervisor looks at processes every
    second: the receiver is back within seconds. Ceph then usually delivers on by itself, though not always (in
    the whole suite, right after the test above healed a stall, the watchdog healed again): the heals are
    recorded, and what is asserted is the restart and an exact index."""
    bodies = image_set(unique_prefix, 40)
    recorder = StreamRecorder(stack, unique_prefix)
    recorder.start()
    stack.stop_service("supervisor")
    suite = stack.settings
    stack.settings = dataclasses.replace(suite, canary_interval_s=Settings().canary_interval_s)  # the default
    try:
        stack.start_service("supervisor")
        # Delivery flows before the kill (a heal of the test before, or its radosgw restart, is not counted here).
        wait_for_a_canary(stack, since=time.time())
        stalls_before = counter(api, "canary_stalls")
        uploader = Uploader(stack, bodies, rate=2)
        uploader.start()
        uploader.wait_uploaded(10)
        ingest = stack.pid("ingest")
        assert ingest is not None
        os.killpg(ingest, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: stack.pid("ingest") not in (None, ingest), 60, what="ingest restarted by the supervisor")
        back_s = time.monotonic() - killed_at
        uploader.finish()
        outcome = assert_index_matches_bucket(stack, s3, api, unique_prefix, bodies, recorder, timeout_s=300)
        heals = counter(api, "canary_stalls") - stalls_before
    finally:
        stack.stop_service("supervisor")
        stack.settings = suite
        restore(stack)
    recorder.stop()
    record_outcome("receiver_killed", {**outcome, "seconds_kill_to_restarted": round(back_s, 1),
                                       "watchdog_heals": heals})


# -- 6. the index service killed during a rebuild -------------------------------------------------------------

REBUILD_FLOOR = 300  # objects in the bucket, so that a reembed outlasts the checks made while it runs


def test_index_service_killed_during_rebuild(stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str) -> None:
    bodies = image_set(unique_prefix, UPLOADS)
    admin = {"Authorization": f"Bearer {stack.settings.admin_token}"}
    # A whole-suite run has hundreds of objects by now; this file alone had ~40, whose reembed was done before the
    # test could see it running.
    seed_prefix = unique_prefix.rstrip("/") + "-seed/"
    seed = image_set(seed_prefix, max(0, REBUILD_FLOOR - len(listing(s3, stack.settings.bucket, ""))))
    if seed:
        for key, body in seed.items():
            s3.put_object(Bucket=stack.settings.bucket, Key=key, Body=body)
        assert_index_matches_bucket(stack, s3, api, seed_prefix, seed)
    with supervisor_paused(stack):
        uploader = Uploader(stack, bodies, RATE)
        uploader.start()
        uploader.wait_uploaded(UPLOADS // 3)
        generation = api.get("/stats").json()["generation"]
        started = api.post("/rebuild", json={"mode": "reembed"}, headers=admin)
        assert started.status_code == 202, started.text
        job = started.json()
        url = f"/rebuild/{job['id']}"
        wait_for(lambda: api.get(url).json()["done"] > 0, 120, what="objects of the rebuild settled")
        time.sleep(1.2)  # past rebuild.SAVE_EVERY_S: the next settle writes the progress to Redis
        settled = api.get(url).json()["done"]
        wait_for(lambda: api.get(url).json()["done"] > settled, 120, what="a settle after that")
        assert api.get(url).json()["state"] == "running"
        stack.stop_service("api", kill=True)
        killed_at = time.monotonic()
        time.sleep(2)
        stack.start_service("api")
        wait_for(lambda: _ready(stack), 300, what="index service ready after the kill")
        ready_at = time.monotonic()
        shadow_features = stack.home / "features" / stack.settings.namespace / f"g{job['generation']}.sqlite"
        shadow_features_left = shadow_features.exists()  # the dead shadow's local features (~30 KB an object)
        state = api.get(f"/rebuild/{job['id']}").json()
        stats = api.get("/stats").json()
        answered = api.post("/search", json={"vector": [1.0] * stats["dim"], "k": 3})
        uploader.finish()
        outcome = assert_index_matches_bucket(stack, s3, api, unique_prefix, bodies)
    assert state["state"] == "failed" and "restarted" in state["error"], state
    assert state["done"] > 0, state  # how far it got (reported 0: the progress was written every 100th object)
    assert not shadow_features_left, f"{shadow_features} was left on disk"
    assert stats["generation"] == generation and stats["rebuild"] == state, stats  # the last job, failed
    assert answered.status_code == 200 and len(answered.json()["results"]) == 3
    assert api.get("/stats").json()["generation"] == generation
    last = connect(stack.settings.redis_url).get(f"{stack.settings.namespace}:generation:last")
    assert int(last) >= job["generation"]  # the next rebuild takes a new number: the dead one's tasks are queued
    record_outcome("index_service_killed_during_rebuild", {
        **outcome, "rebuild_state_after_restart": state["state"], "serving_generation_kept": generation,
        "seconds_kill_to_ready": round(ready_at - killed_at, 1)})


# -- 7. huge and stalling objects -----------------------------------------------------------------------------

class Zeros(io.RawIOBase):
    """``size`` zero bytes, produced as read: a 200 MB upload without 200 MB in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def test_huge_and_stalling_objects_fail_clearly_and_the_batch_goes_on(
    stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    bucket = stack.settings.bucket
    timeout_s = 5
    bodies = image_set(unique_prefix + "good-", 10)
    slow = {unique_prefix + "stall-me.jpg": "fetch_timeout", unique_prefix + "drip-me.jpg": "fetch_timeout",
            unique_prefix + "huge.bin": "too_large"}
    proxy = SlowBodyProxy(("127.0.0.1", stack.config.s3_port), stall=[b"stall-me"], drip=[b"drip-me"])
    worker: subprocess.Popen[bytes] | None = None
    uploads = patient_s3(stack)
    try:
        with supervisor_paused(stack):
            stack.stop_service("worker")  # the only worker is the one behind the proxy
            etags = {k: uploads.put_object(Bucket=bucket, Key=k, Body=b)["ETag"].strip('"') for k, b in bodies.items()}
            for key in slow:
                if key.endswith("huge.bin"):
                    uploads.upload_fileobj(Zeros(200 * 1024 * 1024), bucket, key)
                else:
                    uploads.put_object(Bucket=bucket, Key=key, Body=next(iter(bodies.values())))
            # One batch holding all of them (on top of the notifications' own tasks): the slow ones must not
            # hold up the others.
            serving = api.get("/stats").json()["generation"]  # (not 1 on a stack kept from runs that rebuilt)
            refs = [ObjectRef(bucket, key, s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"'),
                              generation=serving) for key in [*slow, *bodies]]
            Publisher(stack.settings, connect(stack.settings.redis_url)).send_embeds(refs)
            log = LogWindow(stack, ("worker-proxied",))
            worker = start_worker(stack, "worker-proxied.log", BUCKETLENS_S3_ENDPOINT=proxy.url,
                                  BUCKETLENS_FETCH_TIMEOUT_S=str(timeout_s), BUCKETLENS_MAX_RETRIES="1")
            started = time.monotonic()
            outcome = assert_index_matches_bucket(stack, s3, api, unique_prefix, {**bodies, **dict.fromkeys(slow,
                                                  b"")}, bad=slow, timeout_s=300)
            settled = wait_for(lambda: all(k in (f := failures_under(api, bucket, unique_prefix)) for k in slow) and f,
                               120, what="failure records of the slow objects")
            # The batch sent above (the notifications' own tasks may finish first): the huge object fails at once,
            # the slow ones are retried (a stall may be brief), and fail as too slow once the retries are spent.
            mixed = f"batch: {len(bodies)} embedded, 1 failed, 0 skipped, 2 to retry"
            try:
                lines = wait_for(lambda: [x for x in log.lines("worker-proxied") if mixed in x], 60, what=mixed)
            except AssertionError:
                failed = failures_under(api, bucket, unique_prefix)
                good = {k: f"{r['reason']}: {r['message']}" for k, r in failed.items() if k in bodies}
                batches = "\n".join(x for x in log.lines("worker-proxied") if "batch:" in x)
                raise AssertionError(f"no batch indexed the good objects beside the slow ones:\n{batches}\n"
                                     f"good objects that failed: {good}") from None
            took = time.monotonic() - started
    finally:
        if worker is not None:
            stop_worker(worker)
        proxy.close()
        with contextlib.suppress(Exception):
            s3.delete_object(Bucket=bucket, Key=unique_prefix + "huge.bin")  # 200 MB of the test cluster's disk
    assert {k: settled[k]["reason"] for k in slow} == slow, {k: settled[k]["message"] for k in slow}
    assert {k: settled[k]["attempts"] for k in slow} == {k: 1 if r == "too_large" else 2 for k, r in slow.items()}
    assert all(object_state(api, bucket, k)["state"] == "indexed" for k in etags)
    record_outcome("huge_and_stalling_objects", {
        **outcome, "failures": {k.removeprefix(unique_prefix): settled[k]["reason"] for k in slow},
        "fetch_timeout_s": timeout_s, "batch": lines[0].split("batch: ", 1)[1],
        "seconds_worker_start_to_settled": round(took, 1), "held_back_requests": len(proxy.held)})


# -- 8. Redis loses its data ----------------------------------------------------------------------------------

def lose_redis_data(stack: Stack) -> None:
    """Redis comes back empty: killed, its AOF and RDB files gone (a disk lost, a failover to an empty replica).
    The supervisor is held meanwhile: restarting Redis on the files being deleted raced the test's own start (a
    clean-clone run once found no Redis after 30 s); it runs again as soon as Redis is back."""
    stack.stop_service("supervisor")
    try:
        stack.stop_redis(kill=True)
        folder = stack.home / "redis"
        for path in folder.iterdir():
            if path.name != "redis.conf":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        stack.start_redis()
    finally:
        stack.start_service("supervisor")


def test_redis_losing_its_data_keeps_serving_and_a_reconcile_brings_everything_back(
    stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    before = image_set(unique_prefix + "before-", 30)
    during = image_set(unique_prefix + "during-", UPLOADS)
    uploads = patient_s3(stack)
    for key, body in before.items():
        uploads.put_object(Bucket=stack.settings.bucket, Key=key, Body=body)
    assert_index_matches_bucket(stack, s3, api, unique_prefix + "before-", before)
    stats = api.get("/stats").json()
    probe = reference_vectors(stack, dict([next(iter(before.items()))]))
    logs = LogWindow(stack, ("api", "ingest", "worker"))
    # The supervisor keeps running, as on the local stack: a worker that holds a task when Redis goes away can die
    # of it (kombu 5.7.0 raises AttributeError while restoring its unacked tasks at close: README, "Redis losing its
    # data"), and the supervisor restarts it, as compose's restart policy would.
    try:
        uploader = Uploader(stack, during, RATE)
        uploader.start()
        uploader.wait_uploaded(UPLOADS // 3)
        lose_redis_data(stack)
        lost_at = time.monotonic()
        # Served from memory meanwhile: the same vectors, the same answers.
        (vector,) = probe.values()
        hits = api.post("/search", json={"vector": vector.tolist(), "k": 1}).json()["results"]
        served = api.get("/stats").json()
        wait_for(lambda: counter(api, "redis_data_lost") >= 1, 60, what="the index service noticing the loss")
        noticed = time.monotonic() - lost_at
        uploader.finish()
        outcome = assert_index_matches_bucket(stack, s3, api, unique_prefix + "during-", during)
        assert_index_matches_bucket(stack, s3, api, unique_prefix + "before-", before)
    finally:
        restore(stack)
    assert hits[0]["key"] == next(iter(before)) and hits[0]["score"] > 0.999
    assert served["vectors"] >= stats["vectors"] and served["generation"] == stats["generation"]
    generations = connect(stack.settings.redis_url).hgetall(f"{stack.settings.namespace}:generations")
    assert generations == {str(stats["generation"]).encode(): stats["model"].encode()}, generations
    assert all((object_state(api, stack.settings.bucket, k) or {}).get("generation") == stats["generation"]
               for k in during)
    assert logs.count("api", "Redis lost its data") == 1
    record_outcome("redis_lost_its_data", {
        **outcome, "seconds_loss_to_noticed": round(noticed, 1),
        "events_refused_no_generation": logs.count("ingest", "no_generation"),
        "worker_crashes_restarted": logs.count("worker", "Unrecoverable error"),
        "seconds_loss_to_all_indexed": round(time.monotonic() - lost_at)})


def test_redis_gone_back_to_a_copy_from_before_a_rebuild_is_noticed_and_healed(
    stack: Stack, s3: Any, api: httpx.Client, unique_prefix: str
) -> None:
    """A Redis backup restored, a failover to a replica that lagged, or an AOF cut short by `redis-check-aof --fix`
    brings back the generations hash of before the last rebuild: the marker is there, the serving generation is
    not, and ingest tagged every event with the retired one, whose results the merger dropped. Every upload,
    overwrite and delete since was lost, with nothing said, and reconciles too (an independent review restored a
    real AOF copy). Made here as such a copy leaves that hash (the rest of Redis as it is: a copy from within a
    generation was shown harmless), on the shared stack's serving generation."""
    bodies = image_set(unique_prefix, 4)
    keys = list(bodies)
    for key, body in bodies.items():
        s3.put_object(Bucket=stack.settings.bucket, Key=key, Body=body)
    assert_index_matches_bucket(stack, s3, api, unique_prefix, bodies)
    stats = api.get("/stats").json()
    redis = connect(stack.settings.redis_url)
    generations = f"{stack.settings.namespace}:generations"
    healed, logs = counter(api, "redis_data_lost"), LogWindow(stack, ("api",))

    redis.hdel(generations, str(stats["generation"]))
    redis.hset(generations, str(stats["generation"] - 1), stats["model"])
    now = {keys[0]: bodies[keys[1]], keys[1]: bodies[keys[1]], keys[3]: bodies[keys[3]]}  # overwritten, deleted
    s3.put_object(Bucket=stack.settings.bucket, Key=keys[0], Body=now[keys[0]])
    s3.delete_object(Bucket=stack.settings.bucket, Key=keys[2])
    now[unique_prefix + "new.jpg"] = image_set(unique_prefix + "new-", 1).popitem()[1]
    s3.put_object(Bucket=stack.settings.bucket, Key=unique_prefix + "new.jpg", Body=now[unique_prefix + "new.jpg"])

    assert_index_matches_bucket(stack, s3, api, unique_prefix, now, timeout_s=120)
    wait_for(lambda: object_state(api, stack.settings.bucket, keys[2]) is None, 60, what="the deleted object gone")
    assert counter(api, "redis_data_lost") == healed + 1
    assert redis.hgetall(generations) == {str(stats["generation"]).encode(): stats["model"].encode()}
    assert logs.count("api", "Redis went back to an older copy of its data") == 1


# -- 9. snapshots and Redis both lost -------------------------------------------------------------------------

def test_snapshots_and_redis_both_lost_reembed_the_bucket_or_restore_the_s3_copy(stack: Stack, s3: Any) -> None:
    """An index service of its own (namespace, bucket, no notifications) starts with nothing at all: no snapshot
    and no data in Redis. It re-embeds the bucket by itself, /readyz saying so until done; it keeps snapshots in
    the bucket too (SNAPSHOT_S3=1), so after losing its folder and its Redis data again it restores from there."""
    name, bucket, bodies = own_bucket(s3, "restore", 24)
    env, api = own_service(name, bucket, BUCKETLENS_SNAPSHOT_S3="1")
    service = start_worker(stack, f"api-{name}.log", "serve", **env)
    worker: subprocess.Popen[bytes] | None = None
    try:
        # No worker yet: the reembed cannot finish, so /readyz is seen saying why.
        waiting = wait_for(lambda: (r := _readyz(api)) and "re-embedding the bucket (0 of 24" in r.get("reason", "")
                           and r, 300, interval_s=0.5, what="/readyz reporting the restore")
        worker = start_worker(stack, f"worker-{name}.log", **env)
        wait_for(lambda: _readyz(api).get("ready"), 300, interval_s=1, what="the restored index ready")
        restored = api.get("/stats").json()
        outcome = assert_index_matches_bucket(stack, s3, api, f"{name}/", bodies, bucket=bucket)
        copies = listing(s3, bucket, stack.settings.reserved_prefix + f"snapshots/{name}/")  # (its namespace's)
        assert copies, "no snapshot copy in the bucket"

        stop_worker(service, signal.SIGKILL)
        wipe_namespace(stack, name)
        shutil.rmtree(stack.home / "snapshots" / name)
        service = start_worker(stack, f"api-{name}.log", "serve", **env)
        wait_for(lambda: _readyz(api).get("ready"), 300, interval_s=1, what="ready from the S3 snapshot copy")
        again = api.get("/stats").json()
        assert_index_matches_bucket(stack, s3, api, f"{name}/", bodies, bucket=bucket)
    finally:
        for process in (service, worker):
            if process is not None:
                stop_worker(process)
        api.close()
    assert waiting["ready"] is False and "no snapshot and no data in Redis" in waiting["reason"], waiting
    assert restored["vectors"] == len(bodies) and restored["generation"] == 2  # generation 1 was the empty one
    assert again["vectors"] == len(bodies) and again["generation"] == restored["generation"]
    assert again["last_snapshot"]["name"].startswith(stack.settings.reserved_prefix), again["last_snapshot"]
    record_outcome("snapshots_and_redis_lost", {**outcome, "snapshot_copies_in_bucket": len(copies)})


def own_bucket(s3: Any, kind: str, count: int) -> tuple[str, str, dict[str, bytes]]:
    """A namespace name, a bucket of its own (no notifications) and ``count`` images uploaded to it."""
    name = f"{kind[0]}{uuid.uuid4().hex[:8]}"
    bucket = f"{kind}-{name}"
    s3.create_bucket(Bucket=bucket)
    bodies = image_set(f"{name}/", count)
    for key, body in bodies.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    return name, bucket, bodies


def own_service(name: str, bucket: str, **env: str) -> tuple[dict[str, str], httpx.Client]:
    """The environment of an index service (and workers) of its own, and a client for its API."""
    port = free_port()
    env = {"BUCKETLENS_NAMESPACE": name, "BUCKETLENS_BUCKET": bucket, "BUCKETLENS_API_PORT": str(port), **env}
    return env, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)


def _readyz(api: httpx.Client) -> dict[str, Any]:
    try:
        return api.get("/readyz", timeout=5).json()  # type: ignore[no-any-return]
    except (httpx.HTTPError, ValueError):
        return {}


def wipe_namespace(stack: Stack, namespace: str) -> None:
    """Every Redis key of one namespace deleted: what a fresh Redis looks like to the services using it."""
    redis = connect(stack.settings.redis_url)
    for key in redis.scan_iter(match=f"{namespace}:*", count=1000):
        redis.delete(key)


# -- 10. the snapshot folder full or read-only ----------------------------------------------------------------

FILLER = "filler"


@contextlib.contextmanager
def disk_trouble(folder: Path, trouble: str) -> Iterator[None]:
    """``folder`` full (a 16 KB tmpfs filled by ``FILLER``: a snapshot of the still empty serving generation, taken
    as the service's first re-embed merges, fitted in the 16 KB and sometimes was) or read-only (a read-only bind
    mount of itself); chmod would not do: the tests run as root."""
    if trouble == "full":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(folder)], check=True)
        subprocess.run(["dd", "if=/dev/zero", f"of={folder / FILLER}", "bs=4k"], capture_output=True)  # to ENOSPC
    else:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
    try:
        yield
    finally:  # the service can hold a file open there for a moment (a snapshot being written): busy, try again
        wait_for(lambda: subprocess.run(["umount", str(folder)], capture_output=True).returncode == 0, 30,
                 what=f"{folder} unmounted")


@pytest.mark.parametrize("trouble", ["full", "read_only"])
def test_snapshot_folder_full_or_read_only_keeps_serving_and_merging(stack: Stack, s3: Any, trouble: str) -> None:
    name, bucket, bodies = own_bucket(s3, "disk", 12)
    folder = stack.home / "snapshots" / name
    folder.mkdir(parents=True)
    env, api = own_service(name, bucket, BUCKETLENS_SNAPSHOT_EVERY_S="1", BUCKETLENS_SNAPSHOT_FAILURE_GRACE_S="5")
    settings = dataclasses.replace(stack.settings, namespace=name, bucket=bucket)
    redis = connect(stack.settings.redis_url)
    logs = LogWindow(stack, (f"api-{name}",))
    processes = [start_worker(stack, f"worker-{name}.log", **env)]
    try:
        with disk_trouble(folder, trouble):
            processes.append(start_worker(stack, f"api-{name}.log", "serve", **env))
            # It re-embeds the bucket (nothing to start from), then cannot snapshot the result.
            failing = wait_for(lambda: "snapshots failing" in (r := _readyz(api)).get("reason", "") and r, 300,
                               interval_s=1, what="/readyz saying snapshots fail")
            assert_index_matches_bucket(stack, s3, api, f"{name}/", bodies, bucket=bucket)  # serving
            more = send_more(s3, settings, api, image_set(f"{name}/more-", 4))  # merging
            outcome = assert_index_matches_bucket(stack, s3, api, f"{name}/", {**bodies, **more}, bucket=bucket)
            stats = api.get("/stats").json()
            metrics = api.get("/metrics").text
            untrimmed = redis.xlen(f"{name}:results")
            left_behind = sorted(p.name for p in folder.iterdir() if p.name != FILLER)
        # The disk is back: with nothing more uploaded, the next retry snapshots, trims the stream, and /readyz is
        # ready again (a retry waited for the next merge: an idle service stayed 503 for good).
        wait_for(lambda: _readyz(api).get("ready"), 120, interval_s=1, what="ready once snapshots are written")
        trimmed = redis.xlen(f"{name}:results")
        written = sorted(p.name for p in folder.iterdir())
        stop_worker(processes.pop(), signal.SIGKILL)
        processes.append(start_worker(stack, f"api-{name}.log", "serve", **env))
        wait_for(lambda: _readyz(api).get("ready"), 300, interval_s=1, what="ready after a restart")
        reloaded, snapshotted = api.get("/stats").json(), len(bodies) + len(more)
        more.update(send_more(s3, settings, api, image_set(f"{name}/after-", 2)))  # merging goes on
        assert_index_matches_bucket(stack, s3, api, f"{name}/", {**bodies, **more}, bucket=bucket)
    finally:
        for process in processes:
            stop_worker(process)
        api.close()
    assert failing["ready"] is False and ("No space" if trouble == "full" else "Read-only") in failing["reason"]
    assert stats["snapshot_failures"]["failures"] >= 1 and stats["last_snapshot"] is None, stats
    assert re.search(r"^bucketlens_snapshot_failures_total [1-9]", metrics, re.MULTILINE), metrics[:500]
    assert untrimmed == stats["applied_entries"], (untrimmed, stats["applied_entries"])  # nothing trimmed
    assert left_behind == [], left_behind  # no partial snapshot, not even a temporary file
    assert len(written) >= 1 and trimmed < untrimmed
    assert reloaded["last_snapshot"]["name"] in written and reloaded["vectors"] == snapshotted
    assert logs.count(f"api-{name}", "ERROR .*snapshot failed, serving and merging go on") == 1
    record_outcome(f"snapshot_folder_{trouble}", {**outcome, "snapshot_failures": stats["snapshot_failures"],
                                                  "stream_entries_kept_untrimmed": untrimmed})


def test_a_restart_before_a_swapped_in_generations_first_snapshot_loses_nothing(stack: Stack, s3: Any) -> None:
    """A reembed's swap stopped feeding the old generation at once, and the new one's first snapshot came after (15-20
    s at 1M; never, on a read-only disk). A restart before that snapshot restored the old generation, and the replay
    dropped the entries of the new one: uploads and deletes since the swap were lost for good (review 22). The old
    generation is now fed until the new one is durable; the job is said failed after such a restart."""
    name, bucket, bodies = own_bucket(s3, "swap", 6)
    folder = stack.home / "snapshots" / name
    folder.mkdir(parents=True)
    env, api = own_service(name, bucket, BUCKETLENS_SNAPSHOT_EVERY_S="1")
    admin = {"Authorization": f"Bearer {stack.settings.admin_token}"}
    processes = [start_worker(stack, f"worker-{name}.log", **env),
                 start_worker(stack, f"api-{name}.log", "serve", **env)]
    try:
        wait_for(lambda: _readyz(api).get("ready"), 300, interval_s=1, what="ready (the bucket re-embedded)")
        assert_index_matches_bucket(stack, s3, api, f"{name}/", bodies, bucket=bucket)
        wait_for(lambda: (api.get("/stats").json()["last_snapshot"] or {}).get("count") == len(bodies), 120,
                 interval_s=1, what="a snapshot of every object")
        generation = api.get("/stats").json()["generation"]
        with disk_trouble(folder, "read_only"):
            started = api.post("/rebuild", json={"mode": "reembed"}, headers=admin)
            assert started.status_code == 202, started.text
            job = started.json()
            wait_for(lambda: api.get(f"/rebuild/{job['id']}").json()["state"] == "done", 300, interval_s=1,
                     what="the rebuild swapped in (its snapshot failing)")
            assert api.get("/stats").json()["generation"] == job["generation"] > generation
            # Since the swap: a new upload and a delete, sent to the generations fed now (as ingest would)
            more = image_set(f"{name}/after-", 2)
            for key, body in more.items():
                s3.put_object(Bucket=bucket, Key=key, Body=body)
            deleted = sorted(bodies)[0]
            s3.delete_object(Bucket=bucket, Key=deleted)
            kept = {**{k: v for k, v in bodies.items() if k != deleted}, **more}
            assert api.post("/reconcile", json={}, headers=admin).status_code == 200
            assert_index_matches_bucket(stack, s3, api, f"{name}/", kept, bucket=bucket)
            wait_for(lambda: (object_state(api, bucket, deleted) or {}).get("state") != "indexed", 60,
                     what="the deleted object out of the index")
            stop_worker(processes.pop(), signal.SIGKILL)  # before any snapshot of the new generation
        processes.append(start_worker(stack, f"api-{name}.log", "serve", **env))
        wait_for(lambda: _readyz(api).get("ready"), 300, interval_s=1, what="ready after the restart")
        after = api.get("/stats").json()
        state = api.get(f"/rebuild/{job['id']}").json()
        assert_index_matches_bucket(stack, s3, api, f"{name}/", kept, bucket=bucket, timeout_s=30)
        left = object_state(api, bucket, deleted)
    finally:
        for process in processes:
            stop_worker(process)
        api.close()
    assert after["generation"] == generation, after  # the old generation, restored from its snapshot
    assert (left or {}).get("state") != "indexed", left
    assert state["state"] == "failed" and "snapshot" in state["error"], state


def send_more(s3: Any, settings: Settings, api: httpx.Client, bodies: dict[str, bytes]) -> dict[str, bytes]:
    """Upload to a bucket without notifications and queue the objects as ingest would: tasks for the serving
    generation."""
    generation = api.get("/stats").json()["generation"]
    refs = [ObjectRef(settings.bucket, key, s3.put_object(Bucket=settings.bucket, Key=key, Body=body)["ETag"]
                      .strip('"'), generation=generation) for key, body in bodies.items()]
    publisher = Publisher(settings, connect(settings.redis_url))
    publisher.send_embeds(refs)
    publisher.close()
    return bodies


# ---- Milvus backend (issue 10) ------------------------------------------------------------------------------------
# An index service of its own on the session's Milvus server (tests/conftest.py, milvus_server), beside the stack's
# (FAISS) one: the stack gives Redis; the entries are written straight to the result stream (test_recovery.py's mix
# of uploads, re-uploads, deletes and late stale versions), so what is checked is the index path alone.


def test_milvus_killed_mid_merge_answers_503_then_catches_up(stack: Stack, milvus_server: Any) -> None:
    """Milvus SIGKILLed while the service merges, down ~40 s (its restart): /readyz 503 with the reason, searches 503
    (never 500), merging waits; once it is back (here the test restarts it, as the local stack's supervisor does)
    every entry is applied and the index equals an uninterrupted run."""
    import numpy as np

    from bucketlens.keys import Keys
    from index_service.backend import open_backend
    from index_service.feature_store import FeatureStore
    from index_service.vector_index import VectorIndex

    from .test_recovery import DIM, MODEL, IndexProcess, entries, own_settings

    if milvus_server is None:
        pytest.skip("BUCKETLENS_TEST_MILVUS names a server this run did not start and cannot kill")
    settings = own_settings(stack, "mf", "milvus", milvus_server.uri, merge_batch=100, snapshot_every_entries=500)
    keys, redis = Keys(settings.namespace), connect(settings.redis_url)
    stream = entries(2000, seed=3)
    service = IndexProcess(settings)
    service.start(ready=True)
    try:
        for entry in stream[:1000]:
            redis.xadd(keys.results, entry.to_fields())
        wait_for(lambda: int(service.stats()["applied_entries"]) >= 300, 120, interval_s=0.05, what="merging")
        milvus_server.kill()
        for entry in stream[1000:]:  # results keep arriving while Milvus is down
            redis.xadd(keys.results, entry.to_fields())
        ready = wait_for(lambda: (r := httpx.get(service.url + "/readyz", timeout=30)).status_code == 503 and r,
                         60, what="/readyz 503")
        assert "Milvus unreachable" in ready.json()["reason"]
        query = np.ones(DIM, np.float32).tolist()
        answer = httpx.post(service.url + "/search", json={"vector": query}, timeout=60)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "index_unavailable", answer.text
        started = time.monotonic()
        milvus_server.start()
        seen: list[tuple[int, int]] = []  # (/readyz, a search) while Milvus comes back
        unexpected: list[str] = []  # the bodies of answers neither 200 nor 503

        def caught_up() -> bool:
            ready = httpx.get(service.url + "/readyz", timeout=30).status_code
            answer = httpx.post(service.url + "/search", json={"vector": query}, timeout=60)
            searched = answer.status_code
            seen.append((ready, searched))
            if searched not in (200, 503):
                unexpected.append(answer.text)
            return (ready == searched == 200 and redis.xinfo_groups(keys.results)[0]["lag"] == 0
                    and not redis.xinfo_groups(keys.results)[0]["pending"])

        wait_for(caught_up, 300, what="caught up after the restart")
        caught_up_s = time.monotonic() - started
        # A restarted Milvus answers before it has loaded its collections again: searches were 500 for ~25 s then,
        # while /readyz said ready (an independent check, twice).
        assert {searched for _, searched in seen} <= {200, 503}, (seen, unexpected[:3])
        assert all(searched == 200 for ready, searched in seen if ready == 200), seen
        service.stop(signal.SIGTERM)
        backend = open_backend(settings, redis, keys, lambda _: FeatureStore())
        loaded = backend.load()
        assert loaded is not None
        reference = VectorIndex(MODEL, DIM)
        reference.apply(stream)
        assert not index_difference(loaded[0], reference), index_difference(loaded[0], reference)
        record_outcome("milvus_killed_mid_merge", {"entries": len(stream), "indexed": len(reference),
                                                   "seconds_restart_to_caught_up": round(caught_up_s, 1)})
    finally:
        if service.process is not None and service.process.poll() is None:
            service.stop(signal.SIGKILL)
        if milvus_server.process is not None and milvus_server.process.poll() is not None:
            try:  # (left dead by a failure above, it failed every later Milvus test too)
                milvus_server.start()
            except Exception as exc:  # (not in place of the failure above)
                print(f"milvus did not start again: {exc}", file=sys.stderr)
        with contextlib.suppress(Exception):
            client = open_backend(settings, redis, keys, lambda _: FeatureStore()).connection  # type: ignore[attr-defined]
            for name in client.client.list_collections():
                if name.startswith(f"bucketlens_{settings.namespace}_g"):
                    for alias in client.client.list_aliases(name)["aliases"]:
                        client.client.drop_alias(alias)
                    client.client.drop_collection(name)


# -- a cancelled rebuild ------------------------------------------------------------------------------------
# Last: the huge-and-stalling test failed right after it in two of three whole-suite runs (one good object of its
# mixed batch failed), never alone and never in the file run alone; the cause is not found yet.

def indexed_set(stack: Stack, s3: Any, api: httpx.Client, prefix: str, count: int) -> dict[str, bytes]:
    """``count`` images uploaded under ``prefix``, once every one is indexed (a rebuild test's starting point)."""
    bodies = image_set(prefix, count)
    uploader = Uploader(stack, bodies, RATE)
    uploader.start()
    uploader.finish()
    assert_index_matches_bucket(stack, s3, api, prefix, bodies)
    return bodies


def test_a_cancelled_rebuild_leaves_its_queued_tasks_unembedded(stack: Stack, s3: Any, api: httpx.Client,
                                                                unique_prefix: str) -> None:
    """Cancelling a reembed once left its queued tasks to the workers, which embedded the rest of the bucket for
    nothing (minutes on a large one; the next rebuild queued behind them). The workers drop them now, unfetched."""
    bodies = indexed_set(stack, s3, api, unique_prefix, 20)
    admin = {"Authorization": f"Bearer {stack.settings.admin_token}"}
    rebuild_queue = Keys(stack.settings.namespace).rebuild_queue
    logs = LogWindow(stack, ("worker",))
    with supervisor_paused(stack):
        stack.stop_service("worker")  # the tasks wait in the queue, as behind a long backlog
        job = api.post("/rebuild", json={"mode": "reembed"}, headers=admin).json()
        wait_for(lambda: api.get(f"/rebuild/{job['id']}").json()["total"] >= len(bodies), 120,
                 what="the rebuild's listing queued")
        assert api.delete(f"/rebuild/{job['id']}", headers=admin).json()["state"] == "cancelled"
        queued = api.get("/queues").json()["queues"][rebuild_queue]["depth"]
        embedded = counter(api, "embedded")
    wait_for(lambda: (r := api.get("/queues").json())["queues"][rebuild_queue]["depth"] == 0 and r["unacked"] == 0,
             120, what="the cancelled rebuild's tasks taken")
    assert queued >= 1, "nothing was queued when the rebuild was cancelled"
    assert counter(api, "embedded") == embedded, "the cancelled rebuild's objects were embedded"
    assert logs.count("worker", "of a cancelled or retired generation dropped") >= 1
    key = unique_prefix + "after-cancel.jpg"  # and the workers go on with live uploads
    s3.put_object(Bucket=stack.settings.bucket, Key=key, Body=next(iter(image_set(key, 1).values())))
    wait_for(lambda: (state := object_state(api, stack.settings.bucket, key)) and state["state"] == "indexed", 120,
             what=f"{key} indexed")


def test_a_rebuild_whose_listing_task_was_lost_completes(stack: Stack, s3: Any, api: httpx.Client,
                                                         unique_prefix: str) -> None:
    """A rebuild's task lost between the broker and a worker (a worker killed after popping it, before recording
    it) left the rebuild waiting for its objects until cancelled: the orphan sweep stands aside while a shadow
    generation is built (an independent review). Once the pipeline is quiet, they are now sent again."""
    bodies = indexed_set(stack, s3, api, unique_prefix, 12)
    admin = {"Authorization": f"Bearer {stack.settings.admin_token}"}
    keys, redis = Keys(stack.settings.namespace), connect(stack.settings.redis_url)
    resent = counter(api, "orphans_resent")
    with supervisor_paused(stack):
        stack.stop_service("worker")  # the tasks wait in the queue
        job = api.post("/rebuild", json={"mode": "reembed"}, headers=admin).json()
        wait_for(lambda: api.get(f"/rebuild/{job['id']}").json()["listed"], 120, what="the rebuild's listing queued")
        lost = json.loads(redis.lpop(keys.queue_list(keys.rebuild_queue)) or "null")  # as a killed worker's
        assert lost is not None, "no rebuild task was queued"
    done = wait_rebuild(api, job["id"])  # (its lost objects are sent again once the pipeline is quiet)
    assert done["state"] == "done" and done["done"] == done["total"], done
    assert counter(api, "orphans_resent") > resent
    assert_index_matches_bucket(stack, s3, api, unique_prefix, bodies)
