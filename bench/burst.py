"""The burst (``python -m bench --only burst``): many uploads with the workers stopped, then the workers started.

Every upload's notification must be accepted (2xx: ingest answers 503 only near Redis's ``maxmemory``, and a
refused event counts in ``refused_near_full``), Redis's memory per queued object is measured (``used_memory``
growth over the objects queued: task payloads, pending marks, dedup keys), then the workers index everything; the
report says how many embeddings were made beyond one per object (``embedded`` counter growth minus the objects).
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import httpx
from tqdm import tqdm

from bucketlens.keys import Keys
from bucketlens.redis_client import connect
from bucketlens.s3 import make_client
from infra.stack import Stack


def _counters(api: httpx.Client) -> dict[str, int]:
    return api.get("/queues").json()["events"]  # type: ignore[no-any-return]


def run(stack: Stack, api: httpx.Client, files: Sequence[Path], count: int, uploaders: int = 16,
        timeout_s: float = 7200) -> dict[str, Any]:
    s = stack.settings
    redis = connect(s.redis_url)
    s3 = make_client(s)
    blobs = [path.read_bytes() for path in files]
    prefix = f"burst-{uuid.uuid4().hex[:6]}/"
    for name in ("supervisor", "worker"):  # the supervisor would restart the worker
        stack.stop_service(name)
    before = _counters(api)
    vectors_before = api.get("/stats").json()["vectors"]
    memory_before = int(redis.info("memory")["used_memory"])

    def put(i: int) -> None:
        s3.put_object(Bucket=s.bucket, Key=f"{prefix}{i:06d}.jpg", Body=blobs[i % len(blobs)],
                      ContentType="image/jpeg")

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=uploaders) as pool:
        list(tqdm(pool.map(put, range(count)), total=count, unit="img", desc="burst: uploads", leave=False))
    upload_s = time.perf_counter() - started
    deadline = time.monotonic() + timeout_s
    while _counters(api).get("accepted", 0) - before.get("accepted", 0) < count:
        if time.monotonic() > deadline:
            raise TimeoutError("not every upload's event was accepted")
        time.sleep(1)
    accepted_s = time.perf_counter() - started
    queued = api.get("/queues").json()
    memory = int(redis.info("memory")["used_memory"]) - memory_before
    maxmemory = int(redis.info("memory").get("maxmemory", 0))

    stack.start_service("worker")
    stack.start_service("supervisor")
    drained = time.perf_counter()
    with tqdm(total=count, unit="img", desc="burst: indexed", leave=False) as bar:
        done = 0
        while done < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count - done} objects not indexed")
            done = api.get("/stats").json()["vectors"] - vectors_before
            bar.update(done - bar.n)
            time.sleep(1)
    after = _counters(api)
    grew = {name: after.get(name, 0) - before.get(name, 0) for name in ("accepted", "refused_near_full", "embedded")}
    return {
        "objects": count, "upload_seconds": round(upload_s, 1), "seconds_to_all_accepted": round(accepted_s, 1),
        "refused_near_full": grew["refused_near_full"],
        "tasks_queued": sum(q["depth"] for q in queued["queues"].values()),
        "redis_bytes_queued": memory, "redis_bytes_per_queued_object": round(memory / count),
        "redis_maxmemory": maxmemory, "seconds_workers_start_to_all_indexed": round(time.perf_counter() - drained, 1),
        "embedded_more_than_once": max(0, grew["embedded"] - count), "namespace": Keys(s.namespace).namespace,
    }
