"""``python -m bench``: how fast bucketlens is on the local stack, against the in-process limit and the old design."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".bucketlens" / "bench-cache"  # the image set and the exported model, kept between runs
RESULTS = ROOT / "bench" / "results"  # git-ignored, except the reference result committed on purpose
