"""Embedders: *what* is computed (``efficientnet.py``) apart from *what runs it* (``torch_runtime``, ``onnx_runtime``).

``load_embedder(settings)`` picks the runtime: torch on CUDA when present, ONNX Runtime on CPU when installed
(measured faster there, see bench/README.md), eager torch otherwise.
"""

from __future__ import annotations

import logging
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


def load_embedder(settings: Settings) -> Embedder:
    """Load the model once for this process and warm it up."""
    from .torch_runtime import TorchEmbedder, pick_device

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


def _onnx_if_available() -> str:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnx"
