"""``python -m bench`` (``make bench``): the benchmark on the local stack, same images, model and cores.

Steps: ``limit`` (decode + embed in-process), ``e2e`` (bucketlens bulk throughput, then freshness), ``old`` (the
old design), ``fair`` (the worker confined to a core of its own and everything else to the others, against the
limit on that core: live uploads, a reembed backfill, the seed design as written and the kind re-creation; ~6
minutes, ``bench/fair.py``), ``queries`` (search latency over HTTP and in-process on real embeddings, FAISS Flat
and the type the service picks) and ``milvus`` (the same for a Milvus server started for the step, side by side
in one run; ~5 minutes more: ``--only limit,e2e,old,fair,queries`` leaves it out). Only when asked: ``burst``
(``--only burst``: ``--burst`` uploads with the workers stopped, then drained), ``load`` (``--only load``: 64
concurrent searches for 60 s while 2,000 uploads merge) and ``soak`` (``--only soak``: ``--soak`` distinct images
through the stack at its own pace, every process's RSS sampled each second: ``bench/soak.py``). Prints a table
and writes ``bench/results/latest.json`` (every default step, one run: its ratios share a baseline) or, for a
run of other steps, ``latest-<steps>.json``, so that a partial run never hides the full one. Quick by default
(1000 images, 100k vectors); ``--images 5000`` for more.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bucketlens.settings import PREFIX, Settings

from . import CACHE, RESULTS, ROOT, burst, e2e, fair, load, old_design, queries, soak
from .images import ensure_images
from .limit import measure_limit
from .procs import cores, load_average
from .profile import Profiler, worker_summary
from .report import check_targets, headline, table
from .stack import bench_stack, describe, warm_up, worker_pid

STEPS = ("limit", "e2e", "old", "fair", "queries", "milvus")  # the default run
ON_REQUEST = ("burst", "load", "soak")  # long: run with --only


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="images in the set (default 1000)")
    parser.add_argument("--vectors", type=int, default=100_000, help="vectors in the searched index (default 100000)")
    parser.add_argument("--queries", type=int, default=200, help="queries per measurement (default 200)")
    parser.add_argument("--freshness", type=int, default=20, help="single uploads timed for freshness")
    parser.add_argument("--only", default=",".join(STEPS),
                        help=f"steps to run (default {','.join(STEPS)}; also {','.join(ON_REQUEST)})")
    parser.add_argument("--burst", type=int, default=20_000, help="uploads of the burst step (default 20000)")
    parser.add_argument("--soak", type=int, default=20_000, help="distinct images of the soak step (default 20000)")
    parser.add_argument("--load", default="64,60,2000", metavar="CLIENTS,SECONDS,UPLOADS",
                        help="the load step: concurrent searchers, seconds, uploads merging meanwhile")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a bucketlens setting for the workers and the limit, e.g. worker_concurrency=2")
    parser.add_argument("--profile", action="store_true", help="sample the worker with py-spy during the bulk run")
    parser.add_argument("--home", type=Path, help="keep the bench stack in this folder and reuse it next time")
    parser.add_argument("--cache", type=Path, default=CACHE,
                        help="where the image set and the exported model are kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="where the report goes (default: see above)")
    args = parser.parse_args(argv)
    args.out = args.out or default_out(args.only)
    return args


def default_out(only: str) -> Path:
    """``latest.json`` for the default steps (or more), ``latest-<steps>.json`` for any other selection."""
    steps = set(only.split(","))
    return RESULTS / ("latest.json" if steps >= set(STEPS) else f"latest-{'-'.join(sorted(steps))}.json")


def settings_from(pairs: list[str], cache: Path) -> Settings:
    """``BUCKETLENS_*`` from the environment, then ``--set`` pairs; the model cache lives in ``cache``."""
    environ = dict(os.environ)
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in {f.name for f in dataclasses.fields(Settings)}:
            raise SystemExit(f"--set {pair!r}: expected FIELD=VALUE with a field of bucketlens.settings.Settings")
        environ[PREFIX + name.upper()] = value
    return Settings.from_env(environ, home=cache)


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip()


def run(args: argparse.Namespace) -> dict[str, Any]:
    steps = set(args.only.split(","))
    if steps - set(STEPS) - set(ON_REQUEST):
        raise SystemExit(f"--only: unknown steps {sorted(steps - set(STEPS) - set(ON_REQUEST))}; known: "
                         f"{', '.join(STEPS + ON_REQUEST)}")
    settings = settings_from(args.set, args.cache)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    files = ensure_images(args.cache, args.images, args.seed)
    results: dict[str, Any] = {"load_average_before": load_average()}
    if "limit" in steps:
        results["limit"] = measure_limit(settings, [path.read_bytes() for path in files], cores())
    if steps & {"e2e", "old", "fair", "queries", "milvus", "burst", "load", "soak"} and not list(
            (args.cache / "models").glob("*.onnx")):
        from vision.embedders import load_embedder

        load_embedder(settings)  # exports the model into the cache once
    if steps & {"e2e", "old", "queries", "milvus", "burst", "load", "soak"}:
        started = time.perf_counter()
        with bench_stack(settings, args.cache / "models", args.home) as stack:
            results["stack"] = {"up_seconds": time.perf_counter() - started, **describe(stack)}
            with httpx.Client(base_url=stack.api_url, timeout=60) as api:
                results["stack"]["warm_up_seconds"] = warm_up(stack, api, files[0].read_bytes())
                if "e2e" in steps:
                    profiler = None
                    if args.profile:
                        profiler = Profiler(worker_pid(stack), args.out.parent / "worker-profile.txt", idle=True)
                        time.sleep(1)  # py-spy attaches
                    results["e2e"] = e2e.throughput(stack, api, files)
                    if profiler is not None:
                        profiler.stop()
                        results["e2e"]["worker_profile"] = worker_summary(profiler.out)
                    results["e2e"].update(e2e.freshness(stack, api, files, args.freshness))
                    results["e2e"].update(e2e.peak_memory(stack))
                if "burst" in steps:
                    results["burst"] = burst.run(stack, api, files, args.burst)
                if "load" in steps:
                    clients, seconds, uploads = (int(x) for x in args.load.split(","))
                    results["load"] = load.run(stack, api, files, uploads, clients, seconds, args.seed)
                if "soak" in steps:
                    results["soak"] = soak.run(stack, api, ensure_images(args.cache, args.soak, args.seed))
            if "old" in steps:
                results["old_design"] = old_design.run(stack.settings, files)
            backends = [name for name, step in (("faiss", "queries"), ("milvus", "milvus")) if step in steps]
            if backends:
                profile_to = args.out.parent / "search-profile.txt" if args.profile else None
                results["queries"] = queries.run(stack.settings, files, args.vectors, args.queries, backends,
                                                 args.seed, profile_to)
    if "fair" in steps:  # a stack of its own, after the other one is gone: the cores are split between them
        results["fair"] = fair.run(settings, files, args.cache / "models", args.out.parent / "fair-profile.txt")
    results["load_average_after"] = load_average()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    details = run(args)
    flat = headline(details)
    targets = check_targets(flat)
    report = {
        "images": args.images, "cores": cores(), **flat, "targets": targets,
        "settings": [*args.set], "vectors": args.vectors, "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1), "details": details,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report, targets))
    print(f"\n{args.out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
