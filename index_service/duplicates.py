"""Near-duplicate groups, maintained as objects arrive, so ``GET /duplicates`` reads groups instead of searching
everything per request.

For each new or changed object of the serving generation, its nearest neighbours by global score (one batched
FAISS search for many objects; 20, and 20 more where the 20th is a copy too: ``find_pairs``) are proposed, and
spatial verification confirms them: enough consistent ORB matches between the object's stored views (itself and its
mirror) and the neighbour's own. Objects of the same bytes (equal etags) need no verification and no pair: the
store lists them (``FeatureStore.identical``), and ``groups`` links each such set whole, so exact copies of an
image without keypoints are grouped too, and a set of more copies than a search proposes is not split.
Confirmed pairs live in the generation's feature store (``feature_store.py``), which drops an object's pairs
whenever the object changes or goes; groups are stars around each group's best copy, computed per request (pairs
are few next to objects): ``groups``.

Verification is the service's heaviest work (~0.3 CPU-seconds per object on busy photo sets: ORB matching and
RANSAC against every proposed neighbour), so while objects keep arriving the finder keeps to a share of one core
(``duplicates_cpu_share``) and leaves the rest to the workers and searches; once the index is quiet it runs freely
and catches up (``pending`` in ``/stats`` and ``/duplicates`` says how far behind it is). Objects arrive while
batches were merged in the last ``ARRIVING_S`` or while tasks wait in a queue or in a worker's hands (``busy``):
merges alone leave gaps of a whole task's embedding, and in those gaps the finder once ran freely through a reembed
(0.55 of a core, against its share of 0.25).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable, Sequence

import numpy as np

from bucketlens.outage import Outage
from bucketlens.schemas import object_id
from vision import local_features

from .backend import Index, Indexed
from .feature_store import ONE_TO_ONE
from .verify import CANDIDATES, evidence, same_bytes

log = logging.getLogger(__name__)
NEIGHBOURS = CANDIDATES  # proposed per object: as many as a search verifies
# ... and up to this many, for a photo with more copies than that: with 20 proposed, a copy whose neighbours were all
# other copies never met the rest (the web page test's photo and its flipped copy, 25-33 apart late in the whole
# suite). Each further neighbour costs a verification (~5 ms): at most 2x an object's usual cost, paid where its
# nearest 20 are all copies (a set of 1,000 views of each of 20 photos pays it for every object, and is grouped in
# parts: 80 was 4x there, and still split a photo of 150 copies: review 64)
MOST_NEIGHBOURS = 40
MIN_SCORE = 0.2  # global score (centred descriptor) below which a neighbour is not proposed: hard copies score ~0.35
BATCH = 64  # objects per round (one FAISS call) when quiet: ~20 s of verification (up to 2x: MOST_NEIGHBOURS)
ARRIVING_BATCH = 8  # ... while objects arrive: a round then costs seconds, not minutes, before its rest
ARRIVING_S = 5.0  # objects merged this recently: ingest is running, so the finder keeps to its CPU share
# Default links of a group: the matches that say "the same photo". Pairs are kept from
# ``local_features.MIN_INLIERS`` up, so a caller may ask for looser groups.
GROUP_MATCHES = local_features.COPY_MATCHES


class DuplicateFinder:
    """Runs in its own thread; ``wake`` after a merge batch. ``index`` returns the serving generation.
    ``cpu_share``: the share of one core the thread may use while objects arrive (1: no limit); ``busy``: whether
    objects are on their way though none was merged lately (tasks queued or being embedded); ``active``: whether this
    process looks at all (a replica of a shared index that does not write leaves it to the writer)."""

    def __init__(self, index: Callable[[], Index], cpu_share: float = 1.0,
                 busy: Callable[[], bool] = lambda: False, active: Callable[[], bool] = lambda: True) -> None:
        if not 0 < cpu_share <= 1:
            raise ValueError(f"duplicates_cpu_share must be above 0 and at most 1, not {cpu_share}")
        self.index = index
        self.cpu_share = cpu_share
        self.busy = busy
        self.active = active
        # Object id -> etag still to check, in the generation below: what arrived since it was seen first (a copy
        # just uploaded waited behind a reembed's whole backlog, minutes: an independent check), then the rest,
        # oldest written first. Each round takes half its objects from the newest: the arrivals, latest first, then
        # the rest, latest written first (a copy uploaded after a bulk import's thousands waited behind all of them,
        # and after a rebuild's swap or a restart, when everything unchecked is the rest). The other half goes
        # oldest first, through the arrivals, then the rest: every object moves.
        self.arrivals: dict[str, str] = {}
        self.backlog: dict[str, str] = {}
        self.checking = 0  # objects of the round in progress
        self.generation = -1
        self.checked_objects = 0
        self.cpu_s = 0.0  # this thread's CPU time in its rounds (``/stats``: what it took from the cores)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._arrived = -ARRIVING_S  # monotonic time of the last merge (``arriving``)
        self._outage = Outage(log, "looking for duplicates works again")
        self._thread = threading.Thread(target=self._run, name="duplicates", daemon=True)

    @property
    def pending(self) -> int:
        """How many objects are still to check (the three are disjoint)."""
        return len(self.arrivals) + len(self.backlog) + self.checking

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def wake(self, changed: Sequence[tuple[str, str]] = ()) -> None:
        """``changed``: ``(object id, etag)`` upserted in the serving generation since the last call."""
        with self._lock:
            for oid, etag in changed:
                self.backlog.pop(oid, None)
                self.arrivals.pop(oid, None)  # (a new version is the newest arrival: review 64)
                self.arrivals[oid] = etag
        if changed:
            self.arriving()
        self._wake.set()

    def arriving(self) -> None:
        """Objects are being merged, into the serving generation or a rebuild's shadow: ingest or a reembed
        needs the cores, so for the next ``ARRIVING_S`` the finder keeps to its CPU share."""
        self._arrived = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=5.0)
            self._wake.clear()
            if not self.active():  # (a former writer checked every object again beside the new one: review 21)
                self.generation = -1  # active again, it finds what the other writer left unchecked meanwhile
                continue
            try:
                while not self._stop.is_set():
                    began = time.thread_time()
                    checked = self.step(BATCH if self._quiet() else ARRIVING_BATCH)
                    spent = time.thread_time() - began
                    self.cpu_s += spent
                    if not checked:
                        break
                    self._stop.wait(self.pause(spent))
            except Exception:  # said once, not every few seconds while the index server is away
                self._outage.failed("looking for duplicates failed; trying again every few seconds (said once)")
            else:
                self._outage.worked()

    def pause(self, spent_s: float) -> float:
        """Seconds to rest after a step that took ``spent_s`` of this thread's CPU: enough to keep to the share
        while objects arrive, none when the index is quiet."""
        return 0.0 if self._quiet() else spent_s * (1 - self.cpu_share) / self.cpu_share

    def _quiet(self) -> bool:
        return self.cpu_share >= 1 or (time.monotonic() - self._arrived > ARRIVING_S and not self.busy())

    def step(self, limit: int = BATCH) -> int:
        """Check up to ``limit`` pending objects; returns how many were checked."""
        index = self.index()
        if index.generation != self.generation:  # start, or a rebuild swapped: whatever is unchecked is pending
            self._look_again(index)
        with self._lock:  # half the newest pending (arrivals, then the backlog's latest), then the oldest
            newest = list(itertools.islice(itertools.chain(reversed(self.arrivals.items()),
                                                           reversed(self.backlog.items())), (limit + 1) // 2))
            arrived = self._take(newest)
            oldest = list(itertools.islice(itertools.chain(self.arrivals.items(), self.backlog.items()),
                                           limit - len(newest)))
            arrived |= self._take(oldest)
            batch = newest + oldest
            self.checking = len(batch)  # (a round of objects with many copies takes a while: review 64)
        if not batch:
            return 0
        try:
            objects = [o for oid, etag in batch if (o := _current(index, oid, etag)) is not None]
            pairs = find_pairs(index, objects)
            index.features.add_pairs([(object_id(o.bucket, o.key), o.etag) for o in objects], pairs)
        except Exception:  # the index server away (Milvus restarting): checked later, not dropped (every retry took
            # another batch, and a Milvus restart left identical copies ungrouped for good: an independent check)
            self._put_back(newest, oldest, arrived)
            raise
        finally:
            self.checking = 0
        self.checked_objects += len(objects)
        return len(batch)

    def _look_again(self, index: Index) -> None:
        """At a start or a rebuild's swap, whatever of ``index`` is unchecked is pending: the arrivals still current,
        then the rest, oldest written first (unknown times first). The index is asked outside the lock (a Milvus
        collection's scan, which ``wake`` waited on in the merger), and the generation is taken on only once it
        answered (a scan that failed, Milvus not loaded yet after a start, left nothing pending for good)."""
        if index.features.pairs_version < ONE_TO_ONE:
            recount(index)
        checked = index.features.checked()
        with self._lock:
            seen = dict(self.arrivals)
        gone = {oid for oid, etag in seen.items() if checked.get(oid) == etag or _current(index, oid, etag) is None}
        written = [(object_id(o.bucket, o.key), o.etag) for o in sorted(index.objects(), key=lambda o: o.modified)]
        with self._lock:  # (what arrived meanwhile stays)
            self.arrivals = {oid: etag for oid, etag in self.arrivals.items() if oid not in gone or seen[oid] != etag}
            self.backlog = {oid: etag for oid, etag in written if checked.get(oid) != etag and oid not in self.arrivals}
            self.generation = index.generation

    def _put_back(self, newest: list[tuple[str, str]], oldest: list[tuple[str, str]], arrived: set[str]) -> None:
        """A failed round's objects, back where they were taken from: the newest at the end, the oldest at the
        front (all at the end, a restart's retries took the oldest for the latest uploads). A newer version that
        arrived meanwhile stays where it is."""
        with self._lock:
            woken = set(self.arrivals)

            def part(items: list[tuple[str, str]], arrivals: bool) -> list[tuple[str, str]]:
                return [(oid, etag) for oid, etag in items if (oid in arrived) == arrivals and oid not in woken]

            self.arrivals = dict(part(oldest, True) + list(self.arrivals.items()) + part(newest[::-1], True))
            self.backlog = dict(part(oldest, False) + list(self.backlog.items()) + part(newest[::-1], False))

    def _take(self, items: list[tuple[str, str]]) -> set[str]:
        """Take ``items`` out of the arrivals or the backlog; returns those that were arrivals."""
        arrived = set()
        for oid, _ in items:
            if self.arrivals.pop(oid, None) is None:
                del self.backlog[oid]
            else:
                arrived.add(oid)
        return arrived


def _current(index: Index, oid: str, etag: str) -> Indexed | None:
    obj = index.get(*oid.split("/", 1))
    return obj if obj is not None and obj.etag == etag else None


def recount(index: Index) -> None:
    """Count the matches of pairs stored by an older count (``feature_store.PAIRS_VERSION``) again, as
    ``find_pairs`` counts them now; pairs that no longer reach ``MIN_INLIERS`` go."""
    started = time.monotonic()
    stale = index.features.pairs()
    etags = {oid: obj.etag for a, b, _ in stale for oid in (a, b) if (obj := index.get(*oid.split("/", 1)))}
    stored = index.features.views(sorted(etags.items()))
    recounted = [(a, b, evidence(stored[a], etags[a], stored[b], etags[b]) if a in stored and b in stored else 0)
                 for a, b, _ in stale]
    dropped = index.features.recount_pairs(recounted)
    log.info("counted the matches of %d duplicate pairs again (%.1f s): %d were not copies", len(stale),
             time.monotonic() - started, dropped)


def find_pairs(index: Index, objects: list[Indexed],
               min_score: float = MIN_SCORE) -> list[tuple[str, str, int, str]]:
    """Confirmed ``(object id, object id, matches, the second's etag)`` between each of ``objects`` and its
    neighbours. Objects indexed without local features (an older model) have nothing to verify with and are not
    searched for. Each is verified against its ``NEIGHBOURS`` nearest, then, if the furthest of those is a copy too
    (it may have more copies than were proposed), the next ones, twice as many each time, up to ``MOST_NEIGHBOURS``."""
    stored = index.features.views([(object_id(o.bucket, o.key), o.etag) for o in objects])
    known = [(o, v) for o in objects
             if object_id(o.bucket, o.key) in stored and (v := index.vector(o.bucket, o.key)) is not None]
    if not known:
        return []
    ids = [object_id(o.bucket, o.key) for o, _ in known]
    neighbours = index.search_many(np.stack([v for _, v in known]), MOST_NEIGHBOURS, list(ids))
    todo = [(obj, oid, hits) for (obj, _), oid, hits in zip(known, ids, neighbours)]
    pairs = []
    start, end = 0, NEIGHBOURS
    while todo and start < MOST_NEIGHBOURS:
        proposed = [[(o, s) for o, s in hits[start:end] if s >= min_score] for _, _, hits in todo]
        wanted = {(object_id(o.bucket, o.key), o.etag) for hits in proposed for o, _ in hits}
        stored |= index.features.views(sorted(w for w in wanted if w[0] not in stored))
        deeper = []
        for (obj, oid, hits), near in zip(todo, proposed):
            matches = 0
            for other, _ in near:
                other_id = object_id(other.bucket, other.key)
                matches = evidence(stored[oid], obj.etag, stored[other_id], other.etag) if other_id in stored else 0
                if matches >= local_features.MIN_INLIERS and not same_bytes(obj.etag, other.etag):
                    pairs.append((oid, other_id, matches, other.etag))  # (the same bytes: linked by ``groups``)
            if len(near) == end - start and matches >= local_features.MIN_INLIERS:  # the furthest was a copy too
                deeper.append((obj, oid, hits))
        todo, start, end = deeper, end, end * 2
    return pairs


@dataclasses.dataclass
class Group:
    members: list[Indexed]  # the best copy (``_best_first``) first, then the others, most pixels first
    pairs: int  # links from the copy the group was formed around (the most pixels)
    matches: int  # the weakest of those links' matches


NEAR_PIXELS = 0.03  # copies within this share of the most pixels count as large: of those, the oldest is the best


def _best_first(members: list[Indexed]) -> list[Indexed]:
    """``members`` (most pixels first) with the best copy first: of those within ``NEAR_PIXELS`` of the most, the
    oldest, most often the original. A JPEG at quality 40 of a 512x512 PNG kept 242,688 pixels past the border
    trim against the PNG's 239,616, and was "best" (review 59); unknown times count as the newest."""
    most = members[0].pixels
    best = min((held for held in members if held.pixels >= most * (1 - NEAR_PIXELS)),
               key=lambda held: held.modified or float("inf"))
    return [best] + [held for held in members if held is not best]


def groups(index: Index, min_matches: int, bucket: str | None = None, prefix: str = "") -> list[Group]:
    """Groups of copies among the objects of ``bucket`` under ``prefix``, largest first.

    Not connected components: on a real bucket one false link (two wallpapers of one series, two crops whose
    fill corners line up) would chain unrelated groups into one. Each group is a star around its best copy:
    objects are taken by pixels, most first (the oldest first of equal ones); each one not yet grouped anchors a
    group of its directly linked, not yet grouped copies. Objects of the same bytes are linked to one another
    (``FeatureStore.identical``: 0.3 s at 1M objects)."""
    looked: dict[str, Indexed | None] = {}  # each object asked once (a Milvus query each), and only if selected

    def chosen(oid: str) -> Indexed | None:
        if oid not in looked:
            in_bucket, _, key = oid.partition("/")  # (a bucket name has no "/")
            wanted = (bucket is None or in_bucket == bucket) and key.startswith(prefix)
            looked[oid] = index.get(in_bucket, key) if wanted else None
        return looked[oid]

    links: dict[str, dict[str, int]] = {}
    for a, b, matches in index.features.pairs(min_matches):
        if chosen(a) is not None and chosen(b) is not None:
            links.setdefault(a, {})[b] = matches
            links.setdefault(b, {})[a] = matches
    # Each object -> the objects of its bytes (itself too): linked to all of them, as one set (not a link each:
    # 10,000 uploads of one placeholder would be 10^8). The index's etag, not only the store's, says which bytes.
    same: dict[str, set[str]] = {}
    within = f"{bucket}/{prefix}" if bucket is not None else ""
    for etag, oids in index.features.identical(within).items() if min_matches <= local_features.IDENTICAL else []:
        if len(kept := {oid for oid in oids if (obj := chosen(oid)) is not None and obj.etag == etag}) > 1:
            same.update(dict.fromkeys(kept, kept))
    selected = {oid: obj for oid, obj in looked.items() if obj is not None}

    def best_first(oid: str) -> tuple[int, float, str]:  # of equal pixels, the oldest: most often the original (by
        # key, "copies/astronaut_desat.webp" was the best over "samples/astronaut.png": review 57); unknown times last
        held = selected[oid]
        return -held.pixels, held.modified or float("inf"), oid

    grouped: set[str] = set()
    found = []
    for anchor in sorted(links.keys() | same.keys(), key=best_first):
        if anchor in grouped:
            continue
        linked = dict.fromkeys(same.get(anchor, ()), local_features.IDENTICAL) | links.get(anchor, {})
        for oid, matches in list(linked.items()):  # a copy's identical files are copies as much (review 84: an
            linked |= {other: matches for other in same.get(oid, ()) if other not in linked}  # original linked to
            # 40 of 100 identical JPEGs took those, and the rest were a second group)
        copies = sorted((oid for oid in linked if oid not in grouped and oid != anchor), key=best_first)
        if copies:
            grouped.update([anchor, *copies])
            found.append(Group(_best_first([selected[anchor]] + [selected[oid] for oid in copies]), len(copies),
                               min(linked[oid] for oid in copies)))
    return sorted(found, key=lambda g: (-len(g.members), g.members[0].bucket, g.members[0].key))
