"""What Linux says of a process in /proc: its stat fields and its children."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

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
