"""The HTTP server under ingest and the index service bounds each request's head and how slowly its body may come
(bucketlens/serving.py), at its shipped limits: a real uvicorn, run by ``serve``, on a free loopback port, with a
route that reads its body as the services' routes do (``read_limited``)."""

from __future__ import annotations

import concurrent.futures
import json
import math
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bucketlens.serving import HEAD_TIMEOUT_S, MAX_HEAD_BYTES, MIN_BODY_RATE
from infra.ports import free_port

APP = """
import sys
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
import asyncio
from bucketlens.http import EXCEPTION_HANDLERS, read_limited
from bucketlens.serving import HEAD_TIMEOUT_S, MIN_BODY_RATE, serve

async def size(request):
    return PlainTextResponse(str(len(await read_limited(request, 1 << 24))))

async def late(request):  # an app that reads the body only well past its due time (busy, say)
    await asyncio.sleep(HEAD_TIMEOUT_S + 8)
    return await size(request)

routes = [Route("/", lambda request: PlainTextResponse("ok")), Route("/body", size, methods=["POST"]),
          Route("/late", late, methods=["POST"])]
serve(Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS), "127.0.0.1", int(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serving") / "server.log"


@pytest.fixture(scope="module")
def port(server_log: Path) -> Iterator[int]:
    port = free_port()
    with server_log.open("wb") as log:
        server = subprocess.Popen([sys.executable, "-c", APP, str(port)], stderr=log)
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


def send_body(port: int, size: int, rate: float, path: str = "/body", chunked: bool = False, expect: bool = False
              ) -> tuple[int, bytes, float]:
    """POST ``size`` bytes to ``path`` at ``rate`` bytes a second (0: none after the head; inf: at once), in chunks
    of a tenth of a second's bytes with ``chunked``, once the server says ``100 Continue`` with ``expect``; the
    answer's status (0: none) and body, and the seconds from the head to the close."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(HEAD_TIMEOUT_S + 30)
        length = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n%s\r\n%s\r\n"
                     % (path.encode(), length, b"Expect: 100-continue\r\n" if expect else b""))
        start, sent, piece = time.monotonic(), 0, max(1, int(min(rate, size) / 10))
        if expect:
            assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            while rate and sent < size:
                part = b"a" * min(piece, size - sent)
                sock.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
                sent += len(part)
                time.sleep(max(0.0, start + sent / rate - time.monotonic()))
            if chunked and rate:
                sock.sendall(b"0\r\n\r\n")
        except OSError:  # cut off while sending: the answer is in the socket
            pass
        answer = b""
        while chunk := closed(sock):  # (to the close: the server closes a ``Connection: close`` one once answered)
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]) if head else 0, body, time.monotonic() - start


def test_a_body_that_trickles_in_is_answered_408_and_a_slow_steady_one_is_served(port: int, server_log: Path) -> None:
    """A body that trickled in (a byte a second, or none after the head) held its connection for as long as the
    client cared to send: both servers had no timeout for it (README, "Security", until now). A body that keeps
    ``MIN_BODY_RATE`` on average past the grace is read whole, however long it takes, chunked or not; so is one
    sent at once to an app that reads it only past its due time, and one held back for ``100 Continue`` until such
    an app asks for it (neither is the client's slowness). A client cut off is said in one line, not as a bug with a
    traceback."""
    steady = int(MIN_BODY_RATE * 1.5 * (HEAD_TIMEOUT_S + 5))  # past the grace, at 1.5x the least rate
    late = 256 * 1024  # (more than uvicorn buffers before it stops reading: 64 KiB)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = [pool.submit(send_body, port, *how) for how in (
            (10_000, 1.0), (10_000, 0), (steady, 1.5 * MIN_BODY_RATE), (steady, 1.5 * MIN_BODY_RATE, "/body", True),
            (late, math.inf, "/late"), (late, math.inf, "/late", False, True))]
        (trickle, trickle_body, trickle_s), (silent, _, silent_s), *served = (a.result() for a in answers)
    assert (trickle, silent) == (408, 408)
    assert json.loads(trickle_body)["error"]["code"] == "body_too_slow"
    assert HEAD_TIMEOUT_S - 1 < min(trickle_s, silent_s) and max(trickle_s, silent_s) < HEAD_TIMEOUT_S + 10
    assert [(status, body) for status, body, _ in served] == [(200, str(size).encode())
                                                              for size in (steady, steady, late, late)]
    assert all(seconds > HEAD_TIMEOUT_S for _, _, seconds in served)
    assert httpx.get(f"http://127.0.0.1:{port}/").text == "ok"
    said = server_log.read_text()
    assert "Traceback" not in said and "Exception in ASGI application" not in said, said


def test_chunked_framing_or_trailers_past_the_limit_are_refused(port: int) -> None:
    """A chunked body's trailer is read as a header is, after the head's limit stopped counting and without a byte
    of body to time: one streamed for good grew the server at the line's rate (review 77)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(10)
        sock.sendall(b"POST /body HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n0\r\nX-Trailer: ")
        sent = 0
        with pytest.raises(OSError):  # reset or broken pipe once the server has refused and closed
            while sent < 100 * MAX_HEAD_BYTES:
                sock.sendall(b"a" * 1000)
                sent += 1000
        assert sent < 100 * MAX_HEAD_BYTES
