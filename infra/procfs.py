"""What Linux says of a process in /proc (its stat fields, its children, its session, whether it is ours and listens)
and stopping one."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

START_TIME = 19  # of ``stat_fields``: when the process started, in clock ticks since boot


def stat_fields(pid: int | str) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command's name (which may hold spaces and parentheses): the state
    first (``Z``: a zombie), then ppid, pgrp, session, ...; OSError when the process is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()


def stop_process(process: subprocess.Popen[bytes], grace_s: float, group: bool = False) -> None:
    """TERM, then KILL after ``grace_s`` (``group``: KILL its whole process group, what it started included)."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL) if group else process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):  # (one stuck in the kernel: raising in a caller's
            process.wait(timeout=10)  # ``finally`` hid what failed there)


def children(pid: int) -> list[int]:
    """The child processes of ``pid``, forked by any of its threads (a Celery worker's pool, a stack's services);
    [] when Linux does not say."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, ValueError):  # (a thread that ended meanwhile)
            continue
    return found


def live_pid(path: Path, comm_prefix: str) -> int | None:
    """The pid in ``path`` if that process is alive and is what we started (not a recycled pid): its name, and
    where the file has it (``pid_record``), its start time. By name alone, a stale file's pid reused by any
    Python process was taken for a service, and ``down`` killed it (an independent review)."""
    try:
        pid, *started = path.read_text().split()
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        fields = stat_fields(pid)
        owner = os.stat(f"/proc/{pid}").st_uid
    except (OSError, ValueError):
        return None
    if fields[0] == "Z" or not comm.startswith(comm_prefix[:15]) or started[:1] not in ([], [fields[START_TIME]]):
        return None
    if owner != os.getuid():  # another user's (the system's own redis-server, named in a stale daemon pid file)
        return None
    return int(pid)


def pid_record(pid: int) -> str:
    """What a pid file of ours holds: the pid and the process's start time (clock ticks since boot)."""
    return f"{pid} {stat_fields(pid)[START_TIME]}"


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a TCP socket listening on ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    with contextlib.suppress(OSError):
        return any(os.readlink(fd) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir())
    return False


def session_members(sid: int) -> list[int]:
    """The processes of the session ``sid`` that are not zombies."""
    return list(_scan_session(sid))


def _scan_session(sid: int) -> Iterator[int]:
    """``session_members``, each as the scan of /proc finds it."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_fields(stat.parent.name)
            member = int(fields[3]) == sid and fields[0] != "Z"  # state, ppid, pgrp, session
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if member:
            yield int(stat.parent.name)


def kill_session(sid: int, timeout_s: float = 5.0) -> None:
    """SIGKILL every process of the session ``sid``, pass after pass until none is left but zombies: a subshell
    forked during a pass escaped it, and ran on after an interrupted `up` (a test saw it once)."""
    deadline = time.monotonic() + timeout_s
    while True:
        killed = 0
        for pid in _scan_session(sid):  # (killed as found: a pass that listed first left more time)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:  # gone meanwhile
                continue
            killed += 1
        if not killed or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def terminate(pid: int, sig: int, timeout_s: float, group: bool = False) -> None:
    """Send ``sig`` to ``pid`` (its process group: ``group``) and wait up to ``timeout_s`` for it to go, then
    SIGKILL it. A stopped process (SIGSTOP, a debugger gone) is continued, so that it takes the signal: a `down` of
    a stack whose processes were frozen waited 30 s for each (review 83: 98 s, silent)."""
    try:
        send = functools.partial(os.killpg if group else os.kill, pid)
        send(sig)
        if sig != signal.SIGKILL:
            send(signal.SIGCONT)
    except (ProcessLookupError, PermissionError):  # gone, or not ours to stop
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            # A zombie is gone once its other threads are: the group's leader shows Z while they still exit holding
            # its files (a Ceph OSD started again at once failed on the old one's lock on its pid file)
            if stat_fields(pid)[0] == "Z" and len(
                    os.listdir(f"/proc/{pid}/task")) <= 1:
                os.waitpid(pid, os.WNOHANG)
        except (ProcessLookupError, ChildProcessError, FileNotFoundError):
            return
        time.sleep(0.1)
    if sig != signal.SIGKILL:
        terminate(pid, signal.SIGKILL, 5, group)
