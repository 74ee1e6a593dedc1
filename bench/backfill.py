"""A backfill as queues see it: queue depth, Redis memory and the freshness of live uploads over time, while W
workers embed an existing bucket of N images and live uploads keep arriving (docs/scale.md quotes its output).

A fluid model, one step per minute, with the shapes bucketlens has: a rebuild lists the bucket and queues every
object on the lower-priority rebuild queue as fast as the listing goes; workers serve the live queue first
(``queue_order_strategy=priority``); each worker embeds ``--rate`` images a second. Redis holds each queued
reference (``--ref-bytes``: an ``ObjectRef`` as JSON, 270 bytes measured, plus its share of the task envelope) and
the result stream between checkpoints. Freshness of a live upload = what waits on the live queue ahead of it over
the live share of the capacity, plus the measured end-to-end latency of an idle pipeline.

    .venv/bin/python -m bench.backfill --images 10000000 --workers 50 --rate 38 --live 20
"""

from __future__ import annotations

import argparse
import json

IDLE_FRESHNESS_S = 0.18  # measured p50 on the local stack (bench/README.md, run 4)


def simulate(images: int, workers: int, rate: float, live: float, list_rate: float, ref_bytes: int,
             entry_bytes: int, checkpoint_s: float, step_s: float = 60.0) -> list[dict[str, float]]:
    capacity = workers * rate  # images a second
    listed = backfill_q = live_q = done = 0.0
    rows, t = [], 0.0
    while done < images and t < 90 * 86400:
        new = min(list_rate * step_s, images - listed)
        listed += new
        backfill_q += new
        live_q += live * step_s
        budget = capacity * step_s
        served_live = min(live_q, budget)
        live_q -= served_live
        served_backfill = min(backfill_q, budget - served_live)
        backfill_q -= served_backfill
        done += served_backfill
        t += step_s
        merged_per_s = (served_live + served_backfill) / step_s
        rows.append({
            "hour": round(t / 3600, 2), "listed": int(listed), "embedded": int(done),
            "rebuild_queue": int(backfill_q), "live_queue": int(live_q),
            "redis_queues_gb": round((backfill_q + live_q) * ref_bytes / 1e9, 2),
            "redis_stream_gb": round(merged_per_s * checkpoint_s * entry_bytes / 1e9, 3),
            "live_freshness_s": round(IDLE_FRESHNESS_S + live_q / max(capacity, 1e-9), 2),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000_000)
    parser.add_argument("--workers", type=int, default=50, help="worker processes (one per core on CPU)")
    parser.add_argument("--rate", type=float, default=38.0, help="images a second per worker (bench/README.md)")
    parser.add_argument("--live", type=float, default=20.0, help="live uploads a second during the backfill")
    parser.add_argument("--list-rate", type=float, default=5000.0, help="keys listed and queued a second")
    parser.add_argument("--ref-bytes", type=int, default=320, help="Redis bytes per queued object reference")
    parser.add_argument("--entry-bytes", type=int, default=5400 + 36_000,
                        help="result-stream bytes per object (vector, metadata, local features up to 36 KB)")
    parser.add_argument("--checkpoint-s", type=float, default=60.0, help="stream kept between checkpoints")
    parser.add_argument("--every", type=int, default=60, help="print one row per this many minutes")
    args = parser.parse_args()
    rows = simulate(args.images, args.workers, args.rate, args.live, args.list_rate, args.ref_bytes,
                    args.entry_bytes, args.checkpoint_s)
    for row in rows[:: args.every] + rows[-1:]:
        print(json.dumps(row))
    peak = max(rows, key=lambda r: r["redis_queues_gb"])
    worst = max(r["live_freshness_s"] for r in rows)
    print(json.dumps({"hours": rows[-1]["hour"], "peak_redis_queues_gb": peak["redis_queues_gb"],
                      "peak_at_hour": peak["hour"], "worst_live_freshness_s": worst}))


if __name__ == "__main__":
    main()
