"""A TCP proxy for fault tests: forwards to a real server, but holds back the body of chosen responses.

Requests whose first line contains a ``stall`` marker get their response headers and the first bytes of the
body, then nothing more (the connection stays open); ``drip`` markers get the body one byte every
``drip_interval_s``. Everything else passes through untouched. HTTP/1.1 without pipelining is assumed (one
request in flight per connection), which is what boto3/urllib3 do. A side that closes closes the other, as on a
direct connection: a client kept a connection the server had closed and its next request waited out its read
timeout.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Sequence

HEAD_END = b"\r\n\r\n"


class SlowBodyProxy:
    def __init__(self, target: tuple[str, int], stall: Sequence[bytes] = (), drip: Sequence[bytes] = (),
                 drip_interval_s: float = 0.5, body_prefix: int = 4096) -> None:
        self.target = target
        self.stall = tuple(stall)
        self.drip = tuple(drip)
        self.drip_interval_s = drip_interval_s
        self.body_prefix = body_prefix
        self.held: list[bytes] = []  # request lines whose responses were held back
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed.set()
        _close(self._listener, *self._sockets)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self._sockets += [client, upstream]
            mode: list[str] = ["pass"]  # what to do with the response now on its way back
            threading.Thread(target=self._requests, args=(client, upstream, mode), daemon=True).start()
            threading.Thread(target=self._responses, args=(upstream, client, mode), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket, mode: list[str]) -> None:
        try:
            while data := client.recv(65536):
                line = data.split(b"\r\n", 1)[0]
                if line.split(b" ", 1)[0] in (b"GET", b"HEAD", b"PUT", b"POST", b"DELETE"):
                    mode[0] = ("stall" if any(m in line for m in self.stall)
                               else "drip" if any(m in line for m in self.drip) else "pass")
                    if mode[0] != "pass":
                        self.held.append(line)
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _close(client, upstream)

    def _responses(self, upstream: socket.socket, client: socket.socket, mode: list[str]) -> None:
        try:
            while data := upstream.recv(65536):
                if mode[0] == "pass":
                    client.sendall(data)
                    continue
                head, sep, body = data.partition(HEAD_END)
                client.sendall(head + sep + body[: self.body_prefix])
                rest = body[self.body_prefix :]
                while not self._closed.is_set() and client.fileno() != -1:  # hold the connection; drip or send nothing
                    if mode[0] == "drip":
                        if not rest:
                            rest = upstream.recv(65536)
                            if not rest:
                                return
                        client.sendall(rest[:1])
                        rest = rest[1:]
                    time.sleep(self.drip_interval_s)
        except OSError:
            pass
        finally:
            _close(upstream, client)


def _close(*sockets: socket.socket) -> None:
    """Shut down, then close: a thread blocked in ``recv`` on the socket wakes (``close`` alone leaves it)."""
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
