"""The HTTP server under ingest and the index service: uvicorn on httptools, with each request's head bounded.

httptools bounds neither a request head's size nor how long it takes to arrive, and uvicorn checks neither
before the app (and its token checks) sees the request: one connection streaming header lines grew a server by
300 MB, and silent or half-sent heads held connections for good (review 70). A head (request line and headers)
may hold ``MAX_HEAD_BYTES`` and must be whole within ``HEAD_TIMEOUT_S`` of the connection or of its first byte;
a request past either is answered 400 or closed. Bodies are bounded by each route (``read_limited``). A server
exposed beyond this host still belongs behind a proxy with its own timeouts (README, "Security")."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # a search's request line and headers take well under 1 KiB
HEAD_TIMEOUT_S = 20.0


class BoundedHead(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a head over ``MAX_HEAD_BYTES`` and closing one not whole in time.

    The bytes are counted as they arrive: httptools hands over a header only once it has ended, so a header that
    never ends (a value streamed for good) was never counted (review 72)."""

    _in_head = True  # from the connection's start (or a request's first byte) to the end of its headers
    _head_bytes = 0
    _head_timer: asyncio.TimerHandle | None = None

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
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0
        self._arm()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:  # a pipelined head waits for the answer
            self._arm()  # before it (uvicorn reads no more meanwhile): closing lost that answer (review 72)
        elif not self.transport.is_closing():
            self.transport.close()


def serve(app: Any, host: str, port: int) -> None:
    """Run ``app`` until stopped."""
    uvicorn.run(app, host=host, port=port, log_level="warning", http=BoundedHead)
