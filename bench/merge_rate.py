"""How fast the merger turns stream entries into index state, without a stack: a Redis of its own, ``n`` upserts in
its result stream (as the workers write them, ``ResultEntry.to_fields``, with ``--feature-bytes`` of local
features each), then ``Merger.step`` until the stream is drained into a ``VectorIndex`` with its SQLite feature
store on this disk. Prints entries/s and, with ``--profile``, where the time went (cProfile).

    .venv/bin/python -m bench.merge_rate 20000 --feature-bytes 0
    .venv/bin/python -m bench.merge_rate 20000 --feature-bytes 30000
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import time

from redis.utils import HIREDIS_AVAILABLE

from bucketlens.keys import Keys
from bucketlens.redis_client import connect
from bucketlens.schemas import ResultEntry
from index_service.feature_store import FeatureStore
from index_service.merger import Merger
from index_service.vector_index import VectorIndex, set_search_threads

from .index_scale import DIM, clustered
from .stack import scratch_folder, scratch_redis


def measure(url: str, n: int, feature_bytes: int, profile: bool) -> dict[str, object]:
    client = connect(url)
    keys = Keys("merge-rate")
    blob = os.urandom(feature_bytes)
    data = clustered(n, seed=0)
    for start in range(0, n, 1000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(n, start + 1000)):
            entry = ResultEntry("upsert", "b", f"folder{i % 50}/k{i}", "e", "", i + 1, 1, "m", data[i], features=blob)
            pipe.xadd(keys.results, entry.to_fields())
        pipe.execute()
    del data
    with scratch_folder() as folder:
        index = VectorIndex("m", DIM, 1, FeatureStore(folder / "features.sqlite"))
        merger = Merger(client, keys, index.apply)
        merger._ensure_group()
        profiler = cProfile.Profile() if profile else None
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        while merger.step():
            pass
        if profiler:
            profiler.disable()
        seconds = time.perf_counter() - started
        index.features.close()
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    return {"entries": n, "feature_bytes": feature_bytes, "seconds": round(seconds, 2),
            "entries_per_s": round(merger.applied / seconds), "hiredis": HIREDIS_AVAILABLE}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.merge_rate", description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=20_000, help="stream entries to merge")
    parser.add_argument("--feature-bytes", type=int, default=30_000, help="local features per entry")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    set_search_threads(1)
    with scratch_redis() as url:
        print(json.dumps(measure(url, args.n, args.feature_bytes, args.profile)))


if __name__ == "__main__":
    main()
