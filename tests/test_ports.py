"""Ports chosen for local stacks are leased machine-wide until bound (infra/ports.py). Pure logic: the lease file
lives in the test's folder, and nothing is started."""

from __future__ import annotations

import fcntl
import json
import random
import socket
from pathlib import Path

import pytest

from bucketlens.settings import Settings
from infra import ports
from infra.stack import Stack, StackError


@pytest.fixture(autouse=True)
def leases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "leases.json"
    monkeypatch.setattr(ports, "LEASES", path)
    monkeypatch.setattr(ports, "_said", False)
    return path


def unused_port() -> int:
    """A port nothing binds, below the kernel's range for outgoing connections (32768-60999): one the kernel
    picked (port 0) could be taken by any process's next connection before the test chose it (a flake whole-suite
    runs met with a live stack beside it)."""
    for port in random.Random().sample(range(20_000, 32_000), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 20000-31999")


def chosen(stack: Stack) -> set[int]:
    return set(stack.config.ports().values())


def test_two_stacks_made_before_either_binds_choose_different_ports(tmp_path: Path) -> None:
    """Review 31: a second ``up`` started while the first made its Ceph cluster chose the first's S3, ingest and
    API ports (nothing listened there yet): its servers never started, and its status showed the other's index."""
    preferred = unused_port()  # free now, as 7400 is on a machine without a stack
    first = Stack(Settings(home=tmp_path / "a", api_port=preferred))
    second = Stack(Settings(home=tmp_path / "b", api_port=preferred))
    assert len(chosen(first)) == len(chosen(second)) == 5
    assert not chosen(first) & chosen(second), (first.config, second.config)
    assert first.config.api_port == preferred  # the first takes the preferred ports where they are free
    first.choose_backend("milvus")  # a port chosen later is leased too
    second.choose_backend("milvus")
    assert first.config.milvus_port != second.config.milvus_port
    assert Stack(Settings(home=tmp_path / "a")).config == first.config  # a stack's own choice stays its own
    # A start leases the stack's ports again (review 32), so a stack set up meanwhile chooses others; a lease
    # alone refuses no start (its holder may be gone: review 34), a port in use does.
    ports.LEASES.unlink()
    first.check_ports()
    assert not chosen(Stack(Settings(home=tmp_path / "c", api_port=preferred))) & chosen(first)
    second.config.api_port = first.config.api_port
    second.check_ports()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", first.config.api_port))
        sock.listen()
        with pytest.raises(StackError, match=f"port {first.config.api_port}, this stack's api port, is in use"):
            second.check_ports()


def test_a_lease_holds_a_port_for_others_only_and_runs_out(leases: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = ports.free_port(by="me")
    assert ports.free_port(port, by="me") == port  # the holder may choose it again
    assert ports.free_port(port, by="other") != port and ports.free_port(port) != port
    assert not ports.lease(port, by="other") and ports.lease(port, by="me")
    quick = ports.free_port()  # a caller that binds at once holds it from other choosers, not from a stack's start
    assert ports.free_port(quick, by="other") != quick and ports.lease(quick, by="other")
    monkeypatch.setattr(ports, "LEASE_S", -1.0)
    ports.lease(port, by="me")  # (its lease, renewed, has run out)
    monkeypatch.undo()
    monkeypatch.setattr(ports, "LEASES", leases)
    assert ports.free_port(port, by="other") == port
    assert ports.free_port(port, by="third") != port  # ... and the other's, new, holds


def test_a_bound_port_is_never_chosen_whatever_the_leases_say() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        held = sock.getsockname()[1]
        assert ports.free_port(held, by="me") != held


@pytest.mark.parametrize("content", ["", "not json", "[]", '{"7400": 3}', '{"7400": {"until": "soon"}}'])
def test_a_damaged_lease_file_is_read_as_no_leases(leases: Path, content: str) -> None:
    leases.write_text(content)
    port = ports.free_port()
    assert list(json.loads(leases.read_text())) == [str(port)]


def test_a_link_or_a_lock_held_long_leaves_ports_chosen_without_leases(tmp_path: Path, leases: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Another local user's link in /tmp made the leases overwrite the file it points to, and a lock held forever hung
    every ``up`` (review 34)."""
    target = tmp_path / "precious"
    target.write_text("keep")
    leases.symlink_to(target)
    assert ports.free_port() > 0 and target.read_text() == "keep"
    leases.unlink()
    monkeypatch.setattr(ports, "LOCK_WAIT_S", 0.2)
    with open(leases, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert ports.free_port() > 0


def test_without_a_lease_file_ports_are_chosen_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(ports, "LEASES", tmp_path / "missing" / "leases.json")  # (cannot be made)
    assert ports.free_port() > 0
    assert "port leases in" in caplog.text


@pytest.mark.parametrize(("host", "url"), [("127.0.0.1", "http://127.0.0.1"), ("0.0.0.0", "http://127.0.0.1"),
                                           ("::1", "http://[::1]"), ("::", "http://[::1]"),
                                           ("192.168.1.20", "http://192.168.1.20")])
def test_the_stack_reaches_its_services_where_they_bind(tmp_path: Path, host: str, url: str) -> None:
    """`BUCKETLENS_API_HOST=::1 bucketlens up` (or a LAN address) waited 300 s for /readyz at 127.0.0.1, where
    nothing listened, then failed (review 48)."""
    stack = Stack(Settings(home=tmp_path, api_host=host, ingest_host=host))
    assert stack.api_url == f"{url}:{stack.config.api_port}"
    assert stack.ingest_url == f"{url}:{stack.config.ingest_port}"
