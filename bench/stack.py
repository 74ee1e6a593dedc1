"""The benchmark's own local stack (``infra.stack.Stack``), started for one run and removed afterwards.

With ``keep`` the stack and its folder stay for the next run (quicker while trying levers); ingest and the
worker are then restarted so that the settings of this run apply to them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import httpx

from bucketlens.s3 import make_client
from bucketlens.settings import Settings
from infra.stack import Stack, running
from infra.stack import scratch_redis as redis_server

from . import ROOT
from .procs import stack_pids

log = logging.getLogger(__name__)


@contextlib.contextmanager
def scratch_folder() -> Iterator[Path]:
    """A temporary folder on the project's disk, removed at the end: not /tmp, which may be a tmpfs where SQLite's
    commits never reach a disk."""
    parent = ROOT / ".bucketlens"
    parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent) as folder:
        yield Path(folder)


@contextlib.contextmanager
def scratch_redis(*options: str) -> Iterator[str]:
    """A ``redis-server`` of its own (``infra.stack.scratch_redis``) in a temporary folder; yields its URL."""
    with tempfile.TemporaryDirectory() as folder, redis_server(Path(folder), *options) as (url, _):
        yield url


@contextlib.contextmanager
def bench_stack(settings: Settings, models: Path, home: Path | None = None) -> Iterator[Stack]:
    """A running stack with namespace and bucket ``bench``; ``models`` seeds its exported-model cache.

    ``home``: keep the stack there (reused if it exists). Without it, a temporary folder is used and the
    stack is stopped and removed at the end, whatever happens.
    """
    keep = home is not None
    home = Path(home or tempfile.mkdtemp(prefix="bucketlens-bench-")).resolve()
    reused = (home / "stack.json").exists()
    (home / "models").mkdir(parents=True, exist_ok=True)
    for exported in models.glob("*.onnx"):  # exporting the model again would cost ~20 s of the run
        if not (home / "models" / exported.name).exists():
            shutil.copy2(exported, home / "models" / exported.name)
    base = dataclasses.replace(settings, home=home, namespace="bench", bucket="bench", ingest_port=0, api_port=0)
    # On a reused stack this run's settings must reach ingest and the worker (the supervisor would restart them).
    restart = ("supervisor", "worker", "ingest") if reused else ()
    with running(base, keep=keep, restart=restart) as stack:
        yield stack


def wait_indexed(api: httpx.Client, bucket: str, key: str, timeout_s: float = 120, poll_s: float = 0.01) -> float:
    """Seconds until ``GET /objects/{bucket}/{key}`` says ``indexed``, polling every ``poll_s``."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        response = api.get(f"/objects/{bucket}/{quote(key, safe='/')}")  # (a key with #, ? or %: review 33)
        if response.status_code == 200 and response.json()["state"] == "indexed":
            return time.perf_counter() - started
        if response.status_code == 200 and response.json()["state"] == "failed":
            raise RuntimeError(f"{bucket}/{key} failed: {response.json()['failure']}")
        time.sleep(poll_s)
    raise TimeoutError(f"{bucket}/{key} was not indexed within {timeout_s:.0f} s")


def warm_up(stack: Stack, api: httpx.Client, blob: bytes) -> float:
    """One object through the whole path, so the timed runs start with every process warm."""
    key = f"warmup/{time.time_ns()}.jpg"
    make_client(stack.settings).put_object(Bucket=stack.settings.bucket, Key=key, Body=blob,
                                           ContentType="image/jpeg")
    return wait_indexed(api, stack.settings.bucket, key, timeout_s=300)


def worker_pid(stack: Stack) -> int:
    return stack_pids(stack.home)["worker"]


def describe(stack: Stack) -> dict[str, Any]:
    s = stack.settings
    return {name: getattr(s, name) for name in ("batch_window_ms", "batch_size", "worker_concurrency",
                                                 "torch_threads", "fetch_concurrency", "runtime", "device")}
