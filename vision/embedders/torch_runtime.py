"""Run the model with torch: CUDA (half precision, batched) when present, else CPU."""

from __future__ import annotations

import numpy as np
import torch

from bucketlens.settings import Settings

from .. import network
from ..models import Recipe
from . import Finisher


def pick_device(wanted: str) -> str:
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("BUCKETLENS_DEVICE=cuda but torch sees no CUDA device")
    return wanted


class TorchEmbedder:
    def __init__(self, settings: Settings, recipe: Recipe, device: str) -> None:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.recipe = recipe
        self.device = device
        self.dtype = torch.float16 if device == "cuda" and settings.half else torch.float32
        self.net = network.build(recipe).to(device=device, dtype=self.dtype)
        self.finish = Finisher(recipe)

    @property
    def model(self) -> str:
        return self.recipe.name

    @property
    def dim(self) -> int:
        return self.recipe.dim

    def embed(self, images: np.ndarray) -> np.ndarray:
        size = self.recipe.input_size
        assert images.ndim == 4 and images.shape[1:] == (size, size, 3), f"bad batch shape {images.shape}"
        batch = torch.from_numpy(np.ascontiguousarray(images))
        if self.device == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode():
            features = self.net(batch.permute(0, 3, 1, 2).to(self.dtype)).float()
        return self.finish(features.cpu().numpy())
