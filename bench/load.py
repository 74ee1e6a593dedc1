"""The load run (``python -m bench --only load``): concurrent searches while uploads merge.

``clients`` threads search without pause for ``seconds`` (by vector, and by the key of an indexed object) while
``uploads`` new images are uploaded and merged; every answer must be 200. Reports the latency percentiles, the
searches per second, errors by status, and how many uploads were merged during the window.
"""

from __future__ import annotations

import collections
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import httpx
import numpy as np

from bucketlens.s3 import make_client
from infra.stack import Stack

from .e2e import percentile


def run(stack: Stack, api: httpx.Client, files: Sequence[Path], uploads: int = 2000, clients: int = 64,
        seconds: float = 60.0, seed: int = 0) -> dict[str, Any]:
    s = stack.settings
    stats = api.get("/stats").json()
    keys = [r["key"] for r in api.post("/search", json={"vector": [1.0] * stats["dim"], "k": 100}).json()["results"]]
    blobs = [path.read_bytes() for path in files]
    s3 = make_client(s)
    prefix = f"load-{uuid.uuid4().hex[:6]}/"
    stop = threading.Event()
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def searcher(number: int) -> None:
        rng = np.random.default_rng(seed + number)
        with httpx.Client(base_url=stack.api_url, timeout=60) as client:
            client.get("/healthz")  # connect before the first timed search: it times the search, not the handshake
            while not stop.is_set():
                body: dict[str, Any] = {"k": 10}
                if keys and rng.random() < 0.5:
                    body["key"] = keys[int(rng.integers(len(keys)))]
                else:
                    body["vector"] = rng.standard_normal(stats["dim"]).tolist()
                started = time.perf_counter()
                try:
                    status = str(client.post("/search", json=body).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                took = time.perf_counter() - started
                with lock:
                    if status == "200":
                        latencies.append(took)
                    else:
                        errors[status] += 1

    def upload(i: int) -> None:
        if not stop.is_set():
            s3.put_object(Bucket=s.bucket, Key=f"{prefix}{i:05d}.jpg", Body=blobs[i % len(blobs)],
                          ContentType="image/jpeg")

    before = stats["vectors"]
    threads = [threading.Thread(target=searcher, args=(n,), daemon=True) for n in range(clients)]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        for thread in threads:
            thread.start()
        list(pool.map(upload, random.Random(seed).sample(range(uploads), uploads)))
        stop.wait(max(0.0, seconds - (time.perf_counter() - started)))
        stop.set()
    for thread in threads:
        thread.join(60)
    window = time.perf_counter() - started
    ms = [t * 1000 for t in latencies]
    return {
        "clients": clients, "seconds": round(window, 1), "uploads": uploads,
        "merged_during_window": api.get("/stats").json()["vectors"] - before,
        "searches": len(ms), "searches_per_s": round(len(ms) / window, 1), "errors": dict(errors),
        "p50_ms": round(percentile(ms, 50), 1) if ms else None, "p99_ms": round(percentile(ms, 99), 1) if ms else None,
    }
