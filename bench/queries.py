"""Query latency over HTTP against indexes of synthetic clustered vectors, beside the same FAISS search
in-process (``IndexFlatIP``, the service's ``faiss_threads``).

A dedicated index service (``bucketlens serve``, namespace ``benchq``, on the bench stack's Redis) reads a
result stream that the benchmark fills directly with upsert entries (``ResultEntry.to_fields`` + XADD): first
the smaller size, then the rest up to the larger one. The vectors look like real embeddings (non-negative, in a
few thousand clusters), not uniform noise. The service keeps a flat index (``approx_threshold`` set above the
largest size) so that both sides run the same exhaustive inner-product scan.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import httpx
import numpy as np
from tqdm import tqdm

from bucketlens.keys import Keys
from bucketlens.redis_client import connect
from bucketlens.schemas import ResultEntry
from bucketlens.settings import Settings
from infra.stack import free_port

from . import ROOT
from .e2e import percentile
from .procs import tree_peak_rss_mb
from .profile import Profiler, search_summary

NAMESPACE = "benchq"


def clustered_vectors(n: int, dim: int, seed: int, clusters: int = 2000) -> np.ndarray:
    """``n`` L2-normalised, non-negative vectors around ``clusters`` centres (pooled CNN features are >= 0)."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.standard_normal((clusters, dim), dtype=np.float32))
    centres *= rng.random((clusters, dim), dtype=np.float32) < 0.3  # sparse, as ReLU features are
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 10_000):
        rows = min(10_000, n - start)
        picked = centres[rng.integers(0, clusters, rows)]
        chunk = np.maximum(picked + 0.4 * rng.standard_normal((rows, dim), dtype=np.float32), 0)
        out[start : start + rows] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def fill_stream(settings: Settings, vectors: np.ndarray, start: int) -> None:
    """XADD one upsert entry per vector, as the workers would, with keys ``synthetic/<start + i>``."""
    client = connect(settings.redis_url)
    keys = Keys(NAMESPACE)
    with tqdm(total=len(vectors), unit="vec", desc="queries: fill stream", leave=False) as bar:
        for chunk in range(0, len(vectors), 500):
            pipe = client.pipeline(transaction=False)
            for i, vector in enumerate(vectors[chunk : chunk + 500], start=start + chunk):
                entry = ResultEntry("upsert", settings.bucket, f"synthetic/{i:07d}", f"etag{i}", "", i, 1,
                                    settings.model, vector)
                pipe.xadd(keys.results, entry.to_fields())
            pipe.execute()
            bar.update(min(500, len(vectors) - chunk))
    client.close()


class QueryService:
    """``bucketlens serve`` in its own process, on the bench stack's Redis and model cache."""

    def __init__(self, stack_settings: Settings, largest: int) -> None:
        # Snapshots off (a 100k snapshot while measuring would only add disk noise); a flat index at every size.
        self.settings = dataclasses.replace(stack_settings, namespace=NAMESPACE, api_port=free_port(),
                                            approx_threshold=largest + 1, snapshot_every_s=1e9,
                                            snapshot_every_entries=10**9)
        self.url = f"http://127.0.0.1:{self.settings.api_port}"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def snapshots(self) -> Path:
        return Path(self.settings.home) / "snapshots" / NAMESPACE

    def start(self) -> None:
        shutil.rmtree(self.snapshots, ignore_errors=True)  # a kept home's earlier run must not be reloaded
        log = open(Path(self.settings.home) / "logs" / "query-service.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bucketlens.cli", "serve"], env={**os.environ, **self.settings.to_env()},
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=str(ROOT),
        )
        log.close()

    def wait_vectors(self, count: int, timeout_s: float = 600) -> dict[str, Any]:
        """Wait until the service is ready and holds ``count`` vectors; returns its ``/stats``."""
        deadline = time.monotonic() + timeout_s
        with tqdm(total=count, unit="vec", desc="queries: merged", leave=False) as bar:
            while time.monotonic() < deadline:
                assert self.process is not None and self.process.poll() is None, "query service exited"
                try:
                    ready = httpx.get(self.url + "/readyz", timeout=5).status_code == 200
                    stats = httpx.get(self.url + "/stats", timeout=5).json()
                except httpx.HTTPError:
                    ready, stats = False, {"vectors": 0}
                bar.update(stats["vectors"] - bar.n)
                if ready and stats["vectors"] >= count:
                    return dict(stats)
                time.sleep(0.2)
        raise TimeoutError(f"query service did not reach {count} vectors within {timeout_s:.0f} s")

    def peak_rss_mb(self) -> float:
        return tree_peak_rss_mb(self.process.pid) if self.process else 0.0

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        connect(self.settings.redis_url).delete(Keys(NAMESPACE).results)
        shutil.rmtree(self.snapshots, ignore_errors=True)


def timed(requests: Sequence[Callable[[], float | None]], concurrency: int, desc: str) -> dict[str, float]:
    """Run the requests ``concurrency`` at a time; p50/p99 of round trips (and of ``took_ms`` when given)."""
    lock = threading.Lock()
    rounds: list[float] = []
    took: list[float] = []
    with tqdm(total=len(requests), unit="q", desc=desc, leave=False) as bar:

        def run(request: Callable[[], float | None]) -> None:
            started = time.perf_counter()
            server_ms = request()
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                rounds.append(elapsed)
                if server_ms is not None:
                    took.append(server_ms)
                bar.update()

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(run, requests))
    out = {"p50_ms": percentile(rounds, 50), "p99_ms": percentile(rounds, 99)}
    if took:
        out["took_p50_ms"] = percentile(took, 50)
    return out


class Clients(threading.local):
    """One keep-alive HTTP client per thread."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=60)


def measure_size(service: QueryService, vectors: np.ndarray, queries: np.ndarray, images: Sequence[bytes],
                 with_images: bool) -> dict[str, Any]:
    """HTTP and in-process latencies against the first ``len(vectors)`` vectors."""
    clients = Clients(service.url)

    def by_vector(body: bytes) -> Callable[[], float]:
        def send() -> float:
            response = clients.client.post("/search", content=body, headers={"content-type": "application/json"})
            assert response.status_code == 200, response.text[:200]
            return float(response.json()["took_ms"])
        return send

    def by_image(blob: bytes) -> Callable[[], float]:
        def send() -> float:
            response = clients.client.post("/search", files={"image": ("q.jpg", blob, "image/jpeg")})
            assert response.status_code == 200, response.text[:200]
            return float(response.json()["took_ms"])
        return send

    def healthz() -> None:
        clients.client.get("/healthz")

    bodies = [json.dumps({"vector": q.tolist(), "k": 10}).encode() for q in queries]
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.omp_set_num_threads(max(1, service.settings.faiss_threads))  # the same scan as the service runs

    def in_process(query: np.ndarray) -> Callable[[], None]:
        def search() -> None:
            index.search(query[None], 10)
        return search

    n = len(vectors)
    out: dict[str, Any] = {"vectors": n}
    out["http_floor"] = timed([healthz] * len(queries), 1, f"{n}: GET /healthz")
    for concurrency in (1, 8):
        out[f"vector_c{concurrency}"] = timed([by_vector(b) for b in bodies], concurrency, f"{n}: by vector")
        out[f"inprocess_c{concurrency}"] = timed([in_process(q) for q in queries], concurrency, f"{n}: in-process")
    if with_images:
        out["image_c1"] = timed([by_image(images[i % len(images)]) for i in range(len(queries) // 2)], 1,
                                f"{n}: by image")
    return out


def run(stack_settings: Settings, image_files: Sequence[Path], sizes: Sequence[int], count: int,
        seed: int = 0, profile_to: Path | None = None) -> dict[str, Any]:
    """Latencies at each index size (ascending); the service is filled up to each size in turn.

    ``profile_to``: sample the service's CPU with py-spy while the largest size is measured.
    """
    sizes = sorted(sizes)
    dim = 1280
    vectors = clustered_vectors(sizes[-1], dim, seed)
    queries = clustered_vectors(count, dim, seed + 1)
    images = [path.read_bytes() for path in image_files[:20]]
    service = QueryService(stack_settings, sizes[-1])
    results: dict[str, Any] = {}
    try:
        filled = 0
        for i, size in enumerate(sizes):
            fill_stream(service.settings, vectors[filled:size], filled)
            filled = size
            if i == 0:
                service.start()
            stats = service.wait_vectors(size)
            profiler = None
            if profile_to is not None and size == sizes[-1]:
                assert service.process is not None
                profiler = Profiler(service.process.pid, profile_to, idle=False)
                time.sleep(1)  # py-spy attaches
            results[str(size)] = {**measure_size(service, vectors[:size], queries, images, True),
                                  "index_type": stats["index_type"]}
            if profiler is not None:
                profiler.stop()
                results["search_profile"] = search_summary(profiler.out)
        results["index_peak_rss_mb"] = service.peak_rss_mb()
    finally:
        service.stop()
    return results
