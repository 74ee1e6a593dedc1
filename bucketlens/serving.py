"""The HTTP server under ingest and the index service: uvicorn on httptools, with each request's head and body bounded.

httptools bounds neither a request head's size nor how long it takes to arrive, and uvicorn checks neither
before the app (and its token checks) sees the request: one connection streaming header lines grew a server by
300 MB, and silent or half-sent heads held connections for good (review 70). A head (request line and headers)
may hold ``MAX_HEAD_BYTES`` and must be whole within ``HEAD_TIMEOUT_S`` of the connection or of its first byte;
a request past either is answered 400 or closed. So is a chunked body whose framing (chunk sizes, their
extensions, trailers: bytes httptools keeps or drops, never hands on as body) outgrows ``MAX_HEAD_BYTES`` beyond
the body's own size: a trailer streamed for good grew the server as a header did (review 77). A body must arrive at
``MIN_BODY_RATE`` bytes a second on average, after ``HEAD_TIMEOUT_S`` of grace, or it is answered 408 and closed:
one that trickled in held its connection for as long as the client cared to send (review 70 left it to a proxy).
How much a body may hold is each route's (``http.bounded``, ``read_limited``). A server exposed beyond this host
still belongs behind a proxy (README, "Security")."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # a search's request line and headers take well under 1 KiB
HEAD_TIMEOUT_S = 20.0
MIN_BODY_RATE = 16 * 1024  # bytes a second: a 12 MP photo in 5 minutes; a phone's uplink sends it in seconds


class BoundedHead(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a head over ``MAX_HEAD_BYTES``, closing one not whole in time, and
    answering 408 to a body that arrives slower than ``MIN_BODY_RATE`` past its grace.

    The bytes are counted as they arrive: httptools hands over a header only once it has ended, so a header that
    never ends (a value streamed for good) was never counted (review 72)."""

    _in_head = True  # from the connection's start (or a request's first byte) to the end of its headers
    _head_bytes = 0
    _timer: asyncio.TimerHandle | None = None  # the head's deadline, then the body's
    _body_from = 0.0  # the loop's time the body's allowance counts from
    _body_bytes = 0
    _in_body = False  # from the end of a request's headers to the end of its body
    _framing = 0  # bytes received since the headers ended, less the body's: chunked framing and trailers

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            room = MAX_HEAD_BYTES - self._head_bytes
            if len(data) > room:  # the head must end within ``room``: parse that much first, and see
                super().data_received(data[:room])
                if self._in_head and not self.transport.is_closing():
                    self.send_400_response(f"request head over {MAX_HEAD_BYTES} bytes")
                if self.transport.is_closing():
                    return
                data = data[room:]
            else:
                self._head_bytes += len(data)
        elif self._in_body:
            self._framing += len(data)  # (on_body takes the body's bytes back off)
        super().data_received(data)
        if self._in_body and self._framing > MAX_HEAD_BYTES + self._body_bytes and not self.transport.is_closing():
            self.send_400_response(f"chunked framing or trailers over {MAX_HEAD_BYTES} bytes beyond the body")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0
        self._arm()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
        self._in_body, self._framing = True, 0
        self._body_from, self._body_bytes = self.loop.time(), 0  # (a request without a body completes at once)
        self._arm_at(self._body_due(), self._body_too_slow)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        self._framing -= len(body)
        self._arm_at(self._body_due(), self._body_too_slow)  # (a due time passed already: at once)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._disarm()
        super().on_message_complete()

    def _body_due(self) -> float:
        """When the body's next bytes are due: ``HEAD_TIMEOUT_S`` after its start, and a second later for each
        ``MIN_BODY_RATE`` bytes that came."""
        return self._body_from + HEAD_TIMEOUT_S + self._body_bytes / MIN_BODY_RATE

    def _arm(self) -> None:
        self._arm_at(self.loop.time() + HEAD_TIMEOUT_S, self._too_slow)

    def _arm_at(self, when: float, then: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_at(when, then)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _body_too_slow(self) -> None:
        self._timer = None
        if self.flow.read_paused or (self.cycle is not None and self.cycle.waiting_for_100_continue):
            # The app has not taken what came yet (or a pipelined request waits for the one before it), or has not
            # asked for the body that a client sending ``Expect: 100-continue`` holds back until it does (review
            # 77): not the client's slowness. Its allowance starts again from now.
            self._body_from = self.loop.time() - self._body_bytes / MIN_BODY_RATE
            self._arm_at(self._body_due(), self._body_too_slow)
            return
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_started:
            body = json.dumps({"error": {"code": "body_too_slow", "message": (
                f"the request body arrived slower than {MIN_BODY_RATE} bytes a second (after {HEAD_TIMEOUT_S:.0f} s "
                f"of grace): {self._body_bytes} bytes came")}}).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"x-content-type-options: nosniff\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                                 % (len(body), body))
        self.transport.close()

    def _too_slow(self) -> None:
        self._timer = None
        if self.cycle is not None and not self.cycle.response_complete:  # a pipelined head waits for the answer
            self._arm()  # before it (uvicorn reads no more meanwhile): closing lost that answer (review 72)
        elif not self.transport.is_closing():
            self.transport.close()


def serve(app: Any, host: str, port: int) -> None:
    """Run ``app`` until stopped."""
    uvicorn.run(app, host=host, port=port, log_level="warning", http=BoundedHead)
