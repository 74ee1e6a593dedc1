"""``python -m bench.quality`` (``make quality``): does an edited copy of a photo find its source first?

Photos: the corpus of ``bench/corpus.py`` (scikit-image's photographs and the Debian wallpaper packages). Gallery:
the originals. Queries: every photo x every edit of ``bench/edits.py`` x ``--seeds`` seeds, never indexed.

``--in-process`` compares descriptor variants (recipes of ``vision/models.py``) with no servers: decode, embed,
exact search, spatial verification of the top candidates. Anything learned from photos (the centring mean, the copy
threshold) is fitted on one half of the families and evaluated on the other, both ways round. Without it, the
shipped design runs end to end: the gallery is uploaded to the running local stack (``bucketlens up``) and each
query is a ``POST /search`` over HTTP, reranking included (``bench/quality_e2e.py``).

Writes ``bench/results/quality.json``; ``--fit`` writes the centring mean of the default model from all photos.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from bucketlens.settings import Settings
from vision import local_features
from vision.decode import decode_image
from vision.embedders import Embedder, Finisher, fitted_path, load_embedder
from vision.models import DEFAULT_MODEL, RECIPES, Recipe, recipe

from . import RESULTS
from .corpus import Photo, ensure_photos
from .edits import EDITS, edit
from .quality_metrics import evaluate, fit_threshold, pairs, source_at, split_families

log = logging.getLogger(__name__)
MAX_PIXELS = 64_000_000
RERANK = 20  # candidates verified per query
BASE = RECIPES["efficientnet-lite0"]
VARIANTS: dict[str, Recipe] = {
    "lite0 mean (today)": BASE,
    "lite0 gem": dataclasses.replace(BASE, pooling="gem"),
    "lite0 mean+mirror": dataclasses.replace(BASE, mirror=True),
    "lite0 gem+mirror": dataclasses.replace(BASE, pooling="gem", mirror=True),
    "lite0 mean+mirror+centre": dataclasses.replace(BASE, mirror=True, centre=True),
    "lite0 gem+mirror+centre": dataclasses.replace(BASE, pooling="gem", mirror=True, centre=True),
    "lite1 gem+mirror+centre": dataclasses.replace(RECIPES["efficientnet-lite1"], pooling="gem", mirror=True,
                                                   centre=True),
}


@dataclasses.dataclass
class Query:
    photo: Photo
    edit: str
    seed: int
    path: Path


def make_queries(photos: Sequence[Photo], seeds: int, folder: Path) -> list[Query]:
    """Every photo x every edit x seed, written once as files (the end-to-end mode uploads the same bytes)."""
    queries = [Query(p, e, s, folder / f"{e}-{s}" / p.path.name) for e in EDITS for s in range(seeds) for p in photos]
    todo = [q for q in queries if not q.path.exists()]

    def write(q: Query) -> None:
        q.path.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(q.photo.path) as image:
            data = edit(q.edit, image.convert("RGB"), q.seed)
        tmp = q.path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(q.path)

    with ThreadPoolExecutor(2) as pool:
        list(tqdm(pool.map(write, todo), total=len(todo), desc="edited copies", disable=not todo))
    return queries


class Decoded:
    """Decoded pixels per input size and ORB features per file, computed once per run."""

    def __init__(self) -> None:
        self._pixels: dict[tuple[Path, int], np.ndarray] = {}
        self._features: dict[Path, local_features.Features] = {}
        self._mirrored: dict[Path, local_features.Features] = {}

    def pixels(self, paths: Sequence[Path], size: int) -> np.ndarray:
        todo = [p for p in paths if (p, size) not in self._pixels]
        for path in tqdm(todo, desc=f"decode at {size}", disable=len(todo) < 50, leave=False):
            self._pixels[(path, size)] = decode_image(path.read_bytes(), MAX_PIXELS, size).pixels
        return np.stack([self._pixels[(p, size)] for p in paths])

    def features(self, path: Path, mirrored: bool = False) -> local_features.Features:
        if path not in self._features:
            gray = decode_image(path.read_bytes(), MAX_PIXELS, 32, local_features.SIDE).gray
            assert gray is not None
            self._features[path] = local_features.extract(gray)
            self._mirrored[path] = local_features.extract(np.ascontiguousarray(gray[:, ::-1]))
        return (self._mirrored if mirrored else self._features)[path]


def embed_all(embedder: Embedder, decoded: Decoded, paths: Sequence[Path], label: str) -> np.ndarray:
    size = embedder.recipe.input_size
    out = []
    for start in tqdm(range(0, len(paths), 64), desc=f"embed {label}", leave=False):
        out.append(embedder.embed(decoded.pixels(paths[start : start + 64], size)))
    return np.concatenate(out)


def rerank(scores: np.ndarray, query_paths: Sequence[Path], gallery_paths: Sequence[Path], decoded: Decoded
           ) -> tuple[np.ndarray, np.ndarray]:
    """``(order, inliers)``: gallery indices per query with the top ``RERANK`` re-ordered by verification
    (verified candidates first, by consistent matches; then the rest by global score), and each top candidate's
    inlier count (0 beyond the top)."""
    order = np.argsort(-scores, axis=1)
    counts = np.zeros_like(scores, dtype=np.int32)
    for path in {*query_paths, *gallery_paths}:  # extract once, in this thread, before the pool matches
        decoded.features(path)

    def verify(qi: int) -> list[int]:
        views = [decoded.features(query_paths[qi]), decoded.features(query_paths[qi], mirrored=True)]
        return [local_features.best_inliers(views, decoded.features(gallery_paths[g])) for g in order[qi, :RERANK]]

    with ThreadPoolExecutor(2) as pool:  # OpenCV matches without the GIL
        matched = list(tqdm(pool.map(verify, range(len(query_paths))), total=len(query_paths), desc="verify",
                            leave=False))
    for qi, found in enumerate(matched):
        top = order[qi, :RERANK]
        counts[qi, top] = found
        key = [(-(n if n >= local_features.MIN_INLIERS else 0), -scores[qi, g]) for n, g in zip(found, top)]
        order[qi, :RERANK] = top[sorted(range(len(top)), key=lambda i: key[i])]
    return order, counts


def evaluate_variant(name: str, vectors_g: np.ndarray, vectors_q: np.ndarray, recipe_: Recipe, photos: list[Photo],
                     queries: list[Query], decoded: Decoded, verify: bool) -> dict[str, Any]:
    """Both directions: fit on one half of the families, evaluate queries of the other against the whole gallery."""
    families_g = [p.family for p in photos]
    half_a, half_b = split_families(families_g)
    report: dict[str, Any] = {"variant": name, "recipe": dataclasses.asdict(recipe_), "directions": []}
    for fit_half, eval_half, label in ((half_a, half_b, "fit A / eval B"), (half_b, half_a, "fit B / eval A")):
        g, q = vectors_g, vectors_q
        if recipe_.centre:
            centre = g[[f in fit_half for f in families_g]].mean(axis=0)
            finish = Finisher(recipe_, centre)
            g, q = finish(g), finish(q)
        fit_mild = [i for i, x in enumerate(queries) if x.photo.family in fit_half and x.edit == "mild"]
        positives, negatives = pairs(q[fit_mild] @ g.T, [queries[i].photo.family for i in fit_mild], families_g)
        threshold = fit_threshold(positives, negatives)
        rows = {}
        for edit_name in EDITS:
            idx = [i for i, x in enumerate(queries) if x.photo.family in eval_half and x.edit == edit_name]
            scores = q[idx] @ g.T
            sources = [queries[i].photo.family for i in idx]
            row = _ranked_metrics(np.argsort(-scores, axis=1), families_g, sources, "")
            decision = evaluate(*pairs(scores, sources, families_g), threshold)
            row.update(threshold=round(threshold, 4), precision=round(decision.precision, 4),
                       recall=round(decision.recall, 4))
            if verify:
                order, counts = rerank(scores, [queries[i].path for i in idx], [p.path for p in photos], decoded)
                row.update(_ranked_metrics(order, families_g, sources, "verified_"))
                pos, neg = pairs(counts.astype(np.float32), sources, families_g)
                verified = evaluate(pos, neg, local_features.MIN_INLIERS)
                row.update(verified_precision=round(verified.precision, 4), verified_recall=round(verified.recall, 4))
            rows[edit_name] = row
        report["directions"].append({"label": label, "rows": rows})
    return report


def _ranked_metrics(order: np.ndarray, families_g: list[str], sources: list[str], prefix: str) -> dict[str, float]:
    ranked = [[families_g[g] for g in row[:10]] for row in order]
    return {f"{prefix}source@1": round(source_at(ranked, sources, 1), 4),
            f"{prefix}source@10": round(source_at(ranked, sources, 10), 4)}


def worker_cost(settings: Settings, recipe_: Recipe, paths: Sequence[Path]) -> dict[str, float]:
    """What a worker does per image, in one process: decode, embed (batches of 8), ORB when the recipe says so."""
    embedder = load_embedder(settings, custom=dataclasses.replace(recipe_, centre=False))
    blobs = [p.read_bytes() for p in paths]
    side = local_features.SIDE if recipe_.local_features else 0
    started = time.perf_counter()
    extra = 0
    for start in range(0, len(blobs), 8):
        images = [decode_image(b, MAX_PIXELS, recipe_.input_size, side) for b in blobs[start : start + 8]]
        embedder.embed(np.stack([i.pixels for i in images]))
        for image in images:
            if image.gray is not None:
                extra += len(local_features.encode(local_features.extract(image.gray)))
    elapsed = time.perf_counter() - started
    return {"img_per_s": round(len(blobs) / elapsed, 1),
            "index_bytes_per_image": recipe_.dim * 4 + round(extra / len(blobs))}


def run_in_process(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings.from_env(home=Path(".bucketlens"), runtime="onnx", worker_concurrency=1)
    photos = ensure_photos(args.photos)
    queries = make_queries(photos, args.seeds, args.photos / "queries")
    decoded = Decoded()
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    results = []
    for name in names:
        variant = VARIANTS[name]
        embedder = load_embedder(settings, custom=dataclasses.replace(variant, centre=False))
        g = embed_all(embedder, decoded, [p.path for p in photos], f"{name}: gallery")
        q = embed_all(embedder, decoded, [x.path for x in queries], f"{name}: queries")
        verify = name in args.verify.split(",")
        report = evaluate_variant(name, g, q, variant, photos, queries, decoded, verify)
        cost_sample = [x.path for x in queries[: args.cost_images]]
        report["cost"] = worker_cost(settings, dataclasses.replace(variant, local_features=verify), cost_sample)
        results.append(report)
        print_table(report)
    return {"mode": "in-process", "photos": len(photos), "families": len({p.family for p in photos}),
            "queries": len(queries), "seeds": args.seeds, "variants": results}


def print_table(report: dict[str, Any]) -> None:
    cost = report.get("cost", {})
    print(f"\n## {report['variant']}   worker {cost.get('img_per_s', '?')} img/s, "
          f"{cost.get('index_bytes_per_image', '?')} bytes/image")
    keys = ["source@1", "source@10", "verified_source@1", "verified_source@10", "precision", "recall",
            "verified_precision", "verified_recall"]
    for direction in report["directions"]:
        present = [k for k in keys if k in next(iter(direction["rows"].values()))]
        print(f"{direction['label']}   threshold {next(iter(direction['rows'].values()))['threshold']}")
        print(f"| edit | {' | '.join(present)} |")
        print("|---" * (len(present) + 1) + "|")
        for edit_name, row in direction["rows"].items():
            print(f"| {edit_name} | {' | '.join(f'{row[k]:.3f}' for k in present)} |")


def fit(args: argparse.Namespace) -> None:
    """Fit the default model's centring mean on every photo of the corpus and write it beside the code."""
    chosen = recipe(DEFAULT_MODEL)
    settings = Settings.from_env(home=Path(".bucketlens"), runtime="onnx")
    photos = ensure_photos(args.photos)
    embedder = load_embedder(settings, custom=dataclasses.replace(chosen, centre=False))
    mean = embed_all(embedder, Decoded(), [p.path for p in photos], "gallery").mean(axis=0).astype(np.float32)
    path = fitted_path(chosen.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, mean, allow_pickle=False)
    print(f"wrote {path} ({path.stat().st_size} bytes) from {len(photos)} photos")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-process", action="store_true", help="compare descriptor variants without servers")
    parser.add_argument("--fit", action="store_true", help="write the default model's centring mean and stop")
    parser.add_argument("--variants", default="", help=f"in-process variants (default all: {', '.join(VARIANTS)})")
    parser.add_argument("--verify", default="lite0 gem+mirror+centre",
                        help="in-process variants also measured with spatial verification")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--cost-images", type=int, default=200, help="images timed for the worker's cost")
    parser.add_argument("--photos", type=Path, default=Path(".bucketlens/photos"))
    parser.add_argument("--home", type=Path, help="end to end: keep the bench stack in this folder, reuse it next time")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.fit:
        fit(args)
        return
    if args.in_process:
        result = run_in_process(args)
    else:
        from .quality_e2e import run_end_to_end

        result = run_end_to_end(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    previous[result["mode"]] = result
    args.out.write_text(json.dumps(previous, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
