"""Fair figures (the ``fair`` step): the worker on a core of its own, everything else on the others.

On 2 shared cores the S3 server, the uploaders, ingest and the index service compete with the workers for the
cores the in-process limit has to itself, so "end to end against the limit" says as much about the neighbours as
about the pipeline. Here the bucketlens worker (one pool process, one runtime thread: ``worker_concurrency=1``,
``torch_threads=1``) is confined to the last core, and every other process (Redis, the S3 server, ingest, the
index service, the supervisor, this bench and py-spy) to the others, with ``sched_setaffinity`` on every thread.
Each figure is set against the limit measured in-process on the worker's core alone:

- ``limit``: decode + embed + local features in-process on the worker core (``bench.limit``, one lane); then
  the best variant again with a busy loop on every other core (``limit_others_busy_images_per_s``): the control
  for what a busy neighbour core costs the worker's core by itself; and once more after the backfill, the worker
  idle (``limit_after_images_per_s``): this host's speed drifts within a run, so the backfill is also set against
  the mean of the limits measured before and after it (``backfill_vs_limit_before_and_after``).
- ``live``: every image uploaded by 16 threads, first upload -> last vector merged (``bench.e2e.throughput``).
- ``backfill``: ``POST /rebuild`` in mode ``reembed`` of the whole bucket (the images and the warm-up object),
  request -> swap, with the worker's on-CPU time sampled by py-spy (``--nonblocking``, from the other core).
- ``seed``: the old design (``bench.old_design``) on the same cores: as the seed wrote it (eager torch,
  ``--pool=solo``) and the kinder re-creation (the service's runtime, a prefork pool child), its worker on the
  worker core, its caller on the others.

Each with CPU-ms per image and each core's busy share (``core_busy_share``: all users, so a neighbour shows).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx
from tqdm import tqdm

from bucketlens.auth import bearer
from bucketlens.settings import Settings
from infra.stack import Stack

from . import e2e, old_design
from .limit import measure_limit
from .procs import ALL_CORES, CpuMeter, pin, tree
from .profile import Profiler, worker_cpu_summary
from .stack import bench_stack, warm_up, worker_pid


def run(settings: Settings, files: Sequence[Path], models: Path, profile_to: Path) -> dict[str, Any]:
    if len(ALL_CORES) < 2:
        return {"skipped": "needs 2 cores: one for the worker, the rest for everything else"}
    worker_core, rest = {max(ALL_CORES)}, ALL_CORES - {max(ALL_CORES)}
    one = dataclasses.replace(settings, worker_concurrency=1, torch_threads=1)
    me = [os.getpid()]
    results: dict[str, Any] = {"worker_core": sorted(worker_core), "other_cores": sorted(rest)}

    def limit_here(**variants: Any) -> dict[str, Any]:  # on the cores this process is pinned to now
        return measure_limit(one, [path.read_bytes() for path in files], 1, **variants)

    try:
        pin(me, worker_core)
        limit = limit_here()
        results.update((key, limit[key]) for key in ("limit_images_per_s", "limit_variant", "limit_cpu"))
        with spinning(rest):  # the control: the same limit while the other cores are busy, as they are below
            busy = limit_here(only=[str(limit["limit_variant"])])
        results["limit_others_busy_images_per_s"] = busy["limit_images_per_s"]
        pin(me, rest)  # the stack started from here inherits the other cores
        with bench_stack(one, models) as stack:
            pin(tree(worker_pid(stack)), worker_core)
            with httpx.Client(base_url=stack.api_url, timeout=60) as api:
                warm_up(stack, api, files[0].read_bytes())
                results["live"] = e2e.throughput(stack, api, files)
                results["backfill"] = reembed(stack, api, profile_to)
            pin(me, worker_core)  # the limit again, the worker idle: this host's speed drifts over a run
            again = limit_here(only=[str(limit["limit_variant"])])
            results["limit_after_images_per_s"] = again["limit_images_per_s"]
            pin(me, rest)
            seed = dataclasses.replace(stack.settings, runtime="torch")
            results["seed_as_written"] = old_design.run(seed, files, pool="solo", cpus=worker_core)
            results["seed_kind"] = old_design.run(stack.settings, files, cpus=worker_core)
    finally:
        pin(me, set(ALL_CORES))
    limit_rate = results["limit_images_per_s"]
    live_rate = results["live"]["bucketlens_images_per_s"]
    results["ratios"] = {
        "limit_others_busy_vs_idle": results["limit_others_busy_images_per_s"] / limit_rate,
        "live_vs_limit": live_rate / limit_rate,
        "backfill_vs_limit": results["backfill"]["images_per_s"] / limit_rate,
        "limit_after_vs_before": results["limit_after_images_per_s"] / limit_rate,
        # the comparator with the neighbour cores as busy as they are during the backfill (a VM's busy sibling
        # slows the worker's core with nothing shared in software: the control above)
        "backfill_vs_limit_others_busy": (results["backfill"]["images_per_s"]
                                          / results["limit_others_busy_images_per_s"]),
        "backfill_vs_limit_before_and_after": (results["backfill"]["images_per_s"]
                                               / ((limit_rate + results["limit_after_images_per_s"]) / 2)),
        "live_vs_seed_as_written": live_rate / results["seed_as_written"]["old_design_images_per_s"],
        "live_vs_seed_kind": live_rate / results["seed_kind"]["old_design_images_per_s"],
        "backfill_vs_seed_as_written": (results["backfill"]["images_per_s"]
                                        / results["seed_as_written"]["old_design_images_per_s"]),
    }
    return results


@contextlib.contextmanager
def spinning(cpus: set[int]) -> Iterator[None]:
    """A busy loop on each of ``cpus`` (no memory traffic): two vCPUs of a VM can be hyperthreads of one
    physical core, and then a busy neighbour slows the worker's core even with nothing shared in software."""
    loop = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", loop, str(cpu)]) for cpu in cpus]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def reembed(stack: Stack, api: httpx.Client, profile_to: Path, timeout_s: float = 3600) -> dict[str, Any]:
    """``POST /rebuild`` (mode ``reembed``) of the stack's bucket, timed from the request to the swap."""
    headers = bearer(stack.settings.admin_token)
    profiler = Profiler(worker_pid(stack), profile_to, idle=False, nonblocking=True)
    time.sleep(1)  # py-spy attaches
    meter = CpuMeter(stack.home)
    finder_s = api.get("/stats").json()["duplicates"]["cpu_s"]
    response = api.post("/rebuild", json={"mode": "reembed"}, headers=headers)
    response.raise_for_status()
    job = response.json()
    with tqdm(unit="img", desc="backfill: reembedded", leave=False) as bar:
        while job["state"] == "running":
            if meter.elapsed() > timeout_s:
                raise TimeoutError(f"the rebuild did {job['done']} of {job['total']} in {timeout_s:.0f} s")
            time.sleep(0.2)
            job = api.get(f"/rebuild/{job['id']}").json()
            bar.total = job["total"]
            bar.update(job["done"] - bar.n)
    elapsed = meter.elapsed()
    finder_s = api.get("/stats").json()["duplicates"]["cpu_s"] - finder_s
    profiler.stop()
    if job["state"] != "done":
        raise RuntimeError(f"the rebuild ended {job['state']}: {job.get('error')}")
    return {"objects": job["total"], "failed": job["failed"], "seconds": elapsed,
            "images_per_s": job["total"] / elapsed, **meter.report(job["total"]),
            "duplicate_finder_core_share": round(finder_s / elapsed, 3),  # its share is duplicates_cpu_share
            "worker_cpu_profile": worker_cpu_summary(profile_to)}
