"""Run the model with ONNX Runtime on CPU, from a graph exported once from the same torch weights.

The export is cached under the state folder, keyed by model and weights hash, so a new wheel re-exports.

``runtime=onnx-int8`` runs an int8 copy of that graph (static QDQ: per-channel int8 weights, uint8 activations),
made on first use from it and from the activation ranges fitted on real photos (``python -m bench.int8 --fit``,
``vision/fitted/<graph>.int8.json``): each ReLU6 is quantized with the convolution before it (ONNX Runtime then
folds the clip into the convolution's output range), and the stem and the first ``FLOAT_BLOCKS`` blocks stay in
float. On the quality corpus's photos it was not fitted on, its vectors are within cosine 0.997 of float32's on
average (0.994 at worst), it ranks the edited copies as float32 does (within a point), and it embeds 1.45x as fast
on one thread (a worker's whole pipeline 1.22x: bench/README.md, "int8 on CPU"), so it shares the model's name and
index with float32 workers. Not ``auto``'s choice: the issue makes it the default only if it wins on quality too,
and it ties (its labels: the same top-1 class for 94.5 % of images, float32's among its five for all).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bucketlens.settings import Settings

from .. import network
from ..models import Recipe
from . import FITTED, RecipeEmbedder, worker_processes

log = logging.getLogger(__name__)


def export(recipe: Recipe, path: Path) -> None:
    import torch

    net = network.build(recipe)
    sample = torch.zeros(1, 3, recipe.input_size, recipe.input_size)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    # The TorchScript exporter (dynamo=False) needs no onnxscript; its deprecation and constant-folding
    # notes are not actionable here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net, (sample,), str(tmp), input_names=["images"], output_names=["features", "probs"],
            dynamic_axes={"images": {0: "n"}, "features": {0: "n"}, "probs": {0: "n"}}, opset_version=17, dynamo=False,
        )
    os.replace(tmp, path)


# Most images per runtime call. On CPU a larger batch is no faster per image, but its activations grow ONNX
# Runtime's memory arena, which never shrinks: ~1 GB per process after a batch of 32, ~0.5 GB at 8 (bench/README.md).
CHUNK = 8


def intra_op_threads(settings: Settings) -> int:
    """``torch_threads``, or else this machine's cores shared among the worker's processes: each of
    ``worker_processes`` runs its own model, and more runtime threads than cores only contend
    (bench/README.md measures it)."""
    if settings.torch_threads:
        return settings.torch_threads
    return max(1, len(os.sched_getaffinity(0)) // worker_processes(settings))


FLOAT_BLOCKS = 4  # the stem and blocks 0-3 (high resolution, few channels) carry most of int8's error


def graph_name(recipe: Recipe) -> str:
    """Every recipe field the exported graph depends on (models that differ only after the network share it)."""
    return (f"{recipe.arch}-{recipe.input_size}-{recipe.pooling}{recipe.gem_p:g}-m{int(recipe.mirror)}"
            f"-{recipe.activation}-probs")


def exported(settings: Settings, recipe: Recipe) -> Path:
    """The float32 graph of ``recipe``, exported once into the state folder."""
    cache = Path(settings.home) / "models"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{graph_name(recipe)}-{network.weights_digest(recipe)}.onnx"
    if not path.exists():
        log.info("exporting %s to ONNX at %s (once)", recipe.name, path)
        export(recipe, path)
    return path


def int8_ranges_path(recipe: Recipe) -> Path:
    return FITTED / f"{graph_name(recipe)}.int8.json"


def quantize(source: Path, out: Path, calibration: Any = None, ranges: dict[str, list[float]] | None = None,
             float_blocks: int | None = FLOAT_BLOCKS, **options: Any) -> None:
    """An int8 copy of the float32 graph ``source`` at ``out``, calibrated on ``calibration`` (an ONNX Runtime
    ``CalibrationDataReader``) or given each activation's ``ranges`` (name -> [min, max]) as fitted before;
    ``options`` go to ``quantize_static`` (the bench tries others)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class One(CalibrationDataReader):  # with ranges given, the quantizer still wants one input to run
        def __init__(self, shape: list[int]) -> None:
            self.left = [{"images": np.zeros([1, *shape[1:]], np.float32)}]

        def get_next(self) -> dict[str, np.ndarray] | None:
            return self.left.pop() if self.left else None

    prepared = out.with_suffix(f".prepared{os.getpid()}")
    quant_pre_process(str(source), str(prepared))
    try:
        model = onnx.load(str(prepared))
        convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        early = [] if float_blocks is None else ["_conv_stem", *(f"_blocks.{b}/" for b in range(float_blocks))]
        if ranges is not None:
            weights = {i.name for i in model.graph.initializer}
            needed = {t for n in model.graph.node if n.op_type in ("Conv", "Clip") for t in (*n.input[:1], *n.output)}
            if missing := needed - weights - ranges.keys():  # another exporter's names: nothing to quantize them by
                raise ValueError(f"the fitted int8 ranges lack {len(missing)} of this graph's activations (e.g. "
                                 f"{min(missing)}): refit with `python -m bench.int8 --fit`, or run float32")
            options["extra_options"] = {"TensorQuantOverrides": {
                name: [{"rmin": np.float32(low), "rmax": np.float32(high)}] for name, (low, high) in ranges.items()}}
            calibration = One(shape)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        # The quantizer says each scale it widens at INFO on the root logger itself: 111 lines in a worker's log at
        # its first start (review 67). Its warnings pass; what other loggers say passes (a logger's filter sees only
        # its own records).
        root, quiet = logging.getLogger(), lambda record: record.levelno >= logging.WARNING
        root.addFilter(quiet)
        try:
            quantize_static(str(prepared), str(tmp), calibration, quant_format=QuantFormat.QDQ,
                            per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            op_types_to_quantize=options.pop("op_types_to_quantize", ["Conv", "Clip"]),
                            nodes_to_exclude=[c for c in convs if any(part in c for part in early)], **options)
        finally:
            root.removeFilter(quiet)
        os.replace(tmp, out)
    finally:
        prepared.unlink(missing_ok=True)


def int8_graph(settings: Settings, recipe: Recipe) -> Path:
    """The int8 copy of ``recipe``'s graph, made once from the fitted ranges and named by their digest (as the
    export is by the weights'), so ranges refitted in a later version make a new graph rather than reuse the old
    one; refuses ranges fitted on another export (the tensors are named by the exporter) rather than guess."""
    source = exported(settings, recipe)
    fitted = int8_ranges_path(recipe)
    if not fitted.exists():
        raise ValueError(f"runtime onnx-int8 needs the activation ranges fitted for {graph_name(recipe)} at {fitted}: "
                         "`python -m bench.int8 --fit`, or run float32 (runtime onnx)")
    text = fitted.read_bytes()
    saved = json.loads(text)
    if saved["export"] != source.name:
        raise ValueError(f"{fitted} was fitted on {saved['export']}, not on this export ({source.name}): refit with "
                         "`python -m bench.int8 --fit`, or run float32 (runtime onnx)")
    path = source.with_name(f"{source.stem}-int8-{hashlib.sha256(text).hexdigest()[:16]}.onnx")
    if path.exists():
        return path
    log.info("making the int8 graph of %s at %s (once)", recipe.name, path)
    quantize(source, path, ranges=saved["ranges"], float_blocks=saved["float_blocks"])
    return path


class OnnxEmbedder(RecipeEmbedder):
    def __init__(self, settings: Settings, recipe: Recipe) -> None:
        super().__init__(recipe, "cpu")
        path = int8_graph(settings, recipe) if settings.runtime == "onnx-int8" else exported(settings, recipe)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads(settings)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = [self._run(images[i : i + CHUNK]) for i in range(0, len(images), CHUNK)]
        return np.concatenate([f for f, _ in parts]), np.concatenate([p for _, p in parts])

    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
        features, probs = self.session.run(["features", "probs"], {"images": x})
        return np.asarray(features), np.asarray(probs)
