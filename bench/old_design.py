"""The design bucketlens replaced, re-created faithfully for comparison (DESIGN.md, first table).

The caller reads each image file, base64-encodes it into its own Celery task, sends every task, then waits on
each result in turn (``future.get``) and builds a FAISS ``IndexFlatIP`` from all vectors at the end. One
Celery worker process does to ONE image per task what a bucketlens worker does to each (``bench.limit``'s
decode and describe: decode as the model's recipe says, embed, local features) and returns the vector through
Celery's Redis result backend. Same Redis as the bench stack (its own queue), same model, runtime and settings
as the bucketlens workers. JSON serializer (the old design pickled; JSON is the fairer baseline here).

As the seed wrote it (``bench.fair``): ``runtime=torch`` (eager) and ``pool="solo"`` (the worker process runs
each task itself); the kinder re-creation keeps the service's runtime and pool.

Run the worker with ``python -m bench.old_design REDIS_URL QUEUE [POOL]`` (settings from ``BUCKETLENS_*``).
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np
from celery import Celery
from celery.signals import worker_process_init
from tqdm import tqdm

from bucketlens.settings import Settings
from infra.procfs import stop_process

from . import ROOT
from .procs import CpuMeter, tree_peak_rss_mb

TASK = "old.embed"


def create_app(redis_url: str, queue: str, settings: Settings | None = None) -> Celery:
    """The old design's Celery app; with ``settings`` it also registers the worker side (model and task)."""
    app = Celery("old-design", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    result_accept_content=["json"], task_default_queue=queue, worker_hijack_root_logger=False,
                    broker_connection_retry_on_startup=True, result_expires=3600)
    if settings is None:
        return app
    resources: dict[str, Any] = {}

    @worker_process_init.connect(weak=False)  # a prefork child; with the solo pool, the first (warm-up) task
    def load_model(**_: object) -> Any:
        from vision.embedders import load_embedder

        if "embedder" not in resources:
            resources["embedder"] = load_embedder(settings)
        return resources["embedder"]

    @app.task(name=TASK)
    def embed(image_b64: str) -> list[float]:
        from .limit import decode_batch, describe

        embedder = load_model()  # the same work per image as the service's worker: decode, embed, local features
        vectors, _ = describe(embedder, decode_batch(embedder.recipe, [base64.b64decode(image_b64)],
                                                     settings.max_pixels))
        vector: np.ndarray = vectors[0]
        return vector.tolist()  # type: ignore[no-any-return]

    return app


def start_worker(settings: Settings, queue: str, log_path: Path, pool: str = "prefork",
                 cpus: set[int] | None = None) -> subprocess.Popen[bytes]:
    """One Celery worker process (``settings.worker_concurrency`` pool children, as the bucketlens worker, or
    none with ``pool="solo"``), confined to ``cpus`` when given."""
    env = {**os.environ, **settings.to_env()}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "bench.old_design", settings.redis_url, queue, pool], env=env, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(ROOT),
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
        )


def run(settings: Settings, files: Sequence[Path], queue: str = "bench-old", pool: str = "prefork",
        cpus: set[int] | None = None) -> dict[str, Any]:
    """Time the old design on ``files``: first file read -> FAISS index built. ``pool`` and ``cpus``: the
    worker's Celery pool and the cores it may use (default: the caller's)."""
    app = create_app(settings.redis_url, queue)
    embed = app.signature(TASK)
    worker = start_worker(settings, queue, Path(settings.home) / "logs" / "old-design-worker.log", pool, cpus)
    try:
        embed.apply_async(args=[base64.b64encode(files[0].read_bytes()).decode()]).get(timeout=300)  # warm
        meter = CpuMeter(Path(settings.home), {"old-design-worker": worker.pid})
        started = time.perf_counter()
        futures = []
        for path in tqdm(files, unit="img", desc="old design: send", leave=False):
            futures.append(embed.apply_async(args=[base64.b64encode(path.read_bytes()).decode()]))
        vectors = [future.get(timeout=600) for future in tqdm(futures, unit="img", desc="old design: get",
                                                              leave=False)]
        index = faiss.IndexFlatIP(len(vectors[0]))
        index.add(np.asarray(vectors, dtype=np.float32))
        elapsed = time.perf_counter() - started
        cpu = meter.report(len(files))
        peak = tree_peak_rss_mb(worker.pid)
        for future in futures:
            future.forget()
    finally:
        stop_process(worker, 30, group=True)  # Celery's warm shutdown stops its pool children too
        app.close()
    return {"old_design_images_per_s": len(files) / elapsed, "old_design_seconds": elapsed,
            "old_design_vectors": index.ntotal, "old_design_worker_peak_rss_mb": peak,
            **{f"old_design_{name}": value for name, value in cpu.items()}}


def main() -> None:
    redis_url, queue, pool = sys.argv[1], sys.argv[2], (sys.argv[3:] or ["prefork"])[0]
    settings = Settings.from_env()
    app = create_app(redis_url, queue, settings)
    app.worker_main(["worker", "-Q", queue, "-P", pool, "-c", str(settings.worker_concurrency), "--loglevel", "WARNING",
                     "-n", f"old-design-{os.getpid()}@%h", "--without-gossip", "--without-mingle"])


if __name__ == "__main__":
    main()
