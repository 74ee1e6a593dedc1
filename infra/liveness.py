"""Which of the local stack's processes are running but hung: a pid that the supervisor's process watch sees, and no
answer behind it.

A frozen (SIGSTOP) or wedged process keeps its pid, so the process watch left it alone for good: a hung index
service answered no search, a hung worker took no task (the index service hands a hung worker's tasks back to the
queue, with nobody left to take them), a hung Redis stalled everything, and a hung radosgw waited for the canary's
heal (its uploads and the supervisor's own S3 calls waited out boto3's timeouts: 184 s). The supervisor asks each
one, in a thread of its own (a hung process holds a question for its whole timeout), every ``PROBE_EVERY_S``: ingest
and the index services their ``/healthz``, radosgw its S3 endpoint (any answer), the worker whether its main
process's delivery record and the heartbeat of each pool process that has beaten (workers/heartbeat.py, each
rewritten every 3 s by a thread of its own) are in Redis, Redis a PING, Milvus its health check, the Ceph monitor
and OSD their admin sockets (the OSD, too, whether it holds an op past ``STUCK_OP_S``). One silent for
``liveness_timeout_s`` is hung: the supervisor kills it, and its process watch starts it again (a worker whose main
process beats loses only its silent pool processes, which it replaces itself). Silence counts only
once a process has started: an HTTP service from when its port takes connections (it binds once its start-up is
done; a refused connection is no answer either way), a Ceph daemon from when its admin socket does (made early in
its start), the others from their first answer (a worker loading its model, a Redis loading its file, a Milvus
starting are not silent). A question that cannot be answered now (the worker's, while Redis is away) starts the
count again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger(__name__)
PROBE_EVERY_S = 5.0
PROBE_TIMEOUT_S = 5.0  # for each HTTP health check and admin socket question
STUCK_OP_S = 30.0  # Ceph's own osd_op_complaint_time: an OSD op in flight longer is a slow request
# An op that began a hair after the dump's own clock reading has an age that wrapped around Ceph 16's unsigned
# seconds: 4294967296 s, logged as stuck while the OSD answered well (review 73). No real op is that old.
WRAPPED_AGE_S = 2.0**31


@dataclasses.dataclass
class Watch:
    pid: int
    started: bool = False  # its silence counts
    silent_since: float | None = None  # when the first question it left unanswered since its last answer was asked


Probe = Callable[[int], "bool | None"]  # (the pid) -> answered; None: cannot tell now


def serves(url: str) -> Probe:
    """An HTTP server's question: ``url`` answers, whatever its status, within ``PROBE_TIMEOUT_S``; None while it
    takes no connections (starting, or exiting)."""
    def ask(pid: int) -> bool | None:
        try:
            httpx.get(url, timeout=PROBE_TIMEOUT_S)
            return True
        except httpx.ConnectError:
            return None
        except httpx.HTTPError:
            return False
    return ask


def admin_socket(path: Path, prefix: str) -> Any:
    """A Ceph daemon's JSON answer to the command ``prefix`` on its admin socket, within ``PROBE_TIMEOUT_S``: what
    ``ceph --admin-daemon`` sends (the command and a NUL; the answer's length in 4 bytes, big-endian, then the
    answer), without starting a Python interpreter every few seconds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(PROBE_TIMEOUT_S)
        sock.connect(str(path))
        sock.sendall(json.dumps({"prefix": prefix, "format": "json"}).encode() + b"\0")
        (size,) = struct.unpack(">I", _receive(sock, 4))
        return json.loads(_receive(sock, size))


def _receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        if not (chunk := sock.recv(size - len(data))):
            raise ConnectionError(f"the admin socket closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def ceph_daemon(run: Path, name: str, osd: bool = False) -> Probe:
    """A Ceph daemon's question: its admin socket (``run``/``name``.``pid``.asok) answers, and for an ``osd`` no op
    has been in flight for ``STUCK_OP_S`` or more. After a 90 s freeze an OSD answered, while ops on some of its
    placement groups stayed "waiting for readable" for good; a radosgw started after that never came up (review 24).
    The first question to find an op stuck logs it. None while it has no socket, or answers something else than
    JSON (for ~5 s of its start an OSD's socket answers that ``dump_ops_in_flight`` is "not defined": review 25)."""
    stuck_in: set[int] = set()  # the pids whose stuck ops were logged

    def ask(pid: int) -> bool | None:
        try:
            answer = admin_socket(run / f"{name}.{pid}.asok", "dump_ops_in_flight" if osd else "version")
        except (FileNotFoundError, ConnectionRefusedError, ValueError):
            return None
        except (OSError, struct.error):  # (a timeout is an OSError)
            return False
        stuck = [op for op in answer.get("ops", []) if osd and STUCK_OP_S <= op.get("age", 0) < WRAPPED_AGE_S]
        if stuck and pid not in stuck_in:
            oldest = max(stuck, key=lambda op: op.get("age", 0))
            log.warning("%s (pid %d) holds %d ops in flight for %.0f s or more; the oldest, %.0f s: %s (%s)", name,
                        pid, len(stuck), STUCK_OP_S, oldest.get("age", 0), str(oldest.get("description"))[:200],
                        oldest.get("type_data", {}).get("flag_point"))
            stuck_in.add(pid)
        return not stuck
    return ask


class Liveness:
    """The processes that started and then went silent for ``timeout_s``."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.watches: dict[str, Watch] = {}
        self.answered: dict[str, float] = {}  # name -> when the question its process last answered was asked
        self.lock = threading.Lock()  # the probes run in their thread, ``hung`` in the supervisor's

    def probe(self, probes: Mapping[str, tuple[int | None, Probe, bool]], now: Callable[[], float]) -> None:
        """Ask each process once; ``probes``: name: (its pid or None when not running, its question, whether its
        silence counts before its first answer)."""
        for name, (pid, ask, started) in probes.items():
            if pid is None:
                with self.lock:
                    self.watches.pop(name, None)
                continue
            asked = now()
            answer = ask(pid)
            with self.lock:
                watch = self.watches.get(name)
                if watch is None or watch.pid != pid:  # a new process: what the last one did is not held against it
                    watch = self.watches[name] = Watch(pid, started)
                if answer:
                    watch.started, watch.silent_since = True, None
                    self.answered[name] = asked
                elif answer is None:
                    watch.silent_since = None
                elif watch.silent_since is None:
                    watch.silent_since = asked

    def note(self, name: str, when: float) -> None:
        """``name`` answered a question asked at ``when`` (one that ``probe`` does not ask itself)."""
        with self.lock:
            self.answered[name] = when

    def answered_since(self, name: str, since: float) -> bool:
        """Whether a process of ``name`` answered a question asked after ``since`` (a monotonic time)."""
        with self.lock:
            return self.answered.get(name, float("-inf")) > since

    def hung(self, now: float) -> dict[str, tuple[int, float]]:
        """name: (pid, seconds silent) of each hung process."""
        with self.lock:
            return {name: (watch.pid, now - watch.silent_since) for name, watch in self.watches.items()
                    if watch.started and watch.silent_since is not None and now - watch.silent_since >= self.timeout_s}

    def forget_all(self) -> None:
        """Every process is judged afresh (the supervisor could not ask for a while: a silence it saw before that
        says nothing of now)."""
        with self.lock:
            self.watches.clear()

    def forget(self, name: str) -> None:
        """``name`` was killed: its next process is watched afresh."""
        with self.lock:
            self.watches.pop(name, None)
