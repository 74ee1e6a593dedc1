"""Run the model with torch: CUDA (half precision, batched) when present, else CPU."""

from __future__ import annotations

import numpy as np
import torch

from bucketlens.settings import Settings

from .. import network
from ..models import Recipe
from . import RecipeEmbedder


def pick_device(wanted: str) -> str:
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("BUCKETLENS_DEVICE=cuda but torch sees no CUDA device")
    return wanted


class TorchEmbedder(RecipeEmbedder):
    def __init__(self, settings: Settings, recipe: Recipe, device: str) -> None:
        super().__init__(recipe, device)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.dtype = torch.float16 if device == "cuda" and settings.half else torch.float32
        self.net = network.build(recipe).to(device=device, dtype=self.dtype)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = torch.from_numpy(np.ascontiguousarray(images))
        if self.device == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode():
            features, probs = self.net(batch.permute(0, 3, 1, 2).to(self.dtype))
        return features.float().cpu().numpy(), probs.float().cpu().numpy()
