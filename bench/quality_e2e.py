"""The quality benchmark end to end: the shipped design, over HTTP, on a stack of its own.

A bench stack (``bench/stack.py``: Ceph RGW, Redis, ingest, a worker, the index service, default settings) gets
the gallery uploaded to its bucket under ``quality/``; every edited copy is then a ``POST /search`` with the image,
as a user sends it, reranking as the service decides by default. Copy decision: the global-score threshold fitted
on one half's mild queries and evaluated on the other half (scores of the top 10 results: the query's family
against the strongest other photos), and the service's own ``verified`` flag.
"""

from __future__ import annotations

import argparse
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from bucketlens.s3 import make_client
from bucketlens.settings import Settings

from . import CACHE
from .corpus import ensure_photos
from .edits import EDITS
from .quality import Query, make_queries
from .quality_metrics import evaluate, fit_threshold, source_at, split_families
from .stack import bench_stack, wait_indexed

PREFIX = "quality/"


def upload_gallery(settings: Settings, api: httpx.Client, photos: list[Any]) -> dict[str, str]:
    """Upload every photo and wait until each is indexed; returns key -> family."""
    s3 = make_client(settings)
    families = {}
    for photo in tqdm(photos, desc="upload gallery"):
        key = PREFIX + photo.path.name
        s3.put_object(Bucket=settings.bucket, Key=key, Body=photo.path.read_bytes(), ContentType="image/jpeg")
        families[key] = photo.family
    for key in tqdm(families, desc="wait indexed"):
        wait_indexed(api, settings.bucket, key, timeout_s=600, poll_s=0.2)
    return families


def ask(api: httpx.Client, query: Query) -> tuple[list[dict[str, Any]], float]:
    started = time.perf_counter()
    response = api.post("/search", files={"image": ("q.jpg", query.path.read_bytes(), "image/jpeg")},
                        data={"k": "10"})
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return response.json()["results"], elapsed


def run_end_to_end(args: argparse.Namespace) -> dict[str, Any]:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per query otherwise
    photos = ensure_photos(args.photos)
    queries = make_queries(photos, args.seeds, args.photos / "queries")
    settings = Settings.from_env(home=Path(".bucketlens"))
    with bench_stack(settings, CACHE, args.home) as stack, httpx.Client(base_url=stack.api_url, timeout=120) as api:
        families = upload_gallery(stack.settings, api, photos)
        model = api.get("/stats").json()["model"]
        with ThreadPoolExecutor(2) as pool:
            answers = list(tqdm(pool.map(lambda q: ask(api, q), queries), total=len(queries), desc="queries"))
    return {"mode": "end-to-end", "model": model, "photos": len(photos), "queries": len(queries),
            "seeds": args.seeds, **score(queries, answers, families)}


def score(queries: list[Query], answers: list[tuple[list[dict[str, Any]], float]], families: dict[str, str]
          ) -> dict[str, Any]:
    """Per edit and per direction (fit the threshold on one half of the families, evaluate on the other)."""
    half_a, half_b = split_families(list(families.values()))
    directions = []
    for fit_half, eval_half, label in ((half_a, half_b, "fit A / eval B"), (half_b, half_a, "fit B / eval A")):
        fit_idx = [i for i, q in enumerate(queries) if q.photo.family in fit_half and q.edit == "mild"]
        threshold = fit_threshold(*_pairs([queries[i] for i in fit_idx], [answers[i][0] for i in fit_idx],
                                          families))
        rows = {}
        for edit_name in EDITS:
            idx = [i for i, q in enumerate(queries) if q.photo.family in eval_half and q.edit == edit_name]
            results = [answers[i][0] for i in idx]
            ranked = [[families.get(r["key"], "other") for r in rs] for rs in results]
            sources = [queries[i].photo.family for i in idx]
            decision = evaluate(*_pairs([queries[i] for i in idx], results, families), threshold)
            verified = [[families.get(r["key"]) == source for r in rs if r.get("verified")]
                        for rs, source in zip(results, sources)]
            true = sum(sum(v) for v in verified)
            flagged = sum(len(v) for v in verified)
            rows[edit_name] = {
                "source@1": round(source_at(ranked, sources, 1), 4),
                "source@10": round(source_at(ranked, sources, 10), 4),
                "threshold": round(threshold, 4), "precision": round(decision.precision, 4),
                "recall": round(decision.recall, 4),
                "verified_precision": round(true / flagged, 4) if flagged else 1.0,
                "verified_recall": round(float(np.mean([any(v) for v in verified])), 4),
                "query_p50_ms": round(float(np.median([answers[i][1] for i in idx])) * 1000, 1),
            }
        directions.append({"label": label, "rows": rows})
    return {"variant": "shipped (end to end)", "directions": directions}


def _pairs(queries: list[Query], results: list[list[dict[str, Any]]], families: dict[str, str]
           ) -> tuple[np.ndarray, np.ndarray]:
    positives: list[float] = []
    negatives: list[float] = []
    for query, rs in zip(queries, results):
        for r in rs:
            (positives if families.get(r["key"]) == query.photo.family else negatives).append(r["score"])
    return np.asarray(positives, dtype=np.float64), np.asarray(negatives, dtype=np.float64)



