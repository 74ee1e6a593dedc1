"""Search latency over HTTP for both index backends, on real embeddings, beside the same search in-process.

One result stream (namespace ``benchq``, on the bench stack's Redis) is filled directly with upsert entries
(``ResultEntry.to_fields`` + XADD; no workers): ``bench/real_vectors.py``'s embeddings of real photos and their
edited copies, grown to ``vectors`` by perturbation. Index services (``bucketlens serve``) then read the whole
stream from its start, one *setup* after another:

- ``faiss Flat``: ``approx_threshold`` above the size, so the exhaustive scan;
- ``faiss <type>``: the default threshold, so the type the service picks at that size (IVF at 100k);
- ``milvus <type>`` (``--only ...,milvus``): a Milvus standalone server started for the step; HNSW by default.

Per setup: the merge rate (vectors per second from the first merged to the last), ``POST /search`` by vector at
concurrency 1 and 8 as a JSON list (``json``) and as raw float32 bytes (``raw``: ``application/octet-stream``),
the same search in-process through the backend contract (FAISS: the same index type built in this process,
restructured at the same threshold; Milvus: the service's own collection, loaded from the server), the split of
each query from the response's ``Server-Timing`` (parse, scan, presign, encode; ``http`` is the round trip less
their sum), raw searches at concurrency 1 and 8 for ``WRK_SECONDS`` each from ``wrk`` (Debian's C load generator,
``bench/search.lua``: a client that costs the shared cores little, beside this process's Python threads),
recall@10 against an exact scan (all queries, and the real ones: edited copies never indexed), and the resident
memory of every process involved before the service stops.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
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
from index_service.backend import Index, open_backend, restructure_into
from index_service.feature_store import FeatureStore
from index_service.vector_index import set_search_threads
from infra import milvus
from infra.procfs import stop_process
from infra.stack import free_port

from . import ROOT, real_vectors
from .e2e import percentile
from .procs import peak_rss_mb, rss_mb, stack_pids, tree_peak_rss_mb
from .profile import Profiler, search_summary

NAMESPACE = "benchq"
WRK_SECONDS = 10
HELD_OUT_SEED = 3  # edited copies of this seed are queries, never indexed


def key(i: int) -> str:
    return f"synthetic/{i:07d}"


def entries(settings: Settings, vectors: np.ndarray, order: int = 0) -> list[ResultEntry]:
    """One upsert entry per vector, as the workers would write them, with keys ``key(i)``."""
    return [ResultEntry("upsert", settings.bucket, key(i), f"etag{i}", "", order + i, 1, settings.model, vector)
            for i, vector in enumerate(vectors)]


def fill_stream(settings: Settings, vectors: np.ndarray) -> None:
    """The stream holds exactly these upserts. They are ordered an hour ahead: a service that starts without a
    snapshot reconciles with the bucket (``redis_loss.restore_at_start``) and deletes what it holds from before
    the reconcile that the bucket does not list, and these objects are in no bucket."""
    client = connect(settings.redis_url)
    stream = Keys(NAMESPACE).results
    client.delete(stream)
    rows = entries(settings, vectors, time.time_ns() + 3600 * 10**9)
    for chunk in tqdm(range(0, len(rows), 500), unit="x500", desc="queries: fill stream", leave=False):
        pipe = client.pipeline(transaction=False)
        for entry in rows[chunk : chunk + 500]:
            pipe.xadd(stream, entry.to_fields())
        pipe.execute()
    client.close()


@dataclasses.dataclass
class Setup:
    backend: str
    index_type: str  # what the service should end up with
    settings: Settings

    @property
    def name(self) -> str:
        return f"{self.backend} {self.index_type}"


class QueryService:
    """``bucketlens serve`` in its own process, reading the bench's stream from its start."""

    def __init__(self, settings: Settings) -> None:
        # Snapshots off (one at 100k while measuring would only add disk noise), so every start reads the stream.
        self.settings = dataclasses.replace(settings, namespace=NAMESPACE, api_port=free_port(),
                                            snapshot_every_s=365 * 86400, snapshot_every_entries=10**9)
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

    def stats(self) -> dict[str, Any] | None:
        """``/stats`` with ``ready`` added; None while the service does not answer."""
        assert self.process is not None and self.process.poll() is None, "query service exited"
        try:
            ready = httpx.get(self.url + "/readyz", timeout=5).status_code == 200
            return {**httpx.get(self.url + "/stats", timeout=5).json(), "ready": ready}
        except httpx.HTTPError:
            return None

    def merge(self, count: int, index_type: str, timeout_s: float = 900) -> dict[str, Any]:
        """Wait until the service is ready with ``count`` vectors in an index of ``index_type``; the merge rate from
        its first answer (merging starts before HTTP does: up to a start-up's worth of vectors are not timed)."""
        deadline = time.monotonic() + timeout_s
        first: tuple[float, int] | None = None
        merged_s = None
        with tqdm(total=count, unit="vec", desc="queries: merged", leave=False) as bar:
            while time.monotonic() < deadline:
                stats, now = self.stats(), time.perf_counter()
                if stats is None:
                    time.sleep(0.1)
                    continue
                bar.update(stats["vectors"] - bar.n)
                if first is None:
                    first = (now, stats["vectors"])
                if merged_s is None and stats["vectors"] >= count:
                    merged_s = now - first[0]
                if merged_s is not None and stats["ready"] and stats["index_type"] == index_type:
                    assert first is not None
                    return {"merge_per_s": round((count - first[1]) / max(merged_s, 1e-3)),
                            "merge_s": round(merged_s, 1), "ready_after_merge_s": round(now - first[0] - merged_s, 1)}
                time.sleep(0.1)
        raise TimeoutError(f"query service did not reach {count} vectors in {index_type} within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is None:
            return
        stop_process(self.process, 30, group=True)
        shutil.rmtree(self.snapshots, ignore_errors=True)


Request = Callable[[], dict[str, float] | None]  # one search; the server's split when it gives one


def timed(requests: Sequence[Request], concurrency: int, desc: str,
          warm: Callable[[], object] | None = None) -> dict[str, float]:
    """Run the requests ``concurrency`` at a time: p50/p99 of the round trips, p50 of each part of the split.
    ``warm`` runs once in each thread before anything is timed: a keep-alive client is built and connects once,
    not per query (untimed, the first 8 of 200 queries at c=8 took ~0.5 s each, all of it client set-up)."""
    lock = threading.Lock()
    rounds: list[float] = []
    parts: dict[str, list[float]] = {}
    with tqdm(total=len(requests), unit="q", desc=desc, leave=False) as bar:

        def run(request: Request) -> None:
            started = time.perf_counter()
            split = request()
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                rounds.append(elapsed)
                if split is not None:
                    for part, ms in {**split, "http": elapsed - sum(split.values())}.items():
                        parts.setdefault(part, []).append(ms)
                bar.update()

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            if warm is not None:  # one task per thread, held at the barrier until every thread has warmed up
                ready = threading.Barrier(concurrency)
                list(pool.map(lambda _: (warm(), ready.wait()), range(concurrency)))
            list(pool.map(run, requests))
    out = {"p50_ms": percentile(rounds, 50), "p99_ms": percentile(rounds, 99)}
    out.update({f"{part}_p50_ms": percentile(values, 50) for part, values in parts.items()})
    return out


def server_timing(header: str) -> dict[str, float]:
    """``parse;dur=0.1, scan;dur=2.0`` -> ``{"parse": 0.1, "scan": 2.0}``."""
    out = {}
    for item in header.split(","):
        name, _, duration = item.strip().partition(";dur=")
        out[name] = float(duration)
    return out


class Clients(threading.local):
    """Per thread, two keep-alive clients: the standard library's connection for searches by vector and the floor,
    and httpx for image uploads (multipart). The lighter client is what the targets need: a round trip to a bare
    Starlette endpoint under uvicorn took 0.19 ms with it against 0.43 ms with httpx here (p50 of 500, 2026-12-01),
    and that difference was counted as the service's HTTP time before (queries-2core-1201-*.json used httpx)."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=60)
        where = urllib.parse.urlsplit(url)
        self.connection = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port, timeout=60)

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = ""
                ) -> tuple[int, str, bytes]:
        """Status, ``Server-Timing`` and body of one request on this thread's connection."""
        self.connection.request(method, path, body=body, headers={"content-type": content_type} if body else {})
        response = self.connection.getresponse()
        return response.status, response.getheader("server-timing") or "", response.read()


def in_process_index(setup: Setup, vectors: np.ndarray, redis_url: str) -> tuple[Index, Callable[[], None]]:
    """The same index the service searches, in this process, and how to let it go."""
    settings = dataclasses.replace(setup.settings, namespace=NAMESPACE)
    backend = open_backend(settings, connect(redis_url), Keys(NAMESPACE), lambda _: FeatureStore())
    if backend.shared:  # Milvus: the service's own collection
        loaded = backend.load()
        assert loaded is not None, "the service has no Milvus collection"
        return loaded[0], backend.close
    # FAISS: built as the service builds it, restructured once it holds more than approx_threshold vectors.
    index = backend.new_generation(settings.model, 1)
    rows = entries(settings, vectors)
    for start in range(0, len(rows), settings.merge_batch):
        index.apply(rows[start : start + settings.merge_batch])
        if target := restructure_into(index, settings.approx_threshold, backend.approximate):
            index.restructure(target)
    assert index.index_type == setup.index_type, (index.index_type, setup.index_type)
    return index, lambda: backend.discard(index)


def measure(service: QueryService, index: Index, queries: np.ndarray, exact_kth: np.ndarray,
            real: np.ndarray, images: Sequence[bytes]) -> dict[str, Any]:
    """HTTP (JSON and raw vectors) and in-process latencies, the split, and recall@10."""
    clients = Clients(service.url)
    scores: dict[int, list[float]] = {}

    def by_vector(i: int, body: bytes, content_type: str) -> Request:
        def send() -> dict[str, float]:
            status, timing, answer = clients.request("POST", "/search", body, content_type)
            assert status == 200, answer[:200]
            scores[i] = [hit["score"] for hit in json.loads(answer)["results"]]
            return server_timing(timing)
        return send

    def by_image(blob: bytes) -> Request:
        def send() -> dict[str, float]:
            response = clients.client.post("/search", files={"image": ("q.jpg", blob, "image/jpeg")})
            assert response.status_code == 200, response.text[:200]
            return server_timing(response.headers["server-timing"])
        return send

    def in_process(query: np.ndarray) -> Request:
        def search() -> None:
            index.search(query, 10)
        return search

    def healthz() -> None:
        status, _, answer = clients.request("GET", "/healthz")
        assert status == 200, answer[:200]

    def warm_httpx() -> None:
        clients.client.get("/healthz").raise_for_status()

    bodies = {
        "json": ([json.dumps({"vector": q.tolist(), "k": 10}).encode() for q in queries], "application/json"),
        "raw": ([q.astype("<f4").tobytes() for q in queries], "application/octet-stream"),
    }
    out: dict[str, Any] = {"http_floor": timed([healthz] * len(queries), 1, "GET /healthz", healthz)}
    # Every form searches the same queries: the first pass signs the result URLs, later ones find them cached
    # (what popular results get), so it is kept apart.
    raw, content_type = bodies["raw"]
    out["raw_c1_first"] = timed([by_vector(i, body, content_type) for i, body in enumerate(raw)], 1, "first pass",
                                healthz)
    for concurrency in (1, 8):
        for form, (payloads, content_type) in bodies.items():
            out[f"{form}_c{concurrency}"] = timed(
                [by_vector(i, body, content_type) for i, body in enumerate(payloads)], concurrency,
                f"{form} c={concurrency}", healthz)
        out[f"inprocess_c{concurrency}"] = timed([in_process(q) for q in queries], concurrency,
                                                 f"in-process c={concurrency}")
    for concurrency in (1, 8):
        out[f"raw_c{concurrency}_wrk"] = wrk_search(service.url, raw, concurrency)
    out["image_c1"] = timed([by_image(images[i % len(images)]) for i in range(len(queries) // 4)], 1, "by image",
                           warm_httpx)
    # Recall@10 with ties counted: a hit scoring at least the exact 10th score belongs in a top 10.
    found = np.array([sum(s >= kth - 1e-4 for s in scores[i][:10]) / 10 for i, kth in enumerate(exact_kth)])
    out["recall_at_10"] = float(found.mean())
    out["recall_at_10_real"] = float(found[real].mean())
    return out


def wrk_search(url: str, bodies: Sequence[bytes], concurrency: int, seconds: int = WRK_SECONDS) -> dict[str, Any]:
    """``POST /search`` with ``bodies`` (raw vectors, in turn) on ``concurrency`` keep-alive connections for
    ``seconds``, from ``wrk``: one thread in C, so the service's latency is not the Python client's CPU. Closed loop
    like ``timed``: each connection sends its next search when the last is answered."""
    if shutil.which("wrk") is None:
        return {"skipped": "wrk is not installed (make install adds it: apt-get install wrk)"}
    with tempfile.NamedTemporaryFile(suffix=".bin") as file:
        file.write(b"".join(bodies))
        file.flush()
        env = {**os.environ, "BODIES": file.name, "BODY_BYTES": str(len(bodies[0]))}
        done = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s",
                               "-s", str(ROOT / "bench" / "search.lua"), url],
                              env=env, capture_output=True, text=True, timeout=seconds + 60)
    try:
        out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):  # wrk failed: its own words, not a JSON error, and the step goes on
        return {"skipped": f"wrk exited {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}"}
    if out["errors"] or out["non_2xx"]:  # (counted, not asserted: a figure with errors in it is not a latency)
        out["skipped"] = f"{out['errors']} failed and {out['non_2xx']} non-2xx answers of {out['requests']}"
    return out


def processes(service: QueryService, stack_settings: Settings, milvus_pid: int | None) -> dict[str, Any]:
    """Resident memory (now, and peak) of each process involved, in MiB."""
    pids = {"index service": service.process.pid if service.process else None,
            "redis": stack_pids(Path(stack_settings.home)).get("redis"), "milvus": milvus_pid,
            "bench (in-process index)": os.getpid()}
    return {name: {"rss_mb": round(rss_mb(pid), 1), "peak_rss_mb": round(peak_rss_mb(pid), 1)}
            for name, pid in pids.items() if pid is not None}


def run(stack_settings: Settings, image_files: Sequence[Path], n: int, count: int, backends: Sequence[str],
        seed: int = 0, profile_to: Path | None = None) -> dict[str, Any]:
    """Every setup of ``backends`` at ``n`` vectors; ``profile_to``: py-spy on each service while it answers."""
    real = real_vectors.load(stack_settings, seeds=HELD_OUT_SEED + 1)
    indexed, held_out = real.split(HELD_OUT_SEED)
    vectors = real_vectors.grow(indexed, n, seed)
    rng = np.random.default_rng(seed + 1)
    real_queries = held_out[rng.choice(len(held_out), count // 2, replace=False)]
    synthetic = real_vectors.perturb(indexed[rng.integers(0, len(indexed), count - count // 2)], rng)
    queries = np.concatenate([real_queries, synthetic])
    is_real = np.arange(len(queries)) < len(real_queries)
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    exact_kth = exact.search(queries, 10)[0][:, -1]
    del exact
    set_search_threads(stack_settings.faiss_threads)  # in-process scans as the service runs them, in any thread
    images = [path.read_bytes() for path in image_files[:20]]
    results: dict[str, Any] = {"vectors": n, "real_vectors": len(indexed), "queries": len(queries),
                               "real_queries": int(is_real.sum()), "cosine_to_parent": list(real_vectors.COSINE)}
    server: subprocess.Popen[bytes] | None = None
    data = Path(tempfile.mkdtemp(prefix="bench-milvus-"))
    try:
        for backend in backends:
            settings = dataclasses.replace(stack_settings, index_backend=backend)
            if backend == "milvus":
                port = free_port()
                log = Path(stack_settings.home) / "logs" / "query-milvus.log"
                server = milvus.start(data, port, log)
                milvus.wait_ready(data, server, log_path=log)
                settings = dataclasses.replace(settings, milvus_uri=f"http://127.0.0.1:{port}")
            picked = "IVF" if backend == "faiss" else settings.milvus_index_type
            setups = [Setup(backend, picked, settings)] if n > settings.approx_threshold else []
            if backend == "faiss":  # the exhaustive scan beside it
                setups.insert(0, Setup(backend, "Flat", dataclasses.replace(settings, approx_threshold=n + 1)))
            for setup in setups:
                results[setup.name] = measure_setup(setup, stack_settings, vectors, queries, exact_kth, is_real,
                                                    images, server.pid if server else None, profile_to)
                print(f"{setup.name}: {json.dumps(results[setup.name])}", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            milvus.stop(server)
        shutil.rmtree(data, ignore_errors=True)
        connect(stack_settings.redis_url).delete(Keys(NAMESPACE).results)
    return results


def measure_setup(setup: Setup, stack_settings: Settings, vectors: np.ndarray, queries: np.ndarray,
                  exact_kth: np.ndarray, is_real: np.ndarray, images: Sequence[bytes], milvus_pid: int | None,
                  profile_to: Path | None) -> dict[str, Any]:
    fill_stream(stack_settings, vectors)  # again: a service trims what its last checkpoint covers when it stops
    service = QueryService(setup.settings)
    service.start()
    try:
        out = service.merge(len(vectors), setup.index_type)
        index, release = in_process_index(setup, vectors, stack_settings.redis_url)
        try:
            profiler = None
            if profile_to is not None:
                assert service.process is not None
                tag = setup.name.replace(" ", "-")
                profiler = Profiler(service.process.pid, profile_to.with_name(f"{profile_to.stem}-{tag}.txt"),
                                    idle=False)
                time.sleep(1)  # py-spy attaches
            out.update(measure(service, index, queries, exact_kth, is_real, images))
            if profiler is not None:
                profiler.stop()
                out["search_profile"] = search_summary(profiler.out)
            out["processes"] = processes(service, stack_settings, milvus_pid)
            assert service.process is not None
            out["index_service_tree_peak_rss_mb"] = round(tree_peak_rss_mb(service.process.pid), 1)
        finally:
            release()
    finally:
        service.stop()
    return out
