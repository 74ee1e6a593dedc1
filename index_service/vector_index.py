"""One generation of the index: a FAISS inner-product index over L2-normalised vectors, plus per-object state.

Semantics (DESIGN.md, "Index semantics"): one vector per (bucket, key); a re-upload replaces; a delete
removes and leaves a tombstone with its order; an entry older than what the index holds is discarded.
All mutation happens under one lock, batch by batch, so a search never sees a half-applied batch.

Structures: ``Flat`` (exact scan; ``IndexIDMap2`` keeps id -> vector) or ``IVF`` (``IndexIVFFlat`` with a
hashtable direct map, so ``remove_ids`` and ``reconstruct`` work and deletes take effect at once).
``restructure`` swaps one for the other while merges continue: changes made during the build are
journalled and replayed onto the new structure before the swap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from typing import Any, Iterable, Iterator

import faiss
import numpy as np

from bucketlens.schemas import ResultEntry, object_id

from .feature_store import FeatureStore

log = logging.getLogger(__name__)


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


@dataclasses.dataclass
class ApplyStats:
    upserted: int = 0
    deleted: int = 0
    stale: int = 0
    rejected: int = 0
    settled: list[str] = dataclasses.field(default_factory=list)  # object ids upserted or deleted
    # The batch's last word on each object's local features: (etag, bytes), or None to drop the row.
    features: dict[str, tuple[str, bytes] | None] = dataclasses.field(default_factory=dict)


def ivf_lists(n: int) -> int:
    """Number of inverted lists for ``n`` vectors: ~4 sqrt(n), never more lists than vectors."""
    return int(max(1, min(65536, n, 4 * math.sqrt(max(n, 1)))))


def build_structure(index_type: str, dim: int, ids: np.ndarray, vectors: np.ndarray, nprobe: int = 0) -> Any:
    """A new FAISS structure holding ``vectors`` under ``ids`` (``Flat`` or ``IVF``; IVF trains on them)."""
    assert vectors.dtype == np.float32 and vectors.shape == (len(ids), dim), f"bad vectors {vectors.shape}"
    structure: Any
    if index_type == "Flat":
        structure = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif index_type == "IVF":
        if len(ids) == 0:
            raise ValueError("an IVF index is trained on the stored vectors, and there are none yet")
        nlist = ivf_lists(len(ids))
        structure = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = vectors[np.random.default_rng(0).choice(len(ids), min(len(ids), nlist * 64), replace=False)]
        structure.train(sample)
        structure.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]  # remove + reconstruct
        structure.nprobe = nprobe or default_nprobe(nlist)
    else:
        raise ValueError(f"unknown index type {index_type!r} (Flat or IVF)")
    if len(ids):
        structure.add_with_ids(vectors, ids)
    return structure


def set_search_threads(threads: int) -> None:
    """FAISS's OpenMP threads for this process. One query at a time scans faster on one thread when the cores
    are shared (measured: 100k x 1280 flat, 2 busy cores: p50 38 ms on 1 thread, 98 ms on 2); concurrency
    comes from the HTTP thread pool instead."""
    faiss.omp_set_num_threads(max(1, threads))


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: recall@10 >= 0.95 with p50 under 5 ms up to 1M vectors (README, "Scale")."""
    return min(nlist, max(16, nlist // 128))


class ReadWriteLock:
    """Many readers (searches, which run in parallel: FAISS releases the GIL) or one writer (a merge batch).

    Writers are preferred: a waiting merge stops new searches from starting, so a stream of queries cannot
    starve it. (A plain lock made 8 concurrent searches queue behind each other: bench/README.md.)"""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class VectorIndex:
    def __init__(self, model: str, dim: int, generation: int = 1, features: FeatureStore | None = None) -> None:
        self.model = model
        self.dim = dim
        self.generation = generation
        self.features = features if features is not None else FeatureStore()  # this generation's local features
        self.index_type = "Flat"
        self._faiss: Any = build_structure("Flat", dim, np.empty(0, np.int64), np.empty((0, dim), np.float32))
        self._ids: dict[str, int] = {}
        self._objects: dict[int, Indexed] = {}
        self._tombstones: dict[str, tuple[int, float]] = {}  # object id -> (order, time of delete)
        self._next_id = 1
        self._lock = ReadWriteLock()
        self._journal: list[tuple[str, int, np.ndarray | None]] | None = None  # set while restructuring

    def __len__(self) -> int:
        return len(self._ids)

    # -- merging -------------------------------------------------------------------------------------------

    def apply(self, entries: Iterable[ResultEntry]) -> ApplyStats:
        """Apply a batch atomically with respect to searches."""
        stats = ApplyStats()
        with self._lock.write():
            for entry in entries:
                self._apply_one(entry, stats)
            puts = [(oid, *row) for oid, row in stats.features.items() if row is not None]
            self.features.write(puts, [oid for oid, row in stats.features.items() if row is None])
        return stats

    def _apply_one(self, entry: ResultEntry, stats: ApplyStats) -> None:
        if entry.op not in ("upsert", "delete"):
            return  # a worker's failed/skipped note: nothing changes in the index
        oid = object_id(entry.bucket, entry.key)
        current_id = self._ids.get(oid)
        current = self._objects.get(current_id) if current_id is not None else None
        if current is not None and current.order > entry.order:
            stats.stale += 1
            return
        if entry.op == "delete":
            if current_id is not None:
                self._remove(oid, current_id)
            tombstone = self._tombstones.get(oid)
            if tombstone is None or tombstone[0] < entry.order:
                self._tombstones[oid] = (entry.order, time.time())
            stats.features[oid] = None
            stats.deleted += 1
            stats.settled.append(oid)
            return
        tombstone = self._tombstones.get(oid)
        if tombstone is not None and tombstone[0] >= entry.order:
            stats.stale += 1  # an older version arriving after the delete must not resurrect the object
            return
        if entry.vector is None or entry.vector.shape != (self.dim,) or entry.model != self.model:
            log.error("rejecting %s: model %r dim %s does not match index %r dim %d",
                      oid, entry.model, None if entry.vector is None else entry.vector.shape, self.model, self.dim)
            stats.rejected += 1
            return
        if current_id is not None:
            self._remove(oid, current_id)
        new_id = self._next_id
        self._next_id += 1
        vector = entry.vector.reshape(1, -1).astype(np.float32)
        self._faiss.add_with_ids(vector, np.array([new_id], dtype=np.int64))
        if self._journal is not None:
            self._journal.append(("add", new_id, vector))
        self._ids[oid] = new_id
        self._objects[new_id] = Indexed(entry.bucket, entry.key, entry.etag, entry.sequencer, entry.order,
                                        entry.generation, entry.pixels)
        stats.features[oid] = (entry.etag, entry.features) if entry.features else None
        self._tombstones.pop(oid, None)
        stats.upserted += 1
        stats.settled.append(oid)

    def _remove(self, oid: str, faiss_id: int) -> None:
        self._faiss.remove_ids(np.array([faiss_id], dtype=np.int64))
        if self._journal is not None:
            self._journal.append(("remove", faiss_id, None))
        del self._ids[oid]
        del self._objects[faiss_id]

    def expire_tombstones(self, older_than_s: float) -> int:
        cutoff = time.time() - older_than_s
        with self._lock.write():
            expired = [oid for oid, (_, when) in self._tombstones.items() if when < cutoff]
            for oid in expired:
                del self._tombstones[oid]
        return len(expired)

    # -- reading -------------------------------------------------------------------------------------------

    def get(self, bucket: str, key: str) -> Indexed | None:
        faiss_id = self._ids.get(object_id(bucket, key))
        return None if faiss_id is None else self._objects.get(faiss_id)

    def buckets(self) -> set[str]:
        with self._lock.read():
            return {obj.bucket for obj in self._objects.values()}

    def objects(self) -> list[Indexed]:
        with self._lock.read():
            return list(self._objects.values())

    def vector(self, bucket: str, key: str) -> np.ndarray | None:
        with self._lock.read():
            faiss_id = self._ids.get(object_id(bucket, key))
            return None if faiss_id is None else self._faiss.reconstruct(faiss_id)

    def search(self, query: np.ndarray, k: int, exclude: str | None = None) -> list[tuple[Indexed, float]]:
        """The ``k`` nearest objects to one normalised query vector, best first."""
        assert query.shape == (self.dim,), f"query has shape {query.shape}, index dim is {self.dim}"
        return self.search_many(query.reshape(1, -1), k, [exclude])[0]

    def search_many(self, queries: np.ndarray, k: int, exclude: list[str | None] | None = None
                    ) -> list[list[tuple[Indexed, float]]]:
        """One FAISS call for many queries (a flat scan reads the vectors once for all of them); ``exclude[i]``
        is an object id left out of query i's results."""
        assert queries.ndim == 2 and queries.shape[1] == self.dim, f"queries {queries.shape}, index dim {self.dim}"
        exclude = exclude or [None] * len(queries)
        with self._lock.read():
            n = len(self._ids)
            if n == 0:
                return [[] for _ in queries]
            want = min(n, k + (1 if any(exclude) else 0))
            scores, ids = self._faiss.search(np.ascontiguousarray(queries, dtype=np.float32), want)
            found = [[(self._objects[i], float(s)) for s, i in zip(row_s, row_i) if i in self._objects]
                     for row_s, row_i in zip(scores, ids)]
        return [[(obj, s) for obj, s in hits if not skip or object_id(obj.bucket, obj.key) != skip][:k]
                for hits, skip in zip(found, exclude)]

    # -- export, import, restructure -------------------------------------------------------------------------

    def export(self) -> tuple[list[Indexed], np.ndarray, dict[str, tuple[int, float]]]:
        """A consistent copy of objects, their vectors (same order) and tombstones, taken under the lock."""
        with self._lock.read():
            ids = np.fromiter(self._objects.keys(), dtype=np.int64, count=len(self._objects))
            objects = [self._objects[int(i)] for i in ids]
            vectors = self._faiss.reconstruct_batch(ids) if len(ids) else np.empty((0, self.dim), np.float32)
            return objects, np.ascontiguousarray(vectors, dtype=np.float32), dict(self._tombstones)

    @classmethod
    def from_export(cls, model: str, dim: int, generation: int, objects: list[Indexed], vectors: np.ndarray,
                    tombstones: dict[str, tuple[int, float]], index_type: str = "Flat",
                    features: FeatureStore | None = None) -> VectorIndex:
        index = cls(model, dim, generation, features)
        ids = np.arange(1, len(objects) + 1, dtype=np.int64)
        if not objects:
            index_type = "Flat"  # nothing to train an IVF index on
        index._faiss = build_structure(index_type, dim, ids, vectors)
        index.index_type = index_type
        index._objects = {int(i): obj for i, obj in zip(ids, objects)}
        index._ids = {object_id(obj.bucket, obj.key): int(i) for i, obj in zip(ids, objects)}
        index._tombstones = dict(tombstones)
        index._next_id = len(objects) + 1
        return index

    def restructure(self, index_type: str) -> None:
        """Rebuild the FAISS structure (e.g. Flat -> IVF) in the caller's thread while merges and searches go on."""
        with self._lock.write():
            if self._journal is not None:
                raise RuntimeError("a restructure is already running")
            ids = np.fromiter(self._objects.keys(), dtype=np.int64, count=len(self._objects))
            vectors = self._faiss.reconstruct_batch(ids) if len(ids) else np.empty((0, self.dim), np.float32)
            self._journal = []
        try:
            started = time.perf_counter()
            structure = build_structure(index_type, self.dim, ids, np.ascontiguousarray(vectors, np.float32))
        except BaseException:
            with self._lock.write():
                self._journal = None
            raise
        with self._lock.write():
            journal, self._journal = self._journal, None
            for op, faiss_id, vector in journal or []:  # what merged while the structure was built
                if op == "add":
                    structure.add_with_ids(vector, np.array([faiss_id], dtype=np.int64))
                else:
                    structure.remove_ids(np.array([faiss_id], dtype=np.int64))
            self._faiss = structure
            self.index_type = index_type
        log.info("index generation %d is now %s over %d vectors (built in %.1f s, %d changes replayed)",
                 self.generation, index_type, len(ids), time.perf_counter() - started, len(journal or []))
