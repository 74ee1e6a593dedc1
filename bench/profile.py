"""Where a worker's time goes: py-spy samples the worker (and its pool children) during the bulk run.

The raw samples (collapsed stacks, one line per stack with its count) are kept next to the results; the
summary splits the wall time of the thread that runs tasks into the pipeline's stages.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
from pathlib import Path

# What a task-running thread is doing, by the first frame in its stack that matches (checked in this order).
STAGES = (
    ("embed: ONNX Runtime", "Session.run ("),
    ("embed: torch", "TorchEmbedder.embed ("),
    ("embed: other", ".embed (workers/embedders"),
    ("decode", "decode (workers/decode.py"),
    ("fetch: waiting on S3", "fetch_many (workers/fetch.py"),
    ("write: Redis", "Pipeline.write (workers/pipeline.py"),
    ("task: other", "register_tasks.<locals>.embed ("),
    ("between tasks (Celery)", ""),
)


class Profiler:
    """``py-spy record`` on ``pid`` and its subprocesses, wall clock (idle samples included)."""

    def __init__(self, pid: int, out: Path, rate: int = 50) -> None:
        self.out = out
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.process = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--subprocesses", "--idle", "--threads", "--format", "raw",
             "--rate", str(rate), "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def stop(self) -> dict[str, float]:
        self.process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        self.process.wait(timeout=60)
        return summarize(self.out)


def summarize(raw: Path) -> dict[str, float]:
    """Share of the task threads' wall time per stage (threads that ran at least one task)."""
    threads: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread (")), "?")
        stage = next(name for name, pattern in STAGES if pattern in stack)
        threads[";".join(frames[: frames.index(thread) + 1] if thread in frames else frames[:1])][stage] += int(count)
    task_threads = [c for c in threads.values() if any(k != "between tasks (Celery)" for k in c)
                    and sum(v for k, v in c.items() if k != "between tasks (Celery)") > 0.05 * sum(c.values())]
    total = collections.Counter[str]()
    for counter in task_threads:
        total.update(counter)
    samples = sum(total.values()) or 1
    return {stage: round(total[stage] / samples, 3) for stage, _ in STAGES if total[stage]}
