"""The classifier head's label space: the 1000 ImageNet-1k classes, in the head's output order.

``vision/data/imagenet-classes.tsv`` (index, WordNet 3.0 synset id, the class's ImageNet names) is generated once by
``python -m vision.labels`` from the data files in PyPI's ``timm`` wheel (downloaded with pip, read as a zip: timm is
never imported, it needs torchvision) and checked in. The head's order is the sorted list of synset ids; the test
suite checks it on photos whose class is known (tests/test_labels.py).
"""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

CLASSES_FILE = Path(__file__).resolve().parent / "data" / "imagenet-classes.tsv"
KEPT = 5  # labels kept per object: the head's five most probable classes
TIMM_SYNSETS = "timm/data/_info/imagenet_synsets.txt"
TIMM_LEMMAS = "timm/data/_info/imagenet_synset_to_lemma.txt"

Labels = tuple[tuple[int, float], ...]  # (class index, probability), most probable first


@dataclasses.dataclass(frozen=True)
class ImageNetClass:
    index: int
    synset: str  # WordNet 3.0 noun synset id, e.g. n02123045
    names: tuple[str, ...]  # ImageNet's names for the class, e.g. ("tabby", "tabby cat")

    @property
    def name(self) -> str:
        return self.names[0]


@functools.cache
def classes() -> tuple[ImageNetClass, ...]:
    rows = [line.split("\t") for line in CLASSES_FILE.read_text(encoding="utf-8").splitlines() if line]
    found = tuple(ImageNetClass(int(i), synset, tuple(names.split(", "))) for i, synset, names in rows)
    assert [c.index for c in found] == list(range(1000)), f"{CLASSES_FILE} must list classes 0..999 in order"
    return found


def top(probs: np.ndarray, k: int = KEPT) -> list[Labels]:
    """Each row's ``k`` most probable classes, most probable first (probabilities rounded to 4 places)."""
    best = np.argsort(-probs, axis=1)[:, :k]
    return [tuple((int(i), round(float(row[i]), 4)) for i in idx) for row, idx in zip(probs, best)]


def public(labels: Labels | None) -> list[dict[str, object]] | None:
    """Labels as the API shows them; None for an object indexed before labels existed."""
    if labels is None:
        return None
    table = classes()
    return [{"id": table[i].synset, "name": table[i].name, "score": p} for i, p in labels]


def encode(labels: Labels) -> str:
    """The stream's and snapshot's compact form: ``index:probability`` pairs, comma-separated."""
    return ",".join(f"{i}:{p:g}" for i, p in labels)


def decode(text: str) -> Labels:
    """Inverse of ``encode``; raises ValueError on anything else."""
    pairs = []
    for part in text.split(","):
        index, _, prob = part.partition(":")
        i, p = int(index), float(prob)
        if not (0 <= i < 1000 and 0.0 <= p <= 1.0):
            raise ValueError(f"bad label {part!r}")
        pairs.append((i, p))
    return tuple(pairs)


def generate(wheel: Path, out: Path = CLASSES_FILE) -> None:
    """Write the class table from a timm wheel's synset list (sorted = the head's order) and its lemma file."""
    with zipfile.ZipFile(wheel) as archive:
        synsets = archive.read(TIMM_SYNSETS).decode().split()
        lemmas = dict(line.split("\t", 1) for line in archive.read(TIMM_LEMMAS).decode().splitlines() if "\t" in line)
    if len(synsets) != 1000 or synsets != sorted(synsets):
        raise SystemExit(f"{TIMM_SYNSETS}: expected 1000 sorted synset ids, got {len(synsets)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f"{i}\t{s}\t{lemmas[s].strip()}\n" for i, s in enumerate(synsets)), encoding="utf-8")


def main(argv: Sequence[str] = ()) -> None:
    """Download the timm wheel (no dependencies, nothing installed) and regenerate the class table."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, "timm", *argv],
                       check=True)
        wheel = next(Path(tmp).glob("timm-*.whl"))
        generate(wheel)
        print(f"wrote {CLASSES_FILE} from {wheel.name}")


if __name__ == "__main__":
    main(sys.argv[1:])
