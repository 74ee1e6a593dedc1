"""Re-rank a search's top candidates by spatial verification (``vision.local_features``).

The global descriptor proposes; local features confirm. Each candidate's consistent matches are counted and enough
of them mark it the same photo; where the model's recipe says so (``promote_matches``), candidates with that many
come first, most matches first, and the rest keep their global order. A candidate whose features are not stored (an
object indexed by an older model, or before its features were kept) stays unverified, in its global place.

The same bytes are the same photo whatever their keypoints: a smooth image (a clear sky, a gradient wallpaper) has
none to match, so its exact copies went unconfirmed. A candidate whose etag equals the query's (the MD5 of a query
image's bytes, or the etag of the object searched by key) counts ``local_features.IDENTICAL`` matches and comes first.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
    matches: int | None = None  # consistent local matches (IDENTICAL for the same bytes); None: not verified
    identical: bool = False  # the same bytes as the query (equal etags)

    @property
    def verified(self) -> bool:
        """Enough matches to call it the same photo."""
        return self.matches is not None and self.matches >= local_features.COPY_MATCHES


def rerank(index: Index, hits: Sequence[tuple[Indexed, float]], views: Sequence[Features],
           promote: int | None, etag: str = "") -> list[Hit]:
    """``hits`` best first by global score; ``views`` the query's features (the query and its mirror), matched
    against each candidate's own (its first stored view); ``promote``: the recipe's ``promote_matches``;
    ``etag``: the query's content (``content_etag`` of an image's bytes, a stored object's etag), "" if unknown."""
    top = list(hits[:CANDIDATES])
    stored = index.features.views([(object_id(o.bucket, o.key), o.etag) for o, _ in top])
    checked = []
    for obj, score in top:
        candidate, identical = stored.get(object_id(obj.bucket, obj.key)), same_bytes(etag, obj.etag)
        matches = evidence(views, etag, candidate or [], obj.etag) if candidate or identical else None
        checked.append(Hit(obj, score, matches, identical))
    if promote is not None:
        checked.sort(key=lambda h: rank_key(h.score, h.matches, promote))
    # The query's own bytes first, whatever the recipe promotes: their vector may differ a little (another runtime,
    # int8 workers: cosine ~0.997), and a look-alike must not pass them.
    checked.sort(key=lambda h: not h.identical)
    return checked + [Hit(obj, score) for obj, score in hits[CANDIDATES:]]


def content_etag(data: bytes) -> str:
    """The etag S3 gives these bytes uploaded in one part (their MD5), to compare with stored objects' etags."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def same_bytes(etag: str, other: str) -> bool:
    """Equal etags: the same content (an MD5, or a multipart upload's MD5 of its parts' MD5s)."""
    return bool(etag) and etag == other


def evidence(views: Sequence[Features], etag: str, candidate: Sequence[Features], candidate_etag: str) -> int:
    """How strongly a candidate is the same photo: ``local_features.IDENTICAL`` for the same bytes, else the
    consistent local matches of ``views`` (an image's, or a stored object's) with the candidate's first view."""
    if same_bytes(etag, candidate_etag):
        return local_features.IDENTICAL
    return local_features.best_inliers(list(views), candidate[0]) if candidate else 0


def rank_key(score: float, matches: int | None, min_matches: int, by_matches: bool = BY_MATCHES) -> tuple[int, float]:
    """Sort key of a verified search: verified candidates first, then the rest by global score. Among verified
    ones, most matches first, or (``by_matches`` False) the global order kept."""
    if matches is not None and matches >= min_matches:
        return (0, -float(matches) if by_matches else -score)
    return (1, -score)
