"""Embedders: *what* is computed (``efficientnet.py``) apart from *what runs it* (``torch_runtime``, ``onnx_runtime``).

``load_embedder(settings)`` picks the runtime: torch on CUDA when present, ONNX Runtime on CPU when installed
(measured faster there, see bench/README.md), eager torch otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Protocol

import numpy as np

from bucketlens.settings import Settings

log = logging.getLogger(__name__)


class Embedder(Protocol):
    model: str
    dim: int
    device: str

    def embed(self, images: np.ndarray) -> np.ndarray:
        """``(N, 224, 224, 3)`` uint8 RGB -> ``(N, dim)`` float32, L2-normalised rows."""
        ...


def load_embedder(settings: Settings, model: str | None = None) -> Embedder:
    """Load ``model`` (default: ``settings.model``) once for this process and warm it up."""
    from .torch_runtime import TorchEmbedder, pick_device

    if model is not None and model != settings.model:
        settings = dataclasses.replace(settings, model=model)
    device = pick_device(settings.device)
    runtime = settings.runtime
    if runtime == "auto":
        runtime = "torch" if device == "cuda" else _onnx_if_available()
    if runtime == "onnx":
        from .onnx_runtime import OnnxEmbedder

        embedder: Embedder = OnnxEmbedder(settings)
    else:
        embedder = TorchEmbedder(settings, device)
    embedder.embed(np.zeros((1, 224, 224, 3), dtype=np.uint8))  # warm-up
    log.info("embedder ready: %s on %s (%s)", embedder.model, embedder.device, type(embedder).__name__)
    return embedder


def worker_processes(settings: Settings) -> int:
    """Processes per worker: ``worker_concurrency``, or by default one per core on CPU (each its own model on one
    runtime thread: measured fastest, bench/README.md) and one on CUDA (the GPU batches; a second copy of the
    model would only compete for it)."""
    if settings.worker_concurrency > 0:
        return settings.worker_concurrency
    from .torch_runtime import pick_device

    return 1 if pick_device(settings.device) == "cuda" else len(os.sched_getaffinity(0))


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
