"""Group events that arrive together into one task, and answer each request only once its task is queued."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Sequence

from bucketlens.schemas import ObjectRef

Flush = Callable[[Sequence[ObjectRef]], Awaitable[None]]


class Batcher:
    """Collects references for up to ``window_s`` (or ``max_size`` references), then flushes them at once.

    ``submit`` returns when the flush that carried its references succeeded and raises what it raised,
    so a receiver can answer 5xx and have the S3 server deliver the event again.
    """

    def __init__(self, flush: Flush, window_s: float, max_size: int) -> None:
        self._flush = flush
        self._window_s = window_s
        self._max_size = max_size
        self._refs: list[ObjectRef] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, refs: Sequence[ObjectRef]) -> None:
        if not refs:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._refs.extend(refs)
        self._waiters.append(waiter)
        if len(self._refs) >= self._max_size or self._window_s <= 0:
            self._start_flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._window_s, self._start_flush)
        await waiter

    def _start_flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        refs, waiters = self._refs, self._waiters
        self._refs, self._waiters = [], []
        if refs:
            asyncio.ensure_future(self._run(refs, waiters))

    async def _run(self, refs: list[ObjectRef], waiters: list[asyncio.Future[None]]) -> None:
        try:
            await self._flush(refs)
        except Exception as exc:  # every request in the batch learns of the failure
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
        else:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
