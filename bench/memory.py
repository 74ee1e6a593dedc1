"""The FAISS index's resident memory against the raw float32 vector bytes, at rest and at each peak the index
service goes through: filling (the merger's path), a snapshot, the Flat -> IVF switch, a restart's load.

    .venv/bin/python -m bench.memory 1000000 [--index-type IVF-SQ8]   # bench/results/memory.json (committed: ...-2core)

Resident size is sampled every 20 ms from /proc (the peak of each phase, above the process's size before the index
existed). The load runs in a fresh process, as a restart does. Vectors are ``bench.index_scale.clustered``, made a
batch at a time so that the benchmark holds no copy of its own (memory does not depend on how real they are).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bucketlens.schemas import ResultEntry
from index_service.snapshots import SnapshotStore
from index_service.vector_index import VectorIndex

from .index_scale import DIM, RESULTS, clustered

MODEL = "m"
BATCH = 2000


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class Peak:
    """The highest resident size since the last ``phase``, sampled in a thread."""

    def __init__(self) -> None:
        self.base = rss_mb()
        self.peak = self.base
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.02)

    def phase(self, started: float) -> dict[str, float]:
        time.sleep(0.05)
        row = {"seconds": round(time.perf_counter() - started, 1), "rest_mb": round(rss_mb() - self.base),
               "peak_mb": round(self.peak - self.base)}
        self.peak = rss_mb()
        return row


def measure(n: int, folder: Path, index_type: str) -> dict[str, Any]:
    raw = n * DIM * 4 / 2**20
    peak = Peak()
    index = VectorIndex(MODEL, DIM)
    phases: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    for start in range(0, n, BATCH):
        vectors = clustered(min(BATCH, n - start), seed=start)
        index.apply([ResultEntry("upsert", "b", f"folder/{start + i:08d}.jpg", "e", "", 1, 1, MODEL, v)
                     for i, v in enumerate(vectors)])
    phases["fill (Flat)"] = peak.phase(started)
    store = SnapshotStore(folder, keep=1)
    started = time.perf_counter()
    store.write(index, "1-0")
    phases["snapshot (Flat)"] = peak.phase(started)
    started = time.perf_counter()
    index.restructure(index_type)
    phases[f"switch Flat -> {index_type}"] = peak.phase(started)
    started = time.perf_counter()
    store.write(index, "2-0")
    phases[f"snapshot ({index_type})"] = peak.phase(started)
    del index
    load = subprocess.run([sys.executable, "-m", "bench.memory", "--load", str(folder)], capture_output=True,
                          text=True, check=True)
    phases[f"restart: load ({index_type})"] = json.loads(load.stdout.strip().splitlines()[-1])
    for row in phases.values():
        row["rest_x_raw"] = round(row["rest_mb"] / raw, 2)
        row["peak_x_raw"] = round(row["peak_mb"] / raw, 2)
    return {"n": n, "dim": DIM, "index_type": index_type, "raw_vector_mb": round(raw), "phases": phases}


def load(folder: Path) -> dict[str, float]:
    peak = Peak()
    started = time.perf_counter()
    loaded = SnapshotStore(folder).load_newest({MODEL: DIM})
    assert loaded is not None and loaded[0].index_type != "Flat", "the benchmark's snapshot did not load"
    return peak.phase(started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=1_000_000)
    parser.add_argument("--index-type", default="IVF", choices=["IVF", "IVF-SQ8"], help="the approximate structure")
    parser.add_argument("--load", type=Path, help=argparse.SUPPRESS)  # the restart, in its own process
    args = parser.parse_args()
    if args.load:
        print(json.dumps(load(args.load)))
        return
    with tempfile.TemporaryDirectory(prefix="bucketlens-memory-") as folder:
        result = measure(args.n, Path(folder), args.index_type)
    for name, row in result["phases"].items():
        print(f"{name:22} {row['seconds']:7.1f} s   at rest {row['rest_x_raw']:.2f} x raw   "
              f"peak {row['peak_x_raw']:.2f} x raw", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "memory.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    previous[f"{args.n}-{args.index_type}"] = result
    out.write_text(json.dumps(previous, indent=2) + "\n")


if __name__ == "__main__":
    main()
