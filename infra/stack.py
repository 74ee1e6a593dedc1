"""The local stack behind ``bucketlens up|down|status``: Redis, Ceph RGW, ingest, one worker, the index service,
and the servers its index backend needs (``SERVERS``: a Milvus standalone server for ``--backend milvus``).

All state lives under one folder (``settings.home``): ``stack.json`` (ports, tokens, the backend), ``run/`` (pid
files), ``logs/``, ``redis/``, ``ceph/``, ``milvus/``. ``down`` stops exactly what ``up`` started, by pid file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import quote, urlsplit

import httpx
import redis
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from bucketlens.auth import bearer
from bucketlens.errors import CLIError
from bucketlens.redis_client import connect
from bucketlens.s3 import make_client
from bucketlens.schemas import json_object
from bucketlens.settings import Settings, reach

from . import milvus
from .canary import RESTART_GRACE_S, Canary
from .liveness import ceph_daemon
from .notifications import ensure_bucket, ensure_notifications, follow_endpoint, notified
from .ports import free_port, lease, port_in_use
from .procfs import (
    kill_session,
    listens,
    live_pid,
    pid_record,
    stop_process,
    terminate,
)

log = logging.getLogger(__name__)
INFRA = Path(__file__).resolve().parent
COMMAND = {"ingest": "ingest", "worker": "worker", "api": "serve", "supervisor": "supervise"}  # of Stack.services
SERVERS: dict[str, tuple[str, ...]] = {"faiss": (), "milvus": ("milvus",)}  # what each index backend runs beside
MAX_REPLICAS = {"faiss": 1, "milvus": 16}  # index service processes: a FAISS index lives in one process
# What client commands take from the services that run, unless their own shell sets it: they may have been started
# from another shell, with a bucket and tokens of their own (a new shell's CLI got 401s and named the default
# bucket: an independent check; `status --json` named the stack's webhook token, not the one ingest took: review 48).
# The addresses they bind are the stack's own way to them too (``API_HOST`` set in the shell of `up` alone).
RUNNING = {"api": ("bucket", "read_token", "admin_token", "api_host", "namespace"),
           "ingest": ("webhook_token", "ingest_host")}
PACKAGES = ("bucketlens", "ingest", "workers", "index_service", "infra", "vision")  # the code the services run


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole (a temporary file renamed), readable by this user alone: it holds tokens
    (a file readable by all until a chmod, before)."""
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(text)
    os.replace(tmp, path)


def _create_private(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` whole and private, unless it exists (then False): of two processes making it at
    once, one wins and the other reads it."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
        file.write(text)
    try:
        os.link(tmp, path)  # (fails where the file exists: a rename would replace it)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


CRASHED = "crashed"  # under run/: ingest had stopped without `down`; the next `up` reconciles


class StackError(CLIError):  # the CLI says it in one line
    """A part of the local stack did not come up; the message says which and where its log is."""


@dataclasses.dataclass
class StackConfig:
    """Chosen once, at the first ``up``, and kept in ``stack.json``."""

    redis_port: int
    s3_port: int
    mon_port: int
    ingest_port: int
    api_port: int
    webhook_token: str
    admin_token: str
    index_backend: str = "faiss"  # chosen by ``up --backend`` (stacks made before it existed: faiss)
    milvus_port: int = 0  # 0: not chosen yet
    replica_ports: list[int] = dataclasses.field(default_factory=list)  # API ports of replicas 2..N (up --replicas)

    def ports(self) -> dict[str, int]:
        """The ports chosen, by server (``status --json``'s ``ports``); replicas' are ``replica_ports``."""
        return {name.removesuffix("_port"): port for name, port in dataclasses.asdict(self).items()
                if name.endswith("_port") and port}


REQUIRED_FIELDS = {field.name for field in dataclasses.fields(StackConfig)
                   if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING}


class Stack:
    def __init__(self, base: Settings) -> None:
        self.home = Path(base.home).resolve()
        self.base = base
        self.config = self._load_or_create_config()
        self._children: dict[str, subprocess.Popen[bytes]] = {}  # started by this process: reaped on stop
        self.found_running: bool | None = None  # whether anything ran as this process's `up` began (None: not yet)
        self.settings = self._settings()

    def _settings(self) -> Settings:
        base, milvus_port, started = self.base, self.config.milvus_port, self.last_started(running=True)
        return dataclasses.replace(
            base,
            home=self.home,
            redis_url=f"redis://127.0.0.1:{self.config.redis_port}/0",
            s3_endpoint=f"http://127.0.0.1:{self.config.s3_port}",
            ingest_port=self.config.ingest_port,
            api_port=self.config.api_port,
            # The way to the running services: the token ingest takes (`up` from a shell without
            # BUCKETLENS_WEBHOOK_TOKEN pointed the notifications at stack.json's, refused: review 50), where they bind.
            webhook_token=started.get("webhook_token") or base.webhook_token or self.config.webhook_token,
            admin_token=base.admin_token or self.config.admin_token,
            index_backend=self.config.index_backend,
            milvus_uri=f"http://127.0.0.1:{milvus_port}" if milvus_port else base.milvus_uri,
            # ... and the running index service's namespace: what `up` starts beside it joins it (a worker `up`
            # started from a shell without it took no task of theirs: review 86)
            **{name: value for name, value in started.items() if name.endswith("_host") or name == "namespace"},
        )

    @property
    def servers(self) -> tuple[str, ...]:
        return SERVERS[self.config.index_backend]

    @property
    def services(self) -> tuple[str, ...]:
        """The Python processes, in start order: index service replicas 2..N are ``api-2`` ..."""
        replicas = tuple(f"api-{i}" for i in range(2, len(self.config.replica_ports) + 2))
        return ("ingest", "worker", "api", *replicas, "supervisor")

    @property
    def api_urls(self) -> list[str]:
        host = reach(self.settings.api_host)
        return [f"http://{host}:{port}" for port in (self.config.api_port, *self.config.replica_ports)]

    @property
    def replica_urls(self) -> dict[str, str]:
        """Each index service replica's name and address (``api`` is replica 1)."""
        return dict(zip(self.services[2:-1], self.api_urls))

    def choose_replicas(self, replicas: int) -> None:
        """``up --replicas N``: N index service processes answer queries, one merges (index_service/lease.py). A
        running stack keeps its count until it is down: its supervisor restarted a dropped replica, which `down`
        then left running (an independent check)."""
        most = MAX_REPLICAS[self.config.index_backend]
        if not 1 <= replicas <= most:
            raise StackError(f"the {self.config.index_backend} backend runs 1 to {most} index service replicas"
                             + ("; --backend milvus shares one index between replicas" if most == 1 else ""))
        running = len(self.config.replica_ports) + 1
        if replicas != running and self._index_service_runs():
            raise StackError(f"the stack runs {running} index service replica(s); 'bucketlens down' first")
        ports = self.config.replica_ports[: replicas - 1]
        c = self.config
        taken = {c.redis_port, c.s3_port, c.mon_port, c.ingest_port, c.api_port, c.milvus_port, *ports}
        candidate = c.api_port
        while len(ports) < replicas - 1:  # the ports after the API's that no part of this stack uses, when free
            candidate += 1
            if candidate not in taken and free_port(candidate, by=str(self.home)) == candidate:
                ports.append(candidate)
        self.config.replica_ports = ports
        self._save_config(self.config)

    def _index_service_runs(self) -> bool:
        """Any of this stack's index service replicas runs (``api`` may have died while ``api-2`` runs on)."""
        return any(self.pid(name) is not None for name in self.replica_urls)

    def choose_backend(self, backend: str) -> None:
        """Record the index backend this stack runs (``up --backend``); switching needs the stack down first (a
        FAISS index does not move to Milvus by itself: README, "Index backends")."""
        if backend not in SERVERS:
            raise StackError(f"unknown index backend {backend!r} (one of {', '.join(SERVERS)})")
        if backend == self.config.index_backend and (self.config.milvus_port or not SERVERS[backend]):
            return
        if backend != self.config.index_backend and self._index_service_runs():
            raise StackError(f"the stack runs the {self.config.index_backend} backend; 'bucketlens down' first")
        self.config.index_backend = backend
        if len(self.config.replica_ports) >= MAX_REPLICAS[backend]:  # two FAISS services fought for the lease, and
            # `up` waited 5 minutes for the one clients ask, which held an empty index (review 29)
            print(f"note: the {backend} backend runs {MAX_REPLICAS[backend]} index service replica(s); this stack "
                  f"ran {len(self.config.replica_ports) + 1}, the others are dropped")
            del self.config.replica_ports[MAX_REPLICAS[backend] - 1 :]
        if SERVERS[backend] and not self.config.milvus_port:  # BUCKETLENS_MILVUS_URI's port (ignored: review 21)
            self.config.milvus_port = free_port(urlsplit(self.base.milvus_uri).port or 19530, by=str(self.home))
        self._save_config(self.config)
        self.settings = self._settings()

    # -- configuration -------------------------------------------------------------------------------------

    def _load_or_create_config(self) -> StackConfig:
        path = self.home / "stack.json"
        if path.exists():
            given = self._stack_file(path)
            if given.keys() >= REQUIRED_FIELDS:
                return StackConfig(**given)
            # Written by hand before the first `up`, with the ports to take (it said "StackConfig.__init__() missing
            # 2 required positional arguments": review 79): the rest is chosen as a first `up` chooses it, by one
            # process (two commands at once each chose other tokens: review 82), then read by every other.
            home = os.open(self.home, os.O_RDONLY)
            try:
                fcntl.flock(home, fcntl.LOCK_EX)
                given = self._stack_file(path)
                if given.keys() >= REQUIRED_FIELDS:
                    return StackConfig(**given)
                kept = {name: value for name, value in given.items() if value not in (None, 0, "")}
                config = StackConfig(**{**dataclasses.asdict(self._choose(kept)), **kept})
                self._save_config(config)
                return config
            finally:
                os.close(home)  # (and its lock)
        self.home.mkdir(parents=True, exist_ok=True)
        config = self._choose({})
        # Two first `up`s at once each chose ports and wrote them, and the one that waited for the other's lock
        # started on the ports the file no longer named (review 59): the first file made stands, the other reads it.
        if not _create_private(path, json.dumps(dataclasses.asdict(config), indent=2)):
            return self._load_or_create_config()
        return config

    @staticmethod
    def _stack_file(path: Path) -> dict[str, Any]:
        """``stack.json``'s fields, checked (the CLI tells users to edit it: a typo was blamed on the server, a wrong
        field a traceback)."""
        def unread(why: str) -> StackError:
            return StackError(f"{path} is not a stack file this version reads ({why}): fix it, or move it away for "
                              "a new one")

        try:
            given = json.loads(path.read_text())
        except ValueError as exc:
            raise unread(f"not JSON: {exc}") from exc
        if not isinstance(given, dict):
            raise unread("not a JSON object")
        fields = [field.name for field in dataclasses.fields(StackConfig)]
        if unknown := sorted(given.keys() - set(fields)):
            raise unread(f"unknown fields {', '.join(unknown)}; it takes {', '.join(fields)}")
        # A bad port ended in a traceback that blamed BUCKETLENS_API_PORT or REDIS_URL, set nowhere (review 86)
        for name, value in given.items():
            if value is None:  # (in a file written before the first `up`: chosen then, review 82)
                continue
            ports = value if name == "replica_ports" else [value] if name.endswith("_port") else []
            if not isinstance(ports, list) or not all(type(port) is int and 0 <= port <= 65535 for port in ports):
                # (not a bool, a float, a string)
                raise unread(f"{name} is {json.dumps(value)}: "
                             + ("a list of ports" if name == "replica_ports" else "a port") + ", each a whole number "
                             "up to 65535")
            if name in ("webhook_token", "admin_token", "index_backend") and not isinstance(value, str):
                raise unread(f"{name} is {json.dumps(value)}: give a string")
        return given

    def _choose(self, given: dict[str, Any]) -> StackConfig:
        """A new stack's ports (those ``given`` are kept from the choice) and tokens."""
        chosen = functools.partial(free_port, by=str(self.home))
        preferred = {"redis_port": 6390, "s3_port": 7480, "mon_port": 3300, "ingest_port": self.base.ingest_port,
                     "api_port": self.base.api_port}
        ports: dict[str, Any] = {name: given.get(name) or chosen(port) for name, port in preferred.items()}
        return StackConfig(**ports, webhook_token=secrets.token_urlsafe(24), admin_token=secrets.token_urlsafe(24))

    def _save_config(self, config: StackConfig) -> None:
        _write_private(self.home / "stack.json", json.dumps(dataclasses.asdict(config), indent=2))

    @property
    def api_url(self) -> str:
        return self.api_urls[0]

    @property
    def ingest_url(self) -> str:
        return f"http://{reach(self.settings.ingest_host)}:{self.config.ingest_port}"

    # -- up / down / status --------------------------------------------------------------------------------

    def up(self) -> None:
        """Start whatever is not running yet; safe to call again."""
        with self._one_at_a_time("up"):
            # What ran when it began: an `up` that waited for another, then was interrupted, stopped what that one
            # started (review 58); `cmd_up` stops only what it started
            self.found_running = any(self.status()["processes"].values())
            self._up()

    def push_endpoint(self) -> str:
        """Where the bucket's notification pushes: this stack's ingest, with its webhook token."""
        token = quote(self.settings.webhook_token, safe="")  # a token of the user's may hold "+", "&" or "#"
        return f"{self.ingest_url}/events?token={token}"

    def notified(self, timeout_s: float, bucket: str | None = None) -> bool:
        """Whether the bucket (``bucket``, or the stack's) still notifies this stack's ingest
        (``notifications.notified``; each call within ``timeout_s``, tried once)."""
        s3 = make_client(self.settings, read_timeout=timeout_s, attempts=1)
        settings = dataclasses.replace(self.settings, bucket=bucket or self.settings.bucket)
        return notified(settings, s3, self.push_endpoint(), timeout_s)

    def notify(self) -> None:
        """The bucket and its notification to this stack's ingest, made again as `up` makes them (someone removed
        the notification, or the bucket, since)."""
        s3 = make_client(self.settings)
        ensure_bucket(s3, self.settings.bucket)
        ensure_notifications(self.settings, s3, self.push_endpoint())

    @contextlib.contextmanager
    def _one_at_a_time(self, command: str) -> Iterator[None]:
        """One `up` or `down` at a time on this home; another waits for it. Two `up`s at once both found a service
        missing and started it twice, the second failing on ports the first took (an old "left alone" item)."""
        (self.home / "run").mkdir(parents=True, exist_ok=True)
        with open(self.home / "run" / "up.lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                print(f"waiting for another `bucketlens {lock.read().strip() or 'up'}` on {self.home} to end",
                      file=sys.stderr)
                fcntl.flock(lock, fcntl.LOCK_EX)
            lock.truncate(0)
            lock.write(f"{command} (pid {os.getpid()})")
            lock.flush()
            yield

    def _up(self) -> None:
        # Only its owner reads the stack's folder: the Ceph OSD's block file holds every image and the push
        # endpoint's token, Redis's files the queues, the logs the keys (they were all readable by any local user).
        self.home.chmod(0o700)
        for folder in ("run", "logs", "redis"):
            (self.home / folder).mkdir(parents=True, exist_ok=True)
        self.check_ports()
        self.start_redis()
        self.start_ceph()
        if "milvus" in self.servers:
            self.start_milvus()
        s3 = make_client(self.settings)
        with self._s3_answers():
            try:
                ensure_bucket(s3, self.settings.bucket)
            except (ClientError, ParamValidationError) as exc:  # (a traceback that named no setting)
                raise StackError(f"the S3 server refused BUCKETLENS_BUCKET={self.settings.bucket!r}: {exc}") from exc
        # Ingest down while the rest ran: what the S3 server pushed meanwhile may be gone (Ceph 16 gave up on six
        # uploads whose topic resumed: the canary came, they never did). Or stopped without `down` (killed, a crash,
        # the machine restarted): radosgw may have stored uploads it never told of (review 83: three, after a kill of
        # the whole stack, indexed only by a reconcile by hand)
        ingest_was_down = self.pid("ingest") is None and (bool(self.found_running) or self._crashed())
        for name in self.services:
            if name != "supervisor":
                self.start_service(name)
        self._wait_http(self.ingest_url + "/healthz", "ingest", 60)
        endpoint = self.push_endpoint()
        with self._s3_answers():
            # A bucket that did not notify this ingest before, and holds objects already: nothing told the index of
            # them, and `up` said nothing of it (review 78: 60 photos left out until a reconcile by hand)
            unheard = (not notified(self.settings, s3, endpoint)
                       and bool(s3.list_objects_v2(Bucket=self.settings.bucket, MaxKeys=1).get("KeyCount")))
            dropped = ensure_notifications(self.settings, s3, endpoint)
            if followed := follow_endpoint(self.settings, s3, endpoint):
                print(f"the notifications of {', '.join(followed)} (set up under an earlier BUCKETLENS_BUCKET) now "
                      "push to this ingest's address and token too", file=sys.stderr)
                dropped = True
        stalled = self.pid("supervisor") is None and not self._delivers(s3)  # (a running supervisor writes the
        # canaries, and heals a stall itself: one writer at a time)
        for name, url in self.replica_urls.items():
            self._wait_http(url + "/readyz", name, 300)
        if dropped:  # (a changed webhook token or ingest port): uploads while the stack was down went with them
            self._reconcile("the notification's push endpoint changed, and the events queued for the old one were "
                            "dropped")
        elif unheard:
            self._reconcile(f"bucket {self.settings.bucket} holds objects it never told this stack of")
        elif stalled:
            self._reconcile("the bucket's notifications had stalled, and the uploads they held back were not told")
        elif ingest_was_down:
            self._reconcile("ingest was not running (or the stack stopped without `bucketlens down`), and the S3 "
                            "server may have given up on what it pushed meanwhile, or never sent it")
        self.start_service("supervisor")  # after the start-up canary: one canary writer at a time

    def _delivers(self, s3: Any) -> bool:
        """Whether a test upload's notification reaches ingest; False when it did only once radosgw was restarted. A
        topic whose endpoint refused connections for 10 s or more (an upload while ingest was down) stays stalled
        until then: `up` failed on it, every time, and never started the supervisor that heals it (review 79)."""
        canary = Canary(self.settings, s3, connect(self.settings.redis_url))

        def waiting(seconds: float) -> None:
            print(f"waiting for a test upload's notification to reach ingest ({seconds:.0f} s so far; a new topic's "
                  "first takes 4-21 s, a restarted gateway's ~30 s)", file=sys.stderr)

        try:  # the first event of a new persistent topic takes 4-21 s (radosgw rereads its queue list)
            canary.wait(90, waiting=waiting)
            return True
        except TimeoutError as exc:
            print(f"{exc}: the bucket's notifications have stalled (an upload came while ingest was down?); "
                  "restarting the S3 server's gateway", file=sys.stderr)
        self.stop_s3()
        self.start_s3()
        try:  # (its persistent queues resume within ~30 s of the restart)
            canary.wait(90 + RESTART_GRACE_S, after_restart=True, waiting=waiting)
        except TimeoutError as exc:
            raise StackError(f"{exc}, after a restart of radosgw too; see {self.home / 'logs'}") from exc
        return False

    @contextlib.contextmanager
    def _s3_answers(self) -> Iterator[None]:
        """An S3 server that takes connections but does not answer (its OSD frozen or wedged) is a StackError that
        says so: ``up`` ended in a 40-line botocore traceback."""
        try:
            yield
        except BotoCoreError as exc:
            raise StackError(f"the S3 server at {self.settings.s3_endpoint} does not answer ({exc}); its logs are in "
                             f"{self.home / 'ceph' / 'log'}. A running supervisor restarts a hung Ceph daemon "
                             f"within {self.settings.liveness_timeout_s:.0f} s; `bucketlens up` again after "
                             "that") from exc

    def _reconcile(self, why: str) -> None:
        print(f"{why}: reconciling with the bucket", file=sys.stderr)
        try:
            self.reconcile(self.settings.bucket).raise_for_status()
        except httpx.HTTPError as exc:
            raise StackError(f"reconcile failed ({exc}): run `bucketlens reconcile` once the stack is up") from exc
        (self.home / "run" / CRASHED).unlink(missing_ok=True)

    def _crashed(self) -> bool:
        """Whether ingest stopped without `down` (its pid file left behind: killed, a crash, a power cut), or a
        `down` found it so (and removed the file: review 85)."""
        run = self.home / "run"
        return self.pid("ingest") is None and ((run / "ingest.pid").exists() or (run / CRASHED).exists())

    def writer_url(self) -> str:
        """The index service that merges (rebuilds and reconciles run there): of several replicas, the one whose
        ``/stats`` says ``writer`` (the others answer 409 not_writer), waiting while none does (the writer died: its
        lease expires and another takes it within ``WRITER_LEASE_S`` and a third); else the API's address."""
        if len(self.api_urls) == 1:
            return self.api_url
        deadline = time.monotonic() + self.settings.writer_lease_s * 4 / 3 + 2
        while True:
            answered = False
            for url in self.api_urls:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    writes = httpx.get(f"{url}/stats", timeout=5).json().get("writer")
                    answered = True
                    if writes:
                        return url
            if not answered or time.monotonic() > deadline:  # (down: no wait; the 409 names the lease's holder)
                return self.api_url
            time.sleep(1.0)

    def serving_url(self) -> str:
        """An index service to ask (searches, listings): of several replicas, the first that answers its health check
        within 2 s (with replica 1 down, every CLI search failed while another served: review 76; a frozen one
        takes connections and answers nothing: review 77); else the API's address."""
        for url in self.api_urls if len(self.api_urls) > 1 else ():
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"{url}/healthz", timeout=2)
                return url
        return self.api_url

    def reconcile(self, bucket: str | None = None) -> httpx.Response:
        """``POST /reconcile`` at the writer, as the admin, of ``bucket`` (the index service's own: None); a large
        bucket's takes minutes."""
        return httpx.post(f"{self.writer_url()}/reconcile", json={} if bucket is None else {"bucket": bucket},
                          timeout=600,
                          headers=bearer(self.settings.admin_token))

    def down(self) -> None:
        """Stop everything, each part even when stopping another failed (then raise the first failure)."""
        steps = [lambda n=name: self.stop_service(n) for name in reversed(self.services)]
        errors = []
        with self._one_at_a_time("down"):
            if self._crashed():  # (the next `up` reconciles)
                (self.home / "run" / CRASHED).touch()
            for step in [*steps, self.stop_milvus, lambda: self._ceph("stop"), self.stop_redis]:
                try:
                    step()
                except Exception as exc:
                    log.error("while stopping the stack: %s", exc)
                    errors.append(exc)
        if errors:
            raise errors[0]

    def check_ports(self) -> None:
        """Refuse, before starting anything, a port of this stack that another program holds. A second stack whose
        ``stack.json`` names the same ports (made while the first was down) would otherwise take the first one's
        Redis and S3 server for its own (both answer) and point that bucket's notifications at itself."""
        c = self.config
        owners = [("redis", c.redis_port, self.redis_pid()), ("ceph-mon", c.mon_port, self.ceph_pid("mon.a")),
                  ("S3 (radosgw)", c.s3_port, self.ceph_pid("client.rgw.a"))]
        if "milvus" in self.servers:
            owners.append(("milvus", c.milvus_port, self.milvus_pid()))
        api_ports = dict(zip(("api", *self.services[3:-1]), (c.api_port, *c.replica_ports)))
        for name in self.services:
            port = c.ingest_port if name == "ingest" else api_ports.get(name)
            if port is not None:
                owners.append((name, port, self.pid(name)))
        for name, port, pid in owners:
            if pid is None:  # leased to this stack until bound: a stack set up meanwhile chooses others (review 32)
                lease(port, by=str(self.home))  # (a lease of another's alone refuses nothing: review 34)
            if pid is None and port_in_use(port):
                raise StackError(f"port {port}, this stack's {name} port, is in use by another program (another "
                                 f"bucketlens stack?): stop that, or give this stack another port in "
                                 f"{self.home / 'stack.json'}")

    def for_clients(self, explicit: Iterable[str] = ()) -> Settings:
        """The settings client commands use: the stack's, with the bucket and tokens (``RUNNING``) its index service
        and ingest were started with while they run, but those named in ``explicit`` (set in the client's own shell).
        (The addresses they bind and ingest's token are the stack's own way to them, whatever the shell: _settings.)"""
        kept = {name: value for name, value in self.last_started(running=True).items() if name not in set(explicit)}
        return dataclasses.replace(self.settings, **kept)

    def last_started(self, running: bool = False) -> dict[str, Any]:
        """What the services were last started with of ``RUNNING`` (``running``: of those that run now)."""
        found: dict[str, Any] = {}
        for service, names in RUNNING.items():
            path = self.home / "run" / f"{service}-settings.json"
            kept = path.exists() and (not running or self.pid(service) is not None)
            started = (json_object(path.read_text()) if kept else None) or {}
            found.update({name: started[name] for name in names if isinstance(started.get(name), str)})
        return found

    def status(self, settings: Settings | None = None) -> dict[str, Any]:
        """Addresses, credentials and process states (``settings``: the client's view, ``for_clients``)."""
        s = settings or self.settings
        return {
            "home": str(self.home),
            "api_url": self.api_url,
            "api_urls": self.api_urls,
            "ingest_url": self.ingest_url,
            "s3_endpoint": s.s3_endpoint,
            "s3_access_key": s.s3_access_key,
            "s3_secret_key": s.s3_secret_key,
            "bucket": s.bucket,
            "redis_url": s.redis_url,
            # the ports this stack chose (the Ceph monitor's showed nowhere else: review 67; replicas': ``api_urls``;
            # the OSD takes its own in 6800-7300)
            "ports": self.config.ports(),
            "namespace": s.namespace,
            "admin_token": s.admin_token,
            "webhook_token": s.webhook_token,
            **({"read_token": s.read_token} if s.read_token else {}),
            "index_backend": s.index_backend,
            **({"milvus_uri": s.milvus_uri} if "milvus" in self.servers else {}),
            "processes": {
                "redis": self.redis_pid() is not None,
                "s3": self.ceph_up() and self.hung_osd() is None,  # (a frozen OSD said up: review 24)
                **({"milvus": self.milvus_pid() is not None} if "milvus" in self.servers else {}),
                **{name: self.pid(name) is not None for name in self.services},
            },
        }

    # -- Redis ---------------------------------------------------------------------------------------------

    def start_redis(self, timeout_s: float = 30) -> None:
        """Start Redis and wait until it answers; a Redis that exits while starting is started once more, and one
        that never answers is reported with the end of its log (a port taken, a bad file)."""
        if self.redis_pid() is not None:
            return
        conf = self.home / "redis" / "redis.conf"
        conf.write_text(
            (INFRA / "redis.conf").read_text()
            + f"port {self.config.redis_port}\ndir {self.home / 'redis'}\n"
            + f"pidfile {self.home / 'run' / 'redis.pid'}\nlogfile {self.home / 'logs' / 'redis.log'}\n"
        )
        logs = self.home / "logs" / "redis.log"
        for attempt in (1, 2):  # one more start if the first exited (seen once in a clean-clone run, cause unknown)
            since = logs.stat().st_size if logs.exists() else 0
            subprocess.run(["redis-server", str(conf)], check=True)
            # Short timeouts, no retries: a port squatted by something that never answers must not hang the start.
            client = redis.Redis.from_url(self.settings.redis_url, socket_timeout=1, socket_connect_timeout=1)
            started = time.monotonic()
            while time.monotonic() < started + timeout_s:
                with contextlib.suppress(Exception):
                    if client.ping():
                        return
                if self.redis_pid() is None and time.monotonic() > started + 3:  # (its pid file: at once)
                    break  # exited: waiting on (30 s, twice) held the supervisor's other restarts (review 49)
                time.sleep(0.1)
            if self.redis_pid() is not None:
                break  # running, not answering
            log.warning("Redis exited while starting (attempt %d): %s%s", attempt, milvus.log_tail(logs, 3, since),
                        free_space(self.home / "redis"))
        raise StackError(f"Redis did not answer on port {self.config.redis_port}: {milvus.log_tail(logs, 3)}"
                         f"{free_space(self.home / 'redis')}; see {logs}")

    def stop_redis(self, kill: bool = False) -> None:
        pid = self.redis_pid()
        if pid is not None:
            terminate(pid, signal.SIGKILL if kill else signal.SIGTERM, 30)

    def redis_pid(self) -> int | None:
        return live_pid(self.home / "run" / "redis.pid", "redis-server")

    # -- Milvus --------------------------------------------------------------------------------------------

    def start_milvus(self) -> None:
        """The Milvus standalone server (30-40 s to answer). A folder whose first start never completed can crash
        the next start, and holds nothing yet: it is made afresh."""
        if self.milvus_pid() is not None:
            return
        data = self.home / "milvus"
        completed = data / ".started"
        if data.exists() and not completed.exists():
            shutil.rmtree(data)
        data.mkdir(parents=True, exist_ok=True)
        process = milvus.start(data, self.config.milvus_port, self.home / "logs" / "milvus.log")
        self._children["milvus"] = process
        (self.home / "run" / "milvus.pid").write_text(pid_record(process.pid))
        try:
            milvus.wait_ready(data, process, log_path=self.home / "logs" / "milvus.log")
        except (RuntimeError, TimeoutError) as exc:
            raise StackError(f"Milvus did not start: {exc}; see {self.home / 'logs' / 'milvus.log'}") from exc
        completed.touch()

    def stop_milvus(self, kill: bool = False) -> None:
        """TERM, then KILL after ``milvus.GRACE_S`` (Milvus 2.3.5 never ends a graceful stop: ``milvus.stop``)."""
        pid = self.milvus_pid()
        if pid is not None:
            terminate(pid, signal.SIGKILL if kill else signal.SIGTERM, milvus.GRACE_S, group=True)
        child = self._children.pop("milvus", None)
        if child is not None:
            child.wait(timeout=5)
        (self.home / "run" / "milvus.pid").unlink(missing_ok=True)

    def milvus_pid(self) -> int | None:
        return live_pid(self.home / "run" / "milvus.pid", "milvus")

    # -- Ceph ----------------------------------------------------------------------------------------------

    def start_ceph(self) -> None:
        if (osd := self.hung_osd()) is not None:  # (after a freeze, `up` ended in S3 timeouts: review 24)
            log.warning("the Ceph OSD (pid %d) does not answer its admin socket or holds an op stuck; restarting it",
                        osd)
            self.kill_ceph("osd.0", osd)
        if self.ceph_up():
            return
        ceph = self.home / "ceph"
        env = {**os.environ, "S3_ACCESS_KEY": self.settings.s3_access_key,
               "S3_SECRET_KEY": self.settings.s3_secret_key}
        if self._creating.exists():  # a first start cut short (Ctrl-C): a cluster without its S3 user, holding nothing
            self._ceph("kill")
            shutil.rmtree(ceph, ignore_errors=True)
        command = "start" if (ceph / "ceph.conf").exists() else "init"
        if command == "init" and ceph.exists():
            raise StackError(f"{ceph} exists without ceph.conf; remove it to re-create the S3 server")
        if command == "init":
            self._creating.touch()
        self._ceph(command, env=env)
        self._creating.unlink(missing_ok=True)
        self._check_s3()

    @property
    def _creating(self) -> Path:
        """Present while the S3 server is being created (beside its folder: ceph.sh init makes that one)."""
        return self.home / "ceph.creating"

    def s3_created(self) -> bool:
        """Whether this stack's S3 server was created (a first ``up`` creates it, ~30 s)."""
        return (self.home / "ceph" / "ceph.conf").exists() and not self._creating.exists()

    def _ceph(self, command: str, env: dict[str, str] | None = None) -> None:
        ceph = self.home / "ceph"
        if command != "init" and not (ceph / "ceph.conf").exists():
            return
        with open(self.home / "logs" / "ceph-script.log", "ab") as out:
            # A session of its own, ended whole when this one is interrupted: killing the script alone (what
            # subprocess.run does on Ctrl-C) left its subshells and tools running (`timeout` makes a process group
            # of its own: only the session holds them all).
            script = subprocess.Popen(
                ["bash", str(INFRA / "ceph.sh"), command, str(ceph), str(self.config.s3_port),
                 str(self.config.mon_port)], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
            try:
                returncode = script.wait(timeout=600)
            except BaseException:
                kill_session(script.pid)
                script.wait()
                raise
        if returncode != 0:
            raise StackError(f"ceph.sh {command} failed; see {self.home / 'logs' / 'ceph-script.log'}")

    def ceph_pid(self, daemon: str) -> int | None:
        """The pid of this stack's Ceph ``daemon`` (``mon.a``, ``client.rgw.a``) if it runs."""
        comm = "radosgw" if daemon.startswith("client.rgw") else "ceph-" + daemon.split(".")[0]
        return live_pid(self.home / "ceph" / "run" / f"{daemon}.pid", comm)

    def hung_osd(self) -> int | None:
        """The pid of this stack's OSD if it runs but does not answer its admin socket, or holds an op stuck
        (infra/liveness.py's ``ceph_daemon``)."""
        pid = self.ceph_pid("osd.0")
        return pid if pid is not None and ceph_daemon(self.home / "ceph" / "run", "osd.0", osd=True)(pid) is False \
            else None

    def kill_ceph(self, daemon: str, pid: int | None) -> None:
        """SIGKILL this stack's Ceph ``daemon`` if it is still process ``pid`` (judged hung: not the one a start put
        in its place meanwhile); ``start_ceph`` starts it again."""
        if pid is not None and self.ceph_pid(daemon) == pid:
            terminate(pid, signal.SIGKILL, 30)

    def stop_s3(self, kill: bool = False) -> None:
        """Stop radosgw only (the cluster stays): the S3 endpoint becomes unreachable. ``kill``: SIGKILL first (a
        frozen radosgw keeps the script's TERM until it is thawed)."""
        if kill and (pid := self.ceph_pid("client.rgw.a")) is not None:
            terminate(pid, signal.SIGKILL, 30)
        self._ceph("stop-rgw")

    def start_s3(self) -> None:
        self._ceph("start-rgw")
        self._check_s3()

    def s3_up(self) -> bool:
        """Whether this stack's radosgw runs and holds its port (another stack's S3 server on that port, one that
        took the port while this radosgw started, was once taken for it: buckets, notifications and uploads went
        there, and the index drifted from its own bucket)."""
        pid = self.ceph_pid("client.rgw.a")
        return pid is not None and listens(pid, self.config.s3_port)

    def ceph_up(self) -> bool:
        """Whether this stack's S3 server works: radosgw holds its port, and the monitor and the OSD behind it run
        (with either dead, radosgw held its port and every request hung, and nothing restarted them: an
        independent review)."""
        return not self.ceph_missing()

    def ceph_dead(self) -> list[str]:
        """This stack's Ceph daemons whose process does not run (the process watch starts them)."""
        return [daemon for daemon in ("mon.a", "osd.0", "client.rgw.a") if self.ceph_pid(daemon) is None]

    def ceph_missing(self) -> list[str]:
        """What of this stack's S3 server is not running (``ceph_up``), for a log line that says which."""
        missing = [f"ceph-{daemon[:3]}" for daemon in self.ceph_dead() if daemon != "client.rgw.a"]
        return missing if self.s3_up() else [*missing, f"radosgw on port {self.config.s3_port}"]

    def _check_s3(self) -> None:
        """Raise unless this stack's radosgw holds its port within a few seconds of its start."""
        deadline = time.monotonic() + 15
        while not self.s3_up():
            if time.monotonic() > deadline:
                log = self.home / "ceph" / "log" / "client.rgw.a.log"
                raise StackError(f"this stack's radosgw does not hold its port {self.config.s3_port}"
                                 + (" (another program holds it)" if port_in_use(self.config.s3_port) else "")
                                 + f"; see {log}")
            time.sleep(0.2)

    # -- Python services -----------------------------------------------------------------------------------

    def start_service(self, name: str) -> None:
        if self.pid(name) is not None:
            return
        if name not in self.services:
            raise StackError(f"unknown service {name!r}")
        env = {**os.environ, **self.settings.to_env()}
        if name.startswith("api"):  # each replica its own port and name (api is replica 1)
            ports = [self.config.api_port, *self.config.replica_ports]
            env.update(BUCKETLENS_API_PORT=str(ports[self.services.index(name) - 2]), BUCKETLENS_REPLICA=name)
        log_file = open(self.home / "logs" / f"{name}.log", "ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "bucketlens.cli", COMMAND[name.split("-")[0]]], env=env, stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(Path(__file__).resolve().parent.parent),
        )
        log_file.close()
        self._children[name] = process
        (self.home / "run" / f"{name}.pid").write_text(pid_record(process.pid))
        (self.home / "run" / f"{name}.code").write_text(code_version())
        if name in RUNNING:  # for client commands in any shell (for_clients); it holds tokens
            _write_private(self.home / "run" / f"{name}-settings.json",
                           json.dumps({field: getattr(self.settings, field) for field in RUNNING[name]}))

    def stop_service(self, name: str, kill: bool = False) -> None:
        pid = self.pid(name)
        if pid is not None:
            terminate(pid, signal.SIGKILL if kill else signal.SIGTERM, 30, group=True)
        child = self._children.pop(name, None)
        if child is not None:
            child.wait(timeout=5)
        (self.home / "run" / f"{name}.pid").unlink(missing_ok=True)
        (self.home / "run" / f"{name}.code").unlink(missing_ok=True)

    def pid(self, name: str) -> int | None:
        """The pid of a running service of this stack, or None."""
        return live_pid(self.home / "run" / f"{name}.pid", "python")

    def other_code(self) -> list[str]:
        """The running services started from other code than this checkout's now (``code_version``): an upgrade
        while they ran, after which `up` started only what was missing, and nothing said that the rest ran the old
        release on (review 51)."""
        current = code_version()
        return [name for name in self.services if self.pid(name) is not None
                and _read_text(self.home / "run" / f"{name}.code") != current]

    # -- readiness -----------------------------------------------------------------------------------------

    @staticmethod
    def answers(url: str, timeout_s: float = 5.0) -> bool:
        """Whether ``url`` answers 200 within ``timeout_s``."""
        try:
            return httpx.get(url, timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait_http(self, url: str, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.answers(url, 2):
                return
            if name in self.services and self.pid(name) is None:
                log_file = self.home / "logs" / f"{name}.log"
                raise StackError(f"{name} exited{last_error(log_file)}; see {log_file}")
            time.sleep(0.2)
        raise StackError(f"{name} not ready at {url} after {timeout_s:.0f} s; see {self.home / 'logs'}")


@contextlib.contextmanager
def running(settings: Settings, keep: bool = False, restart: tuple[str, ...] = ()) -> Iterator[Stack]:
    """A stack that is up for the ``with`` block; unless ``keep``, stopped and its folder removed afterwards,
    whatever happens. ``restart``: services of a kept stack to stop first, so they start with ``settings``."""
    stack = Stack(settings)
    try:
        for name in restart:
            stack.stop_service(name)
        stack.settings = stack._settings()  # (what the stopped ones ran with is no longer the way to them)
        stack.up()
        yield stack
    finally:
        if not keep:
            stack.down()
            shutil.rmtree(stack.home, ignore_errors=True)


@contextlib.contextmanager
def scratch_redis(folder: Path, *options: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A ``redis-server`` of its own on a free port of 127.0.0.1, without persistence unless ``options`` ask for it
    (e.g. ``--appendonly yes``), its files in ``folder``: its URL and process, for tests and benchmarks; stopped
    afterwards."""
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(folder), *options], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 30
        while not _pings(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"a scratch redis-server on port {port} did not start (options: {options})")
            time.sleep(0.05)
        yield url, process
    finally:
        stop_process(process, 10)


def _pings(url: str) -> bool:
    with connect(url, timeout_s=2, retries=0) as client:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False


def last_error(log_file: Path) -> str:
    """': ' and the last CRITICAL or ERROR line of a log's last 64 kB (what a process that exited said last of
    why), or nothing."""
    with contextlib.suppress(OSError), log_file.open("rb") as log:
        log.seek(max(0, log_file.stat().st_size - 65536))
        for line in reversed(log.read().decode(errors="replace").splitlines()):
            if " CRITICAL " in line or " ERROR " in line:
                return f": {line.strip()}"
    return ""


def code_version() -> str:
    """A digest of the services' code as it is on disk now (what a process started now imports)."""
    root = INFRA.parent
    digest = hashlib.sha256()
    for path in sorted(path for package in PACKAGES for pattern in ("*.py", "*.html")
                       for path in (root / package).rglob(pattern)):
        digest.update(f"{path.relative_to(root)}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # (a process of a release that wrote none)
        return None


def free_space(folder: Path) -> str:
    """``; N MB free in folder``, for a message about a server that exited (a full disk makes Redis exit at its first
    write: review 49), or nothing."""
    with contextlib.suppress(OSError):
        return f"; {shutil.disk_usage(folder).free // 2**20} MB free in {folder}"
    return ""


