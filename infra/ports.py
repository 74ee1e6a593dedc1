"""Ports on 127.0.0.1 for the local stack's servers, leased machine-wide from choice to bind.

A first ``up`` chooses its ports a minute before its servers bind them (radosgw binds once the Ceph cluster is
made), so a second ``up`` started meanwhile, in another folder, chose the same ones; its radosgw, ingest and API
never started, and its ``status`` showed the other stack's index (reviews 29 and 31). A choice is now recorded in
``LEASES`` for ``LEASE_S``, under a lock, and other choosers pass over it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from bucketlens.cli import CLIError

log = logging.getLogger(__name__)
LEASES = Path(tempfile.gettempdir()) / "bucketlens-ports.json"
LEASE_S = 900.0  # longer than a first `up` takes to bind what it chose


def free_port(preferred: int = 0, by: str = "") -> int:
    """A port that nothing binds and no other chooser leased, leased to ``by`` (a stack's folder; "" for a caller
    that binds at once): ``preferred`` where it is such a port, else one the kernel picks."""
    with _leases() as held:
        for port in (preferred, *[0] * 16):  # (the kernel may pick a port leased and not yet bound: pick again)
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                chosen = int(sock.getsockname()[1])
            if _take(held, chosen, by):
                return chosen
    raise CLIError("no free port on 127.0.0.1")


def lease(port: int, by: str) -> bool:
    """Lease ``port`` to ``by`` (a stack's folder); False when another stack holds it. A lease of a caller that
    binds at once (``by`` "") is taken over: whether it did bind is ``port_in_use``'s to say."""
    with _leases() as held:
        if not held.get(str(port), {}).get("by"):
            held.pop(str(port), None)
        return _take(held, port, by)


def port_in_use(port: int) -> bool:
    """Whether something listens on (or holds) ``port`` of 127.0.0.1; connections left in TIME_WAIT by a process
    that exited do not count (SO_REUSEADDR, as the servers themselves bind)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def _take(held: dict[str, Any], port: int, by: str) -> bool:
    other = held.get(str(port))
    if other is not None and (not by or other.get("by") != by):
        return False
    held[str(port)] = {"until": time.time() + LEASE_S, "by": by}
    return True


@contextlib.contextmanager
def _leases() -> Iterator[dict[str, Any]]:
    """The leases that have not run out, for the caller to read and add to, written back under one lock."""
    try:
        fd = os.open(LEASES, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # (another user's file, a read-only /tmp): choose as before, without leases
        log.warning("port leases in %s unavailable (%s): a stack started meanwhile may choose the same ports",
                    LEASES, exc)
        yield {}
        return
    with os.fdopen(fd, "r+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)  # (released when the file closes)
        try:
            found = json.loads(file.read() or "{}")
        except ValueError:
            found = {}
        now = time.time()
        held = {port: lease for port, lease in (found.items() if isinstance(found, dict) else ())
                if isinstance(lease, dict) and isinstance(lease.get("until"), (int, float)) and lease["until"] > now}
        yield held
        file.seek(0)
        file.truncate()
        file.write(json.dumps(held))
