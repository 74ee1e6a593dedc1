"""Index scale figures: build/merge rate, search p50/p99 (k=10), recall@10 against exact search, and peak
memory against the raw vector bytes, for the structures the index service uses (``VectorIndex``).

Vectors are shaped like real embeddings (DESIGN.md): a Gaussian mixture around a few thousand centroids,
normalised; uniform random vectors would defeat every approximate index and prove nothing.

    .venv/bin/python -m bench.index_scale 10000 100000 1000000     # writes bench/results/index-scale.json

``--grown-from 50000`` measures the structure the index service serves at that size instead: it switches to the
approximate type once the index passes ``approx_threshold`` (50,000 by default), trained on what it holds then,
merges everything after into those lists, and retrains them each time they hold 4x what they were made for.
``--real`` vectors are made again block by block whenever read, and exact search runs over them 100,000 at a time,
so any size fits: the process then holds the index and little else (``rss_mb``, ``peak_rss_mb``).

    .venv/bin/python -m bench.index_scale 5000000 --real --grown-from 50000 --index-type IVF-SQ8
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from bucketlens.schemas import ResultEntry
from bucketlens.settings import Settings
from index_service.backend import Index, restructure_into
from index_service.vector_index import VectorIndex, default_nprobe, set_search_threads

from . import CACHE
from .procs import peak_rss_mb, rss_mb
from .real_vectors import Grown, load

DIM = 1280
RESULTS = Path(__file__).parent / "results"


def clustered(n: int, seed: int) -> np.ndarray:
    """A two-level Gaussian mixture: 100 themes, sub-centroids around them (2000, or one per 50 vectors at larger
    sizes, so a neighbourhood stays about as crowded as n grows), points around those.

    Nearest neighbours then sit at cosine ~0.7 (top 1) to ~0.55 (top 10) while random pairs sit near 0:
    graded similarity, like real image embeddings, rather than uniform noise.
    """
    rng = np.random.default_rng(seed)
    themes = rng.standard_normal((100, DIM)).astype(np.float32)
    subs = max(2000, n // 50)
    centres = themes[rng.integers(0, 100, subs)] + rng.standard_normal((subs, DIM)).astype(np.float32)
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 50_000):  # in chunks, so generation does not double peak memory
        m = min(50_000, n - start)
        x = centres[rng.integers(0, subs, m)] + rng.standard_normal((m, DIM)).astype(np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def timed_search(index: Index, queries: np.ndarray) -> tuple[list[set[str]], float, float]:
    """Each query's top 10 keys, and the p50 and p99 of a search in ms."""
    hits, times = [], []
    for q in queries:
        started = time.perf_counter()
        result = index.search(q, 10)
        times.append((time.perf_counter() - started) * 1000)
        hits.append({o.key for o, _ in result})
    return hits, float(np.percentile(times, 50)), float(np.percentile(times, 99))


def real(n: int, queries_n: int) -> tuple[Grown, np.ndarray]:
    """``n`` vectors grown from the real photos' embeddings (``bench.real_vectors``, made again block by block
    whenever read: 5M of them would not fit in memory), and ``queries_n`` real edited copies whose edits were never
    indexed (seed 3 held out)."""
    indexed, held = load(Settings.from_env(home=CACHE)).split(held_out_seed=3)
    return Grown(indexed, n, seed=n), held[:queries_n].copy()


def exact(data: Grown | np.ndarray, n: int, queries: np.ndarray, k: int = 10, rows: int = 100_000) -> list[set[str]]:
    """The true ``k`` nearest of the first ``n`` rows of ``data`` for each query: FAISS's brute force (as the Flat
    index scans) over ``rows`` rows at a time, keeping the best ``k`` so far."""
    best_d = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for start in tqdm(range(0, n, rows), desc="exact search", leave=False):
        d, i = faiss.knn(queries, data[start : min(n, start + rows)], k, metric=faiss.METRIC_INNER_PRODUCT)
        d, i = np.hstack([best_d, d]), np.hstack([best_i, i + start])
        top = np.argsort(-d, axis=1, kind="stable")[:, :k]
        best_d, best_i = np.take_along_axis(d, top, 1), np.take_along_axis(i, top, 1)
    return [{f"k{i}" for i in row} for row in best_i]


BATCH = 2000  # entries per ``apply``


def upserts(rows: range | np.ndarray, vectors: np.ndarray, order: int) -> list[ResultEntry]:
    """Uploads of the objects ``k<row>`` with these vectors."""
    return [ResultEntry("upsert", "b", f"k{i}", "e", "", order, 1, "m", v) for i, v in zip(rows, vectors)]


def merge(index: VectorIndex, data: Grown | np.ndarray, rows: range | np.ndarray, order: int = 1,
          threshold: int | None = None, index_type: str = "IVF") -> int:
    """Apply ``rows`` of ``data`` as uploads (keys ``k<row>``) in batches. With ``threshold`` (``approx_threshold``),
    the structure changes when the index service would change it (``backend.restructure_into``: the switch to
    ``index_type``, then a retrain each time its lists are outgrown). Returns how many restructures that took."""
    restructures = 0
    for first in tqdm(range(0, len(rows), BATCH), desc=f"merge {len(rows):,}", leave=False):
        part = rows[first : first + BATCH]  # the merger's path: ResultEntry batches through apply()
        index.apply(upserts(part, data[part], order))
        if threshold is not None and (target := restructure_into(index, threshold, index_type)):
            index.restructure(target)
            restructures += 1
    return restructures


def reupload_rate(index: VectorIndex, data: Grown | np.ndarray, n: int, count: int = 2048) -> int:
    """Re-uploads per second of ``count`` objects already indexed (the same vectors, a newer order): each one
    replaces a vector, which once cost a Flat index a compaction of its whole array per object."""
    rows = np.sort(np.random.default_rng(1).choice(n, min(n, count), replace=False))
    vectors = data[rows]  # before the clock starts: a grown set makes its rows when read
    started = time.perf_counter()
    for first in range(0, len(rows), BATCH):
        index.apply(upserts(rows[first : first + BATCH], vectors[first : first + BATCH], order=2))
    return round(len(rows) / (time.perf_counter() - started))


def measure(n: int, queries_n: int = 200, index_type: str = "IVF", real_set: bool = False,
            grown_from: int = 0) -> dict[str, float]:
    if grown_from >= n:
        raise SystemExit(f"--grown-from {grown_from}: the index must grow past it, so give sizes above it, not {n}")
    if real_set:
        data, queries = real(n, queries_n)
    else:
        data = clustered(n + queries_n, seed=n)
        queries = data[n:].copy()
    index = VectorIndex("m", DIM)
    real_keys = {f"k{i}" for i in range(len(data.real))} if isinstance(data, Grown) else set()  # not perturbed
    row: dict[str, float] = {"n": n, "raw_vector_mb": n * DIM * 4 / 2**20}
    started = time.perf_counter()
    if grown_from:  # the service's path: the switch at the threshold, then every later merge into those lists,
        # merges and restructures on all cores (the service's merger thread), searches on one
        row["retrains"] = merge(index, data, range(n), threshold=grown_from, index_type=index_type) - 1
        row["grown_from"] = grown_from
        row["merge_vectors_per_s"] = round(n / (time.perf_counter() - started))
        row["reupload_per_s"] = reupload_rate(index, data, n)
        exact_hits = exact(data, n, queries)
        del data
        set_search_threads(1)
    else:
        set_search_threads(1)  # everything on one thread: the Flat scan is timed, then the structure built once
        merge(index, data, range(n))
        row["merge_vectors_per_s"] = round(n / (time.perf_counter() - started))
        row["flat_reupload_per_s"] = reupload_rate(index, data, n)
        del data  # from here on the process holds what the index service holds
        exact_hits, row["flat_p50_ms"], row["flat_p99_ms"] = timed_search(index, queries)
        started = time.perf_counter()
        index.restructure(index_type)
        row["ivf_build_s"] = time.perf_counter() - started
    row["index_type"] = index_type  # type: ignore[assignment]
    nlist = index._faiss.nlist
    row["ivf_lists"] = nlist
    sweep = []
    for nprobe in sorted({4, 8, 16, 32, 64, 128, default_nprobe(nlist)}):
        index._faiss.nprobe = nprobe
        hits, p50, p99 = timed_search(index, queries)
        recall = float(np.mean([len(a & b) / 10 for a, b in zip(hits, exact_hits)]))
        sweep.append({"nprobe": nprobe, "recall_at_10": recall, "p50_ms": p50, "p99_ms": p99})
        if real_keys:  # of the true 10 that are real embeddings (photos, edits), the share found
            wanted = sum(len(b & real_keys) for b in exact_hits)
            sweep[-1]["real_recall_at_10"] = sum(len(a & b & real_keys) for a, b in zip(hits, exact_hits)) / wanted
            sweep[-1]["real_neighbours"] = wanted
    row["ivf_sweep"] = sweep  # type: ignore[assignment]
    default = next(s for s in sweep if s["nprobe"] == default_nprobe(nlist))
    row.update(ivf_nprobe=default["nprobe"], ivf_recall_at_10=default["recall_at_10"], ivf_p50_ms=default["p50_ms"],
               ivf_p99_ms=default["p99_ms"])
    if real_keys:
        row["ivf_real_recall_at_10"] = default["real_recall_at_10"]
    row["rss_mb"], row["peak_rss_mb"] = rss_mb(os.getpid()), peak_rss_mb(os.getpid())
    for key, value in list(row.items()):
        if isinstance(value, float):
            row[key] = round(value, 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[10_000, 100_000])
    parser.add_argument("--index-type", default="IVF", choices=["IVF", "IVF-SQ8"], help="the approximate structure")
    parser.add_argument("--real", action="store_true",
                        help="vectors grown from real photo embeddings, queried with held-out real edits")
    parser.add_argument("--grown-from", type=int, default=0, metavar="N",
                        help="switch to the approximate type at N vectors and merge the rest into it, as the "
                             "service does (N = its approx_threshold, 50000 by default)")
    args = parser.parse_args()
    rows = []
    for n in args.sizes:  # one process per size would isolate peak memory; run sizes one at a time for that
        rows.append(measure(n, index_type=args.index_type, real_set=args.real, grown_from=args.grown_from))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "ivf_sweep"}), flush=True)
        for s in rows[-1]["ivf_sweep"]:  # type: ignore[attr-defined]
            real = f"  (real neighbours {s['real_recall_at_10']:.3f})" if "real_neighbours" in s else ""
            print(f"   nprobe {s['nprobe']:>4}: recall@10 {s['recall_at_10']:.3f}{real}  p50 {s['p50_ms']:.2f} ms  "
                  f"p99 {s['p99_ms']:.2f} ms")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "index-scale.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    suffix = (("" if args.index_type == "IVF" else f"-{args.index_type}") + ("-real" if args.real else "")
              + (f"-grown-from-{args.grown_from}" if args.grown_from else ""))
    previous.update({f"{r['n']}{suffix}": r for r in rows})
    out.write_text(json.dumps(previous, indent=2))


if __name__ == "__main__":
    main()
