"""Embedders: *what* is computed (``vision/models.py``, ``vision/network.py``) apart from *what runs it*
(``torch_runtime``, ``onnx_runtime``).

``load_embedder(settings)`` picks the runtime: torch on CUDA when present, ONNX Runtime on CPU when installed
(measured faster there, see bench/README.md), eager torch otherwise; ``onnx-int8`` when asked for (CPU).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from bucketlens.settings import Settings

from .. import labels
from ..labels import Labels
from ..models import Recipe, recipe

log = logging.getLogger(__name__)
FITTED = Path(__file__).resolve().parent.parent / "fitted"


class Embedder(Protocol):
    recipe: Recipe
    device: str

    @property
    def model(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, images: np.ndarray) -> np.ndarray:
        """``(N, size, size, 3)`` uint8 RGB -> ``(N, dim)`` float32, L2-normalised rows."""
        ...

    def describe(self, images: np.ndarray) -> tuple[np.ndarray, list[Labels | None]]:
        """The vectors of ``embed`` and each image's most probable ImageNet classes (``vision/labels.py``; None
        where the recipe's graph has no meaningful head)."""
        ...


class Finisher:
    """The descriptor steps after the network: centring on the fitted mean (if the recipe says so), L2 norm."""

    def __init__(self, recipe: Recipe, centre: np.ndarray | None = None) -> None:
        if recipe.centre and centre is None:
            path = fitted_path(recipe.name)
            if not path.exists():
                raise ValueError(f"model {recipe.name!r} needs its fitted mean {path}: `python -m bench.quality --fit`")
            centre = np.load(path, allow_pickle=False)
        self.centre = centre.astype(np.float32) if centre is not None else None

    def __call__(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float32)
        if self.centre is not None:
            features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12) - self.centre
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        return (features / np.maximum(norms, 1e-12)).astype(np.float32)


class RecipeEmbedder:
    """What both runtimes share: the recipe they run, its name and dimension, the input check, the finish,
    the labels; a runtime only runs the network (``run``)."""

    def __init__(self, recipe: Recipe, device: str) -> None:
        self.recipe = recipe
        self.device = device
        self.finish = Finisher(recipe)

    @property
    def model(self) -> str:
        return self.recipe.name

    @property
    def dim(self) -> int:
        return self.recipe.dim

    def embed(self, images: np.ndarray) -> np.ndarray:
        return self.describe(images)[0]

    def describe(self, images: np.ndarray) -> tuple[np.ndarray, list[Labels | None]]:
        size = self.recipe.input_size
        assert images.ndim == 4 and images.shape[1:] == (size, size, 3), f"bad batch shape {images.shape}"
        features, probs = self.run(images)
        found: list[Labels | None] = list(labels.top(probs)) if self.recipe.labels else [None] * len(images)
        return self.finish(features), found

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The network on a checked batch: (pooled features, class probabilities), float32."""
        raise NotImplementedError


def fitted_path(model: str) -> Path:
    return FITTED / f"{model}.npy"


def load_embedder(settings: Settings, model: str | None = None, custom: Recipe | None = None) -> Embedder:
    """Load ``model`` (default: ``settings.model``; ``custom``: an unregistered recipe, for the quality bench) once
    for this process and warm it up."""
    from .torch_runtime import TorchEmbedder, pick_device

    chosen = custom or recipe(model or settings.model)
    device = pick_device(settings.device)
    runtime = settings.runtime
    if runtime == "auto":
        runtime = "torch" if device == "cuda" else _onnx_if_available()
    if runtime in ("onnx", "onnx-int8"):
        from .onnx_runtime import OnnxEmbedder

        embedder: Embedder = OnnxEmbedder(settings, chosen)
    else:
        embedder = TorchEmbedder(settings, chosen, device)
    size = chosen.input_size
    embedder.embed(np.zeros((1, size, size, 3), dtype=np.uint8))  # warm-up
    log.info("embedder ready: %s on %s (%s)", embedder.model, embedder.device, type(embedder).__name__)
    return embedder


def worker_processes(settings: Settings) -> int:
    """Processes per worker: ``worker_concurrency``, or by default one per core, each with its own model. On CPU
    each runs one runtime thread (measured fastest, bench/README.md). On CUDA too: decoding and local features on
    the CPU bind, not the GPU; on a 16-core H200 machine one process embedded 42 img/s, 8 processes 245, 15
    processes 344 (bench/results/gpu-h200-own.json). Each holds a CUDA context: set ``worker_concurrency`` lower on
    a GPU with little memory."""
    if settings.worker_concurrency > 0:
        return settings.worker_concurrency
    return len(os.sched_getaffinity(0))


class Embedders:
    """One loaded embedder per model, each loaded on first use: a rebuild may switch models, and during it
    the serving and the shadow generation are embedded with different ones."""

    def __init__(self, settings: Settings, preloaded: Embedder | None = None) -> None:
        self.settings = settings
        self._loaded: dict[str, Embedder] = {preloaded.model: preloaded} if preloaded is not None else {}
        self._lock = threading.Lock()

    def get(self, model: str) -> Embedder:
        with self._lock:
            if model not in self._loaded:
                self._loaded[model] = load_embedder(self.settings, model)
            return self._loaded[model]

    def loaded(self, model: str) -> bool:
        return model in self._loaded


def _onnx_if_available() -> str:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnx"
