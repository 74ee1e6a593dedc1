"""The FAISS index's resident memory against the raw float32 vector bytes, at rest and at each peak the index
service goes through: filling (the merger's path), a snapshot, the Flat -> IVF switch, a restart's load.

    .venv/bin/python -m bench.memory 1000000 [--index-type IVF-SQ8]   # bench/results/memory.json (committed: ...-2core)

Resident size is sampled every 20 ms from /proc (the peak of each phase, above the process's size before the index
existed, and the whole process's). The load runs in a fresh process, as a restart does. Vectors are
``bench.index_scale.clustered``, made a batch at a time so that the benchmark holds no copy of its own (memory does
not depend on how real they are).

    .venv/bin/python -m bench.memory 50000 --index-type IVF-SQ8 --grow-to 5000000   # 5M, switched at 50,000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bucketlens.schemas import ResultEntry
from index_service.snapshots import SnapshotStore
from index_service.vector_index import VectorIndex

from .index_scale import DIM, RESULTS, clustered
from .procs import rss_mb

MODEL = "m"
BATCH = 2000


class Peak:
    """The highest resident size since the last ``phase``, sampled in a thread."""

    def __init__(self) -> None:
        self.base = rss_mb(os.getpid())
        self.peak = self.base
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mb(os.getpid()))
            time.sleep(0.02)

    def phase(self, started: float, vectors: int) -> dict[str, float]:
        """This phase's time and memory, also as multiples of the raw float32 bytes of the ``vectors`` held."""
        time.sleep(0.05)
        raw = vectors * DIM * 4 / 2**20
        whole, whole_top = rss_mb(os.getpid()), self.peak
        rest, top = whole - self.base, whole_top - self.base
        self.peak = whole
        return {"seconds": round(time.perf_counter() - started, 1), "vectors": vectors, "raw_vector_mb": round(raw),
                "rest_mb": round(rest), "peak_mb": round(top), "rest_x_raw": round(rest / raw, 2),
                "peak_x_raw": round(top / raw, 2), "process_rest_mb": round(whole), "process_peak_mb": round(whole_top)}


def fill(index: VectorIndex, start: int, stop: int) -> None:
    """Objects ``start`` to ``stop`` through ``apply``, the merger's path, a batch at a time."""
    for first in tqdm(range(start, stop, BATCH), desc=f"fill to {stop:,}", leave=False):
        vectors = clustered(min(BATCH, stop - first), seed=first)
        index.apply([ResultEntry("upsert", "b", f"folder/{first + i:08d}.jpg", "e", "", 1, 1, MODEL, v)
                     for i, v in enumerate(vectors)])


def measure(n: int, folder: Path, index_type: str, grow_to: int) -> dict[str, Any]:
    """Fill ``n`` vectors into Flat, snapshot, switch to ``index_type``, go on filling to ``grow_to`` (as the
    service does past its threshold), snapshot, restart; each phase's figures against the vectors held then."""
    peak = Peak()
    index = VectorIndex(MODEL, DIM)
    phases: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    fill(index, 0, n)
    phases["fill (Flat)"] = peak.phase(started, n)
    store = SnapshotStore(folder, keep=1)
    started = time.perf_counter()
    store.write(index, "1-0")
    phases["snapshot (Flat)"] = peak.phase(started, n)
    started = time.perf_counter()
    index.restructure(index_type)
    phases[f"switch Flat -> {index_type}"] = peak.phase(started, n)
    if grow_to > n:
        started = time.perf_counter()
        fill(index, n, grow_to)
        phases[f"fill ({index_type}) to {grow_to:,}"] = peak.phase(started, grow_to)
    started = time.perf_counter()
    store.write(index, "2-0")
    phases[f"snapshot ({index_type})"] = peak.phase(started, len(index))
    del index
    load = subprocess.run([sys.executable, "-m", "bench.memory", "--load", str(folder)], capture_output=True,
                          text=True, check=True)
    phases[f"restart: load ({index_type})"] = json.loads(load.stdout.strip().splitlines()[-1])
    return {"n": n, "grow_to": max(n, grow_to), "dim": DIM, "index_type": index_type, "phases": phases}


def load(folder: Path) -> dict[str, float]:
    peak = Peak()
    started = time.perf_counter()
    loaded = SnapshotStore(folder).load_newest({MODEL: DIM})
    assert loaded is not None and loaded[0].index_type != "Flat", "the benchmark's snapshot did not load"
    return peak.phase(started, len(loaded[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=1_000_000)
    parser.add_argument("--index-type", default="IVF", choices=["IVF", "IVF-SQ8"], help="the approximate structure")
    parser.add_argument("--grow-to", type=int, default=0, metavar="N",
                        help="after the switch, go on filling the approximate index to N vectors")
    parser.add_argument("--load", type=Path, help=argparse.SUPPRESS)  # the restart, in its own process
    args = parser.parse_args()
    if args.load:
        print(json.dumps(load(args.load)))
        return
    with tempfile.TemporaryDirectory(prefix="bucketlens-memory-") as folder:
        result = measure(args.n, Path(folder), args.index_type, args.grow_to)
    for name, row in result["phases"].items():
        print(f"{name:28} {row['seconds']:7.1f} s   at rest {row['rest_x_raw']:.2f} x raw ({row['rest_mb']:,} MB)  "
              f"peak {row['peak_x_raw']:.2f} x raw ({row['peak_mb']:,} MB)  "
              f"process {row['process_rest_mb']:,} / {row['process_peak_mb']:,} MB", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "memory.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    previous[f"{max(args.n, args.grow_to)}-{args.index_type}"] = result
    out.write_text(json.dumps(previous, indent=2) + "\n")


if __name__ == "__main__":
    main()
