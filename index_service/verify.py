"""Re-rank a search's top candidates by spatial verification (``vision.local_features``).

The global descriptor proposes; local features confirm. Each candidate's consistent matches are counted and enough
of them mark it the same photo; where the model's recipe says so (``promote_matches``), candidates with that many
come first, most matches first, and the rest keep their global order. A candidate whose features are not stored (an
object indexed by an older model, or before its features were kept) stays unverified, in its global place.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from bucketlens.schemas import object_id
from vision import local_features
from vision.local_features import Features

from .backend import Index, Indexed

CANDIDATES = 20  # global top candidates verified per query (bench/README.md, "Quality": cost and gain)
BY_MATCHES = True  # verified candidates ordered by their matches (bench/README.md, "Quality": the sweep)


@dataclasses.dataclass(frozen=True)
class Hit:
    obj: Indexed
    score: float
    matches: int | None = None  # consistent local matches; None when not verified

    @property
    def verified(self) -> bool:
        """Enough matches to call it the same photo."""
        return self.matches is not None and self.matches >= local_features.COPY_MATCHES


def rerank(index: Index, hits: Sequence[tuple[Indexed, float]], views: Sequence[Features],
           promote: int | None) -> list[Hit]:
    """``hits`` best first by global score; ``views`` the query's features (the query and its mirror), matched
    against each candidate's own (its first stored view); ``promote``: the recipe's ``promote_matches``."""
    top = list(hits[:CANDIDATES])
    stored = index.features.views([(object_id(o.bucket, o.key), o.etag) for o, _ in top])
    checked = []
    for obj, score in top:
        candidate = stored.get(object_id(obj.bucket, obj.key))
        matches = local_features.best_inliers(list(views), candidate[0]) if candidate else None
        checked.append(Hit(obj, score, matches))
    if promote is not None:
        checked.sort(key=lambda h: rank_key(h.score, h.matches, promote))
    return checked + [Hit(obj, score) for obj, score in hits[CANDIDATES:]]


def rank_key(score: float, matches: int | None, min_matches: int, by_matches: bool = BY_MATCHES) -> tuple[int, float]:
    """Sort key of a verified search: verified candidates first, then the rest by global score. Among verified
    ones, most matches first, or (``by_matches`` False) the global order kept."""
    if matches is not None and matches >= min_matches:
        return (0, -float(matches) if by_matches else -score)
    return (1, -score)
