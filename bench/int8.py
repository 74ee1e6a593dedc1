"""``python -m bench.int8``: static int8 quantization of the default model's ONNX graph, against float32.

QDQ format, per-channel int8 weights, uint8 activations calibrated on the quality corpus's even-numbered gallery
photos and evaluated on the odd ones (real photos, never both roles). For each calibration variant: the finished
vectors' cosine to float32's for the same image (the issue's bar: >= 0.99), the classifier's top-1 agreement, and
img/s on one ONNX Runtime thread in batches of 8 (the fastest of three passes). Writes ``bench/results/int8.json``.

The first recipe (2026-11-30) quantized the convolutions alone and its vectors sat at cosine ~0.75 from float32's:
ONNX Runtime quantizes a convolution's output over its whole calibrated range (the stem's: -85..86, 0.68 a step)
unless the ReLU6 after it (a ``Clip``) is quantized too, which folds the clip into it ([0, 6], 0.024 a step). With
``Clip`` among the quantized types the vectors reach cosine 0.98, and 0.997 with the stem and the first four blocks
(the high-resolution, few-channel layers) left in float (bench/README.md, "int8 on CPU").

``--quality``: the issue's second bar, ``make quality``'s global ranking (source@1 per edit, in-process, no
verification) with the int8 graph of a variant (``--variant``) against float32's: each direction's graph is
calibrated on that direction's fitting half of the gallery, and only its evaluation half's queries are scored.
Writes ``bench/results/int8-quality.json``.

``--limit``: what a CPU worker gains, the in-process limit (decode, embed, local features: ``bench.limit``'s serial
variant) on one core with one runtime thread, float32 and int8 in turn, twice. Writes ``bench/results/int8-limit.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
from onnxruntime.quantization.shape_inference import quant_pre_process

from bucketlens.settings import Settings
from vision.decode import decode_for
from vision.embedders import Finisher
from vision.embedders.onnx_runtime import FLOAT_BLOCKS, exported, int8_ranges_path, quantize
from vision.models import DEFAULT_MODEL, recipe

from . import RESULTS
from .corpus import ensure_photos
from .quality import Decoded, evaluate_variant, make_queries
from .quality_metrics import split_families

RELU6 = ["Conv", "Clip"]  # each ReLU6 folded into the convolution before it
VARIANTS: dict[str, dict[str, Any]] = {
    "convolutions only (the first recipe)": {"op_types_to_quantize": ["Conv"]},
    "convolutions and ReLU6": {"op_types_to_quantize": RELU6},
    "convolutions and ReLU6, percentile 99.999": {"op_types_to_quantize": RELU6,
                                                  "calibrate_method": CalibrationMethod.Percentile},
    "convolutions and ReLU6, stem and blocks 0-1 in float": {"op_types_to_quantize": RELU6, "float_blocks": 2},
    "convolutions and ReLU6, stem and blocks 0-3 in float": {"op_types_to_quantize": RELU6, "float_blocks": 4},
}


class Reader(CalibrationDataReader):
    def __init__(self, images: np.ndarray) -> None:
        self.batches = iter([{"images": images[i : i + 1]} for i in range(len(images))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def describe(s: ort.InferenceSession, images: np.ndarray, finish: Finisher) -> tuple[np.ndarray, np.ndarray, float]:
    s.run(["features"], {"images": images[:8]})  # warm-up: the first run allocates
    rate = 0.0
    for _ in range(3):  # the fastest of three passes: the 2 cores are shared
        started = time.perf_counter()
        out = [s.run(["features", "probs"], {"images": images[i : i + 8]}) for i in range(0, len(images), 8)]
        rate = max(rate, len(images) / (time.perf_counter() - started))
    return finish(np.concatenate([o[0] for o in out])), np.concatenate([o[1] for o in out]), rate


def quantized(source: Path, out: Path, calibration: np.ndarray, options: dict[str, Any]) -> Path:
    """``source`` quantized as a variant's ``options`` say (``float_blocks``: the stem and that many first blocks
    left in float), calibrated on ``calibration`` (NCHW float32), as the int8 runtime makes its graph."""
    options = dict(options)
    quantize(source, out, Reader(calibration), float_blocks=options.pop("float_blocks", None), **options)
    return out


def fit(home: Path) -> None:
    """The activation ranges the int8 runtime quantizes with (``vision/fitted/<graph>.int8.json``), fitted on the
    gallery photos of the quality corpus's first half of families (``--quality``'s first direction)."""
    from onnxruntime.quantization.calibrate import create_calibrator

    chosen = recipe(DEFAULT_MODEL)
    source = exported(Settings(home=home, runtime="onnx"), chosen)
    photos = ensure_photos(home / "photos")
    half = split_families([p.family for p in photos])[0]
    images = Decoded().pixels([p.path for p in photos if p.family in half], chosen)
    prepared, augmented = home / "models" / "int8-fit-prepared.onnx", home / "models" / "int8-fit-augmented.onnx"
    quant_pre_process(str(source), str(prepared))
    calibrator = create_calibrator(prepared, RELU6, augmented_model_path=str(augmented))
    calibrator.collect_data(Reader(images.transpose(0, 3, 1, 2).astype(np.float32)))
    ranges = {name: [float(np.ravel(data.range_value[0])[0]), float(np.ravel(data.range_value[1])[0])]
              for name, data in calibrator.compute_data().items()}
    path = int8_ranges_path(chosen)
    path.write_text(json.dumps({"export": source.name, "float_blocks": FLOAT_BLOCKS, "photos": len(images),
                                "ranges": ranges}, indent=1) + "\n")
    print(f"{len(ranges)} activation ranges from {len(images)} photos -> {path}")


def features(s: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    """The graph's pooled features of NHWC uint8 ``images``, L2-normalised (not centred)."""
    out = [s.run(["features"], {"images": images[i : i + 8].transpose(0, 3, 1, 2).astype(np.float32)})[0]
           for i in range(0, len(images), 8)]
    rows = np.concatenate(out)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def quality(home: Path, seeds: int, variant: str) -> None:
    source = exported(Settings(home=home, runtime="onnx"), recipe(DEFAULT_MODEL))
    shipped = dataclasses.replace(recipe(DEFAULT_MODEL), local_features=False)
    photos = ensure_photos(home / "photos")
    queries = make_queries(photos, seeds, home / "photos" / "queries")
    decoded = Decoded()
    gallery = decoded.pixels([p.path for p in photos], shipped)
    asked = decoded.pixels([q.path for q in queries], shipped)
    families = [p.family for p in photos]
    halves = split_families(families)
    runs = {"float32": [features(session(source), x) for x in (gallery, asked)]}
    for direction, fit_half in enumerate(halves):  # each direction's graph calibrated on its own fitting half
        calibration = gallery[[f in fit_half for f in families]].transpose(0, 3, 1, 2).astype(np.float32)
        graph = quantized(source, home / "models" / f"int8-quality-{direction}.onnx", calibration,
                          VARIANTS[variant])
        runs[f"int8 {direction}"] = [features(session(graph), x) for x in (gallery, asked)]
    reports = {name: evaluate_variant(name, g, q, shipped, photos, queries, decoded, False)
               for name, (g, q) in runs.items()}
    result: dict[str, Any] = {"model": DEFAULT_MODEL, "int8": variant, "seeds": seeds, "edits": {}}
    for edit_name in reports["float32"]["directions"][0]["rows"]:
        float32 = np.mean([d["rows"][edit_name]["source@1"] for d in reports["float32"]["directions"]])
        int8 = np.mean([reports[f"int8 {i}"]["directions"][i]["rows"][edit_name]["source@1"] for i in (0, 1)])
        result["edits"][edit_name] = {"float32": round(float(float32), 4), "int8": round(float(int8), 4),
                                      "points": round(float(100 * (int8 - float32)), 1)}
        print(edit_name, result["edits"][edit_name])
    path = RESULTS / "int8-quality.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**previous, variant: result}, indent=2) + "\n")  # one entry per variant


def limit(home: Path) -> None:
    from .images import ensure_images
    from .limit import measure_limit

    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # one core, as the fair step gives the worker
    blobs = [path.read_bytes() for path in ensure_images(home / "bench-cache", 256)]
    rates: dict[str, list[float]] = {}
    for _ in range(2):
        for runtime in ("onnx", "onnx-int8"):
            settings = Settings.from_env(home=home, runtime=runtime, torch_threads=1, worker_concurrency=1)
            rate = measure_limit(settings, blobs, 1, only=("serial",))["limit_images_per_s"]
            rates.setdefault(runtime, []).append(round(float(rate), 1))  # type: ignore[arg-type]
    result = {"images": len(blobs), "img_per_s": rates,
              "int8_vs_float32": round(sum(rates["onnx-int8"]) / sum(rates["onnx"]), 2)}
    print(result)
    (RESULTS / "int8-limit.json").write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.int8", description=__doc__.splitlines()[0])
    parser.add_argument("--quality", action="store_true", help="make quality's ranking with int8 against float32")
    parser.add_argument("--fit", action="store_true", help="write the int8 runtime's activation ranges")
    parser.add_argument("--limit", action="store_true", help="a CPU worker's in-process limit, float32 and int8")
    parser.add_argument("--seeds", type=int, default=5, help="--quality: edited copies of each photo and edit")
    parser.add_argument("--variant", default="convolutions and ReLU6, stem and blocks 0-3 in float", choices=VARIANTS,
                        help="--quality: the int8 graph measured")
    args = parser.parse_args()
    home = Path(".bucketlens")
    if args.fit:
        fit(home)
        return
    if args.limit:
        limit(home)
        return
    if args.quality:
        quality(home, args.seeds, args.variant)
        return
    chosen = recipe(DEFAULT_MODEL)
    source = exported(Settings(home=home, runtime="onnx"), chosen)
    photos = [p.path for p in ensure_photos(home / "photos")]
    images = np.stack([decode_for(chosen, p.read_bytes(), 64_000_000).pixels for p in photos])
    images = images.transpose(0, 3, 1, 2).astype(np.float32)
    calibration, evaluation = images[::2], images[1::2]
    finish = Finisher(chosen)
    v32, p32, rate32 = describe(session(source), evaluation, finish)
    report: dict[str, Any] = {"model": DEFAULT_MODEL, "calibration_images": len(calibration),
                              "evaluation_images": len(evaluation), "float32_img_per_s": round(rate32, 1),
                              "variants": {}}
    for name, options in VARIANTS.items():
        out = quantized(source, home / "models" / f"int8-{len(report['variants'])}.onnx", calibration, options)
        v8, p8, rate8 = describe(session(out), evaluation, finish)
        cosine = (v32 * v8).sum(axis=1)
        report["variants"][name] = {"cosine_min": round(float(cosine.min()), 4),
                                    "cosine_mean": round(float(cosine.mean()), 4),
                                    "top1_agreement": round(float((p32.argmax(1) == p8.argmax(1)).mean()), 3),
                                    "img_per_s": round(rate8, 1), "vs_float32": round(rate8 / rate32, 2)}
        print(name, report["variants"][name])
    (RESULTS / "int8.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
