"""How much of a core the duplicate finder takes while objects arrive, against its share (``duplicates_cpu_share``).

A bench stack on every core; ``--images`` photos uploaded (the live phase), then ``POST /rebuild`` reembeds them
all (the backfill). Each phase reports its rate, CPU per image per process, and the finder's CPU over the phase's
wall time (``/stats`` ``duplicates.cpu_s``). Larger tasks (``--set batch_size=128``) space the merges further
apart: a worker writes a task's results only once the whole task is embedded.

    .venv/bin/python -m bench.reembed_cpu --images 1000 --set batch_size=128   # bench/results/reembed-cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from . import CACHE, RESULTS, e2e
from .__main__ import settings_from
from .fair import reembed
from .images import ensure_images
from .stack import bench_stack, warm_up


def finder_share(api: httpx.Client, phase: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``phase``; its report with the duplicate finder's share of a core meanwhile."""
    before, started = api.get("/stats").json()["duplicates"]["cpu_s"], time.monotonic()
    report = phase()
    spent = api.get("/stats").json()["duplicates"]["cpu_s"] - before
    return {**report, "duplicate_finder_core_share": round(spent / (time.monotonic() - started), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a bucketlens setting")
    parser.add_argument("--out", type=Path, default=RESULTS / "reembed-cpu.json")
    args = parser.parse_args()
    settings = settings_from(args.set, CACHE)
    files = ensure_images(CACHE, args.images)
    if not list((CACHE / "models").glob("*.onnx")):
        from vision.embedders import load_embedder

        load_embedder(settings)  # exports the model into the cache once (as ``python -m bench`` does)
    with bench_stack(settings, CACHE / "models") as stack, httpx.Client(base_url=stack.api_url, timeout=60) as api:
        warm_up(stack, api, files[0].read_bytes())
        live = finder_share(api, lambda: e2e.throughput(stack, api, files))
        backfill = reembed(stack, api, args.out.with_suffix(".worker-profile.txt"))
    results = {"settings": args.set, "images": len(files), "live": live, "backfill": backfill,
               "duplicates_cpu_share": settings.duplicates_cpu_share,
               "backfill_vs_live": backfill["images_per_s"] / live["bucketlens_images_per_s"]}
    args.out.write_text(json.dumps(results, indent=1))
    for phase, rate in (("live", live["bucketlens_images_per_s"]), ("backfill", backfill["images_per_s"])):
        print(f"{phase}: {rate:.1f} img/s, duplicate finder {results[phase]['duplicate_finder_core_share']:.2f} "
              f"of a core (its share {settings.duplicates_cpu_share})")


if __name__ == "__main__":
    main()
