"""The limit: the best in-process throughput of decode + embed + local features on the benchmark's images.

No S3, no Redis, no Celery: bytes already in memory go through what the worker does to each image:
``vision.decode.decode_for`` (as the model's recipe says), the embedder the workers load
(``vision.embedders.load_embedder``) in the batches the workers see (``settings.batch_size``), and the local
features when the recipe keeps them.
The best of a few ways to use the machine's cores counts as the limit:

- ``serial``: one model, its runtime using every core; decode, then embed, batch after batch.
- ``pipelined``: the same model, with the next batch decoded in a second thread while this one is embedded.
- ``lanes``: one model per core (one runtime thread each), each lane decoding and embedding its own share;
  what ``worker_concurrency = cores`` with ``torch_threads = 1`` does in the workers.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from bucketlens.settings import Settings
from vision import local_features
from vision.decode import Decoded, decode_for
from vision.embedders import Embedder, load_embedder
from vision.models import Recipe

from .procs import CpuMeter


def _batches(blobs: Sequence[bytes], size: int) -> list[Sequence[bytes]]:
    return [blobs[start : start + size] for start in range(0, len(blobs), size)]


def decode_batch(recipe: Recipe, blobs: Sequence[bytes], max_pixels: int) -> list[Decoded]:
    return [decode_for(recipe, blob, max_pixels, local=True) for blob in blobs]


def local_bytes(recipe: Recipe, images: list[Decoded]) -> int:
    """Each image's local features, encoded as the worker stores them; returns their bytes."""
    count = recipe.local_count
    return sum(len(local_features.encode(local_features.views(i.gray, count))) for i in images if i.gray is not None)


def describe(embedder: Embedder, images: list[Decoded]) -> tuple[np.ndarray, int]:
    """What the worker does after decoding: the model on the batch, then each image's local features; returns
    the vectors and the bytes of those features."""
    vectors = embedder.embed(np.stack([image.pixels for image in images]))
    return vectors, local_bytes(embedder.recipe, images)


def serial(embedders: list[Embedder], blobs: Sequence[bytes], settings: Settings, bar: tqdm) -> None:
    for batch in _batches(blobs, settings.batch_size):
        describe(embedders[0], decode_batch(embedders[0].recipe, batch, settings.max_pixels))
        bar.update(len(batch))


def pipelined(embedders: list[Embedder], blobs: Sequence[bytes], settings: Settings, bar: tqdm) -> None:
    batches = _batches(blobs, settings.batch_size)
    with ThreadPoolExecutor(max_workers=1) as pool:
        recipe = embedders[0].recipe
        ahead = pool.submit(decode_batch, recipe, batches[0], settings.max_pixels)
        for i, batch in enumerate(batches):
            images = ahead.result()
            if i + 1 < len(batches):
                ahead = pool.submit(decode_batch, recipe, batches[i + 1], settings.max_pixels)
            describe(embedders[0], images)
            bar.update(len(batch))


def lanes(embedders: list[Embedder], blobs: Sequence[bytes], settings: Settings, bar: tqdm) -> None:
    lock = threading.Lock()

    def lane(j: int) -> None:
        for batch in _batches(blobs[j :: len(embedders)], settings.batch_size):
            describe(embedders[j], decode_batch(embedders[j].recipe, batch, settings.max_pixels))
            with lock:
                bar.update(len(batch))

    with ThreadPoolExecutor(max_workers=len(embedders)) as pool:
        list(pool.map(lane, range(len(embedders))))


Variant = Callable[[list[Embedder], Sequence[bytes], Settings, tqdm], None]


def measure_limit(settings: Settings, blobs: Sequence[bytes], cores: int,
                  only: Sequence[str] = ("serial", "pipelined", "lanes")) -> dict[str, object]:
    """Images per second of each variant (``only`` those) on ``blobs``; the best is ``limit_images_per_s``."""
    shared = dataclasses.replace(settings, torch_threads=settings.torch_threads or cores)
    single = [load_embedder(shared)]
    per_core = [load_embedder(dataclasses.replace(settings, torch_threads=1)) for _ in range(cores)]
    variants: dict[str, tuple[Variant, list[Embedder]]] = {
        "serial": (serial, single), "pipelined": (pipelined, single), "lanes": (lanes, per_core),
    }
    warm = decode_batch(single[0].recipe, blobs[: settings.batch_size], settings.max_pixels)
    rates: dict[str, float] = {}
    cpu: dict[str, object] = {}
    for name, (run, embedders) in ((name, variants[name]) for name in only):
        for embedder in embedders:  # the first full-size batch of a runtime is slower (allocations)
            describe(embedder, warm)
        with tqdm(total=len(blobs), unit="img", desc=f"limit: {name}", leave=False) as bar:
            meter = CpuMeter()
            run(embedders, blobs, settings, bar)
            rates[name] = len(blobs) / meter.elapsed()
            cpu[name] = meter.report(len(blobs))
    best = max(rates, key=lambda name: rates[name])
    return {"limit_images_per_s": rates[best], "limit_variant": best, "limit_variants": rates,
            "limit_cpu": cpu,
            "batch_size": settings.batch_size}
