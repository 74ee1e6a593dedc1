"""The index contract: what the service asks of one generation of the index (``Index``) and of the store that
keeps generations (``Backend``), and the one factory that picks an implementation from the settings.

Two implementations: ``vector_index.py`` + ``faiss_backend.py`` (FAISS in this process, snapshots on local disk:
the embedded default) and ``milvus_index.py`` (a Milvus server: one collection per generation behind an alias).
``tests/test_backends.py`` runs the same contract against both. Ordering rules live here once (``verdict``), so
both backends discard, delete and resurrect by the same rule.

A generation's local features (``feature_store.py``) stay on the index service's disk with either backend.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from bucketlens.schemas import CONTENT_REASONS, ResultEntry, object_id
from vision import labels as vision_labels
from vision.labels import Labels

from .feature_store import FeatureStore
from .filters import Filter

if TYPE_CHECKING:
    import redis

    from bucketlens.keys import Keys
    from bucketlens.settings import Settings

log = logging.getLogger(__name__)

Tombstones = dict[str, tuple[int, float]]  # object id -> (order of the delete, when it was applied)


@dataclasses.dataclass(frozen=True)
class Indexed:
    """What the index holds for one object."""

    bucket: str
    key: str
    etag: str
    sequencer: str
    order: int
    generation: int
    pixels: int = 0  # width x height of the stored image (0: not known, e.g. indexed by an older worker)
    labels: Labels | None = None  # the classifier's most probable classes (None: model or worker had none)
    modified: float = 0.0  # when the object was written, seconds since the epoch (0: not known)


@dataclasses.dataclass
class ApplyStats:
    """What one batch did: its counts (read by the backends' contract tests) and its local features."""

    upserted: int = 0
    deleted: int = 0
    stale: int = 0
    rejected: int = 0
    # The batch's last word on each object's local features: (etag, bytes), or None to drop the row.
    features: dict[str, tuple[str, bytes] | None] = dataclasses.field(default_factory=dict)

    def write_features(self, store: FeatureStore) -> None:
        """The batch's local features, in one transaction (before its stream entries are acknowledged)."""
        puts = [(oid, *row) for oid, row in self.features.items() if row is not None]
        store.write(puts, [oid for oid, row in self.features.items() if row is None])

    def record(self, outcome: str, entry: ResultEntry) -> None:
        """Count one entry's ``verdict``."""
        oid = object_id(entry.bucket, entry.key)
        if outcome == "stale":
            self.stale += 1
        elif outcome == "reject":
            log.error("rejecting %r: model %r dim %s does not match the index", oid, entry.model,
                      None if entry.vector is None else entry.vector.shape)
            self.rejected += 1
        elif outcome == "delete":
            self.features[oid] = None
            self.deleted += 1
        elif outcome == "upsert":
            self.features[oid] = (entry.etag, entry.features) if entry.features else None
            self.upserted += 1


def verdict(entry: ResultEntry, held: int | None, tombstone: int | None, model: str, dim: int,
            held_etag: str = "") -> str:
    """What one stream entry does to an object whose live version has order ``held`` and etag ``held_etag`` and
    whose last delete had order ``tombstone`` (None: none): ``ignore`` (a worker's note), ``stale`` (older than
    what the index holds, or an upsert no newer than the delete that removed the object: it must not come back),
    ``reject`` (another model or dimension), ``delete`` or ``upsert``.

    A ``failed`` note of a newer version, of other bytes, deletes the one held: the key no longer holds that
    picture (it was overwritten by an empty file, a text, a truncated upload), and a result would show it under
    the key while its link serves the new bytes (an independent check). The same bytes under a higher order (a
    listing orders a version by its time in ms, its event by a sequencer; an identical re-upload) are the held
    picture itself, whose task failed for a passing reason: it stays. A version that failed by its content while
    nothing is held leaves a tombstone too (below it): an older version's upsert merged after it must not bring
    back a picture the key no longer holds (the older task downloaded before the overwrite, and finished last)."""
    if entry.op == "failed":
        if held is None:
            return "delete" if entry.reason in CONTENT_REASONS else "ignore"
        return "delete" if held < entry.order and held_etag != entry.etag else "ignore"
    if entry.op not in ("upsert", "delete"):
        return "ignore"
    if held is not None and held > entry.order:
        return "stale"
    if entry.op == "delete":
        return "delete"
    if tombstone is not None and tombstone >= entry.order:
        return "stale"
    if entry.vector is None or entry.vector.shape != (dim,) or entry.model != model:
        return "reject"
    return "upsert"


def tombstone_after(previous: int | None, entry: ResultEntry) -> tuple[int, float] | None:
    """The tombstone a delete leaves: its order (a failed version's: just below it, so that older versions stay
    out and that very version is indexed once a retry reads it), unless an earlier tombstone holds a newer one."""
    order = entry.order - 1 if entry.op == "failed" else entry.order
    if previous is not None and previous >= order:
        return None
    return order, time.time()


def decode_labels(oid: str, encoded: str) -> Labels | None:
    """A stream entry's labels; a malformed value is logged and the object kept without labels."""
    if not encoded:
        return None
    try:
        return vision_labels.decode(encoded)
    except ValueError as exc:
        log.error("%r: ignoring malformed labels %r: %s", oid, encoded[:100], exc)
        return None


def indexed(entry: ResultEntry) -> Indexed:
    """The object an applied upsert leaves in the index."""
    return Indexed(entry.bucket, entry.key, entry.etag, entry.sequencer, entry.order, entry.generation,
                   entry.pixels, decode_labels(object_id(entry.bucket, entry.key), entry.labels), entry.modified)


def upsert_of(obj: Indexed, vector: np.ndarray, generation: int, model: str, features: bytes = b"") -> ResultEntry:
    """The upsert that leaves ``obj`` in an index of ``generation`` (``indexed``'s inverse: labels and time kept)."""
    return ResultEntry("upsert", obj.bucket, obj.key, obj.etag, obj.sequencer, obj.order, generation, model, vector,
                       features, obj.pixels, "" if obj.labels is None else vision_labels.encode(obj.labels),
                       obj.modified)


TIES = 64  # at most this many more objects are fetched to cut those tied at the k-th score by name
Hits = list[tuple[Indexed, float]]


def nearest(fetch: Callable[[int], list[Hits]], k: int, exclude: Sequence[str | None]) -> list[Hits]:
    """The ``k`` best of each query, from ``fetch(n)`` (each query's ``n`` best, best first), without its object
    ``exclude[i]``; in score order and, among equal scores, by bucket and key. The objects tied at the k-th score are
    all fetched before the cut (up to ``TIES`` more), so that the cut is by name too: byte-identical copies score
    alike, and they came in the structure's own order, so k=1 answered one copy and k=2 two others (review 23)."""
    n = k + (1 if any(exclude) else 0) + 1  # one more than the cut needs: a tie across the cut shows
    while True:
        rows = fetch(n)
        kept = [[hit for hit in row if not skip or object_id(hit[0].bucket, hit[0].key) != skip]
                for row, skip in zip(rows, exclude)]
        if n >= k + TIES or not any(len(row) == n and len(hits) > k and row[-1][1] >= hits[k - 1][1]
                                    for row, hits in zip(rows, kept)):
            return [sorted(hits, key=lambda hit: (-hit[1], hit[0].bucket, hit[0].key))[:k] for hits in kept]
        n = min(2 * n, k + TIES)


class SearchOne:
    """``Index.search`` for both implementations: one query is a batch of one."""

    dim: int

    def search(self, query: np.ndarray, k: int, exclude: str | None = None, where: Filter | None = None
               ) -> list[tuple[Indexed, float]]:
        """The ``k`` nearest objects to one normalised query vector that ``where`` keeps, best first."""
        assert query.shape == (self.dim,), f"query has shape {query.shape}, index dim is {self.dim}"
        return self.search_many(query.reshape(1, -1), k, [exclude], where)[0]  # type: ignore[attr-defined]


class Index(Protocol):
    """One generation: vectors of one model, one per object, with each object's state and the tombstones.

    Searches run concurrently with ``apply`` and see each object either before or after a batch's change to it.
    """

    model: str
    dim: int
    generation: int
    index_type: str
    features: FeatureStore  # this generation's local features, on the service's disk

    def __len__(self) -> int: ...
    def apply(self, entries: Iterable[ResultEntry]) -> ApplyStats: ...
    def expire_tombstones(self, older_than_s: float) -> int: ...
    def get(self, bucket: str, key: str) -> Indexed | None: ...
    def etags(self, oids: Sequence[str]) -> dict[str, str]:
        """The etag of each of ``oids`` held live, in one read."""
        ...
    def buckets(self) -> set[str]: ...
    def objects(self) -> list[Indexed]: ...
    def tombstones(self) -> Tombstones: ...
    def vector(self, bucket: str, key: str) -> np.ndarray | None: ...
    def search(self, query: np.ndarray, k: int, exclude: str | None = None, where: Filter | None = None
               ) -> list[tuple[Indexed, float]]: ...
    def search_many(self, queries: np.ndarray, k: int, exclude: list[str | None] | None = None,
                    where: Filter | None = None) -> list[list[tuple[Indexed, float]]]: ...
    def text_search(self, wanted: Iterable[int], k: int, where: Filter | None = None
                    ) -> list[tuple[Indexed, float]]: ...
    def label_counts(self) -> dict[int, int]: ...
    def export(self) -> tuple[list[Indexed], np.ndarray, Tombstones]: ...
    def restructure(self, index_type: str, progress: Callable[[int], None] | None = None) -> None:
        """Into ``index_type``, with merges and searches going on; ``progress`` is told how many objects are in the
        new structure so far, as they move."""
        ...
    def file_bytes(self) -> int:
        """Bytes the index keeps on the service's disk outside snapshots and its feature store (IVF-SQ8's float16
        vectors, ``vector_file.py``; 0 for the others)."""
        ...
    def outgrown(self) -> bool:
        """The approximate structure was made for far fewer vectors than it holds: restructuring it into its own
        type makes it again for today's size (FAISS IVF's lists; never for Milvus, which indexes per segment)."""
        ...


def restructure_into(index: Index, approx_threshold: int, approximate: str, chosen: str | None = None) -> str | None:
    """The structure ``index`` should become now, if any: ``approximate`` above ``approx_threshold`` vectors,
    exact again below half of it, and its own type again once its lists are outgrown (4x the vectors they were
    made for: at 1M real-grown vectors, lists made at 50,000 took 17.1 ms p50 to search, lists made at 1M 10.9 ms,
    at the same recall; bench/README.md "The index as it grows"). A type a rebuild asked for (``chosen``) is kept
    whatever the size, and made again when outgrown, once the index holds a vector to train it on (an empty one, a
    rebuild's of an empty bucket, tried and failed with a traceback at each merge and twice a second idle)."""
    if chosen is not None:
        if chosen != "Flat" and not len(index):
            return None
        return chosen if index.index_type != chosen or index.outgrown() else None
    if index.index_type == "Flat":
        return approximate if len(index) > approx_threshold else None
    if len(index) < approx_threshold // 2:
        return "Flat"
    return index.index_type if index.outgrown() else None


class Backend(Protocol):
    """Where generations live and how they survive a restart."""

    name: str
    shared: bool  # several index service replicas can serve one index (each reads the same server)
    index_types: tuple[str, ...]  # what ``restructure`` and ``POST /rebuild``'s index_type accept
    approximate: str  # the type a generation is restructured into above ``approx_threshold`` vectors
    last: dict[str, Any] | None  # the newest checkpoint: time, count, last_id (``/stats``' last_snapshot)

    def load(self) -> tuple[Index, str] | None:
        """The serving generation and the last stream id it covers, or None when there is none yet."""
        ...

    def drop_abandoned(self, serving: Index) -> list[str]:
        """Free generations other than ``serving`` that a rebuild interrupted by a restart left; their names."""
        ...

    def new_generation(self, model: str, generation: int) -> Index:
        """An empty generation beside the serving one (the first one serves at once)."""
        ...

    def checkpoint(self, index: Index, last_id: str) -> None:
        """Make everything applied up to stream id ``last_id`` durable; the stream may then be trimmed to it."""
        ...

    def promote(self, old: Index, new: Index) -> None:
        """``new`` now serves (readers elsewhere see it too); ``old`` is retired."""
        ...

    def moved_from(self, current: Index) -> Index | None:
        """For a replica that does not write: the generation the shared index serves now, when the writer moved it
        off ``current`` (a rebuild's or a restructure's swap); else None."""
        ...

    def stopped_writing(self, index: Index) -> None:
        """This process lost the writer lease and only reads ``index`` from now on: what it kept of its own writes
        (a shared index's count) is no longer true."""
        ...

    def retire(self, old: Index) -> None:
        """Free what ``old`` still holds, now that the generation promoted over it is checkpointed (before, a restart
        may restore ``old``)."""
        ...

    def discard(self, index: Index) -> None:
        """An abandoned generation (cancelled or failed rebuild): free whatever it holds."""
        ...

    def problem(self) -> str | None:
        """Why the backend cannot serve now (its server unreachable), or None."""
        ...

    def close(self) -> None: ...


def open_backend(settings: Settings, redis: redis.Redis, keys: Keys, features: Callable[[int], FeatureStore],
                 s3: Any = None) -> Backend:
    """The backend ``settings.index_backend`` names (the only place that chooses one)."""
    if settings.index_backend == "faiss":
        from .faiss_backend import FaissBackend

        return FaissBackend(settings, features, s3)
    from .milvus_index import MilvusBackend  # pymilvus is imported only when Milvus is chosen (Settings checked it)

    return MilvusBackend(settings, redis, keys, features)
