"""The local stack's supervisor (``bucketlens supervise``, started by ``bucketlens up``).

Every ``WATCH_S`` it restarts services and servers that died (Redis, radosgw, Milvus, ingest, the workers, the
index services; the receiver above all: Ceph 16 stops delivering a topic whose endpoint refused connections for
10 s or more, until radosgw restarts). Every ``canary_interval_s`` it proves delivery end to end with a canary
object. When a canary is not delivered within ``canary_timeout_s`` it restarts radosgw (which resumes the stalled
topic and redelivers its queue; ingest too when it does not answer its health check: hung, its pid alive; the OSD
instead when the OSD is the one hung) and
runs a reconcile to heal whatever was missed; a reconcile that fails (the
index service away) is tried again at the next check. A restarted radosgw picks its persistent queues up only when
it rereads their list (every 30 s), so the canary written after a restart gets ``RESTART_GRACE_S`` more: without
it, a timeout under ~30 s restarted radosgw again and again, never leaving it the time to resume (seen in
tests/test_faults.py with ``canary_timeout_s=20``); each heal in a row without a delivery doubles that grace.

A service that dies again within ``STABLE_S`` of its restart without having answered its liveness question
``WELL_S`` or more after it (a setting it refuses, a model it cannot load) is restarted at once the first time,
then after twice the wait of the last time (from ``2 * canary_interval_s`` up to ``MAX_BACKOFF_S``), with the last
line it wrote to its log since then in the supervisor's log: a crash loop does not spend the machine on loading a
model every few seconds. One that answered then was well, and is restarted at once: killed from outside, say
(three kills of the worker within two minutes left it down for two more: review 83).

A process running but hung (frozen, wedged: its pid is there) is found by infra/liveness.py's questions and killed,
and started again by the process watch. The process watch, the delivery check and the liveness questions each run
in a thread of their own: a frozen Redis or S3 server holds a call for its whole timeout, and a restart or a kill
waiting behind one came minutes late (review 24).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import httpx
import redis
from botocore.exceptions import BotoCoreError, ClientError

from bucketlens.keys import Keys
from bucketlens.outage import Outage
from bucketlens.redis_client import connect, probe
from bucketlens.s3 import error_code, make_client

from . import milvus
from .canary import RESTART_GRACE_S, Canary
from .liveness import PROBE_EVERY_S, Liveness, Probe, ceph_daemon, serves
from .milvus import log_tail
from .procfs import children
from .stack import Stack, StackError, free_space

log = logging.getLogger(__name__)
WATCH_S = 1.0  # processes are looked at this often (pid files and a TCP connect: cheap)
SERVERS = {"redis": "redis", "s3": "ceph", "milvus": "milvus"}  # the servers the process watch keeps up: their data
LOGS = {"s3": "ceph-script.log"}  # where a server's start writes, where not logs/<name>.log
# Whose liveness questions say that a server ran well, where not its own name's (the S3 server: its daemons, each:
# radosgw answered while an OSD died at each start, review 88; the worker: a pool process too, which beats once its
# model is loaded, where the main process beat while a model that then failed loaded, review 89)
LIVENESS = {"s3": ("radosgw", "ceph-mon", "ceph-osd"), "worker": ("worker", "worker-pool")}
# A restart counts as well once it answered a question asked this long after it: a worker whose model fails to load
# answered before it died (its main process beats before the pool loads the model), and was restarted without end
# (review 88)
WELL_S = 30.0
RESTARTED = {"redis": " (its append-only file brings back what it held)",  # said with a restart
             "s3": ", then reconciling (what it stored as it died it may not have told of)",
             "milvus": " (the index service waits and resumes merging)"}
STABLE_S = 120.0  # a restarted service that ran this long is well again
MAX_BACKOFF_S = 600.0
CHECK_TIMEOUT_S = 5.0  # the supervisor's own Redis and S3 calls
CEPH_DAEMONS = {"ceph-mon": "mon.a", "ceph-osd": "osd.0"}  # watched name: Ceph's name


@dataclasses.dataclass
class Restarts:
    at: float | None = None  # monotonic time of the last restart; None: none since the service was last well
    quick: int = 0  # restarts in a row that it did not survive for STABLE_S
    log_from: int = 0  # the size of its log at the last restart: what the restarted process wrote comes after

    def wait_s(self, interval_s: float) -> float:
        """How long after the last restart the next one may come."""
        return 0.0 if not self.quick else min(interval_s * 2 ** self.quick, MAX_BACKOFF_S)


class Supervisor:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.settings = stack.settings
        # Short waits: a frozen Redis or S3 server held each check for minutes with the services' (10 s x 4; 60 s x 2)
        self.redis = connect(self.settings.redis_url, CHECK_TIMEOUT_S, retries=1)
        self.keys = Keys(self.settings.namespace)
        self.canary = Canary(self.settings, make_client(self.settings, read_timeout=CHECK_TIMEOUT_S), self.redis)
        self.grace = 0.0  # extra wait for the canary while a restarted radosgw resumes delivery
        self.judging = False  # whether the outstanding canary is this supervisor's own
        self.stalls = 0  # heals in a row with no canary delivered since
        self.reconcile_owed = False  # a heal's reconcile has not been answered yet
        self.owed = 0  # how many reconciles were owed so far: one answered clears only those owed before it began
        self.reconciler: threading.Thread | None = None
        self.outages: dict[str, Outage] = {}  # per step: a failure is logged once, not every time
        self.restarts: dict[str, Restarts] = {}
        self.redis_restarted: float | None = None  # monotonic time this supervisor last started Redis
        self.liveness = Liveness(self.settings.liveness_timeout_s)
        self.beaten: set[int] = set()  # worker pool processes seen beating
        self.silent_pool: dict[int, float] = {}  # those of them silent now: since when (logged as each went silent)
        self.main_beats = False  # whether the worker's main process beat at the last question
        self.kills: dict[str, tuple[float, int]] = {}  # per process: when it was last killed as hung, kills in a row
        self.uncounted = 0  # hung processes killed (or restarted by a heal) not yet counted in Redis
        run = stack.home / "ceph" / "run"
        self.ceph_asks = {name: ceph_daemon(run, daemon, osd=name == "ceph-osd")
                          for name, daemon in CEPH_DAEMONS.items()}
        self.acting = threading.Lock()  # the process watch's starts and the liveness thread's kills, one at a time

    @property
    def watched(self) -> tuple[str, ...]:
        return tuple(name for name in self.stack.services if name != "supervisor")

    def run(self, stop: threading.Event) -> None:
        log.info("supervising %s (every %.0f s; delivery every %.0f s)", ", ".join(self.watched), WATCH_S,
                 self.settings.canary_interval_s)
        threading.Thread(target=self.ask_forever, args=(stop,), name="liveness", daemon=True).start()
        threading.Thread(target=self.check_forever, args=(stop,), name="delivery", daemon=True).start()
        while not stop.is_set():
            with self.acting:
                self.attempt("process watch", self.keep_processes_up)
            stop.wait(WATCH_S)

    def check_forever(self, stop: threading.Event) -> None:
        """The delivery check every ``canary_interval_s`` until ``stop``, in a thread of its own: its S3 and Redis
        calls wait out their timeouts on a frozen server, and the process watch waited with them (a crashed worker
        was restarted 5 min 49 s late while radosgw was frozen: review 24)."""
        while not stop.is_set():
            self.attempt("delivery check", self.check_delivery)
            stop.wait(self.settings.canary_interval_s)

    def attempt(self, what: str, step: Callable[[], object]) -> None:
        """``step``; a failure is logged once, until it works again: a server away (Redis, S3, a process start) in
        one line (each kill of a frozen Redis was followed by a 60-line traceback: review 24), anything else with its
        traceback."""
        outage = self.outages.setdefault(what, Outage(log, f"supervisor {what} works again"))
        try:
            step()
        except (redis.RedisError, BotoCoreError, ClientError, httpx.HTTPError, OSError, StackError,
                subprocess.SubprocessError) as exc:
            outage.failed("supervisor %s failed (%s: %s); retrying", what, type(exc).__name__, exc, exc_info=False)
            return
        except Exception:
            outage.failed("supervisor %s failed; retrying", what)
            return
        outage.worked()

    def ask_forever(self, stop: threading.Event) -> None:
        """The liveness questions, and the kills of what they found hung, every ``PROBE_EVERY_S`` until ``stop``."""
        asker = probe(self.settings.redis_url)  # one try of 2 s: a frozen Redis must not hold the worker's question
        while True:
            waited = time.monotonic()
            if stop.wait(PROBE_EVERY_S):
                return
            if (late := time.monotonic() - waited - PROBE_EVERY_S) >= self.settings.liveness_timeout_s:
                # (frozen itself, or starved of CPU: nothing said so, and its counts went on meanwhile: review 24)
                log.warning("the supervisor itself stood still for %.0f s (frozen, or the machine overloaded); every "
                            "process's silence is counted afresh", late)
                self.liveness.forget_all()
            self.attempt("liveness check", lambda: self.liveness.probe(self.probes(asker), time.monotonic))
            with self.acting:
                self.attempt("hung process kill", lambda: self.kill_hung(asker))

    def probes(self, asker: redis.Redis) -> dict[str, tuple[int | None, Probe, bool]]:
        """Each watched process: its pid (None: not running), the question that shows it alive, and whether its
        silence counts before its first answer (an HTTP service's or a Ceph daemon's: a refused connection is no
        answer; an OSD frozen when the supervisor started was otherwise never judged)."""
        def pings(pid: int) -> bool:
            try:
                return bool(asker.ping())
            except redis.RedisError:
                return False

        urls = {"ingest": self.stack.ingest_url + "/healthz",
                **{name: url + "/healthz" for name, url in self.stack.replica_urls.items()},
                "radosgw": self.settings.s3_endpoint + "/"}
        asks: dict[str, Probe] = {"redis": pings, "worker": functools.partial(self.beats, asker), **self.ceph_asks,
                                  **{name: serves(url) for name, url in urls.items()}}
        if "milvus" in self.stack.servers:
            asks["milvus"] = lambda pid: milvus.healthy(self.stack.home / "milvus")
        counts_at_once = {*urls, *self.ceph_asks}
        return {name: (self.process(name)[0], ask, name in counts_at_once) for name, ask in asks.items()}

    def beats(self, asker: redis.Redis, pid: int) -> bool | None:
        """Whether the worker whose main process is ``pid`` beats: its delivery record, and the heartbeat of each of
        its pool processes that has beaten before (one loading its model has none yet). Pool processes hung under a
        main process that beat left it taking tasks nobody ran, for good (review 24); so did one hung pool process
        beside one that beat, with the batch it held (review 73). None: Redis cannot say."""
        host, pool = socket.gethostname(), children(pid)
        try:
            main = asker.exists(self.keys.consumer(f"{host}:{pid}"))
            beating = {child for child in pool if asker.exists(self.keys.worker(f"{host}:{child}"))}
        except redis.RedisError:
            return None
        # (pruned to the pool as it is: a new pool process given a gone one's pid is loading, not silent)
        self.beaten = (self.beaten & set(pool)) | beating
        silent = self.beaten - beating
        if new := sorted(silent - self.silent_pool.keys()):  # (the kill's own line names the worker's main process)
            log.info("worker pool process %s (of the worker, pid %d) stopped beating: the worker counts as silent "
                     "while it does", ", ".join(map(str, new)), pid)
        now = time.monotonic()
        self.silent_pool = {child: self.silent_pool.get(child, now) for child in silent}
        self.main_beats = bool(main)
        if main and beating:  # a pool process beats once its model is loaded: the worker runs well (``WELL_S``)
            self.liveness.note("worker-pool", now)
        return self.main_beats and not silent

    def process(self, name: str) -> tuple[int | None, Callable[..., None]]:
        """A watched process's pid (None: not running) and what stops it."""
        if name == "redis":
            return self.stack.redis_pid(), self.stack.stop_redis
        if name == "milvus":
            return self.stack.milvus_pid(), self.stack.stop_milvus
        if name == "radosgw":
            return self.stack.ceph_pid("client.rgw.a"), self.stack.stop_s3
        if (daemon := CEPH_DAEMONS.get(name)) is not None:  # (the process watch's start_ceph starts it again)
            pid = self.stack.ceph_pid(daemon)
            return pid, lambda kill: self.stack.kill_ceph(daemon, pid)
        return self.stack.pid(name), functools.partial(self.stack.stop_service, name)

    def kill_hung(self, counters: redis.Redis) -> None:
        """Kill what the liveness questions found hung, once it has left one more question unanswered (the count
        went on while this waited for a start to end: a radosgw that answered again after a 90 s wait for a start
        was killed for the silence before: review 25); the process watch starts it again."""
        now = time.monotonic()
        self.count_kills(counters)  # (a Redis killed at the last round answers again)
        for name, (pid, silent) in self.liveness.hung(now).items():
            self.liveness.forget(name)
            running, stop = self.process(name)
            if running != pid or self.probes(counters)[name][1](pid) is not False:  # (restarted meanwhile; answers
                continue  # now, or cannot be asked now: counted afresh, as the questions do)
            what = f"{name} (pid {pid})"
            if name == "worker" and self.main_beats:  # (the main process beats: only pool processes hang)
                if (pool := self.pool_kill(pid, now)) is None:
                    continue
                what, stop = pool
            last, in_a_row = self.kills.get(name, (None, 0))
            in_a_row = in_a_row + 1 if last is not None and now - last <= STABLE_S + self.liveness.timeout_s else 1
            self.kills[name] = (now, in_a_row)
            log.warning("%s is running but has answered nothing for %.0f s (frozen or hung); killing it to start it "
                        "again%s", what, silent, "" if in_a_row == 1 else
                        f" ({in_a_row} kills in a row: starting it again has not helped; its log may say why)")
            stop(kill=True)
            self.uncounted += 1
        self.count_kills(counters)

    def pool_kill(self, pid: int, now: float) -> tuple[str, Callable[..., None]] | None:
        """The pool processes of the worker whose main process is ``pid`` silent for ``liveness_timeout_s``, named,
        and what kills them; None when none has been (the worker's silence was first one's, then another's: counted
        afresh). The worker starts a pool process in place of each one killed, and Celery gives the batch it held
        back to the queue (``task_reject_on_worker_lost``); the batches of the others go on. (Killing the whole
        worker ran theirs again, counted towards ``MAX_REDELIVERIES``, and loaded the model again: review 75; one
        that had just gone silent beside one hung went with it: review 77.)"""
        # (``since`` is when the answer came, a little after the worker's count began, at the question)
        long = self.liveness.timeout_s - PROBE_EVERY_S / 2
        pool = sorted(child for child, since in self.silent_pool.items() if now - since >= long)
        if not pool:
            return None

        def kill(kill: bool = True) -> None:
            for child in pool:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)

        return f"worker pool process {', '.join(map(str, pool))} (of the worker, pid {pid})", kill

    def count_kills(self, counters: redis.Redis) -> None:
        """Count the kills not counted yet (``hung_restarts``, in ``GET /queues`` and the metrics), once Redis
        answers: a Redis kill is counted when it is back (they were left out: review 24)."""
        if self.uncounted:
            with contextlib.suppress(redis.RedisError):
                counters.hincrby(self.keys.counters, "hung_restarts", self.uncounted)
                self.uncounted = 0

    def keep_processes_up(self) -> None:
        # Redis before anything that needs it, the canary included; backing off like the services: one that died at
        # each start (its disk full: `appendfsync always` exits at a failed write) was restarted every second, and
        # each line said only that its append-only file brings back what it held (review 49).
        self.attempt("restart of redis", self.keep_redis_up)
        # radosgw, its OSD or monitor died (the canary would find it only after canary_timeout_s, and heal only
        # radosgw); backing off too: an OSD that died at each start (its disk full) was started every second, and
        # nothing but ceph-script.log said why (review 60). Milvus too (it was started every second, 30-40 s a start:
        # review 63). Each in an attempt of its own: a start that failed skipped the rest that round (review 64).
        for name in ("s3", *(("milvus",) if "milvus" in self.stack.servers else ()), *self.watched):
            self.attempt(f"restart of {name}", functools.partial(self.keep_up, name))

    def keep_redis_up(self) -> None:
        if self.keep_up("redis"):
            self.redis_restarted = time.monotonic()

    def check_delivery(self) -> None:
        try:
            self._check_delivery()
        except ClientError as exc:
            if error_code(exc) != "NoSuchBucket":
                raise
            self.notify_again(f"bucket {self.settings.bucket} is gone (removed without notifications: the index still "
                              "holds its objects)")

    def notify_again(self, why: str) -> None:
        """Make the bucket and its notification again, as `up` does, and reconcile: a removed notification was taken
        for a stalled topic, radosgw restarted again and again with growing waits (up to 10 minutes), and uploads
        were indexed only at the reconciles after; a removed bucket failed every delivery check (review 60)."""
        log.warning("%s: making it again as `bucketlens up` does, then reconciling", why)
        self.redis.hincrby(self.keys.counters, "notifications_restored", 1)
        self.stack.notify()
        self.owe_reconcile()
        self.restarted_radosgw()  # a canary of its own, with the grace (a new topic's first event takes 4-21 s)
        self.start_reconcile()

    def _check_delivery(self) -> None:
        if self.reconcile_owed:
            self.start_reconcile()
        pending, age = self.canary.check()
        if pending is None:
            self.grace, self.stalls = 0.0, 0
            self.canary.write()
        elif not self.judging:  # outstanding from before this supervisor started: radosgw has often just been
            # started with it (`bucketlens up`, a test's restore) and is resuming its queues; that old canary
            # restarted it again at once. A canary of its own, with the grace
            self.restarted_radosgw()
        elif age > self.settings.canary_timeout_s + self.grace:
            self.heal()
        self.judging = True

    def keep_up(self, name: str, now: float | None = None) -> bool:
        """Restart ``name`` (a service, ``redis``, ``milvus`` or ``s3``: the Ceph daemons) if it is not running,
        backing off while it keeps dying soon after its restarts; whether it was started. ``now``: monotonic (the
        clock's, unless told)."""
        now = time.monotonic() if now is None else now
        restarts = self.restarts.setdefault(name, Restarts())
        said = self._down(name)
        if not said:
            if restarts.at is not None and now - restarts.at >= STABLE_S:
                self.restarts[name] = Restarts()
            return False
        if (name not in SERVERS and restarts.at is not None and self.redis_restarted is not None
                and self.redis_restarted >= restarts.at):
            # Redis was restarted since: a worker dies of that (kombu 5.7.0's crash on a reconnect), not of itself.
            # Counted, two Redis restarts left the stack without workers for minutes (an independent check).
            restarts = self.restarts[name] = Restarts()
        if restarts.at is not None and all(self.liveness.answered_since(watched, restarts.at + WELL_S)
                                           for watched in LIVENESS.get(name, (name,))):
            restarts = self.restarts[name] = Restarts()  # it ran well since its restart: no crash loop of a start
        logs = self.stack.home / "logs" / LOGS.get(name, f"{name}.log")
        if restarts.at is not None:  # it died before it was well again
            if now - restarts.at < restarts.wait_s(self.settings.canary_interval_s):
                return False
            restarts.quick += 1
            log.warning("%s died again within %.0f s of its restart (%d in a row); restarting it, the next time after "
                        "%.0f s; what it wrote to %s ends %s%s", said, STABLE_S, restarts.quick, restarts.wait_s(
                            self.settings.canary_interval_s), logs, log_tail(logs, 2, restarts.log_from),
                        free_space(self.stack.home / SERVERS[name]) if name in SERVERS else "")
        else:
            log.warning("%s is not running; restarting it%s", said, RESTARTED.get(name, ""))
        restarts.at = now
        with contextlib.suppress(OSError):  # (no log yet: from its start)
            restarts.log_from = logs.stat().st_size
        if name == "s3":
            self.owe_reconcile()  # what it stored as it died, and never told of (review 83): at the next check (owed
            self.stack.start_ceph()  # first: a start that raised lost it, and the next round found S3 running)
            self.restarted_radosgw()
        elif name == "redis":
            self.stack.start_redis()
        elif name == "milvus":
            self.stack.start_milvus()
        else:
            self.stack.start_service(name)
        return True

    def _down(self, name: str) -> str:
        """What of ``name`` is not running, said ("": it runs)."""
        if name == "s3":
            missing = self.stack.ceph_missing()
            return f"the S3 server ({', '.join(missing)})" if missing else ""
        if name == "redis":
            pid = self.stack.redis_pid()
        elif name == "milvus":
            pid = self.stack.milvus_pid()
        else:
            pid = self.stack.pid(name)
        return "" if pid is not None else name

    def heal(self) -> None:
        """Restart what stalled delivery: the OSD when it does not answer its admin socket or holds an op stuck
        (restarting radosgw does not help then: its start-up waited on the OSD for good, and it broke the uploads the
        OSD held: review 24); otherwise radosgw, and ingest first when it does not answer its health check (hung:
        its pid is there). Then a reconcile heals whatever was missed. A bucket that no longer notifies ingest is
        made to again instead (asked first, within the supervisor's short timeouts: a frozen radosgw held the
        question for minutes; no answer heals as before)."""
        try:
            renotify = not self.stack.notified(CHECK_TIMEOUT_S)
        except (BotoCoreError, ClientError, httpx.HTTPError, OSError) as exc:
            log.info("cannot tell whether bucket %s notifies ingest (%s): healing the stall", self.settings.bucket, exc)
            renotify = False
        with self.acting:  # (the process watch starts nothing meanwhile: one start at a time. What to restart is
            # judged within: an OSD it started meanwhile was killed for an answer of the one before: review 25)
            # The stall too: a canary written as radosgw died stays undelivered while the process watch starts it
            # again (20-30 s on a busy host), and this heal, waiting for the lock, then restarted the radosgw just
            # started (a flake review). A daemon whose process is gone is the process watch's to start, and its
            # canary counts from then; one that runs but holds no port is healed here, as before.
            pending, age = self.canary.check()
            if pending is None or age <= self.settings.canary_timeout_s + self.grace or self.stack.ceph_dead():
                return
            self.redis.hincrby(self.keys.counters, "canary_stalls", 1)
            self.owe_reconcile()
            if renotify:  # (no restart brings back what someone removed)
                self.notify_again(f"canary undelivered for {age:.0f} s: bucket {self.settings.bucket} does not notify "
                                  "ingest (its notification was removed, or the bucket deleted and created again)")
                return
            self.stalls += 1
            osd = self.stack.hung_osd()
            hung = osd is None and "ingest" in self.stack.services and not self.stack.answers(
                self.stack.ingest_url + "/healthz")
            if osd is not None:
                log.warning("canary undelivered for %.0f s; the Ceph OSD (pid %s) does not answer its admin socket or "
                            "holds an op stuck: restarting it, then reconciling", age, osd)
            else:
                log.warning("canary undelivered for %.0f s%s: restarting %sradosgw, then reconciling", age,
                            "; ingest does not answer its health check" if hung else "", "ingest and " if hung else "")
            try:
                if osd is not None:
                    self.stack.kill_ceph("osd.0", osd)
                    self.uncounted += 1
                    self.stack.start_ceph()
                else:
                    if hung:  # alive but not answering: only a restart ends it; radosgw's topic too
                        self.stack.stop_service("ingest", kill=True)
                        self.uncounted += 1
                        self.stack.start_service("ingest")
                    self.stack.stop_s3()
                    self.stack.start_s3()
            finally:  # a restart that failed is tried again after the grace too, not at each check (every few
                # seconds, which left radosgw no time to start)
                self.restarted_radosgw(RESTART_GRACE_S * 2 ** min(self.stalls - 1, 8))  # (past the cap by then)
        self.start_reconcile()

    def restarted_radosgw(self, grace: float = RESTART_GRACE_S) -> None:
        """A canary written now, with the grace: the one outstanding was written before the restart (and the one
        delivered last, before it died: taking that for delivery after the restart ended the grace at once). Each
        heal in a row that brought no delivery doubles it (up to ``MAX_BACKOFF_S``): a radosgw that takes longer to
        resume its queues (another's lock on them lasts until it expires) was otherwise restarted before it could,
        again and again."""
        self.grace = min(grace, MAX_BACKOFF_S)
        self.canary.write(after_restart=True)

    def owe_reconcile(self) -> None:
        self.owed += 1  # (then the flag: a reconcile ending between the two keeps it)
        self.reconcile_owed = True

    def start_reconcile(self) -> None:
        """The owed reconcile, in a thread of its own: on a large bucket it takes minutes, and a process that dies
        meanwhile must not wait for it to be restarted."""
        if self.reconciler is None or not self.reconciler.is_alive():
            self.reconciler = threading.Thread(target=self.reconcile, name="reconcile", daemon=True)
            self.reconciler.start()

    def reconcile(self) -> None:
        owed = self.owed  # (one owed while this lists the bucket is owed still: review 85)
        try:
            response = self.stack.reconcile()
        except httpx.HTTPError as exc:
            log.warning("reconcile after the heal: %s; again at the next check", exc)
            return
        if response.status_code == 409 or response.status_code >= 500:  # busy or not ready: at the next check
            log.warning("reconcile after the heal: %s %s; again at the next check", response.status_code,
                        response.text[:300])
            return
        log.info("reconcile after the heal: %s %s", response.status_code, response.text[:300])
        self.reconcile_owed = self.owed != owed


