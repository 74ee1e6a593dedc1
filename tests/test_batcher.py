"""The receiver's batcher groups references arriving together and reports failures to every waiter."""

from __future__ import annotations

import asyncio
from typing import Sequence

import pytest

from bucketlens.schemas import ObjectRef
from ingest.batcher import Batcher


def refs(*keys: str) -> list[ObjectRef]:
    return [ObjectRef("b", key, "e") for key in keys]


def test_requests_within_the_window_share_one_flush() -> None:
    flushed: list[list[str]] = []

    async def flush(batch: Sequence[ObjectRef]) -> None:
        flushed.append([r.key for r in batch])

    async def main() -> None:
        batcher = Batcher(flush, window_s=0.05, max_size=100)
        await asyncio.gather(batcher.submit(refs("a")), batcher.submit(refs("b", "c")), batcher.submit(refs("d")))

    asyncio.run(main())
    assert flushed == [["a", "b", "c", "d"]]


def test_a_full_batch_flushes_at_once() -> None:
    flushed: list[int] = []

    async def flush(batch: Sequence[ObjectRef]) -> None:
        flushed.append(len(batch))

    async def main() -> None:
        batcher = Batcher(flush, window_s=60, max_size=2)
        await asyncio.wait_for(batcher.submit(refs("a", "b")), timeout=5)

    asyncio.run(main())
    assert flushed == [2]


def test_a_failed_flush_fails_every_request_in_it() -> None:
    async def flush(batch: Sequence[ObjectRef]) -> None:
        raise ConnectionError("redis down")

    async def main() -> list[object]:
        batcher = Batcher(flush, window_s=0.01, max_size=100)
        return await asyncio.gather(batcher.submit(refs("a")), batcher.submit(refs("b")), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, ConnectionError) for r in results)


def test_nothing_to_submit_returns_immediately() -> None:
    async def flush(batch: Sequence[ObjectRef]) -> None:
        pytest.fail("must not flush")

    asyncio.run(Batcher(flush, 0.01, 10).submit([]))
