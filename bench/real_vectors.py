"""Real embeddings for the index benches, grown to any size.

The quality corpus (``bench/corpus.py``: 83 photos) and its edited copies (``bench/edits.py``: 9 edits x
``seeds``) are embedded once with the model the service runs and cached next to the photos
(``vectors-<model>-<seeds>.npz``), so a second run does not embed again. ``grow`` makes ``n`` vectors from them:
the real ones first, then perturbed copies of random real parents, each at a cosine drawn from ``COSINE`` to
its parent, so the synthetic rows crowd around real embeddings the way near-duplicates and similar photos do.

    .venv/bin/python -m bench.real_vectors        # embed (once) and print what is cached
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bucketlens.settings import Settings
from vision.decode import decode_for

from . import CACHE, ROOT
from .corpus import ensure_photos

PHOTOS = ROOT / ".bucketlens" / "photos"
COSINE = (0.85, 0.95)  # a synthetic vector's cosine to its real parent
BATCH = 32
MAX_PIXELS = 64_000_000


@dataclasses.dataclass
class RealVectors:
    vectors: np.ndarray  # (n, dim) float32, L2-normalised
    seeds: np.ndarray  # per row: the edit seed, -1 for an original photo

    def split(self, held_out_seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows to index, rows to query with): the edits of ``held_out_seed`` are never indexed."""
        held = self.seeds == held_out_seed
        return self.vectors[~held], self.vectors[held]


def load(settings: Settings, seeds: int = 4, folder: Path = PHOTOS) -> RealVectors:
    """The photos and ``seeds`` edited copies of each, embedded by ``settings.model`` (cached on disk)."""
    cache = folder / f"vectors-{settings.model}-{seeds}.npz"
    if cache.exists():
        with np.load(cache) as data:
            return RealVectors(data["vectors"], data["seeds"])
    from vision.embedders import load_embedder  # the model, only when there is something to embed

    from .quality import make_queries

    photos = ensure_photos(folder)
    edited = make_queries(photos, seeds, folder / "queries")
    paths = [p.path for p in photos] + [q.path for q in edited]
    row_seeds = np.array([-1] * len(photos) + [q.seed for q in edited], dtype=np.int16)
    embedder = load_embedder(settings)
    out = []
    for start in tqdm(range(0, len(paths), BATCH), desc="real vectors: embed", leave=False):
        pixels = np.stack([decode_for(embedder.recipe, p.read_bytes(), MAX_PIXELS).pixels
                           for p in paths[start : start + BATCH]])
        out.append(embedder.embed(pixels))
    vectors = np.concatenate(out).astype(np.float32)
    tmp = cache.with_name(cache.stem + ".tmp.npz")
    np.savez(tmp, vectors=vectors, seeds=row_seeds)
    tmp.replace(cache)
    return RealVectors(vectors, row_seeds)


def perturb(parents: np.ndarray, rng: np.random.Generator, cosine: tuple[float, float] = COSINE) -> np.ndarray:
    """One unit vector per parent row at a cosine drawn uniformly from ``cosine`` to it: the parent times c plus
    random noise orthogonal to it times sqrt(1 - c^2), so the cosine is exact and the row has norm 1."""
    noise = rng.standard_normal(parents.shape, dtype=np.float32)
    noise -= np.sum(noise * parents, axis=1, keepdims=True) * parents
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    c = rng.uniform(*cosine, size=(len(parents), 1)).astype(np.float32)
    out = c * parents + np.sqrt(1 - c * c) * noise
    return out / np.linalg.norm(out, axis=1, keepdims=True)  # float rounding only


class Grown:
    """``n`` vectors: the ``real`` rows first (as many as fit), then perturbed copies of random real rows. Rows are
    made a block at a time when read, each block from its own random stream, so a set of any size costs no memory
    and reads the same every time (5M x 1280 floats would be 25.6 GB)."""

    BLOCK = 10_000

    def __init__(self, real: np.ndarray, n: int, seed: int, cosine: tuple[float, float] = COSINE) -> None:
        self.real, self.n, self.seed, self.cosine = real, n, seed, cosine
        self.dim = real.shape[1]
        self._last: tuple[int, np.ndarray] | None = None  # the block read last (reads go block by block)

    def __len__(self) -> int:
        return self.n

    def block(self, b: int) -> np.ndarray:
        if self._last is not None and self._last[0] == b:
            return self._last[1]
        start, stop = b * self.BLOCK, min(self.n, (b + 1) * self.BLOCK)
        out = np.empty((stop - start, self.dim), dtype=np.float32)
        kept = max(0, min(stop, len(self.real)) - start)
        out[:kept] = self.real[start : start + kept]
        if kept < len(out):
            rng = np.random.default_rng((self.seed, b))
            out[kept:] = perturb(self.real[rng.integers(0, len(self.real), len(out) - kept)], rng, self.cosine)
        self._last = b, out
        return out

    def __getitem__(self, rows: slice | range | np.ndarray) -> np.ndarray:
        """The rows at these positions (a slice, a range or an array of positions), in that order."""
        if isinstance(rows, slice):
            rows = range(*rows.indices(self.n))
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        blocks = rows // self.BLOCK
        for b in np.unique(blocks):
            here = blocks == b
            out[here] = self.block(int(b))[rows[here] - b * self.BLOCK]
        return out


def grow(real: np.ndarray, n: int, seed: int, cosine: tuple[float, float] = COSINE) -> np.ndarray:
    """``Grown``'s ``n`` vectors, all in memory."""
    return Grown(real, n, seed, cosine)[:n]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.real_vectors", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="edited copies of each photo per edit (default 4)")
    args = parser.parse_args()
    real = load(Settings.from_env(home=CACHE), args.seeds)
    grown = grow(real.vectors, len(real.vectors) + 1000, 0)
    parents = real.vectors @ grown[len(real.vectors) :].T
    print(f"{len(real.vectors)} real vectors of dimension {real.vectors.shape[1]} "
          f"({int((real.seeds < 0).sum())} photos); synthetic cosine to the nearest real row: "
          f"{np.percentile(parents.max(axis=0), [0, 50, 100]).round(3).tolist()}")


if __name__ == "__main__":
    main()
