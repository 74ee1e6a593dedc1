"""Where the time goes, sampled with py-spy while the bench runs (``--profile``).

- The worker (and its pool children) during the bulk run, wall clock: how the threads that run tasks split
  their time between the pipeline's stages; during the fair step's backfill, on-CPU: where the worker's core goes.
- The query index service during the searches at the largest index size, on-CPU samples only: what a search
  spends its CPU on besides the FAISS scan.

The raw samples (collapsed stacks with counts) are kept next to the results.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

IDLE = "between tasks (Celery)"
# What a task-running thread is doing: the first pattern (a regular expression, in this order) found in its stack
# names the stage. py-spy writes each frame as ``qualified.name (path/relative/to/sys.path.py:line)``.
WORKER_STAGES = (
    (IDLE, r"\(\S*workers/heartbeat\.py"),  # the liveness beacon's thread, waiting between beats
    ("embed: ONNX Runtime", r"run \(\S*onnxruntime_inference_collection\.py"),
    ("embed: torch", r"\(\S*torch/nn/modules/"),
    ("local features", r"\(\S*vision/local_features\.py"),
    ("decode", r"\(\S*vision/decode\.py"),
    ("fetch: waiting on S3", r"wait \(\S*concurrent/futures/_base\.py"),
    ("fetch: S3 download (fetch pool threads)", r"\(\S*workers/fetch\.py"),
    ("write: Redis", r"write \(\S*workers/(pipeline|results)\.py"),
    ("task: other", r"\(\S*workers/"),
    (IDLE, ""),
)
WORKER_CPU_STAGES = (
    *WORKER_STAGES[1:-2],
    ("Celery, kombu, billiard (task hand-over, acks)", r"\(\S*(celery|kombu|billiard)/"),
    ("liveness beacon", r"\(\S*workers/heartbeat\.py"),
    ("task: other", r"\(\S*workers/"),
    ("other", ""),
)
SEARCH_STAGES = (
    ("FAISS search", "search (index_service/vector_index.py"),
    ("embed the query image", "_embed_image (index_service/app.py"),
    ("presigned URLs (boto3)", "generate_presigned_url ("),
    ("parse the request", "parse_search (index_service/queries.py"),
    ("JSON response", "JSONResponse"),
    ("other: uvicorn, Starlette, asyncio, threads", ""),
)

# Leaf frames of threads that wait (py-spy counts some of these as active): not CPU.
WAITING = ("Condition.wait (threading.py", "EpollSelector.select (selectors.py", "_epoll.poll", "Queue.get (queue.py")


class Profiler:
    """``py-spy record`` on ``pid`` and its subprocesses; ``idle`` also samples threads that wait."""

    def __init__(self, pid: int, out: Path, idle: bool, rate: int = 50, nonblocking: bool = False) -> None:
        self.out = out
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        command = [exe, "record", "--pid", str(pid), "--subprocesses", "--threads", "--format", "raw",
                   "--rate", str(rate), "--output", str(out), *(["--nonblocking"] if nonblocking else [])]
        self.process = subprocess.Popen(command + (["--idle"] if idle else []), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        self.process.wait(timeout=60)


def _samples(raw: Path) -> list[tuple[str, str, int]]:
    """(thread, stack, count) per line of py-spy's raw output."""
    out = []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = next((i for i, f in enumerate(frames) if f.startswith("thread (")), 0)
        out.append((";".join(frames[: thread + 1]), stack, int(count)))
    return out


def _shares(counter: collections.Counter[str], stages: tuple[tuple[str, str], ...]) -> dict[str, float]:
    total = sum(counter.values()) or 1
    return {name: round(counter[name] / total, 3) for name, _ in stages if counter[name]}


def worker_summary(raw: Path) -> dict[str, float]:
    """Share of the task threads' wall time per stage (threads that spent >5 % of their time in tasks)."""
    threads: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for thread, stack, count in _samples(raw):
        threads[thread][next(name for name, pattern in WORKER_STAGES if re.search(pattern, stack))] += count
    total: collections.Counter[str] = collections.Counter()
    for counter in threads.values():
        if sum(counter.values()) - counter[IDLE] > 0.05 * sum(counter.values()):
            total.update(counter)
    return _shares(total, WORKER_STAGES)


def worker_cpu_summary(raw: Path) -> dict[str, float]:
    """Share of the worker's on-CPU samples (recorded without ``idle``) per stage, every thread and pool process
    counted: the task thread's stages, the fetch pool's S3 requests, Celery's own work."""
    total: collections.Counter[str] = collections.Counter()
    for _, stack, count in _samples(raw):
        total[next(name for name, pattern in WORKER_CPU_STAGES if re.search(pattern, stack))] += count
    return _shares(total, WORKER_CPU_STAGES)


def search_summary(raw: Path) -> dict[str, float]:
    """Share of the service's on-CPU samples per part of a search (threads waiting for work left out)."""
    total: collections.Counter[str] = collections.Counter()
    for _, stack, count in _samples(raw):
        if not stack.rsplit(";", 1)[-1].startswith(WAITING):
            total[next(name for name, pattern in SEARCH_STAGES if pattern in stack)] += count
    return _shares(total, SEARCH_STAGES)
