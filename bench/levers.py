"""In-process levers, each measured on the bench's images: ``python -m bench.levers [--images N]``.

- JPEG draft mode: ``vision.decode.decode`` (draft on) against the same steps without ``draft``.
- Runtime: ONNX Runtime against eager torch on CPU, same weights, same batches.
- Model batch size and runtime threads: ONNX Runtime at batch 1, 8, 32 with 1 thread and with every core.

Writes ``bench/results/levers.json`` and prints one line per measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from bucketlens.settings import Settings
from vision.decode import decode
from vision.embedders.onnx_runtime import OnnxEmbedder
from vision.embedders.torch_runtime import TorchEmbedder

from . import CACHE, RESULTS
from .images import ensure_images
from .procs import cores, load_average


def decode_without_draft(data: bytes, size: int = 224) -> np.ndarray:
    """``decode``'s steps for an RGB JPEG, minus draft mode: full-size decode, then resize."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0),
                      dtype=np.uint8)


def rate(work: Callable[[], int], seconds: float = 3.0) -> tuple[float, float]:
    """(items per second, CPU ms per item) of ``work`` (which returns how many items it did), repeated."""
    work()  # warm
    done, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        done += work()
    return done / (time.perf_counter() - wall), (time.process_time() - cpu) * 1000 / done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.levers", description=__doc__)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=RESULTS / "levers.json")
    args = parser.parse_args(argv)
    blobs = [path.read_bytes() for path in ensure_images(args.cache, args.images)]
    pixels = np.stack([decode(blob, 64_000_000) for blob in blobs])
    settings = Settings(home=args.cache)
    results: dict[str, dict[str, float]] = {}

    def record(name: str, measured: tuple[float, float]) -> None:
        results[name] = {"per_s": round(measured[0], 1), "cpu_ms_each": round(measured[1], 2)}
        print(f"{name:44} {measured[0]:8.1f} /s  {measured[1]:6.2f} ms CPU each", flush=True)

    record("decode, draft mode (vision.decode)", rate(lambda: len([decode(b, 64_000_000) for b in blobs])))
    record("decode, no draft", rate(lambda: len([decode_without_draft(b) for b in blobs])))

    def embed_all(embedder: OnnxEmbedder | TorchEmbedder, batch: int) -> Callable[[], int]:
        return lambda: sum(len(embedder.embed(pixels[i : i + batch])) for i in range(0, len(pixels), batch))

    all_cores = dataclasses.replace(settings, torch_threads=cores())
    record(f"embed, torch eager, {cores()} threads, batch 32", rate(embed_all(TorchEmbedder(all_cores, "cpu"), 32)))
    for threads in sorted({1, cores()}):
        onnx = OnnxEmbedder(dataclasses.replace(settings, torch_threads=threads))
        for batch in (1, 8, 32):
            record(f"embed, ONNX Runtime, {threads} thread(s), batch {batch}", rate(embed_all(onnx, batch)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cores": cores(), "images": args.images, "load_average": load_average(),
                                    "levers": results}, indent=2) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
