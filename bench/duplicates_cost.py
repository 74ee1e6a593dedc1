"""What keeping near-duplicate groups costs the index service per new object, at a given index size.

The duplicate finder (``index_service/duplicates.py``) runs beside the merger: for each new object, one share of a
batched search (``BATCH`` objects per FAISS call) and the verification of its proposed neighbours. Search cost is
measured on a ``VectorIndex`` of clustered vectors (``bench.index_scale.clustered``); verification cost on the
quality corpus's real photos (ORB views of the shipped recipe), pairs of different photos, which is what almost
every proposed pair is.

    .venv/bin/python -m bench.duplicates_cost 100000     # writes bench/results/duplicates-cost.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bucketlens.schemas import ResultEntry
from index_service.duplicates import BATCH, MOST_NEIGHBOURS, NEIGHBOURS
from index_service.vector_index import VectorIndex, set_search_threads
from vision import local_features
from vision.decode import decode_for
from vision.models import DEFAULT_MODEL, recipe

from .corpus import ensure_photos
from .index_scale import DIM, RESULTS, clustered


def search_ms_per_object(n: int) -> float:
    index = VectorIndex("m", DIM)
    data = clustered(n, seed=0)
    for start in range(0, n, 10_000):
        index.apply([ResultEntry("upsert", "b", f"k{i}", "e", "", 1, 1, "m", data[i])
                     for i in range(start, min(n, start + 10_000))])
    queries = data[:BATCH]
    started = time.perf_counter()
    index.search_many(queries, MOST_NEIGHBOURS, [f"b/k{i}" for i in range(BATCH)])
    return (time.perf_counter() - started) * 1000 / BATCH


def verify_ms_per_pair(photos: Path, pairs: int = 300) -> float:
    chosen = recipe(DEFAULT_MODEL)
    gallery = ensure_photos(photos)
    views = []
    for photo in gallery:
        gray = decode_for(chosen, photo.path.read_bytes(), 64_000_000, local=True).gray
        assert gray is not None
        views.append(local_features.views(gray, chosen.local_count))
    rng = np.random.default_rng(0)
    picks = [(int(a), int(b)) for a, b in rng.integers(0, len(views), (pairs * 2, 2)) if a != b][:pairs]
    started = time.perf_counter()
    for a, b in picks:
        local_features.best_inliers(views[a], views[b][0])
    return (time.perf_counter() - started) * 1000 / len(picks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.duplicates_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sizes", nargs="*", type=int, default=[100_000])
    parser.add_argument("--photos", type=Path, default=Path(".bucketlens/photos"))
    parser.add_argument("--out", type=Path, default=RESULTS / "duplicates-cost.json")
    args = parser.parse_args(argv)
    set_search_threads(1)  # the service's default
    pair_ms = verify_ms_per_pair(args.photos)
    report: dict[str, object] = {"verify_ms_per_pair": round(pair_ms, 3), "neighbours": NEIGHBOURS,
                                 "most_neighbours": MOST_NEIGHBOURS, "sizes": {}}
    for n in args.sizes:
        search_ms = search_ms_per_object(n)
        per_object = search_ms + NEIGHBOURS * pair_ms  # every neighbour verified: the worst case
        report["sizes"][str(n)] = {"search_ms_per_object": round(search_ms, 3),  # type: ignore[index]
                                   "worst_ms_per_object": round(per_object, 1),
                                   # a photo with many copies: its 20 nearest all copies, the next 20 verified too
                                   "many_copies_ms_per_object": round(search_ms + MOST_NEIGHBOURS * pair_ms, 1),
                                   "objects_per_s_one_core": round(1000 / per_object, 1)}
        print(f"{n:>9} vectors: search {search_ms:.2f} ms + {NEIGHBOURS} x {pair_ms:.2f} ms verification "
              f"= {per_object:.1f} ms per new object at most ({1000 / per_object:.0f} objects/s on one core)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
