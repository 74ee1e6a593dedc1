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
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from bucketlens.settings import Settings
from index_service.verify import BY_MATCHES, CANDIDATES, rank_key
from vision import local_features
from vision.decode import decode_for
from vision.embedders import Embedder, Finisher, fitted_path, load_embedder
from vision.models import DEFAULT_MODEL, RECIPES, Recipe

from . import RESULTS
from .corpus import Photo, ensure_photos
from .edits import EDITS, edit
from .limit import decode_batch, describe
from .quality_metrics import evaluate, fit_threshold, pairs, source_at, split_families

log = logging.getLogger(__name__)
MAX_PIXELS = 64_000_000
BASE = RECIPES["efficientnet-lite0"]
SHIPPED = RECIPES[DEFAULT_MODEL]
VARIANTS: dict[str, Recipe] = {
    "lite0 mean (today)": BASE,
    "lite0 mean+mirror": dataclasses.replace(BASE, mirror=True),
    "lite0 gem": dataclasses.replace(BASE, pooling="gem"),
    "lite0 gem+mirror": dataclasses.replace(BASE, pooling="gem", mirror=True),
    "lite0 gem+mirror+centre": dataclasses.replace(SHIPPED, trim_borders=False, local_features=False),
    f"{SHIPPED.name} (shipped: gem+mirror+centre+trim)": dataclasses.replace(SHIPPED, local_features=False),
    "lite1 gem+mirror+centre+trim": dataclasses.replace(SHIPPED, arch="efficientnet-lite1", input_size=240,
                                                         local_features=False),
    # Cheaper workers (cost against quality): smaller local features, no mirror pass of the network.
    "lite0-copy-v2-fast (ORB 384 px 300)": dataclasses.replace(RECIPES["lite0-copy-v2-fast"], local_features=False),
    "copy-v2 no mirror pass": dataclasses.replace(SHIPPED, mirror=False),
    "copy-v2 no mirror pass ORB 384 px 300": dataclasses.replace(SHIPPED, mirror=False, local_side=384,
                                                                 local_count=300),
    # The network as trained (ReLU6; the first builds ran swish in its place: vision/models.py).
    "lite0 mean relu6": dataclasses.replace(BASE, activation="relu6"),
    "lite0-copy-v3 (relu6: gem+mirror+centre+trim)": dataclasses.replace(RECIPES["lite0-copy-v3"],
                                                                          local_features=False),
}


@dataclasses.dataclass
class Query:
    photo: Photo
    edit: str
    seed: int
    path: Path


def make_queries(photos: Sequence[Photo], seeds: int, folder: Path, edits: Iterable[str] = EDITS,
                 edit: Callable[[str, Image.Image, int], bytes] = edit) -> list[Query]:
    """Every photo x every one of ``edits`` x seed, written once as files by ``edit`` (the end-to-end mode uploads
    the same bytes; the held-out check makes its own edits)."""
    queries = [Query(p, e, s, folder / f"{e}-{s}" / p.path.name) for e in edits for s in range(seeds) for p in photos]
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
    """Each file decoded once per way of decoding (input size, border trimming): pixels, and the ORB features of
    the image and of its mirror."""

    def __init__(self) -> None:
        self._pixels: dict[tuple[Path, int, bool], np.ndarray] = {}
        self._views: dict[tuple[Path, bool, int, int], list[local_features.Features]] = {}

    def pixels(self, paths: Sequence[Path], recipe_: Recipe) -> np.ndarray:
        keys = [(p, recipe_.input_size, recipe_.trim_borders) for p in paths]
        for key in keys:
            if key not in self._pixels:
                self._pixels[key] = decode_for(recipe_, key[0].read_bytes(), MAX_PIXELS).pixels
        return np.stack([self._pixels[key] for key in keys])

    def views(self, path: Path, recipe_: Recipe) -> list[local_features.Features]:
        key = (path, recipe_.trim_borders, recipe_.local_side, recipe_.local_count)
        if key not in self._views:
            gray = decode_for(recipe_, path.read_bytes(), MAX_PIXELS, local=True).gray
            assert gray is not None
            self._views[key] = local_features.views(gray, recipe_.local_count)
        return self._views[key]


def embed_all(embedder: Embedder, decoded: Decoded, paths: Sequence[Path], label: str) -> np.ndarray:
    out = []
    for start in tqdm(range(0, len(paths), 64), desc=f"embed {label}", leave=False):
        out.append(embedder.embed(decoded.pixels(paths[start : start + 64], embedder.recipe)))
    return np.concatenate(out)


def verify_top(scores: np.ndarray, query_paths: Sequence[Path], gallery_paths: Sequence[Path], decoded: Decoded,
               recipe_: Recipe) -> np.ndarray:
    """Consistent matches of each query with its global top ``CANDIDATES`` (-1 elsewhere: not verified), as the
    service verifies: the query and its mirror against the stored object's own features."""
    order = np.argsort(-scores, axis=1)[:, :CANDIDATES]
    for path in tqdm({*query_paths, *gallery_paths}, desc="ORB", leave=False):  # extract before the pool matches
        decoded.views(path, recipe_)

    def verify(qi: int) -> list[int]:
        views = decoded.views(query_paths[qi], recipe_)
        return [local_features.best_inliers(views, decoded.views(gallery_paths[g], recipe_)[0]) for g in order[qi]]

    counts = np.full(scores.shape, -1, dtype=np.int32)
    with ThreadPoolExecutor(2) as pool:  # OpenCV matches without the GIL
        for qi, found in enumerate(pool.map(verify, range(len(query_paths)))):
            counts[qi, order[qi]] = found
    return counts


def verified_order(scores: np.ndarray, counts: np.ndarray, min_matches: int, by_matches: bool = BY_MATCHES
                   ) -> np.ndarray:
    """The service's order (``index_service.verify.rank_key``) for every query."""
    out = []
    for row_scores, row_counts in zip(scores, counts):
        keys = [rank_key(float(s), int(c) if c >= 0 else None, min_matches, by_matches)
                for s, c in zip(row_scores, row_counts)]
        out.append(sorted(range(len(keys)), key=keys.__getitem__))
    return np.asarray(out)


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
        fit_families = [queries[i].photo.family for i in fit_mild]
        fit_scores = q[fit_mild] @ g.T
        threshold = fit_threshold(*pairs(fit_scores, fit_families, families_g))
        gallery_paths = [p.path for p in photos]
        if verify:  # the fewest consistent matches that mean "a copy" at 99 % precision on the fitting half
            fit_counts = verify_top(fit_scores, [queries[i].path for i in fit_mild], gallery_paths, decoded, recipe_)
            min_matches = max(4, int(fit_threshold(*pairs(fit_counts.astype(np.float64), fit_families, families_g))))
        rows = {}
        for edit_name in EDITS:
            idx = [i for i, x in enumerate(queries) if x.photo.family in eval_half and x.edit == edit_name]
            scores = q[idx] @ g.T
            sources = [queries[i].photo.family for i in idx]
            row: dict[str, Any] = _ranked_metrics(np.argsort(-scores, axis=1), families_g, sources, "")
            decision = evaluate(*pairs(scores, sources, families_g), threshold)
            row.update(threshold=round(threshold, 4), precision=round(decision.precision, 4),
                       recall=round(decision.recall, 4))
            if verify:
                counts = verify_top(scores, [queries[i].path for i in idx], gallery_paths, decoded, recipe_)
                for label_, m, claim in (("verified_", local_features.MIN_INLIERS, local_features.COPY_MATCHES),
                                         ("fitted_", min_matches, min_matches)):
                    row.update(_ranked_metrics(verified_order(scores, counts, m), families_g, sources, label_))
                    decision = evaluate(*pairs(counts.astype(np.float64), sources, families_g), claim)
                    row.update({f"{label_}min_matches": m, f"{label_}precision": round(decision.precision, 4),
                                f"{label_}recall": round(decision.recall, 4)})
                row["sweep"] = {  # source@1 by the least matches that verify, and the order among verified ones
                    f"{'matches' if by else 'score'}@{m}": _ranked_metrics(verified_order(scores, counts, m, by),
                                                                            families_g, sources, "")["source@1"]
                    for m in (10, 15, 20, 25, 30, 40) for by in (True, False)}
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
    started = time.perf_counter()
    extra = sum(describe(embedder, decode_batch(recipe_, blobs[i : i + 8], MAX_PIXELS))[1]  # as bench.limit does
                for i in range(0, len(blobs), 8))
    elapsed = time.perf_counter() - started
    return {"img_per_s": round(len(blobs) / elapsed, 1),
            "index_bytes_per_image": recipe_.dim * 4 + round(extra / len(blobs))}


def run_in_process(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings.from_env(home=Path(".bucketlens"), runtime="onnx", worker_concurrency=1)
    photos = ensure_photos(args.photos)
    queries = make_queries(photos, args.seeds, args.photos / "queries")
    decoded = Decoded()
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    results: list[dict[str, Any]] = []
    cost_sample = [x.path for x in queries[: args.cost_images]]
    today = worker_cost(settings, BASE, cost_sample)  # the first build's worker: the baseline of every cost ratio
    summary = {"mode": "in-process", "photos": len(photos), "families": len({p.family for p in photos}),
               "queries": len(queries), "seeds": args.seeds, "today_worker": today, "variants": results}
    for name in names:
        verify = name in args.verify.split(",")
        variant = dataclasses.replace(VARIANTS[name], local_features=verify)
        embedder = load_embedder(settings, custom=dataclasses.replace(variant, centre=False))
        g = embed_all(embedder, decoded, [p.path for p in photos], f"{name}: gallery")
        q = embed_all(embedder, decoded, [x.path for x in queries], f"{name}: queries")
        report = evaluate_variant(name, g, q, variant, photos, queries, decoded, verify)
        report["cost"] = worker_cost(settings, variant, cost_sample)
        report["cost"]["vs_today"] = round(report["cost"]["img_per_s"] / today["img_per_s"], 3)
        results.append(report)
        print_table(report)
        save(args.out, summary)  # after each variant: a long run interrupted keeps what it measured
    return summary


def print_table(report: dict[str, Any]) -> None:
    cost = report.get("cost", {})
    print(f"\n## {report['variant']}   worker {cost.get('img_per_s', '?')} img/s ({cost.get('vs_today', '?')} x "
          f"today's), {cost.get('index_bytes_per_image', '?')} bytes/image")
    keys = ["source@1", "source@10", "precision", "recall", "verified_source@1", "verified_source@10",
            "verified_precision", "verified_recall", "fitted_min_matches", "fitted_source@1", "fitted_precision",
            "fitted_recall"]
    for direction in report["directions"]:
        present = [k for k in keys if k in next(iter(direction["rows"].values()))]
        print(f"{direction['label']}   threshold {next(iter(direction['rows'].values()))['threshold']}")
        print(f"| edit | {' | '.join(present)} |")
        print("|---" * (len(present) + 1) + "|")
        for edit_name, row in direction["rows"].items():
            print(f"| {edit_name} | {' | '.join(f'{row[k]:.3f}' for k in present)} |")


def fit(args: argparse.Namespace) -> None:
    """Fit each centred model's mean on every photo of the corpus and write it beside the code."""
    settings = Settings.from_env(home=Path(".bucketlens"), runtime="onnx")
    photos = ensure_photos(args.photos)
    decoded = Decoded()
    for chosen in [r for r in RECIPES.values() if r.centre]:
        embedder = load_embedder(settings, custom=dataclasses.replace(chosen, centre=False))
        mean = embed_all(embedder, decoded, [p.path for p in photos], chosen.name).mean(axis=0).astype(np.float32)
        path = fitted_path(chosen.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, mean, allow_pickle=False)
        print(f"wrote {path} ({path.stat().st_size} bytes) from {len(photos)} photos")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-process", action="store_true", help="compare descriptor variants without servers")
    parser.add_argument("--fit", action="store_true", help="write each centred model's mean and stop")
    parser.add_argument("--variants", default="", help=f"in-process variants (default all: {', '.join(VARIANTS)})")
    parser.add_argument("--verify", default=f"{SHIPPED.name} (shipped: gem+mirror+centre+trim)",
                        help="in-process variants also measured with spatial verification")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--cost-images", type=int, default=200, help="images timed for the worker's cost")
    parser.add_argument("--photos", type=Path, default=Path(".bucketlens/photos"))
    parser.add_argument("--home", type=Path, help="end to end: keep the bench stack in this folder, reuse it next time")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    parser.add_argument("--table", action="store_true", help="print the tables of --out's results and stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.table:
        print(summary(json.loads(args.out.read_text())))
        return
    if args.fit:
        fit(args)
        return
    if args.in_process:
        result = run_in_process(args)
    else:
        from .quality_e2e import run_end_to_end

        result = run_end_to_end(args)
    save(args.out, result)
    print(f"\nwrote {args.out}")


def summary(results: dict[str, Any]) -> str:
    """Markdown tables of a results file: per variant (in-process) and per edit (end to end); each figure is the
    mean of the two directions (fit on one half of the families, evaluated on the other)."""

    def mean(directions: list[dict[str, Any]], edit_name: str, key: str) -> float:
        return float(np.mean([d["rows"][edit_name][key] for d in directions]))

    lines = []
    if "in-process" in results:
        lines += ["| variant | " + " | ".join(EDITS) + " | worker vs today | bytes/image |",
                  "|---" * (len(EDITS) + 3) + "|"]
        for v in results["in-process"]["variants"]:
            cost = v.get("cost", {})
            for key, label in (("source@1", ""), ("verified_source@1", " + verification")):
                if key in v["directions"][0]["rows"][EDITS[0]]:
                    cells = " | ".join(f"{mean(v['directions'], e, key):.3f}" for e in EDITS)
                    lines.append(f"| {v['variant']}{label} | {cells} | {cost.get('vs_today', '')} | "
                                 f"{cost.get('index_bytes_per_image', '')} |")
    if "end-to-end" in results:
        e2e = results["end-to-end"]
        keys = ["source@1", "source@10", "threshold", "precision", "recall", "verified_precision",
                "verified_recall", "query_p50_ms"]
        lines += ["", f"End to end ({e2e['model']}, {e2e['queries']} queries):", "",
                  "| edit | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for e in EDITS:
            lines.append(f"| {e} | " + " | ".join(f"{mean(e2e['directions'], e, k):.3f}" for k in keys) + " |")
    return "\n".join(lines)


def save(path: Path, result: dict[str, Any]) -> None:
    """Keep one result per mode in ``path`` (in-process and end to end live side by side)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous[result["mode"]] = result
    path.write_text(json.dumps(previous, indent=1))


if __name__ == "__main__":
    main()
