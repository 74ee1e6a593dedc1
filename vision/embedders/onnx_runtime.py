"""Run the model with ONNX Runtime on CPU, from a graph exported once from the same torch weights.

The export is cached under the state folder, keyed by model and weights hash, so a new wheel re-exports.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bucketlens.settings import Settings

from .. import network
from ..models import Recipe
from . import RecipeEmbedder, worker_processes

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


class OnnxEmbedder(RecipeEmbedder):
    def __init__(self, settings: Settings, recipe: Recipe) -> None:
        super().__init__(recipe, "cpu")
        cache = Path(settings.home) / "models"
        cache.mkdir(parents=True, exist_ok=True)
        # The file name holds every recipe field the graph depends on, so an edited recipe re-exports.
        graph = (f"{recipe.arch}-{recipe.input_size}-{recipe.pooling}{recipe.gem_p:g}-m{int(recipe.mirror)}"
                 f"-{recipe.activation}-probs")
        path = cache / f"{graph}-{network.weights_digest(recipe)}.onnx"
        if not path.exists():
            log.info("exporting %s to ONNX at %s (once)", recipe.name, path)
            export(recipe, path)
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
