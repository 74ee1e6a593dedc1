"""bucketlens end to end on its own stack: bulk throughput (first upload -> last vector merged) and
freshness (one upload at a time on the idle stack -> searchable)."""

from __future__ import annotations

import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import httpx
from tqdm import tqdm

from bucketlens.keys import Keys
from bucketlens.redis_client import connect, text
from bucketlens.s3 import make_client
from infra.stack import Stack

from .procs import CpuMeter, stack_pids, tree_peak_rss_mb
from .stack import wait_indexed


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def throughput(stack: Stack, api: httpx.Client, files: Sequence[Path], uploaders: int = 16,
               timeout_s: float = 1800) -> dict[str, Any]:
    """Upload every file concurrently; images per second from the first upload to the last vector merged."""
    s = stack.settings
    keys = Keys(s.namespace)
    redis = connect(s.redis_url)
    redis.delete(keys.stages)
    s3 = make_client(s)
    prefix = f"e2e-{uuid.uuid4().hex[:6]}/"
    blobs = [path.read_bytes() for path in files]
    before = api.get("/stats").json()["vectors"]
    failures_before = redis.hlen(keys.failures)
    upload_s = 0.0

    def put(i: int) -> None:
        s3.put_object(Bucket=s.bucket, Key=f"{prefix}{files[i].name}", Body=blobs[i], ContentType="image/jpeg")

    meter = CpuMeter(stack.home)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=uploaders) as pool, tqdm(
        total=len(files), unit="img", desc="bucketlens: merged", leave=False
    ) as bar:
        uploads = [pool.submit(put, i) for i in range(len(files))]
        merged = 0
        while merged < len(files):
            if not upload_s and all(f.done() for f in uploads):
                upload_s = time.perf_counter() - started
            failed = redis.hlen(keys.failures) - failures_before
            vectors = api.get("/stats").json()["vectors"] - before
            bar.update(vectors - merged)
            merged = vectors
            if vectors + failed >= len(files):
                break
            if time.perf_counter() - started > timeout_s:
                raise TimeoutError(f"only {vectors} of {len(files)} images merged after {timeout_s:.0f} s")
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        for upload in uploads:
            upload.result()  # re-raises an upload error
    cpu = meter.report(len(files))
    stages = {text(k): float(v) for k, v in redis.hgetall(keys.stages).items()}
    counts = {name.split(":")[0]: stages[name] for name in stages if name.endswith(":count")}
    return {
        "bucketlens_images_per_s": len(files) / elapsed,
        "bucketlens_seconds": elapsed,
        "bucketlens_failed": redis.hlen(keys.failures) - failures_before,
        "upload_seconds": upload_s or elapsed,
        "worker_tasks": int(counts.get("fetch", 0)),
        "worker_images_per_task": len(files) / max(1, counts.get("fetch", 0)),
        "worker_stage_ms_per_image": {
            stage: round(stages[f"{stage}:seconds"] * 1000 / len(files), 2) for stage in counts
        },
        **{f"bucketlens_{name}": value for name, value in cpu.items()},
    }


def freshness(stack: Stack, api: httpx.Client, files: Sequence[Path], count: int = 20) -> dict[str, Any]:
    """``count`` uploads one at a time on the idle stack, each timed from the PUT to ``state == indexed``."""
    s = stack.settings
    s3 = make_client(s)
    prefix = f"fresh-{uuid.uuid4().hex[:6]}/"
    times = []
    for path in tqdm(list(files[:count]), unit="upload", desc="freshness", leave=False):
        blob = path.read_bytes()
        time.sleep(0.3)  # idle between uploads: each one finds an empty queue
        started = time.perf_counter()
        s3.put_object(Bucket=s.bucket, Key=prefix + path.name, Body=blob, ContentType="image/jpeg")
        wait_indexed(api, s.bucket, prefix + path.name, 60, 0.005)
        times.append(time.perf_counter() - started)
    return {"freshness_p50_s": statistics.median(times), "freshness_p95_s": percentile(times, 95),
            "freshness_max_s": max(times), "freshness_samples_s": [round(t, 4) for t in times]}


def peak_memory(stack: Stack) -> dict[str, float]:
    pids = stack_pids(stack.home)
    return {"worker_peak_rss_mb": tree_peak_rss_mb(pids["worker"]), "stack_api_peak_rss_mb":
            tree_peak_rss_mb(pids["api"]), "ingest_peak_rss_mb": tree_peak_rss_mb(pids["ingest"])}
