"""Redis bytes per queued object, without a stack: ``python -m bench.burst_memory [--objects N]``.

A Redis of its own (AOF on, as ``infra/redis.conf``) and the ingest app in-process; N Ceph-shaped upload events,
one per request as Ceph RGW sends them: one at a time (each object then becomes its own task: the worst case) and
64 at a time (ingest's batch window fills tasks). ``used_memory`` growth over N is what one queued object costs:
task payload, pending mark, dedup key. ``python -m bench --only burst`` measures the same through real uploads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import httpx

from bucketlens.keys import Keys
from bucketlens.redis_client import connect
from bucketlens.settings import Settings
from ingest.receiver import create_app

from . import ROOT
from .stack import scratch_redis

RECORD = json.loads((ROOT / "tests" / "fixtures" / "events" / "ceph_put.json").read_bytes())["Records"][0]


def _body(i: int, prefix: str) -> bytes:
    record = json.loads(json.dumps(RECORD))
    record["s3"]["object"].update(key=f"{prefix}/{i:06d}.jpg", eTag=f"{i:032x}")
    return json.dumps({"Records": [record]}).encode()


async def measure(url: str, objects: int, concurrency: int) -> dict[str, Any]:
    settings = Settings(redis_url=url, namespace=f"burst{concurrency}", webhook_token="bench")
    keys = Keys(settings.namespace)
    redis = connect(url)
    redis.hset(keys.generations, "1", settings.model)
    app = create_app(settings)
    gate = asyncio.Semaphore(concurrency)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://ingest") as client:
        before = int(redis.info("memory")["used_memory"])

        async def deliver(i: int) -> None:
            async with gate:
                response = await client.post("/events?token=bench", content=_body(i, settings.namespace))
                response.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(deliver(i) for i in range(objects)))
        seconds = time.perf_counter() - started
        grown = int(redis.info("memory")["used_memory"]) - before
    return {"objects": objects, "concurrent_deliveries": concurrency,
            "tasks": redis.llen(keys.queue_list(keys.live_queue)),
            "bytes_per_queued_object": round(grown / objects), "events_per_s": round(objects / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.burst_memory", description=__doc__)
    parser.add_argument("--objects", type=int, default=3000)
    args = parser.parse_args()
    with scratch_redis("--appendonly", "yes") as url:
        for concurrency in (1, 64):
            print(json.dumps(asyncio.run(measure(url, args.objects, concurrency))))


if __name__ == "__main__":
    main()
