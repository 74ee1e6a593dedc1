"""Re-rank a search's top candidates by spatial verification (``vision.local_features``).

The global descriptor proposes; local features confirm. Each candidate's consistent matches are counted and enough
of them mark it the same photo; where the model's recipe says so (``promote_matches``), candidates with that many
come first, most matches first, and the rest keep their global order. A candidate whose features are not stored (an
object indexed by an older model, or before its features were kept) stays unverified, in its global place.

The same bytes are the same photo whatever their keypoints: a smooth image (a clear sky, a gradient wallpaper) has
none to match, so its exact copies went unconfirmed. A candidate whose etag equals the query's (the MD5 of a query
image's bytes, or the etag S3 gives them uploaded in parts of a usual size; or the etag of the object searched by
key) counts ``local_features.IDENTICAL`` matches and comes first.
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
           promote: int | None, etag: Content = "") -> list[Hit]:
    """``hits`` best first by global score; ``views`` the query's features (the query and its mirror), matched
    against each candidate's own (its first stored view); ``promote``: the recipe's ``promote_matches``;
    ``etag``: the query's content (an image's bytes, a stored object's etag), "" if unknown."""
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


MIB = 1024 * 1024
# The part sizes S3 clients upload in: rclone 5 MiB, the AWS CLI and boto3 8, s3cmd 15, MinIO's mc and minio-go 16,
# then the larger ones that big files get.
PART_SIZES = tuple(size * MIB for size in (5, 8, 15, 16, 32, 64, 100, 128))


class QueryBytes:
    """A query image's bytes, against stored objects' etags: S3 names bytes uploaded in one part by their MD5, and
    bytes uploaded in parts by the MD5 of the parts' MD5s and their count ("<md5>-2"). A file over 8 MB sent by the
    AWS CLI or boto3 was never ``identical`` to itself (review 61). A part size is tried where it gives the etag's
    count of parts for these bytes (each one read once, at most)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        self._in_parts: dict[int, str] = {}  # part size -> the etag of these bytes uploaded in parts of it

    def named(self, etag: str) -> bool:
        """Whether S3 could have given these bytes ``etag``."""
        if etag == self.md5:
            return True
        digest, dash, count = etag.partition("-")
        if not (dash and count.isdigit() and len(digest) == 32):
            return False
        parts, size = int(count), len(self.data)
        return any(self._in_parts_of(part) == etag for part in PART_SIZES if (parts - 1) * part < size <= parts * part)

    def _in_parts_of(self, part: int) -> str:
        if part not in self._in_parts:
            digests = b"".join(hashlib.md5(self.data[start : start + part], usedforsecurity=False).digest()
                               for start in range(0, len(self.data), part))
            self._in_parts[part] = f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(digests) // 16}"
        return self._in_parts[part]


Content = str | QueryBytes  # a query's content: a stored object's etag, or an image's bytes


def same_bytes(content: Content, other: str) -> bool:
    """The same content: an image's bytes that S3 could name ``other``, or equal etags (an MD5, or a multipart
    upload's MD5 of its parts' MD5s)."""
    if isinstance(content, QueryBytes):
        return content.named(other)
    return bool(content) and content == other


def evidence(views: Sequence[Features], etag: Content, candidate: Sequence[Features], candidate_etag: str) -> int:
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
