"""Near-duplicate groups, maintained as objects arrive, so ``GET /duplicates`` reads groups instead of searching
everything per request.

For each new or changed object of the serving generation, its nearest neighbours by global score (one batched
FAISS search for many objects) are proposed, and spatial verification confirms them: enough consistent ORB
matches between the two stored feature sets. Stored features are of the image itself, so a mirrored copy cannot
match them; when a neighbour is very close by the (mirror-invariant) global score but does not verify, the new
object is fetched once and its mirror's features are matched too. Confirmed pairs live in the generation's
feature store (``feature_store.py``), which drops an object's pairs whenever the object changes or goes; groups
are the connected components of the pairs, computed per request (pairs are few next to objects).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Callable, Sequence

import numpy as np

from bucketlens.schemas import object_id
from vision import local_features
from vision.local_features import Features

from .vector_index import Indexed, VectorIndex

log = logging.getLogger(__name__)
NEIGHBOURS = 10  # proposed per object
MIN_SCORE = 0.5  # global score below which a neighbour is not even proposed
MIRROR_SUSPECT = 0.9  # above this, an unverified neighbour is tried against the object's mirror
BATCH = 256  # objects per round (one FAISS call)

FetchMirror = Callable[[Indexed], "Features | None"]


class DuplicateFinder:
    """Runs in its own thread; ``wake`` after a merge batch. ``index`` returns the serving generation."""

    def __init__(self, index: Callable[[], VectorIndex], fetch_mirror: FetchMirror) -> None:
        self.index = index
        self.fetch_mirror = fetch_mirror
        self.pending: dict[str, str] = {}  # object id -> etag still to check, in the generation below
        self.generation = -1
        self.checked_objects = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="duplicates", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def wake(self, changed: Sequence[tuple[str, str]] = ()) -> None:
        """``changed``: ``(object id, etag)`` upserted in the serving generation since the last call."""
        with self._lock:
            self.pending.update(changed)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=5.0)
            self._wake.clear()
            try:
                while not self._stop.is_set() and self.step():
                    pass
            except Exception:
                log.exception("looking for duplicates failed; trying again at the next merge")

    def step(self) -> int:
        """Check one batch of pending objects; returns how many were checked."""
        index = self.index()
        if index.generation != self.generation:  # start, or a rebuild swapped: whatever is unchecked is pending
            checked = index.features.checked()
            with self._lock:
                self.generation = index.generation
                self.pending = {object_id(o.bucket, o.key): o.etag for o in index.objects()
                                if checked.get(object_id(o.bucket, o.key)) != o.etag}
        with self._lock:
            batch = list(self.pending.items())[:BATCH]
            for oid, _ in batch:
                del self.pending[oid]
        if not batch:
            return 0
        objects = [o for oid, etag in batch if (o := _current(index, oid, etag)) is not None]
        pairs = find_pairs(index, objects, self.fetch_mirror)
        index.features.add_pairs([(object_id(o.bucket, o.key), o.etag) for o in objects], pairs)
        self.checked_objects += len(objects)
        return len(batch)


def _current(index: VectorIndex, oid: str, etag: str) -> Indexed | None:
    obj = index.get(*oid.split("/", 1))
    return obj if obj is not None and obj.etag == etag else None


def find_pairs(index: VectorIndex, objects: list[Indexed], fetch_mirror: FetchMirror) -> list[tuple[str, str, int]]:
    """Confirmed ``(object id, object id, matches)`` between each of ``objects`` and its neighbours."""
    vectors = [index.vector(o.bucket, o.key) for o in objects]
    known = [(o, v) for o, v in zip(objects, vectors) if v is not None]
    if not known:
        return []
    ids = [object_id(o.bucket, o.key) for o, _ in known]
    neighbours = index.search_many(np.stack([v for _, v in known]), NEIGHBOURS, list(ids))
    wanted = {(object_id(o.bucket, o.key), o.etag) for hits in neighbours for o, s in hits if s >= MIN_SCORE}
    wanted |= {(oid, o.etag) for oid, (o, _) in zip(ids, known)}
    stored = index.features.get(sorted(wanted))
    pairs = []
    for oid, (obj, _), hits in zip(ids, known, neighbours):
        if oid not in stored:
            continue  # indexed without local features (an older model): nothing to verify with
        views = [local_features.decode(stored[oid])]
        for other, score in hits:
            other_id = object_id(other.bucket, other.key)
            if score < MIN_SCORE or other_id not in stored:
                continue
            candidate = local_features.decode(stored[other_id])
            matches = local_features.best_inliers(views, candidate)
            if matches < local_features.MIN_INLIERS and score >= MIRROR_SUSPECT and len(views) == 1:
                mirror = fetch_mirror(obj)
                if mirror is not None:
                    views.append(mirror)
                    matches = local_features.best_inliers(views, candidate)
            if matches >= local_features.MIN_INLIERS:
                pairs.append((oid, other_id, matches))
    return pairs


@dataclasses.dataclass
class Group:
    members: list[Indexed]  # best copy (most pixels) first
    pairs: int
    matches: int  # the weakest confirmed link's matches


def groups(index: VectorIndex, min_matches: int, bucket: str | None = None, prefix: str = "") -> list[Group]:
    """Connected components of the confirmed pairs, members filtered by bucket and key prefix (a group keeps at
    least two members), largest groups first."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    weakest: dict[str, int] = {}
    links: dict[str, int] = {}
    pairs = index.features.pairs(min_matches)
    for a, b, _ in pairs:
        parent[root(a)] = root(b)
    for a, _, matches in pairs:
        r = root(a)
        weakest[r] = min(weakest.get(r, matches), matches)
        links[r] = links.get(r, 0) + 1
    members: dict[str, list[Indexed]] = {}
    for oid in parent:
        obj = index.get(*oid.split("/", 1))
        if obj is not None and (bucket is None or obj.bucket == bucket) and obj.key.startswith(prefix):
            members.setdefault(root(oid), []).append(obj)
    found = [Group(sorted(objs, key=lambda o: (-o.pixels, o.key)), links[r], weakest[r])
             for r, objs in members.items() if len(objs) >= 2]
    return sorted(found, key=lambda g: (-len(g.members), g.members[0].bucket, g.members[0].key))
