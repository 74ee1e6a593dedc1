"""What fsyncing Redis's AOF before each answer costs ingest: ``python -m bench.redis_fsync [--objects N]``.

``infra/redis.conf`` has ``appendfsync always``: an event ingest acknowledged is on disk, so a power loss of the
Redis host loses none (``everysec`` loses up to a second of them, and nothing notices: the marker key that reveals
a Redis that lost its data survives). The step delivers the same Ceph-shaped events as ``bench.burst_memory`` to the
ingest app in process, one per request (as Ceph RGW sends them) and 64 at once, against a Redis of its own with each
setting in turn, and writes ``bench/results/redis-fsync.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from . import RESULTS
from .burst_memory import measure
from .stack import scratch_redis


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_fsync", description=__doc__)
    parser.add_argument("--objects", type=int, default=2000)
    args = parser.parse_args()
    rows = []
    for concurrency in (1, 64):
        rates = {}
        for mode in ("everysec", "always", "everysec", "always"):  # twice each, interleaved: the host drifts
            with scratch_redis("--appendonly", "yes", "--appendfsync", mode) as url:
                rates.setdefault(mode, []).append(asyncio.run(measure(url, args.objects, concurrency))["events_per_s"])
        best = {mode: max(found) for mode, found in rates.items()}
        rows.append({"concurrent_deliveries": concurrency, "events_per_s": rates,
                     "always_over_everysec": round(best["always"] / best["everysec"], 2)})
        print(json.dumps(rows[-1]))
    (RESULTS / "redis-fsync.json").write_text(json.dumps({"objects": args.objects, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
