"""Run the model with torch: CUDA (half precision, batched) when present, else CPU."""

from __future__ import annotations

import numpy as np
import torch

from bucketlens.settings import Settings

from . import efficientnet


def pick_device(wanted: str) -> str:
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("BUCKETLENS_DEVICE=cuda but torch sees no CUDA device")
    return wanted


class TorchEmbedder:
    def __init__(self, settings: Settings, device: str) -> None:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.model = settings.model
        self.dim = efficientnet.DIMS[settings.model]
        self.device = device
        self.dtype = torch.float16 if device == "cuda" and settings.half else torch.float32
        self.net = efficientnet.build(settings.model).to(device=device, dtype=self.dtype)

    def embed(self, images: np.ndarray) -> np.ndarray:
        assert images.ndim == 4 and images.shape[1:] == (224, 224, 3), f"bad batch shape {images.shape}"
        batch = torch.from_numpy(np.ascontiguousarray(images))
        if self.device == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode():
            x = batch.permute(0, 3, 1, 2).to(self.dtype)
            features = self.net(x).float()
            features = torch.nn.functional.normalize(features, dim=1)
        return features.cpu().numpy().astype(np.float32, copy=False)
