"""How long searches wait while the merger applies batches that carry local features (in-process, no stack).

A ``VectorIndex`` of ``n`` clustered vectors (``bench.index_scale.clustered``; IVF from 50,000 on, as the service
switches) with its SQLite feature store in a temporary folder on this disk; one thread searches without pause
while the main thread applies ``--batches`` batches of 512 new objects (the merger's batch), each with a
``--feature-bytes`` blob of local features (the workers write up to 36 KB). Reports each apply's time, the
share of it spent committing the features, and the search latency idle and during the merges.

``--checkpoint``: how merges fare while a snapshot is written. The snapshot is written once alone (until the
checkpoint had a thread of its own, the merger wrote it between two batches: no merge for that long), then again in
a thread while the main thread applies batches until it is done; reports both durations and the batches' apply
times idle and during the second.

    .venv/bin/python -m bench.merge_stall 60000     # writes bench/results/merge-stall.json
    .venv/bin/python -m bench.merge_stall 300000 --checkpoint --feature-bytes 0   # merge-stall-checkpoint.json
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from bucketlens.schemas import ResultEntry
from index_service.feature_store import FeatureStore
from index_service.snapshots import SnapshotStore
from index_service.vector_index import VectorIndex, set_search_threads

from .index_scale import DIM, RESULTS, clustered
from .stack import scratch_folder

BATCH = 512  # the merger's batch (``Merger.batch``)


class TimedStore(FeatureStore):
    """The feature store, timing each batch's commit."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.committing: list[float] = []

    def write(self, puts: Sequence[tuple[str, str, bytes]], deletes: Iterable[str]) -> None:
        started = time.perf_counter()
        super().write(puts, deletes)
        self.committing.append((time.perf_counter() - started) * 1000)


def percentiles(times: list[float]) -> dict[str, float]:
    return {"count": len(times), "p50_ms": round(float(np.percentile(times, 50)), 2),
            "p99_ms": round(float(np.percentile(times, 99)), 2), "max_ms": round(max(times), 1)}


def searching(index: VectorIndex, queries: np.ndarray, stop: threading.Event, times: list[float]) -> None:
    i = 0
    while not stop.is_set():
        started = time.perf_counter()
        index.search(queries[i % len(queries)], 10)
        times.append((time.perf_counter() - started) * 1000)
        i += 1


def filled(index: VectorIndex, data: np.ndarray, n: int) -> None:
    """The vectors already held: no features, to fill fast; IVF from 50,000 on, as the service switches."""
    for start in range(0, n, 2000):
        index.apply([ResultEntry("upsert", "b", f"k{i}", "e", "", 1, 1, "m", data[i])
                     for i in range(start, min(n, start + 2000))])
    if n >= 50_000:
        index.restructure("IVF")


def measure(n: int, batches: int, feature_bytes: int, idle_s: float = 5.0) -> dict[str, object]:
    data = clustered(n + batches * BATCH + 50, seed=n)
    queries = data[-50:]
    blob = os.urandom(feature_bytes)
    with scratch_folder() as folder:
        store = TimedStore(folder / "features.sqlite")
        index = VectorIndex("m", DIM, 1, store)
        filled(index, data, n)
        idle: list[float] = []
        during: list[float] = []
        applies: list[float] = []
        for times, merging in ((idle, False), (during, True)):
            stop = threading.Event()
            searcher = threading.Thread(target=searching, args=(index, queries, stop, times))
            searcher.start()
            if merging:
                for b in range(batches):
                    rows = range(n + b * BATCH, n + (b + 1) * BATCH)
                    entries = [ResultEntry("upsert", "b", f"k{i}", "e", "", 1, 1, "m", data[i], features=blob)
                               for i in rows]
                    started = time.perf_counter()
                    index.apply(entries)
                    applies.append((time.perf_counter() - started) * 1000)
            else:
                time.sleep(idle_s)
            stop.set()
            searcher.join()
        store.close()
    committing = sum(store.committing[-batches:])  # the merged batches' commits, not the fill's
    return {"n": n, "index_type": index.index_type, "batch": BATCH, "feature_bytes": feature_bytes,
            "apply": percentiles(applies), "features_commit_share": round(committing / sum(applies), 3),
            "search_idle": percentiles(idle), "search_while_merging": percentiles(during)}


def measure_checkpoint(n: int, feature_bytes: int, most_batches: int = 400) -> dict[str, object]:
    data = clustered(n + most_batches * BATCH, seed=n)
    blob = os.urandom(feature_bytes)
    with scratch_folder() as folder:
        index = VectorIndex("m", DIM, 1, FeatureStore(folder / "features.sqlite"))
        filled(index, data, n)
        snapshots = SnapshotStore(folder / "snapshots", keep=1)
        started = time.perf_counter()
        snapshots.write(index, "1-1")
        alone = time.perf_counter() - started
        rows = iter(range(n, len(data)))

        def merged() -> float:
            entries = [ResultEntry("upsert", "b", f"k{i}", "e", "", 1, 1, "m", data[i], features=blob)
                       for i, _ in zip(rows, range(BATCH))]
            started = time.perf_counter()
            index.apply(entries)
            return (time.perf_counter() - started) * 1000

        idle = [merged() for _ in range(10)]
        held = len(index)
        writer = threading.Thread(target=snapshots.write, args=(index, "2-2"))
        started = time.perf_counter()
        writer.start()
        during = []
        while writer.is_alive() and len(during) < most_batches - 10:
            during.append(merged())
        writer.join()
        beside = time.perf_counter() - started
        index.features.close()
        written = snapshots.last
    assert written is not None and held <= written["count"] <= held + len(during) * BATCH, written  # when it began
    return {"n": n, "index_type": index.index_type, "batch": BATCH, "feature_bytes": feature_bytes,
            "snapshot_alone_s": round(alone, 2), "snapshot_beside_merges_s": round(beside, 2),
            "batches_merged_while_written": len(during), "entries_per_s_while_written": round(
                len(during) * BATCH / beside), "apply_idle": percentiles(idle), "apply_while_written": percentiles(
                during) if during else None}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.merge_stall", description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=60_000, help="vectors held before the merges")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--feature-bytes", type=int, default=30_000)
    parser.add_argument("--checkpoint", action="store_true", help="merges while a snapshot is written")
    args = parser.parse_args()
    set_search_threads(1)  # as the index service runs
    if args.checkpoint:
        result, name = measure_checkpoint(args.n, args.feature_bytes), "merge-stall-checkpoint.json"
    else:
        result, name = measure(args.n, args.batches, args.feature_bytes), "merge-stall.json"
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
