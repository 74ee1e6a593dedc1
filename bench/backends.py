"""Both index backends side by side, in process, through the same contract (``index_service/backend.py``): merge rate
(``apply`` in the merger's batches), checkpoint time, search p50/p99 (k=10, one query at a time), and recall@10
against exact search once each backend has switched to the approximate type it picks (FAISS IVF, Milvus HNSW or
IVF per ``BUCKETLENS_MILVUS_INDEX_TYPE``). Over HTTP, under concurrency and on real embeddings:
``python -m bench --only queries,milvus`` (``bench/queries.py``).

    .venv/bin/python -m bench.backends --milvus-uri http://127.0.0.1:19530 20000   # bench/results/backends.json

(git-ignored; the committed run is ``backends-2core.json``, bench/README.md "Index backends").

The Milvus side needs a running server (``python -m infra.milvus --data DIR --port PORT``, or ``bucketlens up
--backend milvus``); vectors as ``bench.index_scale.clustered`` (a Gaussian mixture, never uniform noise).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from bucketlens.keys import Keys
from bucketlens.redis_client import connect
from bucketlens.schemas import ResultEntry
from bucketlens.settings import Settings
from index_service.backend import open_backend
from index_service.feature_store import FeatureStore

from .index_scale import RESULTS, clustered, timed_search

MODEL = Settings().model
BATCH = Settings().merge_batch


def measure(backend_name: str, n: int, settings: Settings, redis_url: str) -> dict[str, Any]:
    settings = Settings(**{**settings.__dict__, "index_backend": backend_name,
                           "namespace": f"bench{uuid.uuid4().hex[:6]}"})
    backend = open_backend(settings, connect(redis_url), Keys(settings.namespace), lambda _: FeatureStore())
    index = backend.new_generation(MODEL, 1)
    vectors = clustered(n + 200, seed=7)
    data, queries = vectors[:n], vectors[n:]
    entries = [ResultEntry("upsert", "b", f"k{i}", "e", "", 1, 1, MODEL, v) for i, v in enumerate(data)]
    started = time.perf_counter()
    for start in range(0, n, BATCH):
        index.apply(entries[start : start + BATCH])
    merge_s = time.perf_counter() - started
    started = time.perf_counter()
    backend.checkpoint(index, "1-0")
    checkpoint_s = time.perf_counter() - started
    exact, flat_p50, flat_p99 = timed_search(index, queries)
    started = time.perf_counter()
    index.restructure(backend.approximate)
    restructure_s = time.perf_counter() - started
    approx, p50, p99 = timed_search(index, queries)
    recall = float(np.mean([len(a & e) / 10 for a, e in zip(approx, exact)]))
    row = {"backend": backend_name, "vectors": n, "merge_per_s": round(n / merge_s),
           "checkpoint_s": round(checkpoint_s, 2),
           "flat_p50_ms": round(flat_p50, 2), "flat_p99_ms": round(flat_p99, 2), "approximate": backend.approximate,
           "restructure_s": round(restructure_s, 1), "approx_p50_ms": round(p50, 2), "approx_p99_ms": round(p99, 2),
           "recall_at_10": round(recall, 3)}
    alias = getattr(backend, "alias", None)  # Milvus: the bench's alias goes before its collection
    if alias is not None:
        backend.connection.client.drop_alias(alias)  # type: ignore[attr-defined]
    backend.discard(index)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[20_000])
    parser.add_argument("--milvus-uri", default=Settings().milvus_uri)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6390/0", help="for the checkpoints")
    args = parser.parse_args()
    settings = Settings(milvus_uri=args.milvus_uri, home=Path(tempfile.mkdtemp(prefix="bench-backends-")))
    rows = []
    for n in args.sizes:
        for name in ("faiss", "milvus"):
            rows.append(measure(name, n, settings, args.redis_url))
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "backends.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
