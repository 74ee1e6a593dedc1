"""The HTTP server under ingest and the index service bounds each request's head (bucketlens/serving.py), at its
shipped limits: a real uvicorn, run by ``serve``, on a free loopback port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from bucketlens.serving import HEAD_TIMEOUT_S, MAX_HEAD_BYTES
from infra.ports import free_port

APP = """
import sys
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from bucketlens.serving import serve
serve(Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))]), "127.0.0.1", int(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", APP, str(port)])
    try:
        for _ in range(200):
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield port
    finally:
        server.terminate()
        server.wait(10)


def closed(sock: socket.socket) -> bytes | None:
    """What the server said before it closed the connection, or None if it is still open."""
    try:
        return sock.recv(65536) or b""
    except TimeoutError:
        return None
    except ConnectionResetError:
        return b""


@pytest.mark.parametrize("piece", [b"X-Filler: " + b"a" * 1000 + b"\r\n", b"a" * 1000], ids=["lines", "one value"])
def test_a_head_past_its_limit_is_refused_before_the_server_reads_on(port: int, piece: bytes) -> None:
    """One connection streaming header lines grew a server by 300 MB, before any token was checked (review 70);
    one header whose value never ended was never counted (httptools hands a header over once it ends: review
    72)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(10)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: ")
        sent = 0
        with pytest.raises(OSError):  # reset or broken pipe once the server has refused and closed
            while sent < 100 * MAX_HEAD_BYTES:
                sock.sendall(piece)
                sent += len(piece)
        assert sent < 100 * MAX_HEAD_BYTES
    ordinary = httpx.get(f"http://127.0.0.1:{port}/", headers={"X-Filler": "a" * (MAX_HEAD_BYTES // 2)})
    assert ordinary.text == "ok"  # a large head within the limit is served


def test_a_silent_or_half_sent_head_is_closed_in_time_and_a_whole_one_is_served(port: int) -> None:
    silent = socket.create_connection(("127.0.0.1", port))
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    start = time.monotonic()
    for sock in (silent, half):
        sock.settimeout(HEAD_TIMEOUT_S + 10)
        assert closed(sock) == b""
        sock.close()
    assert HEAD_TIMEOUT_S - 1 < time.monotonic() - start < HEAD_TIMEOUT_S + 10
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:  # a keep-alive client between requests
        assert client.get("/").text == "ok"
        assert client.get("/").text == "ok"
