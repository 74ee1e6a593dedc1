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

from bucketlens.errors import CLIError

log = logging.getLogger(__name__)
LEASES = Path(tempfile.gettempdir()) / "bucketlens-ports.json"
LEASE_S = 900.0  # longer than a first `up` takes to bind what it chose
LOCK_WAIT_S = 5.0  # the lock is held for a moment; longer, and the leases are done without
_said = False  # whether this process said the leases are unavailable


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
    """The leases that have not run out, for the caller to read and add to, written back under one lock. Leases only
    steer choices: where the file cannot be used (another user's, a link, a lock held for long), ports are chosen
    as before, without them."""
    try:  # (not through a link another local user put there: it would write wherever the link points)
        fd = os.open(LEASES, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        yield _without(f"cannot open it ({exc})")
        return
    with os.fdopen(fd, "r+") as file:
        with contextlib.suppress(OSError):  # readable and writable by every user's stacks (not only umask's)
            os.fchmod(fd, 0o666)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (released when the file closes)
                break
            except OSError:
                if time.monotonic() > deadline:
                    yield _without(f"held locked for over {LOCK_WAIT_S:.0f} s")
                    return
                time.sleep(0.05)
        try:
            found = json.loads(file.read(1 << 20) or "{}")
        except ValueError:
            found = {}
        now = time.time()
        held = {port: lease for port, lease in (found.items() if isinstance(found, dict) else ())
                if isinstance(lease, dict) and isinstance(lease.get("until"), (int, float)) and lease["until"] > now}
        yield held
        try:
            file.seek(0)
            file.truncate()
            file.write(json.dumps(held))
            file.flush()
        except OSError as exc:  # (a full disk: the leases are lost, the choice stands)
            _without(f"cannot write it ({exc})")


def _without(reason: str) -> dict[str, Any]:
    """No leases (said once a process)."""
    global _said
    if not _said:
        _said = True
        log.warning("port leases in %s unavailable: %s; a stack set up meanwhile may choose the same ports",
                    LEASES, reason)
    return {}
