"""The soak (``python -m bench --only soak``): ``--soak`` distinct images (20,000) pushed through the stack, with
every stack process's resident memory sampled each second.

Uploads keep at most ``window`` images between their upload and their vector being merged, so the stack runs at
its own pace the whole time (a backlog would grow Redis by design and say nothing about leaks). The report, per
process (each stack service and each of its child processes, e.g. the worker's pool children): RSS when the first
``settled`` (2,000) images were merged, the highest RSS after that, and the growth between them; the index
service also with the growth beyond what it must hold (``vector_bytes`` per vector merged meanwhile: the float32
vector, its metadata and the IVF structure's share, measured by ``bench.memory``). Throughput per quarter of the
images (first merged -> last merged of each quarter). Targets: no process grows more than 10 % after the first
2,000 images; the last quarter's throughput within 10 % of the second quarter's.
"""

from __future__ import annotations

import itertools
import threading
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

from .procs import rss_mb, stack_pids, tree

QUARTERS = 4


class MemorySampler(threading.Thread):
    """RSS of every process of the stack (services and their descendants), once a second, with the number of
    images merged at that moment (``progress()``)."""

    def __init__(self, home: Path, progress: Any) -> None:
        super().__init__(daemon=True)
        self.home, self.progress = home, progress
        self.samples: list[dict[str, Any]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(1.0):
            rss = {}
            for name, pid in stack_pids(self.home).items():
                for rank, member in enumerate(tree(pid)):
                    rss[name if rank == 0 else f"{name}/child{rank}"] = round(rss_mb(member), 1)
            self.samples.append({"t": time.monotonic(), "merged": self.progress(), "rss_mb": rss})

    def stop(self) -> list[dict[str, Any]]:
        self.stopping.set()
        self.join()
        return self.samples


def growth(samples: list[dict[str, Any]], settled: int, vector_bytes: int) -> dict[str, dict[str, float]]:
    """Per process: RSS at the first sample with ``settled`` images merged, the highest after it, the growth."""
    start = next(s for s in samples if s["merged"] >= settled)
    end_merged = samples[-1]["merged"]
    out = {}
    for name, base in start["rss_mb"].items():
        later = [s["rss_mb"][name] for s in samples if s["t"] >= start["t"] and name in s["rss_mb"]]
        peak = max(later)
        row = {"rss_at_settled_mb": base, "peak_after_mb": peak, "final_mb": later[-1],
               "growth": round(peak / base - 1, 3) if base else 0.0}
        if name == "api":
            held = (end_merged - start["merged"]) * vector_bytes / 2**20
            row["held_vectors_mb"] = round(held, 1)
            row["growth_beyond_held"] = round((peak - held) / base - 1, 3) if base else 0.0
        out[name] = row
    return out


def run(stack: Stack, api: httpx.Client, files: Sequence[Path], window: int = 256, uploaders: int = 8,
        settled: int = 2000, vector_bytes: int = 6000, timeout_s: float = 4 * 3600) -> dict[str, Any]:
    s = stack.settings
    redis = connect(s.redis_url)
    keys = Keys(s.namespace)
    s3 = make_client(s)
    prefix = f"soak-{uuid.uuid4().hex[:6]}/"
    vectors_before = api.get("/stats").json()["vectors"]
    failures_before = redis.hlen(keys.failures)
    count = len(files)
    merged = 0
    done_at: list[float] = []  # the moment each image count was first seen merged, per quarter boundary
    next_index = itertools.count()
    lock = threading.Lock()
    uploaded = 0
    finished = threading.Event()

    def uploader() -> None:
        nonlocal uploaded
        while not finished.is_set():
            with lock:
                if uploaded - merged >= window:
                    i = None
                else:
                    i = next(next_index)
                    if i >= count:
                        return
                    uploaded += 1
            if i is None:
                time.sleep(0.02)
                continue
            s3.put_object(Bucket=s.bucket, Key=f"{prefix}{i:06d}.jpg", Body=files[i].read_bytes(),
                          ContentType="image/jpeg")

    sampler = MemorySampler(stack.home, lambda: merged)
    sampler.start()
    started = time.monotonic()
    boundaries = [count * q // QUARTERS for q in range(1, QUARTERS + 1)]
    with ThreadPoolExecutor(max_workers=uploaders) as pool, tqdm(total=count, unit="img", desc="soak: merged",
                                                                  leave=False) as bar:
        running = [pool.submit(uploader) for _ in range(uploaders)]
        try:
            while merged < count:
                if time.monotonic() - started > timeout_s:
                    raise TimeoutError(f"only {merged} of {count} images merged after {timeout_s:.0f} s")
                for future in running:
                    if future.done():
                        future.result()  # re-raises an upload error
                now = (api.get("/stats").json()["vectors"] - vectors_before
                       + redis.hlen(keys.failures) - failures_before)
                with lock:
                    merged = now
                while len(done_at) < len(boundaries) and merged >= boundaries[len(done_at)]:
                    done_at.append(time.monotonic())
                bar.update(merged - bar.n)
                time.sleep(0.2)
        finally:
            finished.set()
    samples = sampler.stop()
    marks = [started, *done_at]
    rates = [(boundaries[0] if q == 0 else boundaries[q] - boundaries[q - 1]) / (marks[q + 1] - marks[q])
             for q in range(QUARTERS)]
    per_process = growth(samples, min(settled, count // 2), vector_bytes)
    worst = max(per_process, key=lambda name: per_process[name].get("growth_beyond_held",
                                                                     per_process[name]["growth"]))
    return {
        "images": count, "seconds": round(time.monotonic() - started, 1),
        "failed": redis.hlen(keys.failures) - failures_before, "images_per_s": count / (marks[-1] - started),
        "quarter_images_per_s": [round(r, 2) for r in rates], "last_vs_second_quarter": rates[-1] / rates[1],
        "settled_after_images": min(settled, count // 2), "processes": per_process,
        "worst_process": worst, "worst_growth": per_process[worst].get("growth_beyond_held",
                                                                       per_process[worst]["growth"]),
        "samples": [{"s": round(x["t"] - started, 1), "merged": x["merged"], "rss_mb": x["rss_mb"]}
                    for x in samples],
    }
